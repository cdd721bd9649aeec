# Sourced by the bench scripts: the priority their targets, initiators and probes run at.
#
# bench_prio MODE sets the array PRIO to the command prefix for MODE: "" nothing (env), "rt"
# SCHED_RR priority 1, anything else a niceness for nice -n. SCHED_RR, round robin,
# so a target's busy reactor and its vhost-user thread on the same core both get turns
# (SCHED_FIFO would starve the latter). On a machine busy with builds only SCHED_RR keeps the
# spinning threads on their cores: there, nice -19 still left rvhost at 0.1-0.3M IOPS where
# SCHED_RR gave 2.5-5M.
bench_prio() {
  case "${1:-}" in
    "") PRIO=(env) ;;
    rt) PRIO=(chrt -r 1) ;;
    *) PRIO=(nice -n "$1") ;;
  esac
}
