//! Fuzzes virtio-blk request decoding. Walks the chain at head 0, decodes it, and checks that a
//! request never points outside its chain and honours the device limits.
//!
//! Two input modes (bit 7 of the 4th control byte):
//! - raw: the rest of the input is guest memory, starting with a 16-entry descriptor table;
//! - compact: a descriptor count, then per descriptor `offset: u16, len: u16, flags: u8` (address
//!   = data area + offset, chained in order; flags bit 0 = WRITE), then a request header
//!   (`type: u32, sector: u64`) written at descriptor 0's address, then data-area contents. Raw
//!   descriptors rarely form a chain decode accepts; compact ones mostly do, so the fuzzer spends
//!   its time on the decoder instead of the walker (which `chain_walk` covers).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rvhost_core::blk::{BlkError, BlkLimits, BlkRequest, BlkRequestKind, RangeLimits};
use rvhost_core::mem::{ByteMemory, Direction, GuestMemory};
use rvhost_core::virtio::ring::VirtqDesc;
use rvhost_core::virtq::{Chain, QueueConfig, SplitQueue};

const BASE: u64 = 0x1_0000;
const SIZE: usize = 0x1_0000;
/// Where compact-mode buffers live: after the descriptor table and rings.
const DATA_AREA: u64 = BASE + 0x1000;

/// Builds the descriptor table, header and data area from the compact encoding.
fn lay_out_compact(mem: &ByteMemory<'_>, input: &[u8]) -> bool {
    let Some((&count, rest)) = input.split_first() else {
        return false;
    };
    let count = usize::from(count % 16) + 1;
    let Some(descs) = rest.get(..5 * count) else {
        return false;
    };
    let rest = &rest[5 * count..];
    let Some(header) = rest.get(..12) else {
        return false;
    };
    let contents = &rest[12..];
    let n = contents.len().min(SIZE - 0x1000);
    if mem.write(DATA_AREA, &contents[..n]).is_err() {
        return false;
    }
    let mut first_addr = 0;
    for (i, d) in descs.chunks_exact(5).enumerate() {
        let addr = DATA_AREA + u64::from(u16::from_le_bytes([d[0], d[1]]));
        let len = u32::from(u16::from_le_bytes([d[2], d[3]]));
        let last = i + 1 == count;
        let flags = u16::from(d[4] & 1) << 1 | if last { 0 } else { 1 };
        let desc = VirtqDesc {
            addr,
            len,
            flags,
            next: i as u16 + 1,
        };
        if mem.write(BASE + 16 * i as u64, &desc.to_bytes()).is_err() {
            return false;
        }
        if i == 0 {
            first_addr = addr;
        }
    }
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&header[..4]);
    hdr[8..].copy_from_slice(&header[4..12]);
    // Descriptor 0 may point (partly) outside memory; then the walk rejects the chain anyway.
    let _ = mem.write(first_addr, &hdr);
    true
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (ctl, image) = data.split_at(4);
    let mut ram = vec![0u8; SIZE];
    let compact = ctl[3] & 0x80 != 0;
    if !compact {
        let n = image.len().min(SIZE);
        ram[..n].copy_from_slice(&image[..n]);
    }
    let mem = ByteMemory::new(BASE, 0x7f00_0000_0000, &mut ram);
    if compact && !lay_out_compact(&mem, image) {
        return;
    }

    let limits = BlkLimits {
        capacity: u64::from(u16::from_le_bytes([ctl[0], ctl[1]])) << (ctl[2] % 48),
        read_only: ctl[3] & 1 != 0,
        discard: (ctl[3] & 2 != 0).then_some(RangeLimits {
            max_sectors: 4096,
            max_segments: 8,
        }),
        write_zeroes: (ctl[3] & 4 != 0).then_some(RangeLimits {
            max_sectors: 1 << 20,
            max_segments: 1,
        }),
    };
    let config = QueueConfig {
        size: 16,
        desc_table: BASE,
        avail_ring: BASE + 0x100,
        used_ring: BASE + 0x200,
    };
    let Ok(q) = SplitQueue::new(config, 1 << 28) else {
        return;
    };
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
        assert!(
            mem.write(addr, &[0]).is_ok(),
            "status byte must be writable"
        );
    }
});
