#!/usr/bin/env bash
# A one-host Ceph cluster for rvhost's rbd bdev tests, from Debian's ceph packages (scripts/setup.sh
# installs them): one monitor, one manager, 1 or 2 memstore OSDs, all bound to 127.0.0.1, cephx on,
# a pool `rbd`. Every file (config, keyrings, monitor store, logs, PID files) lives in DIR; the
# daemons run in the foreground of their own background processes (no systemd) and are stopped by
# the PIDs recorded there.
#
#   scripts/ceph-cluster.sh start DIR [--osds 1|2]   # up, pool rbd created, every PG active+clean
#   scripts/ceph-cluster.sh stop DIR                 # stops every daemon of DIR by its PID
#   scripts/ceph-cluster.sh status DIR               # `ceph -s` of the cluster
#   scripts/ceph-cluster.sh kill-osd DIR ID          # SIGKILL one OSD (fault tests)
#   scripts/ceph-cluster.sh start-osd DIR ID         # start it again (memstore: it comes back
#                                                    # empty and is backfilled from its peer)
#
# Clients use DIR/ceph.conf (`ceph -c DIR/ceph.conf`, `rbd -c DIR/ceph.conf`, or rvhost's
# `bdev_rbd_register_cluster --config-file DIR/ceph.conf --key-file DIR/ceph.client.admin.keyring`).
# DIR/mon_host and DIR/admin.key hold the monitor address and client.admin's secret for
# configurations given as key=value pairs (`mon_host`, `key`).
#
# With 2 OSDs the pool has size 2 and min_size 1, so one OSD may die without stopping I/O.
set -euo pipefail

usage() {
  sed -n '2,20p' "$0" >&2
  exit 2
}

[ $# -ge 2 ] || usage
cmd=$1
dir=$2
shift 2

# The daemons must not see a client's settings (a CEPH_KEYRING or CEPH_ARGS meant for a client
# breaks their cephx).
unset CEPH_KEYRING CEPH_ARGS CEPH_CONF

ceph_cli() { timeout 10 ceph -c "$dir/ceph.conf" "$@"; }

# Starts a daemon in the background with its output in DIR/log and its PID in DIR/run.
spawn() {
  local name=$1
  shift
  setsid "$@" -f -c "$dir/ceph.conf" </dev/null >>"$dir/log/$name.out" 2>&1 &
  echo $! >"$dir/run/$name.pid"
}

# A TCP port on 127.0.0.1 no socket uses, below the kernel's ephemeral range (32768 and up), so
# no client connection takes it between the check and the monitor's bind.
free_port() {
  local port
  for _ in $(seq 1 100); do
    port=$((10000 + RANDOM % 20000))
    if ! ss -Htan "sport = :$port" | grep -q .; then
      echo "$port"
      return
    fi
  done
  echo "ceph-cluster: no free port found" >&2
  exit 1
}

# Daemon NAME's own reason for stopping or stalling: the last lines of its standard output and
# error, and the last errors (level -1 lines) of its log.
log_tail() {
  local name=$1 out=$dir/log/$1.out log=$dir/log/$1.log
  if [ -s "$out" ]; then
    echo "--- last lines of $out:" >&2
    tail -n 10 "$out" >&2
  fi
  if grep -q -- ' -1 ' "$log" 2>/dev/null; then
    echo "--- last errors in $log:" >&2
    grep -A2 -- ' -1 ' "$log" | tail -n 10 >&2
  fi
}

# Sets `status` to ", exit status N (what N means as an errno, which is how Ceph daemons exit)"
# for daemon NAME, a child of this script that has ended (its error line does not always reach
# its output before it exits), or to nothing.
exit_status() {
  local pid code
  status=
  pid=$(cat "$dir/run/$1.pid" 2>/dev/null) || return 0
  code=0
  wait "$pid" 2>/dev/null || code=$?
  [ "$code" -eq 127 ] && return 0 # not a child of this shell
  status=", exit status $code"
  if [ "$code" -gt 1 ] && [ "$code" -lt 128 ]; then
    status="$status ($(python3 -c 'import errno, os, sys; n = int(sys.argv[1]); print("%s: %s" % (errno.errorcode.get(n, "?"), os.strerror(n)))' "$code"))"
  elif [ "$code" -ge 128 ]; then
    status="$status (signal $((code - 128)))"
  fi
}

# wait_for WHAT SECONDS [--daemon NAME] COMMAND...: runs COMMAND until it succeeds. With
# --daemon, gives up as soon as that daemon (its PID file in DIR/run) has exited, and prints
# its log tail then or at the time-out.
wait_for() {
  local what=$1 seconds=$2 daemon=
  shift 2
  if [ "${1:-}" = --daemon ]; then
    daemon=$2
    shift 2
  fi
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ -n "$daemon" ] && ! alive "$(cat "$dir/run/$daemon.pid" 2>/dev/null)"; then
      exit_status "$daemon"
      echo "ceph-cluster: $daemon exited$status while waiting for $what" >&2
      log_tail "$daemon"
      return 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "ceph-cluster: timed out after ${seconds}s waiting for $what (logs in $dir/log)" >&2
      [ -n "$daemon" ] && log_tail "$daemon"
      return 1
    fi
    sleep 0.2
  done
}

pgs_clean() {
  # Every PG of the cluster active+clean (HEALTH_OK alone comes earlier than that).
  local stat
  stat=$(ceph_cli pg stat --format json 2>/dev/null) || return 1
  python3 - "$stat" <<'EOF'
import json, sys
s = json.loads(sys.argv[1])
s = s.get("pg_summary", s)
total = s.get("num_pgs", 0)
clean = sum(e["num"] for e in s.get("num_pg_by_state", []) if e["name"] == "active+clean")
sys.exit(0 if total > 0 and clean == total else 1)
EOF
}

mgr_active() { ceph_cli mgr stat -f json | python3 -c "
import json, sys
sys.exit(0 if json.load(sys.stdin).get('available') else 1)"; }

osd_up() { ceph_cli osd dump --format json | python3 -c "
import json, sys
d = json.load(sys.stdin)
sys.exit(0 if any(o['osd'] == $1 and o['up'] == 1 for o in d['osds']) else 1)"; }

# Whether process $1 runs: any of its threads does (a zombie no parent reaps counts as gone; a
# main thread that has ended while the others still shut the daemon down does not).
alive() {
  [ -n "$1" ] || return 1
  local t state
  for t in /proc/"$1"/task/*/stat; do
    state=$(awk '{print $3}' "$t" 2>/dev/null) || continue
    [ -n "$state" ] && [ "$state" != Z ] && return 0
  done
  return 1
}

stop_pid() {
  local file=$1 pid
  pid=$(cat "$file" 2>/dev/null) || return 0
  rm -f "$file"
  [ -n "$pid" ] && alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do
    alive "$pid" || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

start_osd() {
  local id=$1
  # First start only: an empty store. Memstore saves its store only at a clean stop, so an OSD
  # killed with SIGKILL comes back with the store its last clean stop (or mkfs) left, and the
  # cluster backfills it from its peer.
  if [ ! -f "$dir/osd/$id/fsid" ]; then
    ceph-osd -c "$dir/ceph.conf" -i "$id" --mkfs --osd-uuid "$(cat "$dir/osd/$id/uuid")" \
      >>"$dir/log/osd.$id.out" 2>&1
  fi
  spawn "osd.$id" ceph-osd -i "$id"
}

start() {
  local osds=1
  while [ $# -gt 0 ]; do
    case $1 in
      --osds) osds=$2; shift 2 ;;
      *) usage ;;
    esac
  done
  case $osds in 1 | 2) ;; *) echo "ceph-cluster: --osds must be 1 or 2" >&2; exit 2 ;; esac
  if [ -e "$dir/ceph.conf" ]; then
    echo "ceph-cluster: $dir already holds a cluster (stop it and remove the directory first)" >&2
    exit 1
  fi
  mkdir -p "$dir"/{run,log,mon,mgr,osd}
  dir=$(cd "$dir" && pwd)
  local fsid port
  fsid=$(python3 -c 'import uuid; print(uuid.uuid4())')
  port=$(free_port)
  echo "127.0.0.1:$port" >"$dir/mon_host"
  cat >"$dir/ceph.conf" <<EOF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$port
public addr = 127.0.0.1
cluster addr = 127.0.0.1
public network = 127.0.0.0/8
ms bind msgr2 = false
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $dir/ceph.client.admin.keyring
run dir = $dir/run
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.daemon-pid
# One host: replicas go to different OSDs, not hosts.
osd crush chooseleaf type = 0
osd pool default size = $osds
osd pool default min size = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# Start-up time: decisions propagate in milliseconds instead of seconds.
paxos propose interval = 0.01
mon tick interval = 1
osd heartbeat interval = 1
osd heartbeat grace = 5
osd mon report interval = 1
mgr tick period = 1
mon osd down out interval = 0

[mon]
mon data = $dir/mon/\$id
# The monitor refuses to start below 5 % free disk by default; its store here is a few MiB, and a
# test cluster must not fail because the build directories filled the disk.
mon data avail crit = 1
mon data avail warn = 2
keyring = $dir/mon/\$id/keyring
admin socket = $dir/run/\$name.asok

[mgr]
mgr data = $dir/mgr/\$id
keyring = $dir/mgr/\$id/keyring
admin socket = $dir/run/\$name.asok

[osd]
osd data = $dir/osd/\$id
keyring = $dir/osd/\$id/keyring
admin socket = $dir/run/\$name.asok
osd objectstore = memstore
memstore device bytes = 2147483648
# 4 KiB pages, so random 4 KiB writes do not copy whole 64 KiB pages (RAM use explodes otherwise).
memstore page set = true
memstore page size = 4096
# Memstore OSDs count as rotational; no pause between recovery ops.
osd recovery sleep hdd = 0
osd memory target = 939524096
osd op num shards = 2
osd op num threads per shard = 1
EOF

  ceph-authtool --create-keyring "$dir/ceph.client.admin.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
  sed -n 's/^\s*key = //p' "$dir/ceph.client.admin.keyring" >"$dir/admin.key"
  ceph-authtool --create-keyring "$dir/mon-initial.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$dir/mon-initial.keyring" --import-keyring "$dir/ceph.client.admin.keyring" >/dev/null
  monmaptool --create --addv a "[v1:127.0.0.1:$port]" --fsid "$fsid" "$dir/monmap" >/dev/null
  ceph-mon -c "$dir/ceph.conf" --mkfs -i a --monmap "$dir/monmap" \
    --keyring "$dir/mon-initial.keyring" >>"$dir/log/mon.a.out" 2>&1
  spawn mon.a ceph-mon -i a
  wait_for "the monitor" 30 --daemon mon.a ceph_cli mon stat || return 1

  mkdir -p "$dir/mgr/x"
  ceph_cli auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
    -o "$dir/mgr/x/keyring"
  spawn mgr.x ceph-mgr -i x

  local id
  for i in $(seq 0 $((osds - 1))); do
    local uuid
    uuid=$(python3 -c 'import uuid; print(uuid.uuid4())')
    id=$(ceph_cli osd new "$uuid")
    mkdir -p "$dir/osd/$id"
    echo "$uuid" >"$dir/osd/$id/uuid"
    ceph_cli auth get-or-create "osd.$id" mon 'allow profile osd' mgr 'allow profile osd' \
      osd 'allow *' -o "$dir/osd/$id/keyring"
    start_osd "$id"
  done
  for i in $(seq 0 $((osds - 1))); do
    wait_for "osd.$i up" 60 --daemon "osd.$i" osd_up "$i" || return 1
  done

  ceph_cli osd pool create rbd 8 8 >/dev/null || return 1
  ceph_cli osd pool set rbd size "$osds" --yes-i-really-mean-it >/dev/null || return 1
  ceph_cli osd pool set rbd min_size 1 >/dev/null || return 1
  # The manager loads its Python modules first: over a minute on a loaded machine.
  wait_for "the manager" 180 --daemon mgr.x mgr_active || return 1
  wait_for "every PG active+clean" 60 pgs_clean || return 1
  timeout 30 rbd -c "$dir/ceph.conf" pool init rbd || return 1
  echo "ceph-cluster: up in ${SECONDS}s: conf $dir/ceph.conf, monitor $(cat "$dir/mon_host"), $osds OSD(s), pool rbd"
}

stop() {
  [ -d "$dir/run" ] || return 0
  local f
  for f in "$dir"/run/osd.*.pid "$dir"/run/mgr.*.pid "$dir"/run/mon.*.pid; do
    [ -e "$f" ] && stop_pid "$f"
  done
  return 0
}

case $cmd in
  start) start "$@" || { stop; exit 1; } ;;
  stop) stop ;;
  status) ceph_cli -s ;;
  kill-osd)
    [ $# -eq 1 ] || usage
    pid=$(cat "$dir/run/osd.$1.pid")
    kill -KILL "$pid"
    while alive "$pid"; do sleep 0.05; done
    rm -f "$dir/run/osd.$1.pid"
    ;;
  start-osd)
    [ $# -eq 1 ] || usage
    start_osd "$1"
    wait_for "osd.$1 up" 60 --daemon "osd.$1" osd_up "$1"
    ;;
  *) usage ;;
esac
