//! Decoding walked descriptor chains as virtio-blk requests (§5.2.6).

mod virtq_support;

use rvhost_core::blk::{
    write_status, BlkError, BlkLimits, BlkRange, BlkReject, BlkReqHeaderRepr, BlkRequest,
    BlkRequestKind, BlkStatus, DiscardWriteZeroesRepr, RangeLimits, VirtioBlkConfig,
};
use rvhost_core::mem::{ByteMemory, Direction, GuestMemory, Segment};
use rvhost_core::virtio::bit;
use rvhost_core::virtq::{Chain, SplitQueue};
use virtq_support::*;

const HDR: u64 = DATA;
const BUF: u64 = DATA + 0x1000;
const STATUS: u64 = DATA + 0x8000;
const CAPACITY: u64 = 2048; // 1 MiB

fn limits() -> BlkLimits {
    BlkLimits {
        capacity: CAPACITY,
        read_only: false,
        discard: Some(RangeLimits {
            max_sectors: 1024,
            max_segments: 4,
        }),
        write_zeroes: Some(RangeLimits {
            max_sectors: 512,
            max_segments: 2,
        }),
    }
}

fn header(mem: &ByteMemory<'_>, addr: u64, request_type: u32, sector: u64) {
    let h = BlkReqHeaderRepr {
        request_type,
        reserved: 0,
        sector,
    };
    mem.write(addr, &h.to_bytes()).unwrap();
}

/// Builds a chain from descriptor 0 over `descs` (addr, len, WRITE?) and walks it.
fn chain<'m>(mem: &ByteMemory<'m>, descs: &[(u64, u32, bool)]) -> Chain<16> {
    for (i, &(addr, len, write)) in descs.iter().enumerate() {
        let i = i as u16;
        let last = usize::from(i) + 1 == descs.len();
        let flags = if write { WRITE } else { 0 } | if last { 0 } else { NEXT };
        put_desc(mem, DESC, i, desc(addr, len, flags, i + 1));
    }
    let q = SplitQueue::new(config(16), 0).unwrap();
    let mut c = Chain::new();
    q.walk_chain(mem, 0, &mut c).unwrap();
    c
}

fn decode<'c>(mem: &ByteMemory<'_>, c: &'c Chain<16>) -> Result<BlkRequest<'c, 4>, BlkError> {
    BlkRequest::<4>::decode(mem, c, &limits())
}

fn rejected(mem: &ByteMemory<'_>, c: &Chain<16>) -> (BlkReject, BlkStatus) {
    match decode(mem, c) {
        Err(BlkError::Rejected {
            status_addr,
            reason,
        }) => {
            assert_eq!(status_addr, STATUS);
            (reason, reason.status())
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn read_request() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    header(&mem, HDR, 0, 8);
    let c = chain(
        &mem,
        &[(HDR, 16, false), (BUF, 4096, true), (STATUS, 1, true)],
    );
    let r = decode(&mem, &c).unwrap();
    assert_eq!(r.kind, BlkRequestKind::Read);
    assert_eq!(r.sector, 8);
    assert_eq!(r.data_len(), 4096);
    assert_eq!(r.status_addr, STATUS);
    assert_eq!(r.head, 0);
    let segs: Vec<Segment> = r.data.iter().collect();
    assert_eq!(
        segs,
        vec![Segment {
            guest_addr: BUF,
            host_addr: host(BUF),
            len: 4096,
            direction: Direction::DeviceWritable
        }]
    );
    assert_eq!(r.used_len_ok(), 4097);
    write_status(&mem, r.status_addr, BlkStatus::Ok).unwrap();
}

#[test]
fn write_request_with_header_and_data_sharing_descriptors() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    // Header split 4 + 12 across two descriptors; the second also carries the first 500 data
    // bytes; then 524 more; the status byte shares a descriptor with nothing else.
    header(&mem, HDR, 1, 100);
    let c = chain(
        &mem,
        &[
            (HDR, 4, false),
            (HDR + 4, 512, false),
            (BUF, 524, false),
            (STATUS, 1, true),
        ],
    );
    let r = decode(&mem, &c).unwrap();
    assert_eq!(r.kind, BlkRequestKind::Write);
    assert_eq!(r.sector, 100);
    assert_eq!(r.data_len(), 1024);
    let segs: Vec<(u64, u32)> = r.data.iter().map(|s| (s.guest_addr, s.len)).collect();
    assert_eq!(segs, vec![(HDR + 16, 500), (BUF, 524)]);
    assert!(r
        .data
        .iter()
        .all(|s| s.direction == Direction::DeviceReadable));
    assert_eq!(r.data.iter().next().unwrap().host_addr, host(HDR + 16));
    assert_eq!(r.used_len_ok(), 1);
}

#[test]
fn status_byte_may_share_the_last_data_descriptor() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    header(&mem, HDR, 0, 0);
    let c = chain(&mem, &[(HDR, 16, false), (STATUS - 512, 513, true)]);
    let r = decode(&mem, &c).unwrap();
    assert_eq!(r.status_addr, STATUS);
    let segs: Vec<(u64, u32)> = r.data.iter().map(|s| (s.guest_addr, s.len)).collect();
    assert_eq!(segs, vec![(STATUS - 512, 512)]);
}

#[test]
fn flush_and_get_id() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    header(&mem, HDR, 4, 0);
    let c = chain(&mem, &[(HDR, 16, false), (STATUS, 1, true)]);
    let r = decode(&mem, &c).unwrap();
    assert_eq!(r.kind, BlkRequestKind::Flush);
    assert!(r.data.is_empty());
    assert_eq!(r.used_len_ok(), 1);

    header(&mem, HDR, 8, 0);
    let c = chain(
        &mem,
        &[(HDR, 16, false), (BUF, 20, true), (STATUS, 1, true)],
    );
    let r = decode(&mem, &c).unwrap();
    assert_eq!(r.kind, BlkRequestKind::GetId);
    assert_eq!(r.data_len(), 20);
    assert_eq!(r.used_len_ok(), 21);
}

#[test]
fn get_id_is_written_across_segments_and_cut_to_the_buffer() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    header(&mem, HDR, 8, 0);
    mem.write(BUF, &[0xee; 64]).unwrap();
    // 20 bytes split 7 + 13 over two descriptors: the name, then NUL padding.
    let c = chain(
        &mem,
        &[
            (HDR, 16, false),
            (BUF, 7, true),
            (BUF + 32, 13, true),
            (STATUS, 1, true),
        ],
    );
    let r = decode(&mem, &c).unwrap();
    assert_eq!(r.write_id(&mem, b"Malloc0"), Ok(20));
    let mut out = [0u8; 64];
    mem.read(BUF, &mut out).unwrap();
    assert_eq!(&out[..7], b"Malloc0");
    assert_eq!(out[7..32], [0xee; 25]);
    assert_eq!(out[32..45], [0; 13]);
    assert_eq!(out[45..], [0xee; 19]);
    // A longer name is cut to 20 bytes, a shorter buffer gets what fits.
    let c = chain(&mem, &[(HDR, 16, false), (BUF, 6, true), (STATUS, 1, true)]);
    let r = decode(&mem, &c).unwrap();
    assert_eq!(r.write_id(&mem, b"a-bdev-name-longer-than-20-bytes"), Ok(6));
    assert_eq!(r.used_len_ok(), 7);
    mem.read(BUF, &mut out[..7]).unwrap();
    assert_eq!(
        &out[..7],
        b"a-bdev0",
        "the 7th byte is left from the first answer"
    );
}

#[test]
fn discard_and_write_zeroes_ranges_are_copied_out() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    header(&mem, HDR, 11, 0);
    let a = DiscardWriteZeroesRepr {
        sector: 0,
        num_sectors: 1024,
        flags: 0,
    };
    let b = DiscardWriteZeroesRepr {
        sector: 2040,
        num_sectors: 8,
        flags: 0,
    };
    mem.write(BUF, &a.to_bytes()).unwrap();
    mem.write(BUF + 16, &b.to_bytes()).unwrap();
    // Second range split 5 + 11 across descriptors.
    let c = chain(
        &mem,
        &[
            (HDR, 16, false),
            (BUF, 21, false),
            (BUF + 21, 11, false),
            (STATUS, 1, true),
        ],
    );
    let r = decode(&mem, &c).unwrap();
    assert_eq!(r.kind, BlkRequestKind::Discard);
    assert_eq!(
        r.ranges.as_slice(),
        &[
            BlkRange {
                sector: 0,
                num_sectors: 1024,
                unmap: false
            },
            BlkRange {
                sector: 2040,
                num_sectors: 8,
                unmap: false
            }
        ]
    );
    // The guest changing the list afterwards changes nothing.
    mem.write(BUF, &[0xff; 32]).unwrap();
    assert_eq!(r.ranges[1].sector, 2040);

    header(&mem, HDR, 13, 0);
    let w = DiscardWriteZeroesRepr {
        sector: 16,
        num_sectors: 512,
        flags: 1,
    };
    mem.write(BUF, &w.to_bytes()).unwrap();
    let c = chain(
        &mem,
        &[(HDR, 16, false), (BUF, 16, false), (STATUS, 1, true)],
    );
    let r = decode(&mem, &c).unwrap();
    assert_eq!(r.kind, BlkRequestKind::WriteZeroes);
    assert_eq!(
        r.ranges.as_slice(),
        &[BlkRange {
            sector: 16,
            num_sectors: 512,
            unmap: true
        }]
    );
}

#[test]
fn refusals_that_write_a_status() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let std3 = |mem: &ByteMemory<'_>, data_len: u32, write: bool| {
        chain(
            mem,
            &[(HDR, 16, false), (BUF, data_len, write), (STATUS, 1, true)],
        )
    };

    header(&mem, HDR, 0x55, 0);
    let c = std3(&mem, 512, true);
    assert_eq!(
        rejected(&mem, &c),
        (BlkReject::UnsupportedType(0x55), BlkStatus::Unsupp)
    );

    header(&mem, HDR, 0, 0);
    let c = std3(&mem, 100, true);
    assert_eq!(
        rejected(&mem, &c),
        (BlkReject::UnalignedLength(100), BlkStatus::IoErr)
    );

    header(&mem, HDR, 0, CAPACITY - 1);
    let c = std3(&mem, 1024, true);
    assert_eq!(
        rejected(&mem, &c),
        (
            BlkReject::OutOfRange {
                sector: CAPACITY - 1,
                sectors: 2
            },
            BlkStatus::IoErr
        )
    );
    header(&mem, HDR, 0, CAPACITY - 2);
    assert!(
        decode(&mem, &c).is_ok(),
        "the last two sectors are readable"
    );

    // sector * 512 overflowing u64.
    header(&mem, HDR, 1, u64::MAX / 256);
    let c = std3(&mem, 512, false);
    assert!(matches!(rejected(&mem, &c).0, BlkReject::OutOfRange { .. }));
    header(&mem, HDR, 1, u64::MAX);
    assert!(matches!(rejected(&mem, &c).0, BlkReject::OutOfRange { .. }));

    // Read with device-readable data; write with device-writable data.
    header(&mem, HDR, 0, 0);
    let c = std3(&mem, 512, false);
    assert_eq!(
        rejected(&mem, &c),
        (BlkReject::WrongDirection, BlkStatus::IoErr)
    );
    header(&mem, HDR, 1, 0);
    let c = std3(&mem, 512, true);
    assert_eq!(
        rejected(&mem, &c),
        (BlkReject::WrongDirection, BlkStatus::IoErr)
    );
}

#[test]
fn read_only_devices_refuse_writes() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let ro = BlkLimits {
        read_only: true,
        ..limits()
    };
    header(&mem, HDR, 1, 0);
    let c = chain(
        &mem,
        &[(HDR, 16, false), (BUF, 512, false), (STATUS, 1, true)],
    );
    let e = BlkRequest::<4>::decode(&mem, &c, &ro).unwrap_err();
    assert_eq!(
        e,
        BlkError::Rejected {
            status_addr: STATUS,
            reason: BlkReject::ReadOnly
        }
    );
    assert_eq!(e.status_to_write(), Some((STATUS, BlkStatus::IoErr)));
    for t in [11, 13] {
        header(&mem, HDR, t, 0);
        let e = BlkRequest::<4>::decode(&mem, &c, &ro).unwrap_err();
        assert_eq!(e.status_to_write(), Some((STATUS, BlkStatus::IoErr)));
    }
    header(&mem, HDR, 0, 0);
    let c = chain(
        &mem,
        &[(HDR, 16, false), (BUF, 512, true), (STATUS, 1, true)],
    );
    assert!(
        BlkRequest::<4>::decode(&mem, &c, &ro).is_ok(),
        "reads are fine"
    );
}

#[test]
fn range_list_refusals() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let put_ranges = |mem: &ByteMemory<'_>, ranges: &[DiscardWriteZeroesRepr]| {
        for (i, r) in ranges.iter().enumerate() {
            mem.write(BUF + 16 * i as u64, &r.to_bytes()).unwrap();
        }
        chain(
            mem,
            &[
                (HDR, 16, false),
                (BUF, 16 * ranges.len() as u32, false),
                (STATUS, 1, true),
            ],
        )
    };
    let r = |sector, num_sectors, flags| DiscardWriteZeroesRepr {
        sector,
        num_sectors,
        flags,
    };

    header(&mem, HDR, 11, 0);
    let c = put_ranges(&mem, &[r(0, 1, 1)]);
    assert_eq!(
        rejected(&mem, &c),
        (BlkReject::UnsupportedFlags(1), BlkStatus::Unsupp)
    );
    let c = put_ranges(&mem, &[r(0, 1, 2)]);
    assert_eq!(
        rejected(&mem, &c),
        (BlkReject::UnsupportedFlags(2), BlkStatus::Unsupp)
    );
    let c = put_ranges(&mem, &[r(0, 1025, 0)]);
    assert_eq!(
        rejected(&mem, &c),
        (
            BlkReject::RangeTooLong {
                num_sectors: 1025,
                max: 1024
            },
            BlkStatus::IoErr
        )
    );
    let c = put_ranges(&mem, &[r(CAPACITY, 1, 0)]);
    assert!(matches!(
        rejected(&mem, &c),
        (BlkReject::OutOfRange { .. }, BlkStatus::IoErr)
    ));
    let c = put_ranges(&mem, &[r(0, 1, 0); 5]);
    assert_eq!(
        rejected(&mem, &c),
        (
            BlkReject::TooManyRanges { count: 5, max: 4 },
            BlkStatus::IoErr
        )
    );

    header(&mem, HDR, 13, 0);
    let c = put_ranges(&mem, &[r(0, 1, 1); 3]);
    assert_eq!(
        rejected(&mem, &c),
        (
            BlkReject::TooManyRanges { count: 3, max: 2 },
            BlkStatus::IoErr
        )
    );
    let c = chain(
        &mem,
        &[(HDR, 16, false), (BUF, 20, false), (STATUS, 1, true)],
    );
    assert_eq!(
        rejected(&mem, &c),
        (BlkReject::BadRangeList { len: 20 }, BlkStatus::IoErr)
    );
    let c = chain(&mem, &[(HDR, 16, false), (STATUS, 1, true)]);
    assert_eq!(
        rejected(&mem, &c),
        (BlkReject::BadRangeList { len: 0 }, BlkStatus::IoErr)
    );

    // Not negotiated.
    let no_discard = BlkLimits {
        discard: None,
        write_zeroes: None,
        ..limits()
    };
    let c = put_ranges(&mem, &[r(0, 1, 0)]);
    let e = BlkRequest::<4>::decode(&mem, &c, &no_discard).unwrap_err();
    assert_eq!(e.status_to_write(), Some((STATUS, BlkStatus::Unsupp)));
}

#[test]
fn the_range_buffer_capacity_caps_max_segments() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    header(&mem, HDR, 11, 0);
    let c = chain(
        &mem,
        &[(HDR, 16, false), (BUF, 48, false), (STATUS, 1, true)],
    );
    let e = BlkRequest::<2>::decode(&mem, &c, &limits()).unwrap_err();
    assert_eq!(
        e,
        BlkError::Rejected {
            status_addr: STATUS,
            reason: BlkReject::TooManyRanges { count: 3, max: 2 }
        }
    );
}

#[test]
fn refusals_without_a_usable_status_byte() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    header(&mem, HDR, 0, 0);
    // No writable buffer at all.
    let c = chain(&mem, &[(HDR, 16, false), (BUF, 512, false)]);
    assert_eq!(decode(&mem, &c).unwrap_err(), BlkError::NoStatus);
    assert_eq!(BlkError::NoStatus.status_to_write(), None);
    // Only zero-length writable descriptors.
    let c = chain(&mem, &[(HDR, 16, false), (STATUS, 0, true)]);
    assert_eq!(decode(&mem, &c).unwrap_err(), BlkError::NoStatus);
    // Header shorter than 16 bytes (split 8 + a writable 8).
    let c = chain(
        &mem,
        &[(HDR, 8, false), (HDR + 8, 8, true), (STATUS, 1, true)],
    );
    let e = decode(&mem, &c).unwrap_err();
    assert_eq!(
        e,
        BlkError::HeaderTooShort {
            readable_len: 8,
            status_addr: STATUS
        }
    );
    assert_eq!(e.status_to_write(), Some((STATUS, BlkStatus::IoErr)));
    let c = chain(&mem, &[(STATUS, 1, true)]);
    assert_eq!(
        decode(&mem, &c).unwrap_err(),
        BlkError::HeaderTooShort {
            readable_len: 0,
            status_addr: STATUS
        }
    );
}

#[test]
fn limits_from_config_follow_negotiated_features() {
    use rvhost_core::blk::feature::*;
    let cfg = VirtioBlkConfig {
        capacity: 99,
        max_discard_sectors: 7,
        max_discard_seg: 3,
        max_write_zeroes_sectors: 5,
        max_write_zeroes_seg: 1,
        ..Default::default()
    };
    let l = BlkLimits::from_config(&cfg, bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_RO));
    assert_eq!(l.capacity, 99);
    assert!(l.read_only);
    assert_eq!(
        l.discard,
        Some(RangeLimits {
            max_sectors: 7,
            max_segments: 3
        })
    );
    assert_eq!(l.write_zeroes, None);
    let l = BlkLimits::from_config(&cfg, bit(VIRTIO_BLK_F_WRITE_ZEROES));
    assert!(!l.read_only);
    assert_eq!(l.discard, None);
    assert_eq!(
        l.write_zeroes,
        Some(RangeLimits {
            max_sectors: 5,
            max_segments: 1
        })
    );
}

#[test]
fn chain_error_then_status_write_end_to_end() {
    // A data buffer outside guest memory: the walk fails but names the status byte, so the
    // request alone is failed with IOERR and returned to the driver.
    let mut ram = ram();
    let mem = mem(&mut ram);
    header(&mem, HDR, 0, 0);
    put_desc(&mem, DESC, 0, desc(HDR, 16, NEXT, 1));
    put_desc(&mem, DESC, 1, desc(0x1000, 512, NEXT | WRITE, 2));
    put_desc(&mem, DESC, 2, desc(STATUS, 1, WRITE, 0));
    make_available(&mem, 16, &[0]);
    let mut q = SplitQueue::new(config(16), 0).unwrap();
    let head = q.pop_head(&mem).unwrap().unwrap();
    let mut c = Chain::<16>::new();
    let e = q.walk_chain(&mem, head, &mut c).unwrap_err();
    let status = e.status_segment().unwrap();
    let status_addr = status.guest_end() - 1;
    write_status(&mem, status_addr, BlkStatus::IoErr).unwrap();
    q.add_used(&mem, e.head, 1).unwrap();
    let mut b = [0u8; 1];
    mem.read(STATUS, &mut b).unwrap();
    assert_eq!(b, [1]);
    assert_eq!(used_elem(&mem, 0), (0, 1));
    assert_eq!(used_idx(&mem), 1);
}
