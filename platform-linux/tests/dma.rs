//! Hugepage DMA memory and its 4 KiB fallback.

use std::sync::{Arc, Mutex};

use rvhost_core::mem::MemError;
use rvhost_platform_linux::dma::{configured_hugepages, HUGEPAGE_SIZE, NR_HUGEPAGES_PATH};
use rvhost_platform_linux::{
    copy_between, DmaBuffer, DmaError, DmaMapper, PageKind, PagePolicy, SharedDmaMemory,
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

/// A `/proc/meminfo` count of 2 MiB hugepages (`HugePages_Free`, `HugePages_Total`).
fn meminfo_hugepages(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Free 2 MiB hugepages right now, machine-wide.
fn free_hugepages() -> u64 {
    meminfo_hugepages("HugePages_Free:")
}

/// KiB of hugepages backing this process's mapping that starts at `va` (`Private_Hugetlb` plus
/// `Shared_Hugetlb` of its `/proc/self/smaps` entry), or `None` if no mapping starts there.
/// Unlike `HugePages_Free` it is not moved by other processes taking or returning hugepages.
fn mapping_hugetlb_kib(va: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let start = format!("{va:x}-");
    let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
    lines.next()?;
    let mut kib = 0;
    // The entry's fields, up to the next mapping's header line (which has no ':' after its
    // first word).
    for line in lines.take_while(|l| {
        l.split_whitespace()
            .next()
            .is_some_and(|w| w.ends_with(':'))
    }) {
        if let Some(v) = line
            .strip_prefix("Private_Hugetlb:")
            .or_else(|| line.strip_prefix("Shared_Hugetlb:"))
        {
            kib += v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()?;
        }
    }
    Some(kib)
}

#[test]
fn hugepages_when_reserved_else_fallback() {
    let _serial = HUGEPAGES.lock().unwrap_or_else(|e| e.into_inner());
    let _reservation = Reservation::try_reserve_at_least(16);
    let free = free_hugepages();
    if free >= 4 {
        eprintln!("hugepage path: {free} free 2 MiB pages");
        let buf = DmaBuffer::allocate(3 << 20).expect("hugepages are reserved");
        assert_eq!(buf.page_kind(), PageKind::Huge2MiB);
        assert!(buf.is_hugepage());
        assert_eq!(buf.len(), 3 << 20);
        let (map_va, map_len) = buf.mapping();
        assert_eq!(map_len, 4 << 20, "rounded up to whole 2 MiB pages");
        assert_eq!(map_va % HUGEPAGE_SIZE as u64, 0, "hugepage aligned");
        assert_eq!(buf.va(), map_va);
        buf.write_at((3 << 20) - 1, &[0xee]).unwrap();
        let mut last = [0u8];
        buf.read_at((3 << 20) - 1, &mut last).unwrap();
        assert_eq!(last, [0xee]);
        let mut first = vec![0xffu8; 4096];
        buf.read_at(0, &mut first).unwrap();
        assert!(first.iter().all(|&b| b == 0), "zero-filled");
        assert_eq!(
            mapping_hugetlb_kib(map_va),
            Some(4096),
            "two hugepages back the mapping"
        );
        let strict = DmaBuffer::allocate_with(HUGEPAGE_SIZE, PagePolicy::HugeOnly).unwrap();
        assert!(strict.is_hugepage());
        let shared = SharedDmaMemory::allocate_with(4096, PagePolicy::HugeOnly).unwrap();
        assert!(shared.is_hugepage());
        // More than the machine has: HugeOnly fails, PreferHuge falls back to base pages.
        let too_many =
            usize::try_from(meminfo_hugepages("HugePages_Total:") + 1).unwrap() * HUGEPAGE_SIZE;
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
        drop(shared);
        assert_eq!(
            mapping_hugetlb_kib(map_va),
            None,
            "the mapping is gone on drop"
        );
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
    let buf = DmaBuffer::allocate(10_000).unwrap();
    assert_eq!(buf.page_kind(), PageKind::Base);
    assert_eq!(buf.len(), 10_000);
    assert_eq!(buf.mapping().1, 12_288, "rounded up to whole 4 KiB pages");
    assert_eq!(buf.va() % 4096, 0);
    buf.fill_at(0, 10_000, 0x11).unwrap();
    let mut all = vec![0u8; 10_000];
    buf.read_at(0, &mut all).unwrap();
    assert!(all.iter().all(|&b| b == 0x11));
}

#[test]
fn zero_and_huge_sizes_are_errors() {
    assert!(matches!(DmaBuffer::allocate(0), Err(DmaError::ZeroSize)));
    assert!(matches!(
        DmaBuffer::allocate(usize::MAX),
        Err(DmaError::TooLarge(_))
    ));
    assert!(matches!(
        SharedDmaMemory::allocate_with(0, PagePolicy::SmallOnly),
        Err(DmaError::ZeroSize)
    ));
    assert!(matches!(
        SharedDmaMemory::allocate_with(usize::MAX - 1, PagePolicy::SmallOnly),
        Err(DmaError::TooLarge(_))
    ));
}

#[test]
fn buffer_copies_are_range_checked() {
    let buf = DmaBuffer::allocate_with(8192, PagePolicy::SmallOnly).unwrap();
    buf.write_at(100, b"bounce").unwrap();
    buf.fill_at(8000, 192, 0xff).unwrap();
    let mut out = [0u8; 6];
    buf.read_at(100, &mut out).unwrap();
    assert_eq!(&out, b"bounce");
    assert_eq!(
        buf.fill_at(8000, 193, 0),
        Err(MemError::Unmapped {
            addr: buf.va() + 8000,
            len: 193
        })
    );
    assert!(buf.write_at(8192, &[0]).is_err());
    assert!(buf.write_at(8192, &[]).is_ok());
    assert_eq!(buf.write_at(usize::MAX, &[0, 0]), Err(MemError::Overflow));
    assert!(buf.read_at(8191, &mut [0, 0]).is_err());
    let mut tail = [0u8; 193];
    buf.read_at(7999, &mut tail).unwrap();
    assert_eq!(tail[0], 0);
    assert!(tail[1..].iter().all(|&b| b == 0xff));
    // Raw pointers for device structures: only for ranges inside the buffer.
    assert_eq!(
        buf.ptr_at(0, 8192).map(|p| p.as_ptr() as u64),
        Some(buf.va())
    );
    assert_eq!(
        buf.ptr_at(4096, 0).map(|p| p.as_ptr() as u64),
        Some(buf.va() + 4096)
    );
    assert!(buf.ptr_at(4096, 4097).is_none());
    assert!(buf.ptr_at(usize::MAX, 2).is_none());
}

/// Records what a device's IOMMU was asked to do; `fail_unmap` makes unmapping fail.
#[derive(Debug, Default)]
struct RecordingMapper {
    log: Mutex<Vec<(&'static str, u64, u64)>>,
    fail_unmap: bool,
}

impl DmaMapper for RecordingMapper {
    unsafe fn map(&self, vaddr: u64, len: u64) -> Result<(), DmaError> {
        self.log.lock().unwrap().push(("map", vaddr, len));
        Ok(())
    }
    fn unmap(&self, vaddr: u64, len: u64) -> Result<(), DmaError> {
        self.log.lock().unwrap().push(("unmap", vaddr, len));
        if self.fail_unmap {
            return Err(DmaError::Unmap {
                iova: vaddr,
                len,
                reason: "test".into(),
            });
        }
        Ok(())
    }
}

/// Is `va` inside a mapping of this process (`/proc/self/maps`)?
fn is_mapped(va: u64) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().any(|l| {
        let range = l.split_whitespace().next().unwrap_or("");
        let (lo, hi) = range.split_once('-').unwrap_or(("0", "0"));
        let lo = u64::from_str_radix(lo, 16).unwrap_or(0);
        let hi = u64::from_str_radix(hi, 16).unwrap_or(0);
        (lo..hi).contains(&va)
    })
}

/// Set in the process [`run_alone`] starts.
const ALONE_ENV: &str = "RVHOST_DMA_TEST_ALONE";

/// Runs the test `name` of this binary again in a process of its own, with no other test
/// beside it, and fails if it fails there; `false` in that process, where the caller goes on
/// with the test itself. For tests that look at this process's mappings after a buffer is freed:
/// a mapping made meanwhile by another thread (the stack of the harness's next test thread, a
/// buffer of another test) can take the freed range (seen in 51 of 300 runs of this binary).
fn run_alone(name: &str) -> bool {
    if std::env::var_os(ALONE_ENV).is_some() {
        return false;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = std::process::Command::new(exe)
        .args(["--exact", name, "--test-threads=1", "--nocapture"])
        .env(ALONE_ENV, "1")
        .output()
        .expect("the test binary runs again");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{name}, alone: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

#[test]
fn device_buffers_are_aligned_zeroed_and_mapped_with_iova_equal_to_va() {
    if run_alone("device_buffers_are_aligned_zeroed_and_mapped_with_iova_equal_to_va") {
        return;
    }
    let mapper = Arc::new(RecordingMapper::default());
    let region =
        DmaBuffer::allocate_for_device(10_000, PagePolicy::PreferHuge, mapper.clone()).unwrap();
    assert_eq!(region.iova(), region.va());
    assert_eq!(region.iova() % 4096, 0);
    assert!(region.len() >= 10_000);
    let (map_va, map_len) = region.mapping();
    assert_eq!(map_va, region.va());
    assert_eq!(map_len % 4096, 0);
    if region.is_hugepage() {
        assert_eq!(map_len % HUGEPAGE_SIZE, 0);
        assert_eq!(map_va % HUGEPAGE_SIZE as u64, 0);
    }
    let mut buf = vec![0xAAu8; 64];
    region.read_at(region.len() - 64, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    region.write_at(100, b"hello").unwrap();
    let mut back = [0u8; 5];
    region.read_at(100, &mut back).unwrap();
    assert_eq!(&back, b"hello");
    assert!(
        region.write_at(region.len() - 2, b"abc").is_err(),
        "out of range write refused"
    );
    assert!(region.ptr_at(usize::MAX, 2).is_none());
    drop(region);
    assert_eq!(
        *mapper.log.lock().unwrap(),
        vec![
            ("map", map_va, map_len as u64),
            ("unmap", map_va, map_len as u64)
        ],
        "the whole mapping is mapped for the device, and unmapped on drop"
    );
    assert!(!is_mapped(map_va), "then the memory is freed");
}

#[test]
fn device_buffers_that_cannot_be_unmapped_are_leaked() {
    let mapper = Arc::new(RecordingMapper {
        fail_unmap: true,
        ..RecordingMapper::default()
    });
    let region =
        DmaBuffer::allocate_for_device(4096, PagePolicy::SmallOnly, mapper.clone()).unwrap();
    let va = region.va();
    drop(region);
    assert_eq!(mapper.log.lock().unwrap().len(), 2);
    assert!(
        is_mapped(va),
        "the IOMMU may still point at the pages: they are never given back"
    );
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
