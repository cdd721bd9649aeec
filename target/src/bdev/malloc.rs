//! The RAM bdev (SPDK's `malloc` module): a block device backed by host memory.
//!
//! The backing store is `platform-linux`'s [`SharedDmaMemory`]: zeroed, on 2 MiB hugepages when
//! the host has them (4 KiB pages otherwise, with a warning), and reachable only through
//! range-checked copies, so every reactor that opens a channel can use it at once without locks or
//! `unsafe` here. Guests writing the same blocks from two queues at once get some interleaving of
//! their writes, exactly as on a real disk. Data moves between the store and the I/O's buffers
//! with one `memmove` per buffer ([`copy_between`]), and no I/O allocates.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::rpc::errno::EINVAL;
use crate::rpc::RpcError;
use rvhost_platform_linux::{copy_between, HostMemory, PagePolicy, SharedDmaMemory};

use serde::Deserialize;
use serde_json::Value;

use super::common::{byte_range, check_block_size, check_iovs};
use super::module::{
    bdev_error, check_physical_block_size, decode, delete_by_name, geometry_config, parse_uuid,
    refuse_metadata, BdevContext, BdevModule, ModuleEnv, RpcMethod,
};
use super::{report_completions, Bdev, BdevChannel, BdevError, BdevIo, IoKind, IoStatus};

/// Completions a channel can hold before its queue has to grow (a virtqueue holds at most 1024).
const COMPLETION_CAPACITY: usize = 1024;

/// How much memory all RAM bdevs together may use (`-s/--mem-size`), shared by the bdevs.
#[derive(Debug)]
pub struct MemoryBudget {
    limit_bytes: u64,
    used_bytes: AtomicU64,
    /// Set once an allocation had to fall back to base pages: later ones go straight to base
    /// pages instead of failing (and warning) again for every bdev.
    no_hugepages: AtomicBool,
}

impl MemoryBudget {
    /// A budget of `limit_bytes`.
    pub fn new(limit_bytes: u64) -> Arc<Self> {
        Arc::new(MemoryBudget {
            limit_bytes,
            used_bytes: AtomicU64::new(0),
            no_hugepages: AtomicBool::new(false),
        })
    }

    /// The limit in bytes.
    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    /// Bytes currently held by RAM bdevs.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes.load(Ordering::Acquire)
    }

    fn reserve(self: &Arc<Self>, bytes: u64) -> Result<Reservation, BdevError> {
        let reserved = self
            .used_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes)
                    .filter(|total| *total <= self.limit_bytes)
            });
        match reserved {
            Ok(_) => Ok(Reservation {
                budget: Arc::clone(self),
                bytes,
            }),
            Err(used) => Err(BdevError::Backend(format!(
                "cannot allocate {bytes} bytes: {used} of the {} byte memory budget are in use \
                 (raise it with -s/--mem-size)",
                self.limit_bytes
            ))),
        }
    }
}

/// Memory taken from a [`MemoryBudget`], given back on drop.
#[derive(Debug)]
struct Reservation {
    budget: Arc<MemoryBudget>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget
            .used_bytes
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A RAM bdev.
#[derive(Debug)]
pub struct MallocBdev {
    name: String,
    block_size: u32,
    num_blocks: u64,
    uuid: [u8; 16],
    store: SharedDmaMemory,
    removed: AtomicBool,
    _memory: Reservation,
}

impl MallocBdev {
    /// Creates a zero-filled RAM bdev, taking its memory from `budget`.
    pub fn new(
        name: &str,
        num_blocks: u64,
        block_size: u32,
        uuid: [u8; 16],
        budget: &Arc<MemoryBudget>,
    ) -> Result<Arc<Self>, BdevError> {
        check_block_size(block_size)?;
        if num_blocks == 0 {
            return Err(BdevError::InvalidParams(
                "num_blocks must be greater than 0".into(),
            ));
        }
        let len_bytes = num_blocks
            .checked_mul(u64::from(block_size))
            .ok_or_else(|| {
                BdevError::InvalidParams(format!(
                    "{num_blocks} blocks of {block_size} bytes overflow a 64-bit size"
                ))
            })?;
        let memory = budget.reserve(len_bytes)?;
        let too_big = || BdevError::Backend(format!("{len_bytes} bytes do not fit in memory"));
        let len = usize::try_from(len_bytes).map_err(|_| too_big())?;
        let policy = if budget.no_hugepages.load(Ordering::Acquire) {
            PagePolicy::SmallOnly
        } else {
            PagePolicy::PreferHuge
        };
        let store = SharedDmaMemory::allocate_with(len, policy).map_err(|e| {
            BdevError::Backend(format!("cannot allocate {len_bytes} bytes for {name}: {e}"))
        })?;
        if !store.is_hugepage() && !budget.no_hugepages.swap(true, Ordering::AcqRel) {
            tracing::info!("RAM bdevs use 4 KiB pages from now on (no 2 MiB hugepages available)");
        }
        Ok(Arc::new(MallocBdev {
            name: name.to_owned(),
            block_size,
            num_blocks,
            uuid,
            store,
            removed: AtomicBool::new(false),
            _memory: memory,
        }))
    }

    /// Refuses new I/O from now on (the bdev is being deleted).
    pub fn mark_removed(&self) {
        self.removed.store(true, Ordering::Release);
    }
}

impl Bdev for MallocBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        "Malloc disk"
    }
    fn module_name(&self) -> &'static str {
        "malloc"
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks
    }
    fn uuid(&self) -> [u8; 16] {
        self.uuid
    }
    fn supports(&self, _kind: IoKind) -> bool {
        true
    }
    fn open_channel(self: Arc<Self>) -> Result<Box<dyn BdevChannel>, BdevError> {
        if self.removed.load(Ordering::Acquire) {
            return Err(BdevError::Removed(self.name.clone()));
        }
        Ok(Box::new(MallocChannel {
            bdev: self,
            completions: VecDeque::with_capacity(COMPLETION_CAPACITY),
        }))
    }
}

/// One reactor's view of a [`MallocBdev`]: I/O is executed at submission and its completion
/// queued until the next poll, so completions are always reported from the reactor's poll loop.
struct MallocChannel {
    bdev: Arc<MallocBdev>,
    completions: VecDeque<(u64, IoStatus)>,
}

impl MallocChannel {
    fn execute(&mut self, io: &BdevIo<'_>) -> Result<(), BdevError> {
        let bdev = &*self.bdev;
        let (start, len) = byte_range(io, bdev.num_blocks, bdev.block_size)?;
        // Both fit in usize: the whole store was allocated, so its size does.
        let too_big = || BdevError::OutOfRange {
            offset: io.offset_blocks,
            count: io.num_blocks,
            capacity: bdev.num_blocks,
        };
        let start = usize::try_from(start).map_err(|_| too_big())?;
        let len = usize::try_from(len).map_err(|_| too_big())?;
        let store_error = |_| too_big();
        match io.kind {
            IoKind::Read | IoKind::Write => {
                check_iovs(io, len as u64, bdev.num_blocks)?;
                let mem: &dyn HostMemory = &**io.mem;
                let mut pos = start;
                for iov in io.iovs {
                    let n = iov.len as usize;
                    let store_addr = bdev.store.host_addr(pos).map_err(store_error)?;
                    let copied = if io.kind == IoKind::Read {
                        copy_between(mem, iov.addr, &bdev.store, store_addr, n)
                    } else {
                        copy_between(&bdev.store, store_addr, mem, iov.addr, n)
                    };
                    copied.map_err(BdevError::Memory)?;
                    pos += n;
                }
            }
            IoKind::Unmap | IoKind::WriteZeroes => {
                bdev.store.fill_at(start, len, 0).map_err(store_error)?
            }
            // Writes land in memory at once; there is nothing to make durable.
            IoKind::Flush => {}
        }
        Ok(())
    }
}

impl BdevChannel for MallocChannel {
    fn submit(&mut self, io: &BdevIo<'_>) -> Result<(), BdevError> {
        if self.bdev.removed.load(Ordering::Acquire) {
            return Err(BdevError::Removed(self.bdev.name.clone()));
        }
        self.execute(io)?;
        self.completions.push_back((io.tag, IoStatus::Success));
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, IoStatus)) -> usize {
        report_completions(&mut self.completions, done)
    }

    fn in_flight(&self) -> usize {
        self.completions.len()
    }
}

/// The `malloc` module: RAM bdevs created and deleted over JSON-RPC.
#[derive(Debug)]
pub struct MallocModule {
    budget: Arc<MemoryBudget>,
    /// SPDK names unnamed RAM bdevs `Malloc0`, `Malloc1`, ... from a counter that never goes back.
    next_name: u32,
}

/// `bdev_malloc_create` (SPDK's `rpc_bdev_malloc_create`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MallocCreate {
    name: Option<String>,
    uuid: Option<String>,
    num_blocks: u64,
    block_size: u32,
    physical_block_size: Option<u32>,
    /// A splitting hint for SPDK's bdev layer; rvhost does not split I/O, so it changes nothing.
    #[allow(dead_code)]
    optimal_io_boundary: Option<u32>,
    md_size: Option<u32>,
    md_interleave: Option<bool>,
    dif_type: Option<i32>,
    dif_is_head_of_md: Option<bool>,
    dif_pi_format: Option<i32>,
    /// Memory is not NUMA-placed yet; every node is accepted.
    #[allow(dead_code)]
    numa_id: Option<i32>,
}

impl MallocModule {
    fn create(
        &mut self,
        cx: &mut BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: MallocCreate = decode(params)?;
        refuse_metadata(p.md_size, p.dif_type)?;
        if p.md_interleave == Some(true)
            || p.dif_is_head_of_md == Some(true)
            || p.dif_pi_format.is_some_and(|f| f != 0)
        {
            return Err(RpcError::errno(
                EINVAL,
                "metadata and protection information are not supported",
            ));
        }
        check_physical_block_size(p.physical_block_size, p.block_size)?;
        let name = match p.name {
            Some(name) => name,
            None => self.unused_name(cx),
        };
        let uuid = parse_uuid(p.uuid.as_deref())?;
        cx.check_new_name(&name, uuid)?;
        let bdev = MallocBdev::new(&name, p.num_blocks, p.block_size, uuid, &self.budget)
            .map_err(bdev_error)?;
        let removed = Arc::clone(&bdev);
        cx.register(bdev, Box::new(move || removed.mark_removed()))?;
        tracing::info!(bdev = %name, num_blocks = p.num_blocks, block_size = p.block_size, "created RAM bdev");
        Ok(Value::String(name))
    }

    fn unused_name(&mut self, cx: &BdevContext<'_>) -> String {
        loop {
            let name = format!("Malloc{}", self.next_name);
            self.next_name = self.next_name.wrapping_add(1);
            if !cx.contains(&name) {
                return name;
            }
        }
    }
}

impl BdevModule for MallocModule {
    const NAME: &'static str = "malloc";
    const METHODS: &'static [RpcMethod<Self>] = &[
        RpcMethod {
            name: "bdev_malloc_create",
            old_name: Some("construct_malloc_bdev"),
            handler: Self::create,
        },
        RpcMethod {
            name: "bdev_malloc_delete",
            old_name: Some("delete_malloc_bdev"),
            handler: delete_by_name,
        },
    ];

    fn new(env: &ModuleEnv) -> Self {
        MallocModule {
            budget: Arc::clone(&env.budget),
            next_name: 0,
        }
    }

    fn bdev_config(&self, bdev: &dyn Bdev) -> Option<Value> {
        Some(geometry_config("bdev_malloc_create", bdev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::testing::TestMemory;

    fn budget() -> Arc<MemoryBudget> {
        MemoryBudget::new(64 << 20)
    }

    fn drain(ch: &mut dyn BdevChannel) -> Vec<(u64, IoStatus)> {
        let mut out = Vec::new();
        ch.poll(&mut |tag, status| out.push((tag, status)));
        out
    }

    #[test]
    fn write_then_read_round_trips_through_scattered_buffers() {
        let bdev = MallocBdev::new("Malloc0", 64, 512, [1; 16], &budget()).unwrap();
        let mut ch = Arc::clone(&bdev).open_channel().unwrap();
        let mem = TestMemory::new(8192);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
        mem.write(0, &pattern);
        // Odd-sized, unaligned pieces exercise the partial-word paths.
        let write_iovs = [mem.iov(0, 3), mem.iov(3, 509), mem.iov(0x200, 512)];
        ch.submit(&mem.bdev_io(IoKind::Write, 5, 2, &write_iovs, 11))
            .unwrap();
        assert_eq!(ch.in_flight(), 1);
        assert_eq!(drain(&mut *ch), vec![(11, IoStatus::Success)]);
        assert_eq!(ch.in_flight(), 0);

        let read_iovs = [mem.iov(0x1001, 1000), mem.iov(0x1800, 24)];
        ch.submit(&mem.bdev_io(IoKind::Read, 5, 2, &read_iovs, 12))
            .unwrap();
        assert_eq!(drain(&mut *ch), vec![(12, IoStatus::Success)]);
        assert_eq!(mem.read(0x1001, 1000), &pattern[..1000]);
        assert_eq!(mem.read(0x1800, 24), &pattern[1000..]);
    }

    #[test]
    fn large_io_round_trips() {
        let bdev = MallocBdev::new("Malloc0", 1024, 4096, [2; 16], &budget()).unwrap();
        let mut ch = Arc::clone(&bdev).open_channel().unwrap();
        let len = 3 * 65536 + 4096;
        let mem = TestMemory::new(2 * len);
        let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        mem.write(0, &pattern);
        let blocks = (len / 4096) as u64;
        let w = [mem.iov(0, len as u32)];
        ch.submit(&mem.bdev_io(IoKind::Write, 7, blocks, &w, 1))
            .unwrap();
        let r = [mem.iov(len, len as u32)];
        ch.submit(&mem.bdev_io(IoKind::Read, 7, blocks, &r, 2))
            .unwrap();
        assert_eq!(
            drain(&mut *ch),
            vec![(1, IoStatus::Success), (2, IoStatus::Success)]
        );
        assert_eq!(mem.read(len, len), pattern);
    }

    #[test]
    fn unmap_and_write_zeroes_zero_only_their_range() {
        let bdev = MallocBdev::new("Malloc0", 8, 512, [3; 16], &budget()).unwrap();
        let mut ch = Arc::clone(&bdev).open_channel().unwrap();
        let mem = TestMemory::new(8 * 512);
        mem.fill(0, 8 * 512, 0xab);
        let all = [mem.iov(0, 8 * 512)];
        ch.submit(&mem.bdev_io(IoKind::Write, 0, 8, &all, 1))
            .unwrap();
        ch.submit(&mem.bdev_io(IoKind::Unmap, 1, 2, &[], 2))
            .unwrap();
        ch.submit(&mem.bdev_io(IoKind::WriteZeroes, 6, 1, &[], 3))
            .unwrap();
        ch.submit(&mem.bdev_io(IoKind::Flush, 0, 0, &[], 4))
            .unwrap();
        mem.fill(0, 8 * 512, 0x55);
        ch.submit(&mem.bdev_io(IoKind::Read, 0, 8, &all, 5))
            .unwrap();
        assert_eq!(drain(&mut *ch).len(), 5);
        let bytes = mem.read(0, 8 * 512);
        for block in 0..8 {
            let expect = if matches!(block, 1 | 2 | 6) { 0 } else { 0xab };
            assert!(
                bytes[block * 512..(block + 1) * 512]
                    .iter()
                    .all(|b| *b == expect),
                "block {block}"
            );
        }
    }

    #[test]
    fn rejects_out_of_range_and_mismatched_buffers_without_completing() {
        let bdev = MallocBdev::new("Malloc0", 8, 512, [4; 16], &budget()).unwrap();
        let mut ch = Arc::clone(&bdev).open_channel().unwrap();
        let mem = TestMemory::new(4096);
        let one = [mem.iov(0, 512)];
        for bad in [
            mem.bdev_io(IoKind::Read, 8, 1, &one, 1),
            mem.bdev_io(IoKind::Read, u64::MAX, 2, &one, 2),
            mem.bdev_io(IoKind::Write, 0, 2, &one, 3),
            mem.bdev_io(IoKind::Unmap, 7, 2, &[], 4),
        ] {
            assert!(matches!(ch.submit(&bad), Err(BdevError::OutOfRange { .. })));
        }
        // A buffer outside the I/O's memory is refused, not a panic.
        let outside = [mem.iov(4096, 512)];
        assert!(matches!(
            ch.submit(&mem.bdev_io(IoKind::Read, 0, 1, &outside, 5)),
            Err(BdevError::Memory(_))
        ));
        assert_eq!(ch.in_flight(), 0);
        assert!(drain(&mut *ch).is_empty());
    }

    #[test]
    fn removed_bdev_refuses_io_and_channels() {
        let bdev = MallocBdev::new("Malloc0", 8, 512, [5; 16], &budget()).unwrap();
        let mut ch = Arc::clone(&bdev).open_channel().unwrap();
        bdev.mark_removed();
        let mem = TestMemory::new(512);
        let one = [mem.iov(0, 512)];
        assert!(matches!(
            ch.submit(&mem.bdev_io(IoKind::Read, 0, 1, &one, 1)),
            Err(BdevError::Removed(_))
        ));
        assert!(matches!(
            Arc::clone(&bdev).open_channel(),
            Err(BdevError::Removed(_))
        ));
    }

    #[test]
    fn validates_geometry_and_enforces_the_memory_budget() {
        let budget = MemoryBudget::new(1 << 20);
        for bs in [0, 256, 513, 1000, 131072] {
            assert!(matches!(
                MallocBdev::new("m", 8, bs, [0; 16], &budget),
                Err(BdevError::InvalidParams(_))
            ));
        }
        assert!(matches!(
            MallocBdev::new("m", 0, 512, [0; 16], &budget),
            Err(BdevError::InvalidParams(_))
        ));
        assert!(matches!(
            MallocBdev::new("m", u64::MAX, 4096, [0; 16], &budget),
            Err(BdevError::InvalidParams(_))
        ));
        let a = MallocBdev::new("a", 1024, 512, [0; 16], &budget).unwrap();
        assert_eq!(budget.used_bytes(), 512 * 1024);
        let _b = MallocBdev::new("b", 1024, 512, [0; 16], &budget).unwrap();
        assert!(matches!(
            MallocBdev::new("c", 1, 512, [0; 16], &budget),
            Err(BdevError::Backend(_))
        ));
        drop(a);
        assert_eq!(budget.used_bytes(), 512 * 1024);
        MallocBdev::new("c", 1, 512, [0; 16], &budget).unwrap();
    }

    #[test]
    fn concurrent_channels_see_each_others_writes() {
        let bdev = MallocBdev::new("Malloc0", 256, 512, [6; 16], &budget()).unwrap();
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let bdev = Arc::clone(&bdev);
                std::thread::spawn(move || {
                    let mut ch = bdev.open_channel().unwrap();
                    let mem = TestMemory::new(512);
                    mem.fill(0, 512, t + 1);
                    let iov = [mem.iov(0, 512)];
                    for block in (u64::from(t)..256).step_by(4) {
                        ch.submit(&mem.bdev_io(IoKind::Write, block, 1, &iov, block))
                            .unwrap();
                    }
                    drain(&mut *ch).len()
                })
            })
            .collect();
        let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(total, 256);
        let mut ch = Arc::clone(&bdev).open_channel().unwrap();
        let mem = TestMemory::new(256 * 512);
        let iov = [mem.iov(0, 256 * 512)];
        ch.submit(&mem.bdev_io(IoKind::Read, 0, 256, &iov, 0))
            .unwrap();
        let bytes = mem.read(0, 256 * 512);
        for block in 0..256 {
            let expect = (block % 4) as u8 + 1;
            assert!(bytes[block * 512..(block + 1) * 512]
                .iter()
                .all(|b| *b == expect));
        }
    }
}
