//! The vhost device shell is complete: a third, test-only device type that implements only
//! [`DeviceType`] and [`RequestHandler`] is served to the in-process vhost-user frontend like
//! vhost-blk and vhost-scsi are, and gets everything else from the shell (negotiation, config
//! space reads, queue start and stop, memory table, slots, deferred completion, used ring and
//! call eventfd, its own control operations over the reactor's control ring, removal on
//! disconnect).
//!
//! The device reverses: a request is readable bytes followed by one writable buffer; the device
//! writes the readable bytes into it in reverse order, each XORed with a key, and completes the
//! request one poll round later (as a bdev would), with the number of bytes written as used
//! length.

mod vhost_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rvhost_core::mem::GuestMemory;
use rvhost_platform_linux::NumaTopology;
use rvhost_target::reactor::{self, IdlePolicy, ReactorHandle, Reply};
use rvhost_target::vhost::device::{
    config_range, DeviceType, Disposition, NewRequest, RequestHandler, Requests, ShellRing,
};
use rvhost_target::vhost::{DeviceId, VhostServer, VirtioFeatures};
use vhost::VhostBackend;
use vhost_support::{Desc, Driver, F_NEXT, F_WRITE, VIRTIO_F_VERSION_1};

/// A recognisable config space (60 bytes: what the test driver reads).
const CONFIG: [u8; 60] = {
    let mut c = [0u8; 60];
    c[0] = b'r';
    c[1] = b'e';
    c[2] = b'v';
    c
};
/// Longest request the device reverses.
const MAX_BYTES: usize = 256;

/// The control side: features, config space, one handler per session.
struct ReverseType {
    sessions: Arc<AtomicUsize>,
}

impl DeviceType for ReverseType {
    type Handler = Reverser;

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u32, len: u32) -> Result<Vec<u8>, String> {
        config_range(&CONFIG, offset, len)
    }

    fn max_queues(&self) -> u16 {
        2
    }

    fn new_handler(
        &self,
        _id: DeviceId,
        _reactor: &Arc<ReactorHandle>,
    ) -> Result<Reverser, String> {
        self.sessions.fetch_add(1, Ordering::SeqCst);
        Ok(Reverser {
            key: 0,
            done: Vec::with_capacity(64),
            started_queues: 0,
            removed: Arc::clone(&self.sessions),
        })
    }
}

/// A request between start and completion: where the answer goes and what it is.
#[derive(Debug, Clone, Copy)]
struct Reversal {
    out: u64,
    len: usize,
    bytes: [u8; MAX_BYTES],
}

impl Default for Reversal {
    fn default() -> Self {
        Reversal {
            out: 0,
            len: 0,
            bytes: [0; MAX_BYTES],
        }
    }
}

/// The device type's own control operation.
enum ReverseOp {
    /// XOR every output byte with `key` from now on; answers with the previous key.
    SetKey { key: u8, reply: Reply<u8> },
}

/// The data side of one session.
struct Reverser {
    key: u8,
    /// Requests started this round, completed in the next one.
    done: Vec<u64>,
    started_queues: usize,
    removed: Arc<AtomicUsize>,
}

impl RequestHandler for Reverser {
    type Request = Reversal;
    type Queue = u16;
    type Op = ReverseOp;

    fn start_queue(&mut self, index: u16, features: VirtioFeatures) -> Result<u16, String> {
        assert!(features.has(32), "VERSION_1 negotiated");
        self.started_queues += 1;
        Ok(index)
    }

    fn start(&mut self, r: NewRequest<'_, Self>) -> Disposition {
        let Ok(chain) = r.chain else {
            return Disposition::Abandon;
        };
        assert_eq!(*r.queue_state, r.queue, "per-queue state is the handler's");
        let (Some(out), 1) = (chain.writable().first(), chain.writable().len()) else {
            return Disposition::Complete(0);
        };
        let mut len = 0;
        for seg in chain.readable() {
            let n = (seg.len as usize).min(MAX_BYTES - len);
            if r.mem
                .read(seg.guest_addr, &mut r.request.bytes[len..len + n])
                .is_err()
            {
                return Disposition::Complete(0);
            }
            len += n;
        }
        r.request.out = out.guest_addr;
        r.request.len = len.min(out.len as usize);
        self.done.push(r.tag);
        Disposition::Pending
    }

    fn poll_completions<V: ShellRing>(&mut self, requests: &mut Requests<'_, Self, V>) -> usize {
        let key = self.key;
        let n = self.done.len();
        for tag in self.done.drain(..) {
            requests.update(tag, |req, mem| {
                let mut answer = [0u8; MAX_BYTES];
                for (dst, src) in answer.iter_mut().zip(req.bytes[..req.len].iter().rev()) {
                    *dst = src ^ key;
                }
                mem.write(req.out, &answer[..req.len]).ok()?;
                Some(req.len as u32)
            });
        }
        n
    }

    fn control<V: ShellRing>(
        &mut self,
        op: ReverseOp,
        requests: &mut Requests<'_, Self, V>,
    ) -> bool {
        let ReverseOp::SetKey { key, reply } = op;
        assert!(requests.in_flight() <= self.done.len());
        let _ = reply.send(std::mem::replace(&mut self.key, key));
        false
    }

    fn remove(&mut self) {
        self.removed.fetch_sub(1, Ordering::SeqCst);
    }
}

fn reverse(driver: &mut Driver, queue: usize, input: &[u8]) -> Vec<u8> {
    let q = driver
        .queues
        .iter()
        .find(|q| q.index == queue)
        .expect("queue");
    let (inp, out) = (q.header_addr(), q.buffer_addr());
    driver.ram.write(inp, input);
    driver.ram.write(out, &vec![0xee; input.len()]);
    // Two readable segments, to see the chain walked.
    let half = (input.len() / 2) as u32;
    driver.post(
        queue,
        &[
            Desc {
                addr: inp,
                len: half,
                flags: F_NEXT,
                next: 1,
            },
            Desc {
                addr: inp + u64::from(half),
                len: input.len() as u32 - half,
                flags: F_NEXT,
                next: 2,
            },
            Desc {
                addr: out,
                len: input.len() as u32,
                flags: F_WRITE,
                next: 0,
            },
        ],
    );
    let (id, len) = driver.wait_used(queue);
    assert_eq!((id, len as usize), (0, input.len()));
    driver.ram.read(out, input.len())
}

#[test]
fn a_third_device_type_is_served_by_implementing_the_handler_alone() {
    let dir = vhost_support::socket_dir("device-type");
    let socket = dir.join("rev0");
    let reactor = reactor::spawn(0, IdlePolicy::Adaptive, Arc::new(NumaTopology::unknown()))
        .expect("reactor");
    let sessions = Arc::new(AtomicUsize::new(0));
    let device_type = Arc::new(ReverseType {
        sessions: Arc::clone(&sessions),
    });
    let mut server =
        VhostServer::start("rev0", &socket, device_type, Arc::clone(&reactor)).expect("server");

    let mut driver = Driver::connect(&socket, VIRTIO_F_VERSION_1);
    assert_eq!(driver.features & VIRTIO_F_VERSION_1, VIRTIO_F_VERSION_1);
    assert_eq!(
        &driver.config()[..3],
        b"rev",
        "config space from the device type"
    );
    driver.set_mem_table();
    driver.setup_queue(0);
    driver.setup_queue(1);

    assert_eq!(reverse(&mut driver, 0, b"abcdef"), b"fedcba");
    assert_eq!(reverse(&mut driver, 1, b"0123456789"), b"9876543210");

    // The device type's own operation travels over the reactor's control ring.
    let ids = server.with_devices(|ids| ids.to_vec());
    assert_eq!(ids.len(), 1);
    let old = reactor
        .task_call(ids[0], |reply| ReverseOp::SetKey { key: 0x20, reply })
        .expect("set key");
    assert_eq!(old, 0);
    assert_eq!(reverse(&mut driver, 0, b"abc"), b"CBA");

    // GET_VRING_BASE: the shell stops the queue once drained and reports where it stopped.
    let base = driver.frontend.get_vring_base(1).expect("GET_VRING_BASE");
    assert_eq!(base, 1, "one request consumed on queue 1");

    // A disconnect removes the device: the shell drains it and the handler is told.
    drop(driver);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sessions.load(Ordering::SeqCst) != 0 || server.sessions() != 0 {
        assert!(Instant::now() < deadline, "session not removed");
        std::thread::sleep(Duration::from_millis(5));
    }
    server.stop();
    reactor.shutdown();
}
