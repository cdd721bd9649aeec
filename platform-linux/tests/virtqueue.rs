//! End to end through the platform layer: a "frontend" (this test, writing the memfd the way QEMU's
//! vCPUs write guest RAM) places a split virtqueue, the backend finds its rings from the frontend
//! virtual addresses `SET_VRING_ADDR` would carry, walks a chain with the core's `SplitQueue` over
//! the mapped `MemoryTable`, and serves it through `HostMemory` copies.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use rvhost_core::mem::{Direction, GuestMemory};
use rvhost_core::virtio::ring::VirtqDesc;
use rvhost_core::virtio::{bit, feature};
use rvhost_core::virtq::{Chain, QueueConfig, SplitQueue};
use rvhost_platform_linux::{HostMemory, MemoryTable, RegionSpec};

const LOW_VA: u64 = 0x7f00_0000_0000;
const HIGH_VA: u64 = 0x7f40_0000_0000;
const HIGH_GPA: u64 = 0x1_0000_0000;
/// File offset of the high region (guest RAM above 4 GiB follows the low part in the file).
const HIGH_FILE: u64 = 0x10_0000;

fn memfd(len: u64) -> File {
    // SAFETY: valid NUL-terminated name; the result is checked.
    let raw = unsafe { libc::memfd_create(c"rvhost-virtq".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: a fresh descriptor nobody else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    file.set_len(len).unwrap();
    file
}

/// The frontend's view: write guest RAM at a GPA through the file, as another process would.
fn guest_write(file: &File, gpa: u64, bytes: &[u8]) {
    let offset = if gpa >= HIGH_GPA {
        gpa - HIGH_GPA + HIGH_FILE
    } else {
        gpa
    };
    file.write_all_at(bytes, offset).unwrap();
}

fn guest_read(file: &File, gpa: u64, len: usize) -> Vec<u8> {
    let offset = if gpa >= HIGH_GPA {
        gpa - HIGH_GPA + HIGH_FILE
    } else {
        gpa
    };
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn a_request_travels_from_frontend_rings_to_host_copies_and_back() {
    let file = memfd(2 * HIGH_FILE);
    let fd = || OwnedFd::from(file.try_clone().unwrap());
    let low = RegionSpec {
        guest_phys_addr: 0,
        memory_size: HIGH_FILE,
        userspace_addr: LOW_VA,
        mmap_offset: 0,
    };
    let high = RegionSpec {
        guest_phys_addr: HIGH_GPA,
        memory_size: HIGH_FILE,
        userspace_addr: HIGH_VA,
        mmap_offset: HIGH_FILE,
    };
    let table = MemoryTable::from_regions([(low, fd()), (high, fd())]).unwrap();

    // Rings in the high region, buffers in both.
    let (desc, avail, used) = (HIGH_GPA + 0x1000, HIGH_GPA + 0x2000, HIGH_GPA + 0x3000);
    let (request_buf, reply_buf) = (0x8000u64, HIGH_GPA + 0x9000);
    guest_write(&file, request_buf, b"please copy me!!");
    let chain = [
        VirtqDesc {
            addr: request_buf,
            len: 16,
            flags: 1,
            next: 1,
        }, // NEXT
        VirtqDesc {
            addr: reply_buf,
            len: 16,
            flags: 2,
            next: 0,
        }, // WRITE
    ];
    for (i, d) in chain.iter().enumerate() {
        guest_write(&file, desc + 16 * i as u64, &d.to_bytes());
    }
    guest_write(&file, avail + 4, &0u16.to_le_bytes()); // avail.ring[0] = head 0
    guest_write(&file, avail + 2, &1u16.to_le_bytes()); // avail.idx = 1

    // SET_VRING_ADDR carries frontend virtual addresses; the backend converts them to GPAs.
    let to_gpa = |gpa: u64| {
        table
            .frontend_va_to_gpa(HIGH_VA + (gpa - HIGH_GPA))
            .unwrap()
    };
    let config = QueueConfig {
        size: 8,
        desc_table: to_gpa(desc),
        avail_ring: to_gpa(avail),
        used_ring: to_gpa(used),
    };
    assert_eq!(config.desc_table, desc);
    let mut queue = SplitQueue::new(config, bit(feature::VIRTIO_F_VERSION_1)).unwrap();
    queue.check_rings(&*table).unwrap();

    let head = queue.pop_head(&*table).unwrap().expect("one request");
    let mut walked: Chain<8> = Chain::new();
    queue.walk_chain(&*table, head, &mut walked).unwrap();
    let [request, reply] = walked.segments() else {
        panic!("two segments: {:?}", walked.segments())
    };
    assert_eq!(request.direction, Direction::DeviceReadable);
    assert_eq!(reply.direction, Direction::DeviceWritable);
    assert_eq!(request.host_addr, table.translate(request_buf, 16).unwrap());

    // The device model only ever sees host addresses and HostMemory.
    let device: &dyn HostMemory = &*table;
    let mut data = [0u8; 16];
    device.copy_from_host(request.host_addr, &mut data).unwrap();
    assert_eq!(&data, b"please copy me!!");
    data.reverse();
    device.copy_to_host(reply.host_addr, &data).unwrap();
    queue
        .add_used(&*table, walked.head(), walked.writable_len())
        .unwrap();

    // The frontend sees the reply and the used element.
    assert_eq!(guest_read(&file, reply_buf, 16), b"!!em ypoc esaelp");
    assert_eq!(guest_read(&file, used + 2, 2), 1u16.to_le_bytes());
    assert_eq!(guest_read(&file, used + 4, 8), [0, 0, 0, 0, 16, 0, 0, 0]);

    // After the low region is hot-unplugged, a new table refuses the request buffer while the
    // queue keeps working on its rings in the high region.
    let shrunk = table.with_region_removed(&low).unwrap();
    queue.check_rings(&*shrunk).unwrap();
    guest_write(&file, avail + 6, &0u16.to_le_bytes());
    guest_write(&file, avail + 2, &2u16.to_le_bytes());
    let head = queue.pop_head(&*shrunk).unwrap().expect("second request");
    assert!(
        queue.walk_chain(&*shrunk, head, &mut walked).is_err(),
        "buffer in an unplugged region"
    );
}
