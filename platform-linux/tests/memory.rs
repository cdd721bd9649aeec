//! Guest memory tables built from real memfds, as QEMU would send them.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use proptest::prelude::*;
use rvhost_core::mem::{GuestMemory, MemError};
use rvhost_platform_linux::{
    copy_between, HostMemory, MemoryTable, MemoryTableError, PagePolicy, RegionSpec,
    SharedDmaMemory, MAX_MEM_SLOTS,
};

/// A memfd of `len` bytes (what QEMU's `memory-backend-memfd` hands a backend).
fn memfd(len: u64) -> File {
    // SAFETY: the name is a valid NUL-terminated string; the result is checked.
    let raw = unsafe { libc::memfd_create(c"rvhost-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(
        raw >= 0,
        "memfd_create: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    file.set_len(len).expect("ftruncate");
    file
}

fn fd_of(file: &File) -> OwnedFd {
    file.try_clone().expect("dup").into()
}

const VA_LOW: u64 = 0x7f00_0000_0000;
const VA_HIGH: u64 = 0x7f40_0000_0000;

/// Low: GPA 0x0..0x10000 from file offset 0. High: GPA 0x10_0000..0x12_0000 from file offset
/// 0x13000 (a non-zero mmap_offset, as QEMU sends for RAM above a hole).
fn two_regions() -> (File, Arc<MemoryTable>, RegionSpec, RegionSpec) {
    let file = memfd(0x40000);
    let low = RegionSpec {
        guest_phys_addr: 0,
        memory_size: 0x10000,
        userspace_addr: VA_LOW,
        mmap_offset: 0,
    };
    let high = RegionSpec {
        guest_phys_addr: 0x10_0000,
        memory_size: 0x20000,
        userspace_addr: VA_HIGH,
        mmap_offset: 0x13000,
    };
    let table = MemoryTable::from_regions([(high, fd_of(&file)), (low, fd_of(&file))])
        .expect("two valid regions");
    (file, table, low, high)
}

#[test]
fn regions_are_sorted_and_honour_mmap_offset() {
    let (file, table, low, high) = two_regions();
    assert_eq!(table.len(), 2);
    let specs: Vec<RegionSpec> = table.regions().map(|(s, _)| s).collect();
    assert_eq!(specs, vec![low, high]);

    // Bytes written to the file at mmap_offset + x appear at GPA guest_phys_addr + x.
    file.write_all_at(b"high region", 0x13000 + 0x10).unwrap();
    file.write_all_at(b"low region", 0x20).unwrap();
    let mut buf = [0u8; 11];
    table.read(0x10_0010, &mut buf).unwrap();
    assert_eq!(&buf, b"high region");
    let mut buf = [0u8; 10];
    table.read(0x20, &mut buf).unwrap();
    assert_eq!(&buf, b"low region");

    // And the other way: guest writes land in the file (MAP_SHARED).
    table.write(0x11_fff0, &[0xab; 16]).unwrap();
    let mut back = [0u8; 16];
    file.read_exact_at(&mut back, 0x13000 + 0x1fff0).unwrap();
    assert_eq!(back, [0xab; 16]);
}

#[test]
fn translation_checks_boundaries() {
    let (_file, table, _, _) = two_regions();
    let low_host = table.translate(0, 0x10000).unwrap();
    let high_host = table.translate(0x10_0000, 0x20000).unwrap();
    assert_eq!(table.translate(0x1234, 4), Ok(low_host + 0x1234));
    assert_eq!(table.translate(0x10_0008, 8), Ok(high_host + 8));
    // Zero-length ranges at a region's end are valid, one byte further is not.
    assert_eq!(table.translate(0x10000, 0), Ok(low_host + 0x10000));
    assert_eq!(table.translate(0x12_0000, 0), Ok(high_host + 0x20000));
    assert_eq!(
        table.translate(0x10000, 1),
        Err(MemError::Unmapped {
            addr: 0x10000,
            len: 1
        })
    );
    assert_eq!(
        table.translate(0xffff, 2),
        Err(MemError::Unmapped {
            addr: 0xffff,
            len: 2
        })
    );
    assert_eq!(
        table.translate(0x11_ffff, 2),
        Err(MemError::Unmapped {
            addr: 0x11_ffff,
            len: 2
        })
    );
    assert_eq!(
        table.translate(0x0f_ffff, 1),
        Err(MemError::Unmapped {
            addr: 0x0f_ffff,
            len: 1
        })
    );
    assert_eq!(
        table.translate(0x20_0000, 0),
        Err(MemError::Unmapped {
            addr: 0x20_0000,
            len: 0
        })
    );
    assert_eq!(table.translate(u64::MAX, 2), Err(MemError::Overflow));
    assert_eq!(table.translate(8, u64::MAX), Err(MemError::Overflow));
    // Reads and writes apply the same checks and leave the buffer alone on error.
    let mut buf = [7u8; 4];
    assert!(table.read(0xfffe, &mut buf).is_err());
    assert_eq!(buf, [7; 4]);
    assert!(table.write(0x11_fffe, &buf).is_err());
}

#[test]
fn ranges_straddling_adjacent_regions_are_rejected() {
    // QEMU may split one RAM block into adjacent regions; a range across the seam must be refused
    // because its host addresses need not be contiguous.
    let file = memfd(0x20000);
    let a = RegionSpec {
        guest_phys_addr: 0,
        memory_size: 0x10000,
        userspace_addr: VA_LOW,
        mmap_offset: 0,
    };
    let b = RegionSpec {
        guest_phys_addr: 0x10000,
        memory_size: 0x10000,
        userspace_addr: VA_LOW + 0x10000,
        mmap_offset: 0x10000,
    };
    let table = MemoryTable::from_regions([(a, fd_of(&file)), (b, fd_of(&file))]).unwrap();
    assert_eq!(
        table.translate(0xfff0, 0x20),
        Err(MemError::Unmapped {
            addr: 0xfff0,
            len: 0x20
        })
    );
    assert!(table.translate(0xfff0, 0x10).is_ok());
    assert!(table.translate(0x10000, 0x10).is_ok());
    // The frontend-VA view is contiguous here, but a VA range still has to be inside one region.
    assert!(table.frontend_va_to_host(VA_LOW + 0xfff0, 0x20).is_err());
    assert!(table.frontend_va_to_host(VA_LOW + 0x10000, 0x20).is_ok());
}

#[test]
fn atomic_u16_accesses() {
    let (file, table, _, _) = two_regions();
    table
        .store_u16(0x10_0002, 0xbeef, Ordering::Release)
        .unwrap();
    let mut raw = [0u8; 2];
    file.read_exact_at(&mut raw, 0x13002).unwrap();
    assert_eq!(raw, [0xef, 0xbe], "stored little-endian");
    file.write_all_at(&[0x34, 0x12], 0x13004).unwrap();
    assert_eq!(table.load_u16(0x10_0004, Ordering::Acquire), Ok(0x1234));
    // Orderings that are invalid for the operation are strengthened, not a panic.
    assert_eq!(table.load_u16(0x10_0004, Ordering::Release), Ok(0x1234));
    assert_eq!(table.load_u16(0x10_0004, Ordering::AcqRel), Ok(0x1234));
    table.store_u16(0x10_0004, 1, Ordering::Acquire).unwrap();
    table.store_u16(0x10_0006, 2, Ordering::SeqCst).unwrap();
    assert_eq!(table.load_u16(0x10_0004, Ordering::Relaxed), Ok(1));
    assert_eq!(
        table.load_u16(0x10_0003, Ordering::Acquire),
        Err(MemError::Misaligned { addr: 0x10_0003 })
    );
    assert_eq!(
        table.store_u16(0x10001, 0, Ordering::Release),
        Err(MemError::Misaligned { addr: 0x10001 })
    );
    assert_eq!(
        table.load_u16(0x10000, Ordering::Acquire),
        Err(MemError::Unmapped {
            addr: 0x10000,
            len: 2
        })
    );
    assert_eq!(table.load_u16(0xfffe, Ordering::Acquire), Ok(0));
}

#[test]
fn prefetch_is_a_hint_anywhere() {
    let (file, table, _, _) = two_regions();
    file.write_all_at(&[0x34, 0x12], 0x13004).unwrap();
    // Mapped, unmapped, region ends and the top of the address space: no fault, no change.
    for addr in [0x10_0004, 0x10000, 0xffff, 0, u64::MAX, u64::MAX - 63] {
        table.prefetch(addr, false);
        table.prefetch(addr, true);
    }
    assert_eq!(table.load_u16(0x10_0004, Ordering::Acquire), Ok(0x1234));
}

#[test]
fn frontend_addresses_translate_through_userspace_addr() {
    let (_file, table, _, _) = two_regions();
    assert_eq!(table.frontend_va_to_gpa(VA_LOW), Ok(0));
    assert_eq!(table.frontend_va_to_gpa(VA_LOW + 0xfff), Ok(0xfff));
    assert_eq!(table.frontend_va_to_gpa(VA_HIGH + 0x1000), Ok(0x10_1000));
    assert_eq!(
        table.frontend_va_to_gpa(VA_LOW + 0x10000),
        Err(MemError::Unmapped {
            addr: VA_LOW + 0x10000,
            len: 1
        })
    );
    assert!(table.frontend_va_to_gpa(VA_HIGH - 1).is_err());
    let host = table.frontend_va_to_host(VA_HIGH + 0x100, 0x10).unwrap();
    assert_eq!(Ok(host), table.translate(0x10_0100, 0x10));
    assert!(table.frontend_va_to_host(VA_HIGH + 0x1fff0, 0x11).is_err());
    assert_eq!(
        table.frontend_va_to_host(u64::MAX, 2),
        Err(MemError::Overflow)
    );
}

#[test]
fn add_and_remove_regions_produce_new_tables() {
    let (file, table, low, high) = two_regions();
    let extra_file = memfd(0x8000);
    extra_file.write_all_at(b"hotplug", 0x1000).unwrap();
    let extra = RegionSpec {
        guest_phys_addr: 0x4000_0000,
        memory_size: 0x4000,
        userspace_addr: 0x7f80_0000_0000,
        mmap_offset: 0x1000,
    };
    let grown = table.with_region_added(extra, fd_of(&extra_file)).unwrap();
    assert_eq!(table.len(), 2, "the old table is unchanged");
    assert_eq!(grown.len(), 3);
    assert!(table.translate(0x4000_0000, 1).is_err());
    let mut buf = [0u8; 7];
    grown.read(0x4000_0000, &mut buf).unwrap();
    assert_eq!(&buf, b"hotplug");
    // The regions both tables share are the same mapping.
    assert_eq!(grown.translate(0x10_0000, 1), table.translate(0x10_0000, 1));
    // vm-memory's view of the new table has the same regions and bytes.
    {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
        let vm = grown.vm_memory();
        assert_eq!(vm.num_regions(), 3);
        let mut via_vm = [0u8; 7];
        vm.read_slice(&mut via_vm, GuestAddress(0x4000_0000))
            .unwrap();
        assert_eq!(&via_vm, b"hotplug");
        assert_eq!(MemoryTable::empty().vm_memory().num_regions(), 0);
    }

    // Overlapping regions are refused (and nothing changes).
    let overlapping = RegionSpec {
        guest_phys_addr: 0x11_f000,
        ..extra
    };
    assert!(matches!(
        grown.with_region_added(overlapping, fd_of(&extra_file)),
        Err(MemoryTableError::Overlap {
            other_gpa: 0x10_0000,
            ..
        })
    ));

    // Remove the low region; mmap_offset is ignored when matching, as the spec says.
    let shrunk = grown
        .with_region_removed(&RegionSpec {
            mmap_offset: 0xdead_0000,
            ..low
        })
        .unwrap();
    assert_eq!(shrunk.len(), 2);
    assert!(shrunk.translate(0x100, 1).is_err());
    assert!(
        grown.translate(0x100, 1).is_ok(),
        "older tables keep their mappings"
    );
    assert!(matches!(
        shrunk.with_region_removed(&low),
        Err(MemoryTableError::NotFound {
            gpa: 0,
            size: 0x10000,
            ..
        })
    ));
    assert!(matches!(
        shrunk.with_region_removed(&RegionSpec {
            userspace_addr: 0,
            ..high
        }),
        Err(MemoryTableError::NotFound { .. })
    ));

    // A table outlives the tables derived from it and still reads through its mappings.
    drop(grown);
    drop(shrunk);
    file.write_all_at(b"still mapped", 0x40).unwrap();
    let mut buf = [0u8; 12];
    table.read(0x40, &mut buf).unwrap();
    assert_eq!(&buf, b"still mapped");
}

#[test]
fn bad_regions_are_refused() {
    let file = memfd(0x10000);
    let ok = RegionSpec {
        guest_phys_addr: 0,
        memory_size: 0x1000,
        userspace_addr: VA_LOW,
        mmap_offset: 0,
    };
    let refuse = |spec: RegionSpec| MemoryTable::from_regions([(spec, fd_of(&file))]).unwrap_err();
    assert!(matches!(
        refuse(RegionSpec {
            memory_size: 0,
            ..ok
        }),
        MemoryTableError::EmptyRegion { gpa: 0 }
    ));
    assert!(matches!(
        refuse(RegionSpec {
            guest_phys_addr: u64::MAX - 0x10,
            ..ok
        }),
        MemoryTableError::Overflow {
            field: "guest_phys_addr",
            ..
        }
    ));
    assert!(matches!(
        refuse(RegionSpec {
            userspace_addr: u64::MAX,
            ..ok
        }),
        MemoryTableError::Overflow {
            field: "userspace_addr",
            ..
        }
    ));
    assert!(matches!(
        refuse(RegionSpec {
            mmap_offset: u64::MAX - 0xfff,
            ..ok
        }),
        MemoryTableError::Overflow {
            field: "mmap_offset",
            ..
        }
    ));
    assert!(matches!(
        refuse(RegionSpec {
            mmap_offset: 0x800,
            ..ok
        }),
        MemoryTableError::UnalignedOffset {
            mmap_offset: 0x800,
            ..
        }
    ));
    assert!(matches!(
        refuse(RegionSpec {
            mmap_offset: 0xf000,
            memory_size: 0x2000,
            ..ok
        }),
        MemoryTableError::PastEndOfFile {
            needed: 0x11000,
            file_size: 0x10000,
            ..
        }
    ));
    // Two regions of one table overlapping each other.
    let other = RegionSpec {
        guest_phys_addr: 0x800,
        ..ok
    };
    assert!(matches!(
        MemoryTable::from_regions([(ok, fd_of(&file)), (other, fd_of(&file))]),
        Err(MemoryTableError::Overlap {
            gpa: 0x800,
            other_gpa: 0,
            ..
        })
    ));
    // An empty table is fine (before the first SET_MEM_TABLE) and maps nothing.
    let empty = MemoryTable::from_regions(std::iter::empty()).unwrap();
    assert!(empty.is_empty());
    assert_eq!(
        empty.translate(0, 0),
        Err(MemError::Unmapped { addr: 0, len: 0 })
    );
    assert!(MemoryTable::empty().copy_to_host(0x1000, &[1]).is_err());
}

#[test]
fn slot_limit_is_enforced() {
    let page = 0x1000u64;
    let file = memfd(page * (MAX_MEM_SLOTS as u64 + 1));
    let spec = |i: u64| RegionSpec {
        guest_phys_addr: i * 0x10_0000,
        memory_size: page,
        userspace_addr: VA_LOW + i * 0x10_0000,
        mmap_offset: i * page,
    };
    let full =
        MemoryTable::from_regions((0..MAX_MEM_SLOTS as u64).map(|i| (spec(i), fd_of(&file))))
            .unwrap();
    assert_eq!(full.len(), MAX_MEM_SLOTS);
    let last = MAX_MEM_SLOTS as u64;
    assert!(matches!(
        full.with_region_added(spec(last), fd_of(&file)),
        Err(MemoryTableError::TooManyRegions {
            limit: MAX_MEM_SLOTS
        })
    ));
    assert!(matches!(
        MemoryTable::from_regions((0..=last).map(|i| (spec(i), fd_of(&file)))),
        Err(MemoryTableError::TooManyRegions { .. })
    ));
    // Every region translates to its own page of the file.
    for i in [0, 1, 250, last - 1] {
        file.write_all_at(&i.to_le_bytes(), i * page).unwrap();
        let mut buf = [0u8; 8];
        full.read(i * 0x10_0000, &mut buf).unwrap();
        assert_eq!(u64::from_le_bytes(buf), i);
    }
    let removed = full.with_region_removed(&spec(3)).unwrap();
    assert!(removed.with_region_added(spec(last), fd_of(&file)).is_ok());
}

#[test]
fn host_memory_copies_are_range_checked() {
    let (file, table, _, _) = two_regions();
    let low_host = table.translate(0, 0x10000).unwrap();
    let high_host = table.translate(0x10_0000, 0x20000).unwrap();

    table
        .copy_to_host(high_host + 0x100, b"by host address")
        .unwrap();
    let mut buf = [0u8; 15];
    file.read_exact_at(&mut buf, 0x13100).unwrap();
    assert_eq!(&buf, b"by host address");
    let mut out = [0u8; 15];
    table.copy_from_host(high_host + 0x100, &mut out).unwrap();
    assert_eq!(out, buf);
    table.fill_host(low_host + 0xff00, 0x100, 0x5a).unwrap();
    let mut tail = [0u8; 0x100];
    table.read(0xff00, &mut tail).unwrap();
    assert!(tail.iter().all(|&b| b == 0x5a));

    // Ranges running one byte past a mapping (even into a neighbouring mapping, which mmap may
    // well place right after it), and bytes outside every mapping: refused, nothing written.
    assert_eq!(
        table.fill_host(low_host + 0xff00, 0x101, 0),
        Err(MemError::Unmapped {
            addr: low_host + 0xff00,
            len: 0x101
        })
    );
    assert!(table.copy_to_host(high_host - 1, &[0, 0]).is_err());
    assert!(table.copy_to_host(high_host + 0x1ffff, &[0, 0]).is_err());
    assert!(table
        .copy_to_host(low_host.min(high_host) - 1, &[0])
        .is_err());
    assert!(table
        .copy_to_host((low_host + 0x10000).max(high_host + 0x20000), &[0])
        .is_err());
    assert!(table.copy_from_host(0x1000, &mut [0u8; 4]).is_err());
    assert_eq!(
        table.copy_to_host(u64::MAX, &[0, 0]),
        Err(MemError::Overflow)
    );
    table.read(0xff00, &mut tail).unwrap();
    assert!(tail.iter().all(|&b| b == 0x5a));
    // Zero-length accesses at a region end are fine.
    table.copy_to_host(low_host + 0x10000, &[]).unwrap();

    // Works as a trait object.
    let dyn_mem: &dyn HostMemory = &*table;
    dyn_mem.copy_to_host(low_host, &[1, 2, 3]).unwrap();
    let mut three = [0u8; 3];
    table.read(0, &mut three).unwrap();
    assert_eq!(three, [1, 2, 3]);
}

#[test]
fn copy_between_guest_memory_and_a_ram_disk() {
    let (_file, table, _, _) = two_regions();
    let disk = SharedDmaMemory::allocate_with(0x4000, PagePolicy::SmallOnly).unwrap();
    let guest_host = table.translate(0x10_0000, 0x1000).unwrap();
    let pattern: Vec<u8> = (0..0x1000u32).map(|i| (i * 7) as u8).collect();
    table.write(0x10_0000, &pattern).unwrap();

    // Guest write → disk (what a RAM bdev does for a virtio-blk OUT request).
    copy_between(
        &disk,
        disk.host_addr(0x1000).unwrap(),
        &*table,
        guest_host,
        0x1000,
    )
    .unwrap();
    let mut stored = vec![0u8; 0x1000];
    disk.read_at(0x1000, &mut stored).unwrap();
    assert_eq!(stored, pattern);

    // Disk → guest (an IN request) into the low region.
    let low_host = table.translate(0x8000, 0x1000).unwrap();
    copy_between(
        &*table,
        low_host,
        &disk,
        disk.host_addr(0x1000).unwrap(),
        0x1000,
    )
    .unwrap();
    let mut back = vec![0u8; 0x1000];
    table.read(0x8000, &mut back).unwrap();
    assert_eq!(back, pattern);

    // A destination that would run off the guest region: refused, guest memory untouched.
    let near_end = table.translate(0xf800, 0x800).unwrap();
    assert!(copy_between(&*table, near_end, &disk, disk.va(), 0x1000).is_err());
    // A source past the disk's end: refused.
    assert!(copy_between(
        &*table,
        low_host,
        &disk,
        disk.host_addr(0x3800).unwrap(),
        0x1000
    )
    .is_err());
}

/// A layout of up to six page-multiple regions with gaps, for the property test.
fn layout() -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec((0u64..4, 1u64..5), 1..6).prop_map(|items| {
        let mut gpa = 0u64;
        items
            .into_iter()
            .map(|(gap_pages, size_pages)| {
                gpa += gap_pages * 0x1000;
                let region = (gpa, size_pages * 0x1000);
                gpa += size_pages * 0x1000;
                region
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Every translation agrees with a straightforward model, and reads return what was written.
    #[test]
    fn translation_matches_model(
        regions in layout(),
        queries in prop::collection::vec((0u64..0x2_0000, 0u64..0x3000), 200),
        writes in prop::collection::vec((0u64..0x2_0000, prop::collection::vec(any::<u8>(), 1..64)), 50),
    ) {
        let total: u64 = regions.iter().map(|r| r.1).sum();
        let file = memfd(total);
        let mut offset = 0;
        let mut specs = Vec::new();
        for (i, &(gpa, size)) in regions.iter().enumerate() {
            specs.push(RegionSpec {
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: VA_LOW + (i as u64) * 0x100_0000,
                mmap_offset: offset,
            });
            offset += size;
        }
        let table = MemoryTable::from_regions(specs.iter().map(|s| (*s, fd_of(&file)))).unwrap();
        let model = |addr: u64, len: u64| {
            specs.iter().find(|s| addr >= s.guest_phys_addr && addr + len <= s.guest_phys_addr + s.memory_size)
        };
        for &(addr, len) in &queries {
            match (model(addr, len), table.translate(addr, len)) {
                (Some(s), Ok(host)) => {
                    let base = table.translate(s.guest_phys_addr, 0).unwrap();
                    prop_assert_eq!(host, base + (addr - s.guest_phys_addr));
                    // The same range by host address and by frontend address agrees.
                    prop_assert!(table.copy_from_host(host, &mut vec![0u8; len as usize]).is_ok());
                    let va = s.userspace_addr + (addr - s.guest_phys_addr);
                    prop_assert_eq!(table.frontend_va_to_host(va, len), Ok(host));
                }
                (None, Err(MemError::Unmapped { addr: a, len: l })) => {
                    prop_assert_eq!((a, l), (addr, len));
                }
                (m, t) => prop_assert!(false, "model {:?} vs table {:?} for {:#x}+{:#x}", m, t, addr, len),
            }
        }
        // Writes through the table land at the model's file offset.
        for (addr, data) in &writes {
            let len = data.len() as u64;
            match model(*addr, len) {
                Some(s) => {
                    table.write(*addr, data).unwrap();
                    let mut back = vec![0u8; data.len()];
                    file.read_exact_at(&mut back, s.mmap_offset + (addr - s.guest_phys_addr)).unwrap();
                    prop_assert_eq!(&back, data);
                    let mut via_table = vec![0u8; data.len()];
                    table.read(*addr, &mut via_table).unwrap();
                    prop_assert_eq!(&via_table, data);
                }
                None => prop_assert!(table.write(*addr, data).is_err()),
            }
        }
    }
}

/// Guest RAM on hugepages, as `-object memory-backend-memfd,hugetlb=on` gives a backend. Needs
/// root to reserve pages; elsewhere it checks that a hugetlb memfd cannot even be sized.
#[test]
fn hugetlb_backed_guest_memory() {
    use rvhost_platform_linux::dma::{configured_hugepages, NR_HUGEPAGES_PATH};
    const HUGE: u64 = 2 << 20;
    let old = configured_hugepages();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root && old.is_some_and(|n| n < 8) {
        let _ = std::fs::write(NR_HUGEPAGES_PATH, "8");
    }
    // SAFETY: valid NUL-terminated name; the result is checked.
    let raw = unsafe {
        libc::memfd_create(
            c"rvhost-huge".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_HUGETLB,
        )
    };
    assert!(
        raw >= 0,
        "memfd_create(MFD_HUGETLB): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor nobody else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    let sized = file.set_len(2 * HUGE).is_ok();
    let result = std::panic::catch_unwind(|| {
        if !sized {
            eprintln!("no hugepages available: skipping the mapping part");
            return;
        }
        let spec = RegionSpec {
            guest_phys_addr: 0x1_0000_0000,
            memory_size: HUGE,
            userspace_addr: VA_HIGH,
            mmap_offset: HUGE,
        };
        let table = MemoryTable::from_regions([(spec, fd_of(&file))]).unwrap();
        table.write(0x1_0000_0000 + HUGE - 4, b"edge").unwrap();
        let mut back = [0u8; 4];
        table.read(0x1_0000_0000 + HUGE - 4, &mut back).unwrap();
        assert_eq!(&back, b"edge");
        assert_eq!(
            table.translate(0x1_0000_0000, HUGE).unwrap() % HUGE,
            0,
            "hugepage aligned"
        );
        // An offset that is page aligned but not hugepage aligned: mmap refuses, and that is a
        // typed error, not a crash.
        let bad = RegionSpec {
            mmap_offset: 0x1000,
            memory_size: 0x1000,
            ..spec
        };
        assert!(matches!(
            MemoryTable::from_regions([(bad, fd_of(&file))]),
            Err(MemoryTableError::Mmap { .. })
        ));
    });
    drop(file);
    if let Some(old) = old {
        if configured_hugepages() != Some(old) {
            let _ = std::fs::write(NR_HUGEPAGES_PATH, old.to_string());
        }
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    assert!(
        sized || !root || old.is_none(),
        "root could not get two hugepages"
    );
}
