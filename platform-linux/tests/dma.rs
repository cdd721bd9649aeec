//! Hugepage DMA memory and its 4 KiB fallback.

use std::sync::Mutex;

use rvhost_core::mem::MemError;
use rvhost_platform_linux::dma::{configured_hugepages, HUGEPAGE_SIZE, NR_HUGEPAGES_PATH};
use rvhost_platform_linux::{
    copy_between, DmaBuffer, DmaError, DmaPool, HostMemory, PageKind, PagePolicy, SharedDmaMemory,
};

/// Tests that read or change the hugepage reservation run one at a time.
static HUGEPAGES: Mutex<()> = Mutex::new(());

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Raises `nr_hugepages` to at least `pages` for the life of the guard (never lowers it, so a
/// machine's own reservation is left alone) and restores the old value afterwards.
struct Reservation {
    old: u64,
}

impl Reservation {
    fn try_reserve_at_least(pages: u64) -> Option<Reservation> {
        if !is_root() {
            return None;
        }
        let old = configured_hugepages()?;
        if old < pages {
            std::fs::write(NR_HUGEPAGES_PATH, pages.to_string()).ok()?;
        }
        Some(Reservation { old })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if configured_hugepages() != Some(self.old) {
            let _ = std::fs::write(NR_HUGEPAGES_PATH, self.old.to_string());
        }
    }
}

/// Free 2 MiB hugepages right now (`HugePages_Free` in /proc/meminfo).
fn free_hugepages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("HugePages_Free:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn hugepages_when_reserved_else_fallback() {
    let _serial = HUGEPAGES.lock().unwrap_or_else(|e| e.into_inner());
    let _reservation = Reservation::try_reserve_at_least(16);
    let free = free_hugepages();
    if free >= 4 {
        eprintln!("hugepage path: {free} free 2 MiB pages");
        let mut buf = DmaBuffer::allocate(3 << 20).expect("hugepages are reserved");
        assert_eq!(buf.page_kind(), PageKind::Huge2MiB);
        assert!(buf.is_hugepage());
        assert_eq!(buf.len(), 3 << 20);
        let (map_va, map_len) = buf.mapping();
        assert_eq!(map_len, 4 << 20, "rounded up to whole 2 MiB pages");
        assert_eq!(map_va % HUGEPAGE_SIZE as u64, 0, "hugepage aligned");
        assert_eq!(buf.va(), map_va);
        buf.as_mut_slice()[(3 << 20) - 1] = 0xee;
        assert_eq!(buf.as_slice()[(3 << 20) - 1], 0xee);
        assert!(
            buf.as_slice()[..4096].iter().all(|&b| b == 0),
            "zero-filled"
        );
        assert_eq!(
            free_hugepages(),
            free - 2,
            "the kernel handed out two hugepages"
        );
        let strict = DmaBuffer::allocate_with(HUGEPAGE_SIZE, PagePolicy::HugeOnly).unwrap();
        assert!(strict.is_hugepage());
        let pool = DmaPool::new(4096, 64, PagePolicy::HugeOnly).unwrap();
        assert!(pool.is_hugepage());
        // More than is free: HugeOnly fails, PreferHuge falls back to base pages.
        let too_many = usize::try_from(free_hugepages() + 1).unwrap() * HUGEPAGE_SIZE;
        assert!(matches!(
            DmaBuffer::allocate_with(too_many, PagePolicy::HugeOnly),
            Err(DmaError::Mmap {
                kind: PageKind::Huge2MiB,
                ..
            })
        ));
        let fallback = DmaBuffer::allocate(too_many).unwrap();
        assert_eq!(fallback.page_kind(), PageKind::Base);
        drop(buf);
        drop(strict);
        drop(pool);
        assert_eq!(free_hugepages(), free, "hugepages are returned on drop");
    } else {
        // No hugepages can be had here (not root, or the kernel refused): fall back, and
        // HugeOnly fails with a typed error.
        eprintln!("fallback path: no free hugepages");
        let buf = DmaBuffer::allocate(3 << 20).unwrap();
        assert_eq!(buf.page_kind(), PageKind::Base);
        assert!(matches!(
            DmaBuffer::allocate_with(HUGEPAGE_SIZE * 8, PagePolicy::HugeOnly),
            Err(DmaError::Mmap {
                kind: PageKind::Huge2MiB,
                ..
            })
        ));
    }
}

#[test]
fn fallback_when_no_hugepages_configured() {
    let _serial = HUGEPAGES.lock().unwrap_or_else(|e| e.into_inner());
    if configured_hugepages() != Some(0) {
        // Someone reserved hugepages on this machine; the fallback is still reachable explicitly.
        let buf = DmaBuffer::allocate_with(10_000, PagePolicy::SmallOnly).unwrap();
        assert_eq!(buf.page_kind(), PageKind::Base);
        return;
    }
    let mut buf = DmaBuffer::allocate(10_000).unwrap();
    assert_eq!(buf.page_kind(), PageKind::Base);
    assert_eq!(buf.len(), 10_000);
    assert_eq!(buf.mapping().1, 12_288, "rounded up to whole 4 KiB pages");
    assert_eq!(buf.va() % 4096, 0);
    buf.as_mut_slice().fill(0x11);
    assert!(buf.as_slice().iter().all(|&b| b == 0x11));
}

#[test]
fn zero_and_huge_sizes_are_errors() {
    assert!(matches!(DmaBuffer::allocate(0), Err(DmaError::ZeroSize)));
    assert!(matches!(
        DmaBuffer::allocate(usize::MAX),
        Err(DmaError::TooLarge(_))
    ));
    assert!(matches!(
        DmaPool::new(0, 4, PagePolicy::SmallOnly),
        Err(DmaError::ZeroSize)
    ));
    assert!(matches!(
        DmaPool::new(4096, usize::MAX, PagePolicy::SmallOnly),
        Err(DmaError::TooLarge(_))
    ));
}

#[test]
fn buffer_access_is_host_memory() {
    let mut buf = DmaBuffer::allocate_with(8192, PagePolicy::SmallOnly).unwrap();
    let va = buf.va();
    {
        let access = buf.access();
        access.copy_to_host(va + 100, b"bounce").unwrap();
        access.fill_host(va + 8000, 192, 0xff).unwrap();
        let mut out = [0u8; 6];
        access.copy_from_host(va + 100, &mut out).unwrap();
        assert_eq!(&out, b"bounce");
        assert_eq!(
            access.fill_host(va + 8000, 193, 0),
            Err(MemError::Unmapped {
                addr: va + 8000,
                len: 193
            })
        );
        assert!(access.copy_to_host(va - 1, &[0]).is_err());
        assert!(access.copy_to_host(va + 8192, &[0]).is_err());
        assert!(access.copy_to_host(va + 8192, &[]).is_ok());
        assert_eq!(
            access.copy_to_host(u64::MAX, &[0, 0]),
            Err(MemError::Overflow)
        );
    }
    assert_eq!(&buf.as_slice()[100..106], b"bounce");
    assert!(buf.as_slice()[8000..].iter().all(|&b| b == 0xff));
    assert_eq!(buf.as_slice()[7999], 0);
}

#[test]
fn shared_memory_is_shared_between_threads() {
    let disk = SharedDmaMemory::allocate_with(1 << 20, PagePolicy::SmallOnly).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let disk = disk.clone();
            s.spawn(move || {
                let block = vec![t + 1; 4096];
                for i in 0..64usize {
                    disk.write_at((usize::from(t) * 64 + i) * 4096, &block)
                        .unwrap();
                }
            });
        }
    });
    for t in 0..4u8 {
        let mut block = vec![0u8; 4096];
        disk.read_at(usize::from(t) * 64 * 4096 + 63 * 4096, &mut block)
            .unwrap();
        assert!(block.iter().all(|&b| b == t + 1));
    }
    assert!(disk.write_at((1 << 20) - 1, &[0, 0]).is_err());
    assert!(disk.read_at(usize::MAX, &mut [0]).is_err());
    disk.fill_at(0, 4096, 0).unwrap();
    assert_eq!(disk.host_addr(1 << 20), Ok(disk.va() + (1 << 20)));
    assert!(disk.host_addr((1 << 20) + 1).is_err());
    // Copies between two shared memories by host address.
    let other = SharedDmaMemory::allocate_with(4096, PagePolicy::SmallOnly).unwrap();
    copy_between(
        &other,
        other.va(),
        &disk,
        disk.host_addr(4096).unwrap(),
        4096,
    )
    .unwrap();
    let mut block = vec![0u8; 4096];
    other.read_at(0, &mut block).unwrap();
    assert!(block.iter().all(|&b| b == 1));
}

#[test]
fn pool_hands_out_distinct_aligned_buffers_and_takes_them_back() {
    let pool = DmaPool::new(3000, 8, PagePolicy::SmallOnly).unwrap();
    assert_eq!(pool.capacity(), 8);
    assert_eq!(pool.buffer_size(), 3000);
    let mut held: Vec<DmaBuffer> = (0..8).map(|_| pool.alloc().expect("capacity 8")).collect();
    assert!(pool.alloc().is_none());
    assert_eq!(pool.available(), 0);
    let (map_va, map_len) = pool.mapping();
    let mut vas: Vec<u64> = held.iter().map(|b| b.va()).collect();
    vas.sort_unstable();
    vas.dedup();
    assert_eq!(vas.len(), 8);
    for (i, b) in held.iter_mut().enumerate() {
        assert_eq!(b.va() % 4096, 0);
        assert_eq!(b.len(), 3000);
        assert!(b.va() >= map_va && b.va() + 3000 <= map_va + map_len as u64);
        b.as_mut_slice().fill(i as u8);
    }
    // Writes stay inside each buffer.
    for (i, b) in held.iter().enumerate() {
        assert!(b.as_slice().iter().all(|&x| x == i as u8));
    }
    // Buffers come back on drop, from any thread.
    let one = held.pop().unwrap();
    std::thread::spawn(move || drop(one)).join().unwrap();
    assert_eq!(pool.available(), 1);
    drop(held);
    assert_eq!(pool.available(), 8);
    // A buffer turned into shared memory stays out of the pool for good.
    let shared = pool.alloc().unwrap().into_shared();
    assert_eq!(pool.available(), 7);
    drop(shared);
    assert_eq!(pool.available(), 7);
    // The mapping outlives the pool while buffers remain.
    let mut last = pool.alloc().unwrap();
    drop(pool);
    last.as_mut_slice()[2999] = 1;
    assert_eq!(last.as_slice()[2999], 1);
}
