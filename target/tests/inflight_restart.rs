//! The real `rvhost` binary killed with SIGKILL under out-of-order I/O and restarted from its
//! `save_config` output, ten times, with the `vhost` crate's frontend keeping guest memory and
//! the inflight region across restarts as QEMU does with `reconnect=1` (base = the used index,
//! `SET_INFLIGHT_FD` with the region the first backend allocated).
//!
//! The workload is verifying writers: each slot writes its own 4 KiB block with a sequence
//! number, reads it back once the write is acknowledged and checks it; every completion must be
//! for a request the frontend has outstanding, every status OK, and every request outstanding at
//! a kill must complete within a few seconds of the restart. Completions come out of order: the
//! exported bdev is a delay bdev on an AIO file bdev, with 1 % of requests 40 ms slower than the
//! rest.
//!
//! vhost-blk and vhost-scsi (QEMU 7.2's vhost-user-scsi does not reconnect, so this is where scsi
//! restarts are tested) pass; the negative control, the same blk run with inflight tracking
//! withheld (`RVHOST_TEST_NO_INFLIGHT=1`), must detect a lost or doubled request, which shows
//! that the passing runs depend on the inflight log and not on luck.

mod rpc_common;
mod vhost_support;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use vhost_support::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Verifying writers (each one chain of 3 descriptors at a time).
const SLOTS: u16 = 16;
const BLOCK: usize = 4096;
/// Restarts per run.
const RESTARTS: usize = 10;
/// How long a request may stay outstanding after a restart before the run counts as hung.
const RESUME_TIMEOUT: Duration = Duration::from_secs(5);

/// How each restart ends the running process.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stop {
    /// SIGKILL: a crash; the next process resubmits from the inflight log.
    Kill,
    /// SIGTERM: a graceful stop; in-flight requests complete first, nothing is resubmitted.
    Term,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Blk,
    Scsi,
}

impl Kind {
    /// The request queue.
    fn queue(self) -> usize {
        match self {
            Kind::Blk => 0,
            Kind::Scsi => 2,
        }
    }

    /// Queues the frontend sets up.
    fn queues(self) -> u16 {
        match self {
            Kind::Blk => 1,
            Kind::Scsi => 3,
        }
    }
}

/// One `rvhost` process with a fixed socket directory.
struct Rvhost {
    child: Child,
    dir: PathBuf,
    rpc: PathBuf,
}

impl Rvhost {
    fn start(dir: &Path, extra: &[&str], no_inflight: bool, run: usize) -> Rvhost {
        let rpc = dir.join("rpc.sock");
        let log = File::create(dir.join(format!("rvhost-{run}.log"))).expect("log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rvhost"));
        cmd.arg("-S")
            .arg(dir)
            .arg("-r")
            .arg(&rpc)
            .args(["-m", "0x1", "--no-default", "-L", "info"])
            .args(extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if no_inflight {
            cmd.env("RVHOST_TEST_NO_INFLIGHT", "1");
        } else {
            cmd.env_remove("RVHOST_TEST_NO_INFLIGHT");
        }
        let mut child = cmd.spawn().expect("spawn rvhost");
        let deadline = Instant::now() + Duration::from_secs(60);
        while UnixStream::connect(&rpc).is_err() {
            assert!(
                child.try_wait().expect("wait").is_none(),
                "rvhost exited at start"
            );
            assert!(Instant::now() < deadline, "rvhost did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Rvhost {
            child,
            dir: dir.to_path_buf(),
            rpc,
        }
    }

    fn call(&self, method: &str, params: Value) -> Value {
        let mut stream = UnixStream::connect(&self.rpc).expect("rpc connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut request = json!({"jsonrpc": "2.0", "method": method, "id": 1});
        if !params.is_null() {
            request["params"] = params;
        }
        stream
            .write_all(request.to_string().as_bytes())
            .expect("rpc send");
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .expect("rpc reply");
        let reply: Value = serde_json::from_str(&line).expect("rpc json");
        match reply.get("result") {
            Some(result) => result.clone(),
            None => panic!("{method} failed: {reply}"),
        }
    }

    /// Stops the process with `stop` and reaps it (a graceful stop within 30 s).
    fn stop(&mut self, stop: Stop) {
        match stop {
            Stop::Kill => self.child.kill().expect("SIGKILL"),
            Stop::Term => {
                let sent = Command::new("kill")
                    .args(["-TERM", &self.child.id().to_string()])
                    .status()
                    .expect("kill -TERM");
                assert!(sent.success(), "kill -TERM failed");
                let deadline = Instant::now() + Duration::from_secs(30);
                while self.child.try_wait().expect("wait").is_none() {
                    assert!(Instant::now() < deadline, "rvhost ignored SIGTERM");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        self.child.wait().expect("reap");
    }
}

impl Drop for Rvhost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny deterministic generator (the runs must not depend on a crate's RNG).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below.max(1)
    }
}

fn content(slot: u16, seq: u64) -> Vec<u8> {
    let mut b: Vec<u8> = (0..BLOCK)
        .map(|i| (i as u64 ^ (u64::from(slot) * 31) ^ (seq * 7)) as u8)
        .collect();
    b[0..8].copy_from_slice(&u64::from(slot).to_le_bytes());
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Idle,
    Write(u64),
    Read,
}

struct Slot {
    op: Op,
    acked: u64,
    since: Instant,
}

/// Guest memory, rings and the inflight region that outlive every backend process.
struct Frontside {
    kind: Kind,
    ram: GuestRam,
    frontend: Option<Frontend>,
    inflight: Option<(VhostUserInflight, File)>,
    eventfds: Vec<EventFd>,
    avail_idx: u16,
    used_seen: u16,
    slots: Vec<Slot>,
    /// Heads whose completion arrived for nothing outstanding, or with a bad status or data.
    errors: Vec<String>,
    completed: u64,
}

const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const RING_STRIDE: u64 = 0x1_0000;
const META: u64 = 0x10_0000;
const WBUF: u64 = 0x20_0000;
const RBUF: u64 = 0x30_0000;

impl Frontside {
    fn ring(&self, q: usize) -> (u64, u64, u64) {
        let base = q as u64 * RING_STRIDE;
        (base + DESC, base + AVAIL, base + USED)
    }

    /// Connects to a (new) backend the way QEMU reconnects: negotiate, memory table, the
    /// inflight region (allocated by the first backend, handed to every later one), then each
    /// queue with the used index as its base.
    fn connect(&mut self, socket: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("connecting {}: {e}", socket.display()),
            }
        };
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut f = Frontend::from_stream(stream, 16);
        f.set_owner().expect("SET_OWNER");
        let offered = f.get_features().expect("GET_FEATURES");
        f.set_features(offered & (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES))
            .expect("SET_FEATURES");
        let proto = f.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let want = (VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD)
            & proto;
        f.set_protocol_features(want)
            .expect("SET_PROTOCOL_FEATURES");
        f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        f.set_mem_table(&[self.ram.region(MEM_SIZE)])
            .expect("SET_MEM_TABLE");
        if want.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            if self.inflight.is_none() {
                let asked = VhostUserInflight {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues: self.kind.queues(),
                    queue_size: QUEUE_SIZE,
                };
                self.inflight = Some(f.get_inflight_fd(&asked).expect("GET_INFLIGHT_FD"));
            }
            if let Some((info, file)) = &self.inflight {
                f.set_inflight_fd(info, file.as_raw_fd())
                    .expect("SET_INFLIGHT_FD");
            }
        }
        self.eventfds.clear();
        for q in 0..usize::from(self.kind.queues()) {
            let (desc, avail, used) = self.ring(q);
            let base = self.ram.load_u16(used + 2);
            let (call, kick) = (
                EventFd::new(EFD_NONBLOCK).expect("eventfd"),
                EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            );
            f.set_vring_num(q, QUEUE_SIZE).expect("SET_VRING_NUM");
            f.set_vring_base(q, base).expect("SET_VRING_BASE");
            f.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: 0,
                    desc_table_addr: FRONTEND_VA + desc,
                    used_ring_addr: FRONTEND_VA + used,
                    avail_ring_addr: FRONTEND_VA + avail,
                    log_addr: None,
                },
            )
            .expect("SET_VRING_ADDR");
            f.set_vring_call(q, &call).expect("SET_VRING_CALL");
            f.set_vring_kick(q, &kick).expect("SET_VRING_KICK");
            f.set_vring_enable(q, true).expect("SET_VRING_ENABLE");
            self.eventfds.extend([call, kick]);
        }
        self.frontend = Some(f);
        let now = Instant::now();
        for s in &mut self.slots {
            s.since = now;
        }
    }

    fn head(slot: u16) -> u16 {
        slot * 3
    }

    /// Writes slot `slot`'s chain for `op` and makes it available.
    fn issue(&mut self, slot: u16, op: Op) {
        let q = self.kind.queue();
        let (desc, avail, _) = self.ring(q);
        let meta = META + u64::from(slot) * 0x200;
        let (req, status) = (meta, meta + 0x100);
        let (wbuf, rbuf) = (
            WBUF + u64::from(slot) * BLOCK as u64,
            RBUF + u64::from(slot) * BLOCK as u64,
        );
        let write = matches!(op, Op::Write(_));
        let lba = u64::from(slot) * 8;
        let (req_len, status_len) = match self.kind {
            Kind::Blk => {
                let mut h = [0u8; 16];
                h[0..4].copy_from_slice(&if write { T_OUT } else { T_IN }.to_le_bytes());
                h[8..16].copy_from_slice(&lba.to_le_bytes());
                self.ram.write(req, &h);
                self.ram.write(status, &[0xff]);
                (16u32, 1u32)
            }
            Kind::Scsi => {
                let mut h = [0u8; 51];
                h[0..8].copy_from_slice(&[1, 0, 0x40, 0, 0, 0, 0, 0]);
                h[8..16].copy_from_slice(&u64::from(slot).to_le_bytes());
                let cdb = &mut h[19..29];
                cdb[0] = if write { 0x2a } else { 0x28 };
                cdb[2..6].copy_from_slice(&(lba as u32).to_be_bytes());
                cdb[7..9].copy_from_slice(&8u16.to_be_bytes());
                self.ram.write(req, &h);
                self.ram.write(status, &[0xee; 108]);
                (51, 108)
            }
        };
        let data = if let Op::Write(seq) = op {
            self.ram.write(wbuf, &content(slot, seq));
            (wbuf, 0)
        } else {
            self.ram.write(rbuf, &[0xa5; BLOCK]);
            (rbuf, F_WRITE)
        };
        let h = Self::head(slot);
        let req_desc = Desc {
            addr: req,
            len: req_len,
            flags: F_NEXT,
            next: h + 1,
        };
        let data_desc = |next: u16, last: bool| Desc {
            addr: data.0,
            len: BLOCK as u32,
            flags: data.1 | if last { 0 } else { F_NEXT },
            next,
        };
        let status_desc = |next: u16, last: bool| Desc {
            addr: status,
            len: status_len,
            flags: F_WRITE | if last { 0 } else { F_NEXT },
            next,
        };
        // blk: header, data, status. scsi: request, data-out, response for writes; request,
        // response, data-in for reads.
        let chain = match (self.kind, write) {
            (Kind::Blk, _) | (Kind::Scsi, true) => {
                [req_desc, data_desc(h + 2, false), status_desc(0, true)]
            }
            (Kind::Scsi, false) => [req_desc, status_desc(h + 2, false), data_desc(0, true)],
        };
        for (i, d) in chain.iter().enumerate() {
            self.ram
                .write(desc + 16 * (u64::from(h) + i as u64), &d.bytes());
        }
        let pos = u64::from(self.avail_idx % QUEUE_SIZE);
        self.ram.store_u16(avail + 4 + 2 * pos, h);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.ram.store_u16(avail + 2, self.avail_idx);
        let s = &mut self.slots[usize::from(slot)];
        s.op = op;
        s.since = Instant::now();
    }

    fn status_ok(&self, slot: u16) -> bool {
        let status = META + u64::from(slot) * 0x200 + 0x100;
        match self.kind {
            Kind::Blk => self.ram.read(status, 1)[0] == S_OK,
            Kind::Scsi => {
                let r = self.ram.read(status, 12);
                r[10] == 0 && r[11] == 0
            }
        }
    }

    /// Handles every used element published so far; returns how many.
    fn reap(&mut self) -> usize {
        let q = self.kind.queue();
        let (_, _, used) = self.ring(q);
        let mut n = 0;
        while self.ram.load_u16(used + 2) != self.used_seen {
            let pos = u64::from(self.used_seen % QUEUE_SIZE);
            let elem = self.ram.read(used + 4 + 8 * pos, 8);
            self.used_seen = self.used_seen.wrapping_add(1);
            n += 1;
            let id = u32::from_le_bytes(elem[0..4].try_into().expect("4"));
            let slot = (id / 3) as u16;
            if id % 3 != 0 || slot >= SLOTS || self.slots[usize::from(slot)].op == Op::Idle {
                self.errors
                    .push(format!("completion of head {id}, which is not outstanding"));
                continue;
            }
            self.completed += 1;
            let op = self.slots[usize::from(slot)].op;
            self.slots[usize::from(slot)].op = Op::Idle;
            if !self.status_ok(slot) {
                self.errors.push(format!("slot {slot}: {op:?} failed"));
                continue;
            }
            match op {
                Op::Write(seq) => {
                    self.slots[usize::from(slot)].acked = seq;
                    self.issue(slot, Op::Read);
                }
                Op::Read => {
                    let acked = self.slots[usize::from(slot)].acked;
                    let rbuf = RBUF + u64::from(slot) * BLOCK as u64;
                    if self.ram.read(rbuf, BLOCK) != content(slot, acked) {
                        let got = self.ram.read(rbuf, 16);
                        self.errors.push(format!(
                            "slot {slot}: read back {got:?}, acknowledged write was seq {acked}"
                        ));
                    }
                }
                Op::Idle => {}
            }
        }
        n
    }

    /// Whether a request has been outstanding longer than the resume timeout.
    fn hung(&self) -> Option<String> {
        self.slots.iter().enumerate().find_map(|(i, s)| {
            (s.op != Op::Idle && s.since.elapsed() > RESUME_TIMEOUT).then(|| {
                format!(
                    "slot {i} ({:?}) outstanding for {:?}: lost",
                    s.op,
                    s.since.elapsed()
                )
            })
        })
    }

    /// Runs the writers for `time` (issuing new writes as slots go idle if `issue`).
    fn run(&mut self, time: Duration, issue: bool, seq: &mut u64) -> Result<(), String> {
        let end = Instant::now() + time;
        while Instant::now() < end {
            self.reap();
            if issue {
                for slot in 0..SLOTS {
                    if self.slots[usize::from(slot)].op == Op::Idle {
                        *seq += 1;
                        self.issue(slot, Op::Write(*seq));
                    }
                }
            } else if self.slots.iter().all(|s| s.op == Op::Idle) {
                return Ok(());
            }
            if let Some(first) = self.errors.first() {
                return Err(first.clone());
            }
            if let Some(hung) = self.hung() {
                return Err(hung);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }
}

/// Configures the first process (AIO file bdev, delay bdev with 1 % slow requests, the
/// controller) over RPC and returns its `save_config` output, which every restart runs.
fn configure(target: &Rvhost, kind: Kind, image: &Path) -> PathBuf {
    target.call(
        "bdev_aio_create",
        json!({"filename": image, "name": "Aio0", "block_size": 512}),
    );
    target.call(
        "bdev_delay_create",
        json!({"base_bdev_name": "Aio0", "name": "Delay0",
               "avg_read_latency": 200, "p99_read_latency": 40000,
               "avg_write_latency": 200, "p99_write_latency": 40000}),
    );
    match kind {
        Kind::Blk => {
            target.call(
                "vhost_create_blk_controller",
                json!({"ctrlr": "vhost.0", "dev_name": "Delay0"}),
            );
        }
        Kind::Scsi => {
            target.call("vhost_create_scsi_controller", json!({"ctrlr": "vhost.0"}));
            target.call(
                "vhost_scsi_controller_add_target",
                json!({"ctrlr": "vhost.0", "scsi_target_num": 0, "bdev_name": "Delay0"}),
            );
        }
    }
    // The operator's flow: SPDK's client writes the configuration the restarts run.
    let saved = Command::new(rpc_common::spdk_rpc())
        .arg("-s")
        .arg(&target.rpc)
        .arg("save_config")
        .output()
        .expect("spdk-rpc save_config");
    assert!(saved.status.success(), "save_config failed");
    let path = target.dir.join("rvhost.json");
    std::fs::write(&path, &saved.stdout).expect("write config");
    path
}

struct Outcome {
    completed: u64,
    slowest_resume: Duration,
    /// Restarts whose backend found requests to resubmit (its log says so).
    resubmitting_restarts: usize,
}

/// Ten restarts under the verifying writers; `Err` says what went wrong first.
fn restart_run(kind: Kind, stop: Stop, no_inflight: bool, tag: &str) -> Result<Outcome, String> {
    let dir = PathBuf::from(format!("/tmp/rvi-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let image = dir.join("disk.img");
    File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .expect("image");
    let socket = dir.join("vhost.0");
    let mut target = Rvhost::start(&dir, &[], no_inflight, 0);
    let config = configure(&target, kind, &image);
    let config = config.to_str().expect("utf-8").to_string();

    let ram = GuestRam::new(MEM_SIZE);
    let mut front = Frontside {
        kind,
        ram,
        frontend: None,
        inflight: None,
        eventfds: Vec::new(),
        avail_idx: 0,
        used_seen: 0,
        slots: (0..SLOTS)
            .map(|_| Slot {
                op: Op::Idle,
                acked: 0,
                since: Instant::now(),
            })
            .collect(),
        errors: Vec::new(),
        completed: 0,
    };
    front.connect(&socket);
    let mut seq = 0u64;
    let mut rng = Lcg(0x5eed ^ u64::from(no_inflight));
    let mut slowest_resume = Duration::ZERO;
    let result = (|| {
        for restart in 1..=RESTARTS {
            front.run(Duration::from_millis(300 + rng.next(400)), true, &mut seq)?;
            target.stop(stop);
            front.frontend = None;
            // Completions published before the stop are the frontend's to take (after a graceful
            // stop that is all of them); what is left must complete after the restart.
            front.reap();
            let outstanding = front.slots.iter().filter(|s| s.op != Op::Idle).count();
            target = Rvhost::start(&dir, &["-c", &config], no_inflight, restart);
            let restarted = Instant::now();
            let before = front.completed;
            front.connect(&socket);
            while front.completed == before && outstanding > 0 {
                front.run(Duration::from_millis(1), false, &mut seq)?;
                if let Some(hung) = front.hung() {
                    return Err(format!("restart {restart}: {hung}"));
                }
            }
            slowest_resume = slowest_resume.max(restarted.elapsed());
        }
        front.run(Duration::from_millis(300), true, &mut seq)?;
        front.run(RESUME_TIMEOUT, false, &mut seq)?;
        if let Some(busy) = front.slots.iter().position(|s| s.op != Op::Idle) {
            return Err(format!("slot {busy} never completed"));
        }
        // Every write was acknowledged: each block must hold its slot's last one.
        for slot in 0..SLOTS {
            front.issue(slot, Op::Read);
        }
        front.run(RESUME_TIMEOUT, false, &mut seq)?;
        front.errors.first().map_or(Ok(()), |e| Err(e.clone()))
    })();
    drop(front.frontend.take());
    drop(target);
    let resubmitting_restarts = (1..=RESTARTS)
        .filter(|run| {
            std::fs::read_to_string(dir.join(format!("rvhost-{run}.log")))
                .is_ok_and(|log| log.contains("inflight log recovered"))
        })
        .count();
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("logs kept in {}", dir.display());
    }
    result.map(|()| Outcome {
        completed: front.completed,
        slowest_resume,
        resubmitting_restarts,
    })
}

fn assert_passes(kind: Kind, tag: &str) {
    let outcome =
        restart_run(kind, Stop::Kill, false, tag).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
    eprintln!(
        "{kind:?}: {RESTARTS} SIGKILL restarts ({} of them resubmitted requests), {} requests \
         completed, slowest resume {:?}",
        outcome.resubmitting_restarts, outcome.completed, outcome.slowest_resume
    );
    assert!(outcome.completed > 100, "the writers made progress");
    // Every kill leaves requests in flight (16 writers, none idle for long): each restart must
    // have had something to resubmit, or the run did not test what it claims.
    assert!(
        outcome.resubmitting_restarts >= RESTARTS / 2,
        "only {} of {RESTARTS} restarts resubmitted anything",
        outcome.resubmitting_restarts
    );
    assert!(outcome.slowest_resume < RESUME_TIMEOUT);
}

#[test]
fn blk_survives_ten_sigkill_restarts_under_out_of_order_io() {
    assert_passes(Kind::Blk, "blk");
}

#[test]
fn scsi_survives_ten_sigkill_restarts_under_out_of_order_io() {
    assert_passes(Kind::Scsi, "scsi");
}

#[test]
fn blk_survives_ten_sigterm_restarts_and_needs_no_resubmission() {
    let outcome =
        restart_run(Kind::Blk, Stop::Term, false, "term").unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "Blk: {RESTARTS} SIGTERM restarts, {} requests completed, slowest resume {:?}",
        outcome.completed, outcome.slowest_resume
    );
    assert!(outcome.completed > 100, "the writers made progress");
    assert!(outcome.slowest_resume < RESUME_TIMEOUT);
    // A graceful stop completes and publishes what it popped: the next process finds nothing
    // inflight.
    assert_eq!(outcome.resubmitting_restarts, 0);
}

#[test]
fn without_inflight_tracking_the_same_restarts_lose_or_double_requests() {
    match restart_run(Kind::Blk, Stop::Kill, true, "control") {
        Ok(outcome) => panic!(
            "negative control passed ({} requests): the restart test cannot detect loss",
            outcome.completed
        ),
        Err(why) => {
            eprintln!("negative control failed as it must: {why}");
            let _ = std::fs::remove_dir_all(format!("/tmp/rvi-{}-control", std::process::id()));
        }
    }
}
