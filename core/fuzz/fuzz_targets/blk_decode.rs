//! Fuzzes virtio-blk request decoding: the input is a descriptor table plus guest memory. Walks the
//! chain at head 0, decodes it, and checks that a request never points outside its chain and honours
//! the device limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rvhost_core::blk::{BlkError, BlkLimits, BlkRequest, BlkRequestKind, RangeLimits};
use rvhost_core::mem::{ByteMemory, Direction, GuestMemory};
use rvhost_core::virtq::{Chain, QueueConfig, SplitQueue};

const BASE: u64 = 0x1_0000;
const SIZE: usize = 0x1_0000;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (ctl, image) = data.split_at(4);
    let mut ram = vec![0u8; SIZE];
    let n = image.len().min(SIZE);
    ram[..n].copy_from_slice(&image[..n]);
    let mem = ByteMemory::new(BASE, 0x7f00_0000_0000, &mut ram);

    let limits = BlkLimits {
        capacity: u64::from(u16::from_le_bytes([ctl[0], ctl[1]])) << (ctl[2] % 48),
        read_only: ctl[3] & 1 != 0,
        discard: (ctl[3] & 2 != 0).then_some(RangeLimits { max_sectors: 4096, max_segments: 8 }),
        write_zeroes: (ctl[3] & 4 != 0)
            .then_some(RangeLimits { max_sectors: 1 << 20, max_segments: 1 }),
    };
    let config = QueueConfig { size: 16, desc_table: BASE, avail_ring: BASE + 0x100, used_ring: BASE + 0x200 };
    let Ok(q) = SplitQueue::new(config, 1 << 28) else { return };
    let mut chain = Chain::<16>::new();
    let status = match q.walk_chain(&mem, 0, &mut chain) {
        Ok(()) => match BlkRequest::<8>::decode(&mem, &chain, &limits) {
            Ok(req) => {
                let in_chain = |addr: u64, len: u32| {
                    chain
                        .segments()
                        .iter()
                        .any(|s| addr >= s.guest_addr && addr + u64::from(len) <= s.guest_end())
                };
                assert!(in_chain(req.status_addr, 1));
                let mut total = 0u64;
                for s in req.data.iter() {
                    assert!(s.len > 0 && in_chain(s.guest_addr, s.len));
                    total += u64::from(s.len);
                }
                assert_eq!(total, u64::from(req.data_len()));
                match req.kind {
                    BlkRequestKind::Read | BlkRequestKind::Write => {
                        assert_eq!(req.data_len() % 512, 0);
                        let end = req.sector.checked_add(u64::from(req.data_len() / 512));
                        assert!(end.is_some_and(|e| e <= limits.capacity));
                        let dir = if req.kind == BlkRequestKind::Read {
                            Direction::DeviceWritable
                        } else {
                            assert!(!limits.read_only);
                            Direction::DeviceReadable
                        };
                        assert!(req.data.iter().all(|s| s.direction == dir));
                    }
                    BlkRequestKind::Discard | BlkRequestKind::WriteZeroes => {
                        assert!(!limits.read_only && !req.ranges.is_empty());
                        for r in &req.ranges {
                            let end = r.sector.checked_add(u64::from(r.num_sectors));
                            assert!(end.is_some_and(|e| e <= limits.capacity));
                        }
                    }
                    BlkRequestKind::Flush | BlkRequestKind::GetId => {}
                }
                Some(req.status_addr)
            }
            Err(e) => {
                if e.status_to_write().is_none() {
                    assert_eq!(e, BlkError::NoStatus);
                }
                e.status_to_write().map(|(addr, _)| addr)
            }
        },
        Err(e) => e.status_segment().map(|s| s.guest_end() - 1),
    };
    if let Some(addr) = status {
        assert!(mem.write(addr, &[0]).is_ok(), "status byte must be writable");
    }
});
