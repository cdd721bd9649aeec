//! virtio-blk wire formats against literal bytes from the spec, and constants/layouts against
//! `virtio-bindings` (Linux's uapi headers).

use core::mem::offset_of;

use rvhost_core::blk::{
    self, BlkReqHeader, BlkReqHeaderRepr, BlkStatus, ConfigError, DiscardWriteZeroes,
    DiscardWriteZeroesRepr, VirtioBlkConfig, CONFIG_LEN,
};
use rvhost_core::virtio;
use virtio_bindings::{virtio_blk as vb, virtio_config as vc, virtio_ring as vr};

#[test]
fn request_header_literal() {
    // type OUT (1), reserved 0, sector 0x0102030405060708, little-endian (§5.2.6).
    let wire = [1, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1];
    let view = BlkReqHeader::new_checked(&wire[..]).unwrap();
    assert_eq!(view.request_type(), 1);
    assert_eq!(view.reserved(), 0);
    assert_eq!(view.sector(), 0x0102_0304_0506_0708);
    let repr = BlkReqHeaderRepr::parse(&view);
    assert_eq!(
        repr,
        BlkReqHeaderRepr {
            request_type: 1,
            reserved: 0,
            sector: 0x0102_0304_0506_0708
        }
    );
    assert_eq!(repr.to_bytes(), wire);
    let mut buf = [0xffu8; 16];
    repr.emit(&mut BlkReqHeader::new_checked(&mut buf[..]).unwrap());
    assert_eq!(buf, wire);
    assert_eq!(
        BlkReqHeader::new_checked(&wire[..15]).unwrap_err(),
        blk::Truncated {
            needed: 16,
            got: 15
        }
    );
}

#[test]
fn discard_segment_literal() {
    // sector 0x800, num_sectors 0x100, flags UNMAP.
    let wire = [0, 8, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0];
    let view = DiscardWriteZeroes::new_checked(&wire[..]).unwrap();
    let repr = DiscardWriteZeroesRepr::parse(&view);
    assert_eq!(
        repr,
        DiscardWriteZeroesRepr {
            sector: 0x800,
            num_sectors: 0x100,
            flags: 1
        }
    );
    assert_eq!(repr.to_bytes(), wire);
    assert!(DiscardWriteZeroes::new_checked(&wire[..3]).is_err());
}

#[test]
fn config_offsets_match_the_spec() {
    // §5.2.4: the offsets a driver reads fields at.
    assert_eq!(CONFIG_LEN, 96);
    assert_eq!(offset_of!(VirtioBlkConfig, capacity), 0);
    assert_eq!(offset_of!(VirtioBlkConfig, size_max), 8);
    assert_eq!(offset_of!(VirtioBlkConfig, seg_max), 12);
    assert_eq!(offset_of!(VirtioBlkConfig, geometry), 16);
    assert_eq!(offset_of!(VirtioBlkConfig, blk_size), 20);
    assert_eq!(offset_of!(VirtioBlkConfig, physical_block_exp), 24);
    assert_eq!(offset_of!(VirtioBlkConfig, alignment_offset), 25);
    assert_eq!(offset_of!(VirtioBlkConfig, min_io_size), 26);
    assert_eq!(offset_of!(VirtioBlkConfig, opt_io_size), 28);
    assert_eq!(offset_of!(VirtioBlkConfig, writeback), 32);
    assert_eq!(offset_of!(VirtioBlkConfig, num_queues), 34);
    assert_eq!(offset_of!(VirtioBlkConfig, max_discard_sectors), 36);
    assert_eq!(offset_of!(VirtioBlkConfig, max_discard_seg), 40);
    assert_eq!(offset_of!(VirtioBlkConfig, discard_sector_alignment), 44);
    assert_eq!(offset_of!(VirtioBlkConfig, max_write_zeroes_sectors), 48);
    assert_eq!(offset_of!(VirtioBlkConfig, max_write_zeroes_seg), 52);
    assert_eq!(offset_of!(VirtioBlkConfig, write_zeroes_may_unmap), 56);
    assert_eq!(offset_of!(VirtioBlkConfig, max_secure_erase_sectors), 60);
    assert_eq!(offset_of!(VirtioBlkConfig, zoned), 72);
}

#[test]
fn config_emit_literal() {
    let cfg = VirtioBlkConfig {
        capacity: 0x0000_0001_0000_0000, // 2 TiB in sectors
        size_max: 0x1_0000,
        seg_max: 126,
        blk_size: 4096,
        physical_block_exp: 0,
        min_io_size: 1,
        opt_io_size: 256,
        writeback: 1,
        num_queues: 4,
        max_discard_sectors: 0x3f_ffff,
        max_discard_seg: 1,
        discard_sector_alignment: 8,
        max_write_zeroes_sectors: 0x3f_ffff,
        max_write_zeroes_seg: 1,
        write_zeroes_may_unmap: 1,
        ..Default::default()
    };
    let b = cfg.to_bytes();
    #[rustfmt::skip]
    let expected_head: [u8; 60] = [
        0, 0, 0, 0, 1, 0, 0, 0,          // capacity
        0, 0, 1, 0,                      // size_max
        126, 0, 0, 0,                    // seg_max
        0, 0, 0, 0,                      // geometry
        0, 0x10, 0, 0,                   // blk_size
        0, 0, 1, 0,                      // physical_block_exp, alignment_offset, min_io_size
        0, 1, 0, 0,                      // opt_io_size
        1, 0, 4, 0,                      // writeback, unused0, num_queues
        0xff, 0xff, 0x3f, 0,             // max_discard_sectors
        1, 0, 0, 0,                      // max_discard_seg
        8, 0, 0, 0,                      // discard_sector_alignment
        0xff, 0xff, 0x3f, 0,             // max_write_zeroes_sectors
        1, 0, 0, 0,                      // max_write_zeroes_seg
        1, 0, 0, 0,                      // write_zeroes_may_unmap, unused1
    ];
    assert_eq!(&b[..60], &expected_head[..]);
    assert!(b[60..].iter().all(|&x| x == 0));
    assert_eq!(VirtioBlkConfig::parse(&b), cfg);

    // GET_CONFIG with an offset/length chosen by the frontend.
    let mut out = [0xaau8; 6];
    cfg.read(34, &mut out).unwrap();
    assert_eq!(out, [4, 0, 0xff, 0xff, 0x3f, 0]);
    // QEMU asks for a length that depends on its headers; bytes past our layout read as zero.
    let mut big = [0xaau8; 128];
    cfg.read(0, &mut big).unwrap();
    assert_eq!(&big[..96], &b[..]);
    assert!(big[96..].iter().all(|&x| x == 0));
    assert_eq!(
        cfg.read(200, &mut [0u8; 60]),
        Err(ConfigError::OutOfRange {
            offset: 200,
            len: 60
        })
    );
    assert!(cfg.read(u32::MAX, &mut [0u8; 2]).is_err());
}

#[test]
fn config_write_only_touches_writeback() {
    let mut cfg = VirtioBlkConfig {
        writeback: 1,
        ..Default::default()
    };
    assert_eq!(cfg.write(32, &[0], true), Ok(()));
    assert_eq!(cfg.writeback, 0);
    assert_eq!(cfg.write(32, &[7], true), Ok(()));
    assert_eq!(cfg.writeback, 1);
    assert_eq!(
        cfg.write(32, &[0], false),
        Err(ConfigError::ReadOnlyField { offset: 32 })
    );
    assert_eq!(
        cfg.write(0, &[1, 2, 3, 4, 5, 6, 7, 8], true),
        Err(ConfigError::ReadOnlyField { offset: 0 })
    );
    assert_eq!(
        cfg.write(31, &[0, 0], true),
        Err(ConfigError::ReadOnlyField { offset: 31 })
    );
    assert_eq!(cfg.writeback, 1);
}

#[test]
fn status_codes() {
    assert_eq!(BlkStatus::Ok.as_u8(), vb::VIRTIO_BLK_S_OK as u8);
    assert_eq!(BlkStatus::IoErr.as_u8(), vb::VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(BlkStatus::Unsupp.as_u8(), vb::VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn blk_constants_match_virtio_bindings() {
    use blk::feature::*;
    use blk::request_type::*;
    for (ours, theirs) in [
        (VIRTIO_BLK_F_SIZE_MAX, vb::VIRTIO_BLK_F_SIZE_MAX),
        (VIRTIO_BLK_F_SEG_MAX, vb::VIRTIO_BLK_F_SEG_MAX),
        (VIRTIO_BLK_F_GEOMETRY, vb::VIRTIO_BLK_F_GEOMETRY),
        (VIRTIO_BLK_F_RO, vb::VIRTIO_BLK_F_RO),
        (VIRTIO_BLK_F_BLK_SIZE, vb::VIRTIO_BLK_F_BLK_SIZE),
        (VIRTIO_BLK_F_FLUSH, vb::VIRTIO_BLK_F_FLUSH),
        (VIRTIO_BLK_F_TOPOLOGY, vb::VIRTIO_BLK_F_TOPOLOGY),
        (VIRTIO_BLK_F_CONFIG_WCE, vb::VIRTIO_BLK_F_CONFIG_WCE),
        (VIRTIO_BLK_F_MQ, vb::VIRTIO_BLK_F_MQ),
        (VIRTIO_BLK_F_DISCARD, vb::VIRTIO_BLK_F_DISCARD),
        (VIRTIO_BLK_F_WRITE_ZEROES, vb::VIRTIO_BLK_F_WRITE_ZEROES),
        (VIRTIO_BLK_F_SECURE_ERASE, vb::VIRTIO_BLK_F_SECURE_ERASE),
        (VIRTIO_BLK_F_ZONED, vb::VIRTIO_BLK_F_ZONED),
        (VIRTIO_BLK_T_IN, vb::VIRTIO_BLK_T_IN),
        (VIRTIO_BLK_T_OUT, vb::VIRTIO_BLK_T_OUT),
        (VIRTIO_BLK_T_FLUSH, vb::VIRTIO_BLK_T_FLUSH),
        (VIRTIO_BLK_T_GET_ID, vb::VIRTIO_BLK_T_GET_ID),
        (VIRTIO_BLK_T_DISCARD, vb::VIRTIO_BLK_T_DISCARD),
        (VIRTIO_BLK_T_WRITE_ZEROES, vb::VIRTIO_BLK_T_WRITE_ZEROES),
        (VIRTIO_BLK_T_SECURE_ERASE, vb::VIRTIO_BLK_T_SECURE_ERASE),
        (
            blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        ),
        (blk::VIRTIO_BLK_ID_BYTES as u32, vb::VIRTIO_BLK_ID_BYTES),
    ] {
        assert_eq!(ours, theirs);
    }
}

#[test]
fn blk_layouts_match_virtio_bindings() {
    use vb::virtio_blk_config as C;
    assert_eq!(CONFIG_LEN, core::mem::size_of::<C>());
    macro_rules! same_offset {
        ($($f:ident),*) => {$(
            assert_eq!(offset_of!(VirtioBlkConfig, $f), offset_of!(C, $f), stringify!($f));
        )*};
    }
    same_offset!(
        capacity,
        size_max,
        seg_max,
        geometry,
        blk_size,
        physical_block_exp,
        alignment_offset,
        min_io_size,
        opt_io_size,
        num_queues,
        max_discard_sectors,
        max_discard_seg,
        discard_sector_alignment,
        max_write_zeroes_sectors,
        max_write_zeroes_seg,
        write_zeroes_may_unmap,
        max_secure_erase_sectors,
        max_secure_erase_seg,
        secure_erase_sector_alignment,
        zoned
    );
    assert_eq!(offset_of!(VirtioBlkConfig, writeback), offset_of!(C, wce));
    assert_eq!(core::mem::size_of::<vb::virtio_blk_outhdr>(), 16);
    assert_eq!(offset_of!(vb::virtio_blk_outhdr, sector), 8);
    assert_eq!(
        core::mem::size_of::<vb::virtio_blk_discard_write_zeroes>(),
        16
    );
    assert_eq!(
        offset_of!(vb::virtio_blk_discard_write_zeroes, num_sectors),
        8
    );
    assert_eq!(offset_of!(vb::virtio_blk_discard_write_zeroes, flags), 12);
}

#[test]
fn ring_constants_and_layouts_match_virtio_bindings() {
    use virtio::feature::*;
    use virtio::ring::*;
    for (ours, theirs) in [
        (VIRTIO_F_RING_INDIRECT_DESC, vr::VIRTIO_RING_F_INDIRECT_DESC),
        (VIRTIO_F_RING_EVENT_IDX, vr::VIRTIO_RING_F_EVENT_IDX),
        (VIRTIO_F_VERSION_1, vc::VIRTIO_F_VERSION_1),
        (VIRTIO_F_ACCESS_PLATFORM, vc::VIRTIO_F_ACCESS_PLATFORM),
        (VIRTIO_F_RING_PACKED, vc::VIRTIO_F_RING_PACKED),
        (VIRTIO_F_IN_ORDER, vc::VIRTIO_F_IN_ORDER),
        (VIRTIO_F_ORDER_PLATFORM, vc::VIRTIO_F_ORDER_PLATFORM),
        (VIRTIO_F_NOTIFICATION_DATA, vc::VIRTIO_F_NOTIFICATION_DATA),
        (VIRTIO_F_RING_RESET, vc::VIRTIO_F_RING_RESET),
        (VIRTIO_F_NOTIFY_ON_EMPTY, vc::VIRTIO_F_NOTIFY_ON_EMPTY),
        (VIRTIO_F_ANY_LAYOUT, vc::VIRTIO_F_ANY_LAYOUT),
    ] {
        assert_eq!(ours, theirs);
    }
    for (ours, theirs) in [
        (VIRTQ_DESC_F_NEXT, vr::VRING_DESC_F_NEXT),
        (VIRTQ_DESC_F_WRITE, vr::VRING_DESC_F_WRITE),
        (VIRTQ_DESC_F_INDIRECT, vr::VRING_DESC_F_INDIRECT),
        (VIRTQ_USED_F_NO_NOTIFY, vr::VRING_USED_F_NO_NOTIFY),
        (VIRTQ_AVAIL_F_NO_INTERRUPT, vr::VRING_AVAIL_F_NO_INTERRUPT),
    ] {
        assert_eq!(u32::from(ours), theirs);
    }
    assert_eq!(DESC_TABLE_ALIGN, u64::from(vr::VRING_DESC_ALIGN_SIZE));
    assert_eq!(AVAIL_RING_ALIGN, u64::from(vr::VRING_AVAIL_ALIGN_SIZE));
    assert_eq!(USED_RING_ALIGN, u64::from(vr::VRING_USED_ALIGN_SIZE));
    for (ours, theirs) in [
        (virtio::status::ACKNOWLEDGE, vc::VIRTIO_CONFIG_S_ACKNOWLEDGE),
        (virtio::status::DRIVER, vc::VIRTIO_CONFIG_S_DRIVER),
        (virtio::status::DRIVER_OK, vc::VIRTIO_CONFIG_S_DRIVER_OK),
        (virtio::status::FEATURES_OK, vc::VIRTIO_CONFIG_S_FEATURES_OK),
        (
            virtio::status::DEVICE_NEEDS_RESET,
            vc::VIRTIO_CONFIG_S_NEEDS_RESET,
        ),
        (virtio::status::FAILED, vc::VIRTIO_CONFIG_S_FAILED),
    ] {
        assert_eq!(u32::from(ours), theirs);
    }
    assert_eq!(
        core::mem::size_of::<VirtqDesc>(),
        core::mem::size_of::<vr::vring_desc>()
    );
    assert_eq!(VirtqDesc::SIZE, core::mem::size_of::<vr::vring_desc>());
    assert_eq!(offset_of!(VirtqDesc, len), offset_of!(vr::vring_desc, len));
    assert_eq!(
        offset_of!(VirtqDesc, flags),
        offset_of!(vr::vring_desc, flags)
    );
    assert_eq!(
        offset_of!(VirtqDesc, next),
        offset_of!(vr::vring_desc, next)
    );
    assert_eq!(
        VirtqUsedElem::SIZE,
        core::mem::size_of::<vr::vring_used_elem>()
    );
    assert_eq!(
        offset_of!(VirtqUsedElem, len),
        offset_of!(vr::vring_used_elem, len)
    );
    assert_eq!(
        RING_ARRAY_OFFSET as usize,
        offset_of!(vr::vring_avail, ring)
    );
    assert_eq!(RING_IDX_OFFSET as usize, offset_of!(vr::vring_used, idx));
}
