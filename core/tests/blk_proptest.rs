//! Property tests for virtio-blk: wire round trips, and decode never panics nor yields anything
//! outside the chain it was given.

mod virtq_support;

use proptest::prelude::*;
use rvhost_core::blk::{
    BlkError, BlkGeometry, BlkLimits, BlkReqHeader, BlkReqHeaderRepr, BlkRequest, BlkRequestKind,
    BlkZonedCharacteristics, DiscardWriteZeroes, DiscardWriteZeroesRepr, RangeLimits,
    VirtioBlkConfig, CONFIG_LEN,
};
use rvhost_core::mem::{Direction, GuestMemory};
use rvhost_core::virtio::ring::VirtqDesc;
use rvhost_core::virtq::{Chain, SplitQueue};
use virtq_support::*;

fn config_strategy() -> impl Strategy<Value = VirtioBlkConfig> {
    (
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<(u16, u8, u8)>(),
            any::<u32>(),
        ),
        (
            any::<u8>(),
            any::<u8>(),
            any::<u16>(),
            any::<u32>(),
            any::<u8>(),
            any::<u16>(),
        ),
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u8>(),
        ),
        (any::<u32>(), any::<u32>(), any::<u32>()),
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u8>(),
        ),
    )
        .prop_map(|(a, b, c, d, z)| VirtioBlkConfig {
            capacity: a.0,
            size_max: a.1,
            seg_max: a.2,
            geometry: BlkGeometry {
                cylinders: a.3 .0,
                heads: a.3 .1,
                sectors: a.3 .2,
            },
            blk_size: a.4,
            physical_block_exp: b.0,
            alignment_offset: b.1,
            min_io_size: b.2,
            opt_io_size: b.3,
            writeback: b.4,
            unused0: 0,
            num_queues: b.5,
            max_discard_sectors: c.0,
            max_discard_seg: c.1,
            discard_sector_alignment: c.2,
            max_write_zeroes_sectors: c.3,
            max_write_zeroes_seg: c.4,
            write_zeroes_may_unmap: c.5,
            unused1: [0; 3],
            max_secure_erase_sectors: d.0,
            max_secure_erase_seg: d.1,
            secure_erase_sector_alignment: d.2,
            zoned: BlkZonedCharacteristics {
                zone_sectors: z.0,
                max_open_zones: z.1,
                max_active_zones: z.2,
                max_append_sectors: z.3,
                write_granularity: z.4,
                model: z.5,
                unused2: [0; 3],
            },
        })
}

/// A chain of 1..6 descriptors over a small data area, with random lengths and directions.
fn chain_layout() -> impl Strategy<Value = Vec<(u64, u32, bool)>> {
    prop::collection::vec(
        (
            prop_oneof![8 => (0u64..0x8000).prop_map(|o| DATA + o), 1 => any::<u64>()],
            prop_oneof![4 => 0u32..48, 4 => (0u32..4).prop_map(|n| 512 * n), 1 => 0u32..5000],
            any::<bool>(),
        ),
        1..6,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn header_round_trips(request_type in any::<u32>(), reserved in any::<u32>(), sector in any::<u64>()) {
        let repr = BlkReqHeaderRepr { request_type, reserved, sector };
        let bytes = repr.to_bytes();
        let view = BlkReqHeader::new_checked(&bytes[..]).unwrap();
        prop_assert_eq!(BlkReqHeaderRepr::parse(&view), repr);
        prop_assert_eq!(&bytes[8..], &sector.to_le_bytes()[..]);
    }

    #[test]
    fn range_round_trips(sector in any::<u64>(), num_sectors in any::<u32>(), flags in any::<u32>()) {
        let repr = DiscardWriteZeroesRepr { sector, num_sectors, flags };
        let bytes = repr.to_bytes();
        prop_assert_eq!(DiscardWriteZeroesRepr::parse(&DiscardWriteZeroes::new_checked(&bytes[..]).unwrap()), repr);
    }

    #[test]
    fn config_round_trips(cfg in config_strategy(), offset in 0u32..300, len in 0usize..300) {
        let bytes = cfg.to_bytes();
        prop_assert_eq!(VirtioBlkConfig::parse(&bytes), cfg);
        prop_assert_eq!(&bytes[34..36], &cfg.num_queues.to_le_bytes()[..]);
        prop_assert_eq!(&bytes[36..40], &cfg.max_discard_sectors.to_le_bytes()[..]);
        let mut out = vec![0xa5u8; len];
        match cfg.read(offset, &mut out) {
            Ok(()) => {
                prop_assert!(offset as usize + len <= 256);
                for (i, b) in out.iter().enumerate() {
                    let expected = bytes.get(offset as usize + i).copied().unwrap_or(0);
                    prop_assert_eq!(*b, expected);
                }
            }
            Err(_) => prop_assert!(offset as usize + len > 256),
        }
        prop_assert_eq!(CONFIG_LEN, 96);
    }

    #[test]
    fn decode_never_panics_and_stays_inside_the_chain(
        layout in chain_layout(),
        area in prop::collection::vec(any::<u8>(), 256),
        request_type in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()],
        sector in prop_oneof![0u64..4096, any::<u64>()],
        read_only in any::<bool>(),
    ) {
        let mut ram = ram();
        let mem = mem(&mut ram);
        // Random bytes everywhere a header or range list may be read from, then a header.
        for off in (0..0x8000u64).step_by(256) {
            mem.write(DATA + off, &area).unwrap();
        }
        let first = layout[0].0;
        let hdr = BlkReqHeaderRepr { request_type, reserved: 0, sector }.to_bytes();
        let _ = mem.write(first, &hdr);

        for (i, &(addr, len, write)) in layout.iter().enumerate() {
            let last = i + 1 == layout.len();
            let flags = if write { WRITE } else { 0 } | if last { 0 } else { NEXT };
            put_desc(&mem, DESC, i as u16, VirtqDesc { addr, len, flags, next: i as u16 + 1 });
        }
        let q = SplitQueue::new(config(8), 0).unwrap();
        let mut chain = Chain::<8>::new();
        if q.walk_chain(&mem, 0, &mut chain).is_err() {
            return Ok(());
        }
        let limits = BlkLimits {
            capacity: 2048,
            read_only,
            discard: Some(RangeLimits { max_sectors: 64, max_segments: 4 }),
            write_zeroes: Some(RangeLimits { max_sectors: 64, max_segments: 4 }),
        };
        let in_chain = |addr: u64, len: u32| {
            chain.segments().iter().any(|s| addr >= s.guest_addr && addr + u64::from(len) <= s.guest_end())
        };
        match BlkRequest::<4>::decode(&mem, &chain, &limits) {
            Ok(req) => {
                prop_assert!(in_chain(req.status_addr, 1));
                let mut total = 0u64;
                for seg in req.data.iter() {
                    prop_assert!(seg.len > 0);
                    prop_assert!(in_chain(seg.guest_addr, seg.len));
                    // The status byte is not part of the data (by position in the chain; a guest may
                    // still make its buffers overlap, which only hurts itself).
                    prop_assert!(seg.len <= chain.readable_len().max(chain.writable_len()));
                    total += u64::from(seg.len);
                }
                prop_assert_eq!(total, u64::from(req.data_len()));
                let expected_len = match req.kind {
                    BlkRequestKind::Read | BlkRequestKind::GetId => chain.writable_len() - 1,
                    BlkRequestKind::Write => chain.readable_len() - 16,
                    _ => 0,
                };
                prop_assert_eq!(req.data_len(), expected_len);
                match req.kind {
                    BlkRequestKind::Read | BlkRequestKind::Write => {
                        prop_assert_eq!(req.data_len() % 512, 0);
                        prop_assert!(req.sector + u64::from(req.data_len() / 512) <= limits.capacity);
                        let dir = if req.kind == BlkRequestKind::Read { Direction::DeviceWritable } else { Direction::DeviceReadable };
                        prop_assert!(req.data.iter().all(|s| s.direction == dir));
                        prop_assert!(!(read_only && req.kind == BlkRequestKind::Write));
                    }
                    BlkRequestKind::Discard | BlkRequestKind::WriteZeroes => {
                        prop_assert!(!read_only);
                        prop_assert!(!req.ranges.is_empty() && req.ranges.len() <= 4);
                        for r in &req.ranges {
                            prop_assert!(r.num_sectors <= 64);
                            prop_assert!(r.sector + u64::from(r.num_sectors) <= limits.capacity);
                        }
                    }
                    BlkRequestKind::Flush | BlkRequestKind::GetId => {}
                }
            }
            Err(e) => {
                if let Some((addr, _)) = e.status_to_write() {
                    prop_assert!(in_chain(addr, 1));
                    prop_assert!(mem.write(addr, &[1]).is_ok());
                } else {
                    prop_assert_eq!(e, BlkError::NoStatus);
                }
            }
        }
    }
}
