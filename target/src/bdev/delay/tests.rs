//! The delay channel over a RAM bdev (real clock, short delays, assertions in the safe
//! direction only) and the module's RPC handlers over a registry.

use super::*;
use crate::bdev::malloc::{MallocBdev, MemoryBudget};
use crate::bdev::module::{AnyBdevModule, BdevUsers};
use crate::bdev::testing::TestMemory;
use crate::bdev::BdevRegistry;

fn malloc(name: &str) -> Arc<dyn Bdev> {
    MallocBdev::new(name, 64, 512, [7; 16], &MemoryBudget::new(1 << 20)).unwrap()
}

fn latencies(avg_read_us: u64, avg_write_us: u64) -> Latencies {
    Latencies {
        avg_read_us,
        p99_read_us: avg_read_us,
        avg_write_us,
        p99_write_us: avg_write_us,
    }
}

/// Polls until `count` completions were reported or `limit` passed; each with its time since
/// `start`.
fn collect(
    ch: &mut dyn BdevChannel,
    count: usize,
    start: Instant,
    limit: Duration,
) -> Vec<(u64, IoStatus, Duration)> {
    let mut out = Vec::new();
    while out.len() < count && start.elapsed() < limit {
        ch.poll(&mut |tag, status| out.push((tag, status, start.elapsed())));
        std::thread::sleep(Duration::from_micros(200));
    }
    out
}

#[test]
fn data_round_trips_and_each_kind_waits_its_latency() {
    let delay = DelayBdev::new(
        "Delay0",
        [1; 16],
        malloc("Malloc0"),
        latencies(30_000, 60_000),
    );
    assert_eq!((delay.block_size(), delay.num_blocks()), (512, 64));
    let mut ch = Arc::clone(&delay).open_channel().unwrap();
    let mem = TestMemory::new(4096);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 13 + 1) as u8).collect();
    mem.write(0, &pattern);

    let start = Instant::now();
    let w = [mem.iov(0, 1024)];
    ch.submit(&mem.bdev_io(IoKind::Write, 3, 2, &w, 77))
        .unwrap();
    assert_eq!(ch.in_flight(), 1);
    let done = collect(&mut *ch, 1, start, Duration::from_secs(5));
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].0, done[0].1), (77, IoStatus::Success));
    assert!(
        done[0].2 >= Duration::from_millis(60),
        "write after {:?}",
        done[0].2
    );
    assert_eq!(ch.in_flight(), 0);

    let start = Instant::now();
    let r = [mem.iov(2048, 1024)];
    ch.submit(&mem.bdev_io(IoKind::Read, 3, 2, &r, 78)).unwrap();
    let done = collect(&mut *ch, 1, start, Duration::from_secs(5));
    assert_eq!((done[0].0, done[0].1), (78, IoStatus::Success));
    assert!(
        done[0].2 >= Duration::from_millis(30),
        "read after {:?}",
        done[0].2
    );
    assert_eq!(mem.read(2048, 1024), pattern);

    // Flush, unmap and write-zeroes pass through undelayed, as in SPDK: reported at the first
    // poll, long before any latency could have run out.
    for (tag, kind) in [
        (1, IoKind::Flush),
        (2, IoKind::Unmap),
        (3, IoKind::WriteZeroes),
    ] {
        ch.submit(&mem.bdev_io(kind, 0, 1, &[], tag)).unwrap();
    }
    let mut seen = Vec::new();
    ch.poll(&mut |tag, status| seen.push((tag, status)));
    assert_eq!(seen, [1, 2, 3].map(|t| (t, IoStatus::Success)).to_vec());
}

#[test]
fn completions_come_out_of_order() {
    // Reads wait 80 ms, writes nothing: a read submitted first completes after a write
    // submitted after it.
    let delay = DelayBdev::new("Delay0", [1; 16], malloc("Malloc0"), latencies(80_000, 0));
    let mut ch = Arc::clone(&delay).open_channel().unwrap();
    let mem = TestMemory::new(2048);
    let r = [mem.iov(0, 512)];
    let w = [mem.iov(1024, 512)];
    let start = Instant::now();
    ch.submit(&mem.bdev_io(IoKind::Read, 0, 1, &r, 1)).unwrap();
    ch.submit(&mem.bdev_io(IoKind::Write, 1, 1, &w, 2)).unwrap();
    let done = collect(&mut *ch, 2, start, Duration::from_secs(5));
    let order: Vec<u64> = done.iter().map(|d| d.0).collect();
    assert_eq!(order, [2, 1]);
    assert!(done[1].2 >= Duration::from_millis(80));
}

#[test]
fn a_lowered_latency_applies_to_io_completed_afterwards() {
    let delay = DelayBdev::new("Delay0", [1; 16], malloc("Malloc0"), latencies(0, 0));
    let mut ch = Arc::clone(&delay).open_channel().unwrap();
    let mem = TestMemory::new(512);
    let r = [mem.iov(0, 512)];
    delay.set_latency_us(LatencyType::AvgRead, 50_000);
    delay.set_latency_us(LatencyType::P99Read, 50_000);
    assert_eq!(delay.latencies(), latencies(50_000, 0));
    let start = Instant::now();
    ch.submit(&mem.bdev_io(IoKind::Read, 0, 1, &r, 9)).unwrap();
    let done = collect(&mut *ch, 1, start, Duration::from_secs(5));
    assert!(done[0].2 >= Duration::from_millis(50));
}

#[test]
fn about_one_in_a_hundred_takes_the_p99_latency() {
    // Average 0, p99 "forever": the I/Os still held after the average ones are reported are
    // the p99 ones.
    let l = Latencies {
        avg_read_us: 0,
        p99_read_us: u64::MAX,
        avg_write_us: 0,
        p99_write_us: u64::MAX,
    };
    let delay = DelayBdev::new("Delay0", [1; 16], malloc("Malloc0"), l);
    let mut ch = Arc::clone(&delay).open_channel().unwrap();
    let mem = TestMemory::new(512);
    let r = [mem.iov(0, 512)];
    const N: u64 = 4000;
    let mut fast = 0;
    for tag in 0..N {
        let kind = if tag % 2 == 0 {
            IoKind::Read
        } else {
            IoKind::Write
        };
        ch.submit(&mem.bdev_io(kind, 0, 1, &r, tag)).unwrap();
        if tag % 500 == 499 {
            ch.poll(&mut |_, _| fast += 1);
        }
    }
    ch.poll(&mut |_, _| fast += 1);
    let slow = ch.in_flight();
    assert_eq!(fast + slow, N as usize);
    // Binomial(4000, 0.01): mean 40, standard deviation about 6.3.
    assert!(
        (10..=80).contains(&slow),
        "{slow} of {N} took the p99 latency"
    );
}

/// A base bdev whose I/O all complete with `Failed`.
#[derive(Debug)]
struct FailingBdev;

struct FailingChannel(VecDeque<(u64, IoStatus)>);

impl Bdev for FailingBdev {
    fn name(&self) -> &str {
        "Failing0"
    }
    fn product_name(&self) -> &str {
        "Failing disk"
    }
    fn module_name(&self) -> &'static str {
        "test"
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn num_blocks(&self) -> u64 {
        8
    }
    fn uuid(&self) -> [u8; 16] {
        [3; 16]
    }
    fn supports(&self, kind: IoKind) -> bool {
        kind != IoKind::Unmap
    }
    fn open_channel(self: Arc<Self>) -> Result<Box<dyn BdevChannel>, BdevError> {
        Ok(Box::new(FailingChannel(VecDeque::new())))
    }
}

impl BdevChannel for FailingChannel {
    fn submit(&mut self, io: &BdevIo<'_>) -> Result<(), BdevError> {
        self.0.push_back((io.tag, IoStatus::Failed));
        Ok(())
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, IoStatus)) -> usize {
        crate::bdev::report_completions(&mut self.0, done)
    }
    fn in_flight(&self) -> usize {
        self.0.len()
    }
}

#[test]
fn errors_propagate() {
    // A failed completion is reported as failed, after its latency.
    let delay = DelayBdev::new(
        "Delay0",
        [1; 16],
        Arc::new(FailingBdev),
        latencies(20_000, 0),
    );
    assert!(!delay.supports(IoKind::Unmap));
    assert!(delay.supports(IoKind::Read));
    let mut ch = Arc::clone(&delay).open_channel().unwrap();
    let mem = TestMemory::new(512);
    let r = [mem.iov(0, 512)];
    let start = Instant::now();
    ch.submit(&mem.bdev_io(IoKind::Read, 0, 1, &r, 5)).unwrap();
    let done = collect(&mut *ch, 1, start, Duration::from_secs(5));
    assert_eq!((done[0].0, done[0].1), (5, IoStatus::Failed));
    assert!(done[0].2 >= Duration::from_millis(20));

    // A submission the base refuses is refused, with nothing left in flight.
    let delay = DelayBdev::new("Delay1", [2; 16], malloc("Malloc0"), latencies(0, 0));
    let mut ch = Arc::clone(&delay).open_channel().unwrap();
    let past_end = mem.bdev_io(IoKind::Read, 64, 1, &r, 6);
    assert!(matches!(
        ch.submit(&past_end),
        Err(BdevError::OutOfRange { .. })
    ));
    assert_eq!(ch.in_flight(), 0);
    // Its slot is reused.
    ch.submit(&mem.bdev_io(IoKind::Read, 0, 1, &r, 7)).unwrap();
    assert_eq!(
        collect(&mut *ch, 1, Instant::now(), Duration::from_secs(5)).len(),
        1
    );

    delay.mark_removed();
    assert!(matches!(
        ch.submit(&mem.bdev_io(IoKind::Read, 0, 1, &r, 8)),
        Err(BdevError::Removed(_))
    ));
    assert!(matches!(
        Arc::clone(&delay).open_channel(),
        Err(BdevError::Removed(_))
    ));
}

struct NoUsers;

impl BdevUsers for NoUsers {
    fn bdev_in_use(&self, _name: &str) -> bool {
        false
    }
    fn detach_bdev(&self, _name: &str) {}
}

fn call(
    module: &mut DelayModule,
    reg: &mut BdevRegistry,
    method: &str,
    params: Value,
) -> Result<Value, RpcError> {
    let users = NoUsers;
    let mut cx = BdevContext::new(reg, &users);
    AnyBdevModule::call(module, method, &mut cx, Some(params))
}

fn create_params(name: &str, base: &str, avg: u64, p99: u64) -> Value {
    json!({"base_bdev_name": base, "name": name, "avg_read_latency": avg,
           "p99_read_latency": p99, "avg_write_latency": avg, "p99_write_latency": p99})
}

#[test]
fn module_creates_claims_updates_saves_and_follows_its_base() {
    let mut reg = BdevRegistry::new();
    reg.insert(malloc("Malloc0"), Box::new(|| {})).unwrap();
    let mut module = DelayModule::default();
    let create = |m: &mut DelayModule, r: &mut BdevRegistry, p| call(m, r, "bdev_delay_create", p);

    assert_eq!(
        create(
            &mut module,
            &mut reg,
            create_params("Delay0", "Malloc0", 10, 20)
        )
        .unwrap(),
        json!("Delay0")
    );
    let code = |r: Result<Value, RpcError>| r.unwrap_err().code;
    assert_eq!(
        code(create(
            &mut module,
            &mut reg,
            create_params("D", "Nope", 1, 1)
        )),
        -19
    );
    assert_eq!(
        code(create(
            &mut module,
            &mut reg,
            create_params("Delay0", "Malloc0", 1, 1)
        )),
        -17
    );
    assert_eq!(
        code(create(
            &mut module,
            &mut reg,
            create_params("Malloc0", "Delay0", 1, 1)
        )),
        -17
    );
    assert_eq!(
        code(create(
            &mut module,
            &mut reg,
            create_params("D", "Malloc0", 5, 4)
        )),
        -22
    );
    // The base is claimed: no second delay bdev on it.
    assert_eq!(reg.claimed_by("Malloc0"), Some("Delay0"));
    assert_eq!(
        code(create(
            &mut module,
            &mut reg,
            create_params("D", "Malloc0", 1, 1)
        )),
        -1
    );
    let mut negative = create_params("D", "Malloc0", 1, 1);
    negative["avg_read_latency"] = json!(-1);
    assert_eq!(code(create(&mut module, &mut reg, negative)), -32602);

    let update = |m: &mut DelayModule, r: &mut BdevRegistry, name: &str, ty: &str, us: Value| {
        call(
            m,
            r,
            "bdev_delay_update_latency",
            json!({"delay_bdev_name": name, "latency_type": ty, "latency_us": us}),
        )
    };
    assert_eq!(
        update(&mut module, &mut reg, "Delay0", "p99_write", json!(500)).unwrap(),
        json!(true)
    );
    assert_eq!(
        code(update(
            &mut module,
            &mut reg,
            "Delay0",
            "max_read",
            json!(5)
        )),
        -32602
    );
    assert_eq!(
        code(update(
            &mut module,
            &mut reg,
            "Malloc0",
            "avg_read",
            json!(5)
        )),
        -32602
    );
    assert_eq!(
        code(update(
            &mut module,
            &mut reg,
            "Delay0",
            "avg_read",
            json!("x")
        )),
        -32602
    );

    let config = BdevModule::module_config(&module);
    assert_eq!(config.len(), 1);
    assert_eq!(config[0]["method"], "bdev_delay_create");
    let params = &config[0]["params"];
    assert_eq!(params["base_bdev_name"], "Malloc0");
    assert_eq!(params["p99_write_latency"], 500);
    assert_eq!(params["avg_read_latency"], 10);
    let delay = reg.get("Delay0").unwrap();
    assert_eq!(delay.driver_specific()["delay"], *params);
    assert_eq!(BdevModule::bdev_config(&module, delay.as_ref()), None);

    // Deleting the delay bdev releases the base: another may be stacked on it.
    assert_eq!(
        call(
            &mut module,
            &mut reg,
            "bdev_delay_delete",
            json!({"name": "Delay0"})
        )
        .unwrap(),
        json!(true)
    );
    assert!(!reg.contains("Delay0"));
    assert_eq!(reg.claimed_by("Malloc0"), None);
    assert_eq!(
        code(call(
            &mut module,
            &mut reg,
            "bdev_delay_delete",
            json!({"name": "Malloc0"})
        )),
        -19
    );
    create(
        &mut module,
        &mut reg,
        create_params("Delay1", "Malloc0", 0, 0),
    )
    .unwrap();

    // The base deleted: the delay bdev goes with it at the next tick.
    reg.remove("Malloc0").unwrap();
    let users = NoUsers;
    let mut cx = BdevContext::new(&mut reg, &users);
    AnyBdevModule::tick(&mut module, &mut cx);
    assert!(reg.is_empty());
    assert!(BdevModule::module_config(&module).is_empty());
}
