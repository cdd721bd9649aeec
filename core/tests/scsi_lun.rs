//! The LUN model, command by command, against response bytes built from the SPC-5 / SBC-4 tables.

use rvhost_core::scsi::lun::{
    execute_without_lun, BlockRange, Completion, IoError, IoOp, IoPlan, LunConfig, Outcome,
    Request, ScsiLun, UnitAttention,
};
use rvhost_core::scsi::sense::{FieldPointer, Sense, SenseKey};
use rvhost_core::scsi::ScsiStatus;

const UUID: [u8; 16] = [
    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
];
const BLOCKS: u64 = 2048;
const LUNS: [u16; 3] = [0, 1, 300];

fn config() -> LunConfig {
    let mut cfg = LunConfig::new(512, BLOCKS, UUID)
        .with_bdev_kind("Malloc")
        .unwrap()
        .with_serial("SN123")
        .unwrap();
    cfg.supports_unmap = true;
    cfg.unmap_reads_zeroes = true;
    cfg.supports_write_zeroes = true;
    cfg.supports_flush = true;
    cfg.write_cache = true;
    cfg.max_unmap_blocks = 0x1_0000;
    cfg.max_unmap_descriptors = 4;
    cfg
}

fn lun() -> ScsiLun {
    ScsiLun::new(config()).unwrap()
}

struct Run<'d> {
    outcome: Outcome<'d>,
    data: Vec<u8>,
    sense: Vec<u8>,
}

fn exec<'d>(lun: &mut ScsiLun, cdb: &'d [u8], data_out: &'d [u8], data_in_len: u64) -> Run<'d> {
    let mut data = vec![0u8; 4096];
    let mut sense = vec![0u8; 96];
    let req = Request {
        cdb,
        data_out,
        data_out_len: data_out.len() as u64,
        data_in_len,
        luns: &LUNS,
    };
    let outcome = lun.execute(&req, &mut data, &mut sense);
    if let Outcome::Done(c) = outcome {
        data.truncate(c.transferred as usize);
        sense.truncate(c.sense_len);
    }
    Run {
        outcome,
        data,
        sense,
    }
}

impl Run<'_> {
    fn done(&self) -> Completion {
        match self.outcome {
            Outcome::Done(c) => c,
            Outcome::Io(p) => panic!("expected an immediate completion, got {p:?}"),
        }
    }
    fn good(&self) -> &[u8] {
        let c = self.done();
        assert_eq!(c.status, ScsiStatus::Good, "sense {:02x?}", self.sense);
        assert_eq!(c.sense_len, 0);
        &self.data
    }
    fn check(&self) -> Sense {
        let c = self.done();
        assert_eq!(c.status, ScsiStatus::CheckCondition);
        assert_eq!(c.transferred, 0);
        assert_eq!(c.sense_len, 18);
        Sense::parse_fixed(&self.sense).unwrap()
    }
    fn plan(&self) -> IoPlan<'_> {
        match self.outcome {
            Outcome::Io(p) => p,
            Outcome::Done(c) => panic!("expected an I/O plan, got {c:?} sense {:02x?}", self.sense),
        }
    }
}

fn kcq(s: Sense) -> (SenseKey, u8, u8) {
    (s.key, s.asc, s.ascq)
}

fn cdb_ptr(byte: u16, bit: Option<u8>) -> Option<FieldPointer> {
    Some(FieldPointer {
        in_cdb: true,
        byte,
        bit,
    })
}

fn param_ptr(byte: u16, bit: Option<u8>) -> Option<FieldPointer> {
    Some(FieldPointer {
        in_cdb: false,
        byte,
        bit,
    })
}

// ---- INQUIRY -------------------------------------------------------------------------------

#[test]
fn standard_inquiry_is_spc5_format_with_identification() {
    let mut l = lun();
    let r = exec(&mut l, &[0x12, 0, 0, 0, 96, 0], &[], 96);
    let mut expected = vec![0x00, 0x00, 0x07, 0x02, 31, 0x00, 0x00, 0x02];
    expected.extend_from_slice(b"RVHOST  ");
    expected.extend_from_slice(b"rvhost Malloc   ");
    expected.extend_from_slice(b"0001");
    assert_eq!(r.good(), &expected[..]);
    assert_eq!(r.done().residual, 96 - 36);
}

#[test]
fn inquiry_truncates_to_allocation_length_and_to_initiator_buffer() {
    let mut l = lun();
    let r = exec(&mut l, &[0x12, 0, 0, 0, 5, 0], &[], 96);
    assert_eq!(r.good(), &[0x00, 0x00, 0x07, 0x02, 31]);
    assert_eq!(r.done().residual, 91);
    // Allocation length 255 but the initiator only gave 10 bytes of data-in.
    let r = exec(&mut l, &[0x12, 0, 0, 0, 0xff, 0], &[], 10);
    assert_eq!(r.good().len(), 10);
    assert_eq!(r.done().residual, 0);
}

#[test]
fn inquiry_page_code_without_evpd_is_invalid_field() {
    let mut l = lun();
    let s = exec(&mut l, &[0x12, 0, 0x80, 0, 96, 0], &[], 96).check();
    assert_eq!(kcq(s), (SenseKey::IllegalRequest, 0x24, 0x00));
    assert_eq!(s.field, cdb_ptr(2, None));
}

#[test]
fn vpd_supported_pages() {
    let mut l = lun();
    let r = exec(&mut l, &[0x12, 1, 0x00, 0, 255, 0], &[], 255);
    assert_eq!(
        r.good(),
        &[0x00, 0x00, 0x00, 0x06, 0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]
    );
}

#[test]
fn vpd_unit_serial_number() {
    let mut l = lun();
    let r = exec(&mut l, &[0x12, 1, 0x80, 0, 255, 0], &[], 255);
    assert_eq!(r.good(), b"\x00\x80\x00\x05SN123");
}

#[test]
fn vpd_device_identification_has_naa6_and_t10_vendor_id() {
    let mut l = lun();
    let r = exec(&mut l, &[0x12, 1, 0x83, 0, 255, 0], &[], 255);
    let mut expected = vec![0x00, 0x83, 0x00, 4 + 16 + 4 + 13];
    // NAA designator: binary code set, LU association, type 3, 16 bytes; NAA 6, company ID
    // 52:54:00, the UUID's first 36 bits, then its last 64 bits.
    expected.extend_from_slice(&[0x01, 0x03, 0x00, 0x10]);
    expected.extend_from_slice(&[0x65, 0x25, 0x40, 0x00, 0x01, 0x12, 0x23, 0x34]);
    expected.extend_from_slice(&[0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]);
    // T10 vendor ID designator: ASCII code set, type 1, vendor + serial.
    expected.extend_from_slice(&[0x02, 0x01, 0x00, 13]);
    expected.extend_from_slice(b"RVHOST  SN123");
    assert_eq!(r.good(), &expected[..]);
}

#[test]
fn naa_identifier_is_deterministic_and_tracks_the_uuid() {
    let mut other = UUID;
    other[15] ^= 1;
    let a = rvhost_core::scsi::lun::naa_for(&config());
    assert_eq!(a, rvhost_core::scsi::lun::naa_for(&config()));
    let mut cfg = config();
    cfg.uuid = other;
    assert_ne!(a, rvhost_core::scsi::lun::naa_for(&cfg));
    assert_eq!(a[0] >> 4, 6);
}

#[test]
fn vpd_block_limits() {
    let mut l = lun();
    let r = exec(&mut l, &[0x12, 1, 0xb0, 0, 255, 0], &[], 255);
    let mut expected = vec![0x00, 0xb0, 0x00, 0x3c];
    expected.extend_from_slice(&[0x01, 0x00, 0x00, 0x00]); // WSNZ, no COMPARE AND WRITE
    expected.extend_from_slice(&[0x00, 0x00, 0x20, 0x00]); // MAXIMUM TRANSFER LENGTH 8192 (4 MiB)
    expected.extend_from_slice(&[0; 8]); // optimal transfer length, max prefetch
    expected.extend_from_slice(&[0x00, 0x01, 0x00, 0x00]); // MAXIMUM UNMAP LBA COUNT
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x04]); // MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT
    expected.extend_from_slice(&[0; 8]); // unmap granularity, alignment
    expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x20, 0x00]); // MAXIMUM WRITE SAME LENGTH
    expected.extend_from_slice(&[0; 20]);
    assert_eq!(expected.len(), 64);
    assert_eq!(r.good(), &expected[..]);
}

#[test]
fn vpd_block_device_characteristics_reports_non_rotating_medium() {
    let mut l = lun();
    let r = exec(&mut l, &[0x12, 1, 0xb1, 0, 255, 0], &[], 255);
    let mut expected = vec![0x00, 0xb1, 0x00, 0x3c, 0x00, 0x01];
    expected.resize(64, 0);
    assert_eq!(r.good(), &expected[..]);
}

#[test]
fn vpd_logical_block_provisioning() {
    let mut l = lun();
    let r = exec(&mut l, &[0x12, 1, 0xb2, 0, 255, 0], &[], 255);
    // LBPU | LBPWS | LBPWS10 | LBPRZ=001b; provisioning type 010b (thin).
    assert_eq!(r.good(), &[0x00, 0xb2, 0x00, 0x04, 0x00, 0xe4, 0x02, 0x00]);
    let mut cfg = config();
    cfg.supports_unmap = false;
    let mut l = ScsiLun::new(cfg).unwrap();
    let r = exec(&mut l, &[0x12, 1, 0xb2, 0, 255, 0], &[], 255);
    assert_eq!(r.good(), &[0x00, 0xb2, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00]);
}

#[test]
fn unknown_vpd_page_is_invalid_field() {
    let mut l = lun();
    let s = exec(&mut l, &[0x12, 1, 0x89, 0, 255, 0], &[], 255).check();
    assert_eq!(s, Sense::invalid_field_in_cdb(2, None));
}

// ---- READ CAPACITY -------------------------------------------------------------------------

#[test]
fn read_capacity_10() {
    let mut l = lun();
    let r = exec(&mut l, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    assert_eq!(r.good(), &[0x00, 0x00, 0x07, 0xff, 0x00, 0x00, 0x02, 0x00]);
}

#[test]
fn read_capacity_10_saturates_for_large_devices() {
    let mut cfg = config();
    cfg.num_blocks = 0x1_0000_0001;
    let mut l = ScsiLun::new(cfg).unwrap();
    let r = exec(&mut l, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    assert_eq!(r.good(), &[0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x02, 0x00]);
    let r = exec(
        &mut l,
        &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 0, 0],
        &[],
        32,
    );
    assert_eq!(r.good(), &[0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0x02, 0]);
}

#[test]
fn read_capacity_16_reports_lbpme_and_lbprz() {
    let mut l = lun();
    let r = exec(
        &mut l,
        &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
        &[],
        32,
    );
    let mut expected = vec![
        0, 0, 0, 0, 0, 0, 0x07, 0xff, 0, 0, 0x02, 0x00, 0, 0, 0xc0, 0,
    ];
    expected.resize(32, 0);
    assert_eq!(r.good(), &expected[..]);
}

#[test]
fn unknown_service_action_in_is_invalid_field_at_service_action() {
    let mut l = lun();
    let s = exec(
        &mut l,
        &[0x9e, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
        &[],
        32,
    )
    .check();
    assert_eq!(s, Sense::invalid_field_in_cdb(1, Some(4)));
}

// ---- MODE SENSE / MODE SELECT -------------------------------------------------------------

fn caching(wce: bool) -> Vec<u8> {
    let mut p = vec![0x08, 0x12, if wce { 0x04 } else { 0x00 }];
    p.resize(20, 0);
    p
}

fn control() -> Vec<u8> {
    let mut p = vec![0x0a, 0x0a, 0x00, 0x10];
    p.resize(12, 0);
    p
}

#[test]
fn mode_sense_6_all_pages_with_block_descriptor() {
    let mut l = lun();
    let r = exec(&mut l, &[0x1a, 0, 0x3f, 0, 0xff, 0], &[], 0xff);
    let mut expected = vec![4 + 8 + 20 + 12 - 1, 0x00, 0x10, 0x08];
    expected.extend_from_slice(&[0x00, 0x00, 0x08, 0x00, 0x00, 0x00, 0x02, 0x00]);
    expected.extend(caching(true));
    expected.extend(control());
    assert_eq!(r.good(), &expected[..]);
}

#[test]
fn mode_sense_6_header_only_allocation() {
    let mut l = lun();
    let r = exec(&mut l, &[0x1a, 0x08, 0x3f, 0, 4, 0], &[], 4);
    assert_eq!(r.good(), &[4 + 20 + 12 - 1, 0x00, 0x10, 0x00]);
}

#[test]
fn mode_sense_10_long_lba_caching_page() {
    let mut l = lun();
    let r = exec(
        &mut l,
        &[0x5a, 0x10, 0x08, 0, 0, 0, 0, 0x01, 0x00, 0],
        &[],
        256,
    );
    let mut expected = vec![0x00, 8 + 16 + 20 - 2, 0x00, 0x10, 0x01, 0x00, 0x00, 0x10];
    expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x08, 0x00, 0, 0, 0, 0, 0, 0, 0x02, 0x00]);
    expected.extend(caching(true));
    assert_eq!(r.good(), &expected[..]);
}

#[test]
fn mode_sense_changeable_values_mark_only_wce() {
    let mut l = lun();
    let r = exec(&mut l, &[0x1a, 0x08, 0x48, 0, 0xff, 0], &[], 0xff);
    let mut expected = vec![4 + 20 - 1, 0x00, 0x00, 0x00];
    expected.extend(caching(true));
    assert_eq!(r.good(), &expected[..]);
    let r = exec(&mut l, &[0x1a, 0x08, 0x4a, 0, 0xff, 0], &[], 0xff);
    let mut expected = vec![4 + 12 - 1, 0x00, 0x00, 0x00, 0x0a, 0x0a];
    expected.resize(16, 0);
    assert_eq!(r.good(), &expected[..]);
}

#[test]
fn mode_sense_saved_values_and_unknown_pages_fail() {
    let mut l = lun();
    let s = exec(&mut l, &[0x1a, 0x08, 0xc8, 0, 0xff, 0], &[], 0xff).check();
    assert_eq!(kcq(s), (SenseKey::IllegalRequest, 0x39, 0x00));
    let s = exec(&mut l, &[0x1a, 0x08, 0x1c, 0, 0xff, 0], &[], 0xff).check();
    assert_eq!(s, Sense::invalid_field_in_cdb(2, Some(5)));
    let s = exec(&mut l, &[0x1a, 0x08, 0x08, 0x01, 0xff, 0], &[], 0xff).check();
    assert_eq!(s, Sense::invalid_field_in_cdb(3, None));
}

#[test]
fn mode_sense_reports_write_protect_on_read_only_lun() {
    let mut cfg = config();
    cfg.read_only = true;
    let mut l = ScsiLun::new(cfg).unwrap();
    let r = exec(&mut l, &[0x1a, 0x08, 0x08, 0, 0xff, 0], &[], 0xff);
    assert_eq!(r.good()[2], 0x90);
}

fn mode_select_6(list: &[u8]) -> [u8; 6] {
    [0x15, 0x10, 0, 0, list.len() as u8, 0]
}

#[test]
fn mode_select_toggles_wce_and_mode_sense_reflects_it() {
    let mut l = lun();
    let mut list = vec![0, 0, 0, 0];
    list.extend(caching(false));
    let cdb = mode_select_6(&list);
    let r = exec(&mut l, &cdb, &list, 0);
    assert_eq!(r.good(), &[] as &[u8]);
    assert_eq!(r.done().transferred, 0);
    assert!(!l.write_cache_enabled());
    let r = exec(&mut l, &[0x1a, 0x08, 0x08, 0, 0xff, 0], &[], 0xff);
    assert_eq!(&r.good()[4..], &caching(false)[..]);
    // Default values still report the configured setting.
    let r = exec(&mut l, &[0x1a, 0x08, 0x88, 0, 0xff, 0], &[], 0xff);
    assert_eq!(&r.good()[4..], &caching(true)[..]);
    // A reset restores the default.
    l.reset();
    assert!(l.write_cache_enabled());
}

#[test]
fn mode_select_10_with_block_descriptor_and_both_pages() {
    let mut l = lun();
    let mut list = vec![0, 0, 0, 0, 0, 0, 0, 8];
    list.extend_from_slice(&[0x00, 0x00, 0x08, 0x00, 0x00, 0x00, 0x02, 0x00]);
    list.extend(caching(false));
    list.extend(control());
    let cdb = [0x55, 0x10, 0, 0, 0, 0, 0, 0, list.len() as u8, 0];
    exec(&mut l, &cdb, &list, 0).good();
    assert!(!l.write_cache_enabled());
}

#[test]
fn mode_select_rejects_changes_to_anything_but_wce() {
    let mut l = lun();
    let mut list = vec![0, 0, 0, 0];
    let mut page = caching(false);
    page[2] |= 0x01; // RCD: not changeable
    list.extend(page);
    let cdb = mode_select_6(&list);
    let s = exec(&mut l, &cdb, &list, 0).check();
    assert_eq!(kcq(s), (SenseKey::IllegalRequest, 0x26, 0x00));
    assert_eq!(s.field, param_ptr(6, None));
    assert!(l.write_cache_enabled(), "a rejected list changes nothing");

    let mut list = vec![0, 0, 0, 0];
    let mut page = control();
    page[2] = 0x04; // D_SENSE
    list.extend(page);
    let cdb = mode_select_6(&list);
    let s = exec(&mut l, &cdb, &list, 0).check();
    assert_eq!(s, Sense::invalid_field_in_parameter_list(6, None));

    let mut list = vec![0, 0, 0, 0, 0x1c, 0x0a];
    list.resize(16, 0);
    let cdb = mode_select_6(&list);
    let s = exec(&mut l, &cdb, &list, 0).check();
    assert_eq!(s, Sense::invalid_field_in_parameter_list(4, Some(5)));

    // A block descriptor with a different block length.
    let mut list = vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x10, 0x00];
    list.extend(caching(true));
    let cdb = mode_select_6(&list);
    let s = exec(&mut l, &cdb, &list, 0).check();
    assert_eq!(s, Sense::invalid_field_in_parameter_list(9, None));
}

#[test]
fn mode_select_truncated_list_is_parameter_list_length_error() {
    let mut l = lun();
    let mut list = vec![0, 0, 0, 0];
    list.extend(caching(false));
    list.truncate(14);
    let cdb = mode_select_6(&list);
    let s = exec(&mut l, &cdb, &list, 0).check();
    assert_eq!(kcq(s), (SenseKey::IllegalRequest, 0x1a, 0x00));
    // The CDB promises more than the initiator sent.
    let cdb = [0x15, 0x10, 0, 0, 24, 0];
    let s = exec(&mut l, &cdb, &list, 0).check();
    assert_eq!(kcq(s), (SenseKey::IllegalRequest, 0x1a, 0x00));
}

#[test]
fn mode_select_save_pages_is_rejected() {
    let mut l = lun();
    let s = exec(&mut l, &[0x15, 0x11, 0, 0, 24, 0], &[0; 24], 0).check();
    assert_eq!(s, Sense::invalid_field_in_cdb(1, Some(0)));
}

// ---- READ / WRITE --------------------------------------------------------------------------

#[test]
fn read_10_plans_a_read() {
    let mut l = lun();
    let r = exec(&mut l, &[0x28, 0, 0, 0, 0, 0x10, 0, 0, 0x08, 0], &[], 4096);
    let p = r.plan();
    assert_eq!(
        p.op,
        IoOp::Read {
            lba: 16,
            blocks: 8,
            fua: false
        }
    );
    assert_eq!((p.data_len, p.residual), (4096, 0));
}

#[test]
fn read_6_length_zero_means_256_blocks() {
    let mut l = lun();
    let r = exec(
        &mut l,
        &[0x08, 0x00, 0x01, 0x00, 0x00, 0x00],
        &[],
        256 * 512,
    );
    assert_eq!(
        r.plan().op,
        IoOp::Read {
            lba: 256,
            blocks: 256,
            fua: false
        }
    );
}

#[test]
fn read_16_and_write_12_with_fua() {
    let mut l = lun();
    let cdb = [0x88, 0x08, 0, 0, 0, 0, 0, 0, 0x07, 0xf8, 0, 0, 0, 8, 0, 0];
    let r = exec(&mut l, &cdb, &[], 8 * 512);
    assert_eq!(
        r.plan().op,
        IoOp::Read {
            lba: 2040,
            blocks: 8,
            fua: true
        }
    );
    let data = [0xabu8; 1024];
    let cdb = [0xaa, 0x08, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0];
    let r = exec(&mut l, &cdb, &data, 0);
    let p = r.plan();
    assert_eq!(
        p.op,
        IoOp::Write {
            lba: 1,
            blocks: 2,
            fua: true
        }
    );
    assert_eq!(p.data_len, 1024);
}

#[test]
fn access_past_capacity_is_lba_out_of_range() {
    let mut l = lun();
    let cdb = [0x88, 0, 0, 0, 0, 0, 0, 0, 0x07, 0xf8, 0, 0, 0, 9, 0, 0];
    let s = exec(&mut l, &cdb, &[], 9 * 512).check();
    assert_eq!(s, Sense::LBA_OUT_OF_RANGE);
    let cdb = [
        0x88, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 0, 0,
    ];
    assert_eq!(
        exec(&mut l, &cdb, &[], 512).check(),
        Sense::LBA_OUT_OF_RANGE
    );
    // LBA == capacity with zero blocks is still out of range.
    let cdb = [0x28, 0, 0, 0, 0x08, 0x00, 0, 0, 0, 0];
    assert_eq!(exec(&mut l, &cdb, &[], 0).check(), Sense::LBA_OUT_OF_RANGE);
}

#[test]
fn zero_length_read_completes_without_io() {
    let mut l = lun();
    let r = exec(&mut l, &[0x28, 0, 0, 0, 0, 1, 0, 0, 0, 0], &[], 512);
    assert_eq!(r.good(), &[] as &[u8]);
    assert_eq!(r.done().residual, 512);
}

#[test]
fn buffer_mismatch_fails_when_short_and_reports_residual_when_long() {
    let mut l = lun();
    let s = exec(&mut l, &[0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0], &[], 512).check();
    assert_eq!(s, Sense::invalid_field_in_cdb(7, None));
    let r = exec(&mut l, &[0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0], &[], 4096);
    assert_eq!(r.plan().residual, 4096 - 1024);
    let s = exec(&mut l, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 2, 0], &[0; 100], 0).check();
    assert_eq!(s, Sense::invalid_field_in_cdb(7, None));
}

#[test]
fn transfer_longer_than_block_limits_is_invalid_field() {
    let mut l = lun();
    let cdb = [0x8a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0x01, 0, 0];
    let mut cfg = config();
    cfg.num_blocks = 1 << 20;
    let mut big = ScsiLun::new(cfg).unwrap();
    let data = vec![0u8; 8193 * 512];
    let s = exec(&mut big, &cdb, &data, 0).check();
    assert_eq!(s, Sense::invalid_field_in_cdb(10, None));
    // The protection field must be zero: the LUN has no protection information.
    let s = exec(&mut l, &[0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0], &[], 512).check();
    assert_eq!(s, Sense::invalid_field_in_cdb(1, Some(7)));
}

#[test]
fn writes_to_read_only_lun_are_write_protected() {
    let mut cfg = config();
    cfg.read_only = true;
    let mut l = ScsiLun::new(cfg).unwrap();
    let s = exec(&mut l, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0; 512], 0).check();
    assert_eq!(kcq(s), (SenseKey::DataProtect, 0x27, 0x00));
    let s = exec(&mut l, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &[0; 24], 0).check();
    assert_eq!(kcq(s), (SenseKey::DataProtect, 0x27, 0x00));
    let s = exec(&mut l, &[0x41, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0; 512], 0).check();
    assert_eq!(kcq(s), (SenseKey::DataProtect, 0x27, 0x00));
    // Reads still work.
    exec(&mut l, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[], 512).plan();
}

#[test]
fn io_completion_maps_bdev_errors_to_medium_error() {
    let mut l = lun();
    let mut sense = [0u8; 96];
    let r = exec(&mut l, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[], 1024);
    let plan = r.plan();
    let ok = l.complete_io(&plan, Ok(()), &mut sense);
    assert_eq!(ok.status, ScsiStatus::Good);
    assert_eq!((ok.transferred, ok.residual), (512, 512));
    let c = l.complete_io(&plan, Err(IoError::Medium), &mut sense);
    assert_eq!(c.status, ScsiStatus::CheckCondition);
    assert_eq!(
        &sense[..18],
        &[0x70, 0, 0x03, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x11, 0x00, 0, 0, 0, 0]
    );
    let r = exec(&mut l, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0; 512], 0);
    let c = l.complete_io(&r.plan(), Err(IoError::Medium), &mut sense);
    assert_eq!(c.sense_len, 18);
    assert_eq!(
        kcq(Sense::parse_fixed(&sense).unwrap()),
        (SenseKey::MediumError, 0x0c, 0x00)
    );
    let c = l.complete_io(&r.plan(), Err(IoError::NotReady), &mut sense);
    assert_eq!(c.status, ScsiStatus::CheckCondition);
    assert_eq!(Sense::parse_fixed(&sense).unwrap().key, SenseKey::NotReady);
}

// ---- VERIFY / SYNCHRONIZE CACHE -------------------------------------------------------------

#[test]
fn verify_checks_the_range_only() {
    let mut l = lun();
    exec(&mut l, &[0x2f, 0, 0, 0, 0, 0, 0, 0, 8, 0], &[], 0).good();
    let cdb = [0x8f, 0, 0, 0, 0, 0, 0, 0, 0x07, 0xff, 0, 0, 0, 2, 0, 0];
    assert_eq!(exec(&mut l, &cdb, &[], 0).check(), Sense::LBA_OUT_OF_RANGE);
    let s = exec(&mut l, &[0x2f, 0x02, 0, 0, 0, 0, 0, 0, 8, 0], &[], 0).check();
    assert_eq!(s, Sense::invalid_field_in_cdb(1, Some(2)));
}

#[test]
fn synchronize_cache_flushes_to_the_end_when_length_is_zero() {
    let mut l = lun();
    let r = exec(&mut l, &[0x35, 0, 0, 0, 0, 0x10, 0, 0, 0, 0], &[], 0);
    assert_eq!(
        r.plan().op,
        IoOp::Flush {
            lba: 16,
            blocks: BLOCKS - 16
        }
    );
    let cdb = [0x91, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0];
    assert_eq!(
        exec(&mut l, &cdb, &[], 0).plan().op,
        IoOp::Flush { lba: 0, blocks: 4 }
    );
    let cdb = [0x91, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x00, 0, 0, 0, 0, 0, 0];
    assert_eq!(exec(&mut l, &cdb, &[], 0).check(), Sense::LBA_OUT_OF_RANGE);
    let mut cfg = config();
    cfg.supports_flush = false;
    let mut l = ScsiLun::new(cfg).unwrap();
    exec(&mut l, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0).good();
}

// ---- UNMAP / WRITE SAME ---------------------------------------------------------------------

fn unmap_list(descriptors: &[(u64, u32)]) -> Vec<u8> {
    let bd_len = (descriptors.len() * 16) as u16;
    let mut v = Vec::new();
    v.extend_from_slice(&(bd_len + 6).to_be_bytes());
    v.extend_from_slice(&bd_len.to_be_bytes());
    v.extend_from_slice(&[0; 4]);
    for &(lba, n) in descriptors {
        v.extend_from_slice(&lba.to_be_bytes());
        v.extend_from_slice(&n.to_be_bytes());
        v.extend_from_slice(&[0; 4]);
    }
    v
}

fn unmap_cdb(len: usize) -> [u8; 10] {
    let [hi, lo] = (len as u16).to_be_bytes();
    [0x42, 0, 0, 0, 0, 0, 0, hi, lo, 0]
}

#[test]
fn unmap_parses_block_descriptors_and_skips_empty_ones() {
    let mut l = lun();
    let list = unmap_list(&[(8, 16), (100, 0), (200, 4)]);
    assert_eq!(
        &list[..24],
        &[0, 54, 0, 48, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 16, 0, 0, 0, 0]
    );
    let cdb = unmap_cdb(list.len());
    let r = exec(&mut l, &cdb, &list, 0);
    let IoOp::Unmap(ranges) = r.plan().op else {
        panic!("not an unmap: {:?}", r.plan())
    };
    let got: Vec<BlockRange> = ranges.iter().collect();
    assert_eq!(
        got,
        vec![
            BlockRange { lba: 8, blocks: 16 },
            BlockRange {
                lba: 200,
                blocks: 4
            }
        ]
    );
}

#[test]
fn unmap_validates_lengths_ranges_and_limits() {
    let mut l = lun();
    // Zero parameter list length: nothing to do, not an error.
    exec(&mut l, &unmap_cdb(0), &[], 0).good();
    // Shorter than the header.
    let s = exec(&mut l, &unmap_cdb(4), &[0; 4], 0).check();
    assert_eq!(s, Sense::PARAMETER_LIST_LENGTH_ERROR);
    // Descriptor data length beyond the list.
    let mut list = unmap_list(&[(0, 1)]);
    list[3] = 32;
    let s = exec(&mut l, &unmap_cdb(list.len()), &list, 0).check();
    assert_eq!(s, Sense::PARAMETER_LIST_LENGTH_ERROR);
    // Past the end of the medium.
    let list = unmap_list(&[(2047, 2)]);
    assert_eq!(
        exec(&mut l, &unmap_cdb(list.len()), &list, 0).check(),
        Sense::LBA_OUT_OF_RANGE
    );
    // More descriptors than the block limits allow (4 here).
    let list = unmap_list(&[(0, 1); 5]);
    let s = exec(&mut l, &unmap_cdb(list.len()), &list, 0).check();
    assert_eq!(s, Sense::invalid_field_in_parameter_list(2, None));
    // More blocks than MAXIMUM UNMAP LBA COUNT in total.
    let mut cfg = config();
    cfg.num_blocks = 1 << 20;
    let mut big = ScsiLun::new(cfg).unwrap();
    let list = unmap_list(&[(0, 0x8000), (0x10000, 0x8001)]);
    let s = exec(&mut big, &unmap_cdb(list.len()), &list, 0).check();
    assert_eq!(s, Sense::invalid_field_in_parameter_list(32, None));
    // ANCHOR is not supported.
    let s = exec(
        &mut l,
        &[0x42, 1, 0, 0, 0, 0, 0, 0, 24, 0],
        &unmap_list(&[(0, 1)]),
        0,
    )
    .check();
    assert_eq!(s, Sense::invalid_field_in_cdb(1, Some(0)));
}

#[test]
fn unmap_without_bdev_support_is_an_unknown_command() {
    let mut cfg = config();
    cfg.supports_unmap = false;
    let mut l = ScsiLun::new(cfg).unwrap();
    let list = unmap_list(&[(0, 1)]);
    let s = exec(&mut l, &unmap_cdb(list.len()), &list, 0).check();
    assert_eq!(s, Sense::INVALID_COMMAND_OPERATION_CODE);
}

#[test]
fn write_same_picks_unmap_write_zeroes_or_pattern() {
    let mut l = lun();
    // WRITE SAME(16), UNMAP + NDOB: deallocate (unmapped blocks read zeros).
    let cdb = [0x93, 0x09, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x20, 0, 0];
    let r = exec(&mut l, &cdb, &[], 0);
    let IoOp::Unmap(ranges) = r.plan().op else {
        panic!("{:?}", r.plan())
    };
    assert_eq!(
        ranges.iter().collect::<Vec<_>>(),
        vec![BlockRange {
            lba: 16,
            blocks: 32
        }]
    );
    // WRITE SAME(10) of a zero block without UNMAP: write zeroes.
    let zero = [0u8; 512];
    let cdb = [0x41, 0, 0, 0, 0, 0x10, 0, 0, 0x20, 0];
    let r = exec(&mut l, &cdb, &zero, 0);
    assert_eq!(
        r.plan().op,
        IoOp::WriteZeroes {
            lba: 16,
            blocks: 32
        }
    );
    assert_eq!(r.plan().data_len, 512);
    // A non-zero pattern must be written to every block.
    let pattern = [0x5au8; 512];
    let r = exec(&mut l, &cdb, &pattern, 0);
    assert_eq!(
        r.plan().op,
        IoOp::WriteSame {
            lba: 16,
            blocks: 32,
            block: &pattern[..]
        }
    );
    // UNMAP with a non-zero pattern still writes.
    let cdb = [0x41, 0x08, 0, 0, 0, 0x10, 0, 0, 0x20, 0];
    assert!(matches!(
        exec(&mut l, &cdb, &pattern, 0).plan().op,
        IoOp::WriteSame { .. }
    ));
}

#[test]
fn write_same_rejects_zero_blocks_missing_data_and_anchor() {
    let mut l = lun();
    let s = exec(&mut l, &[0x41, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[0; 512], 0).check();
    assert_eq!(s, Sense::invalid_field_in_cdb(7, None));
    let s = exec(&mut l, &[0x41, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0; 100], 0).check();
    assert_eq!(s, Sense::invalid_field_in_cdb(7, None));
    let s = exec(&mut l, &[0x41, 0x10, 0, 0, 0, 0, 0, 0, 1, 0], &[0; 512], 0).check();
    assert_eq!(s, Sense::invalid_field_in_cdb(1, Some(4)));
    let cdb = [0x93, 0x01, 0, 0, 0, 0, 0, 0, 0x07, 0xff, 0, 0, 0, 2, 0, 0];
    assert_eq!(exec(&mut l, &cdb, &[], 0).check(), Sense::LBA_OUT_OF_RANGE);
}

// ---- START STOP UNIT / TEST UNIT READY / REQUEST SENSE -----------------------------------------

#[test]
fn stopped_unit_is_not_ready_until_started() {
    let mut l = lun();
    exec(&mut l, &[0x00, 0, 0, 0, 0, 0], &[], 0).good();
    let r = exec(&mut l, &[0x1b, 0, 0, 0, 0x00, 0], &[], 0);
    assert_eq!(
        r.plan().op,
        IoOp::Flush {
            lba: 0,
            blocks: BLOCKS
        }
    );
    assert!(l.is_stopped());
    let s = exec(&mut l, &[0x00, 0, 0, 0, 0, 0], &[], 0).check();
    assert_eq!(kcq(s), (SenseKey::NotReady, 0x04, 0x02));
    let s = exec(&mut l, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[], 512).check();
    assert_eq!(kcq(s), (SenseKey::NotReady, 0x04, 0x02));
    exec(&mut l, &[0x12, 0, 0, 0, 36, 0], &[], 36).good();
    let r = exec(&mut l, &[0x03, 0, 0, 0, 18, 0], &[], 18);
    assert_eq!(
        r.good(),
        &[0x70, 0, 0x02, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x04, 0x02, 0, 0, 0, 0]
    );
    exec(&mut l, &[0x1b, 0, 0, 0, 0x01, 0], &[], 0).good();
    exec(&mut l, &[0x00, 0, 0, 0, 0, 0], &[], 0).good();
    // NO_FLUSH stops without a flush; LOEJ is not possible on this medium.
    exec(&mut l, &[0x1b, 0, 0, 0, 0x04, 0], &[], 0).good();
    let s = exec(&mut l, &[0x1b, 0, 0, 0, 0x02, 0], &[], 0).check();
    assert_eq!(s, Sense::invalid_field_in_cdb(4, Some(1)));
}

#[test]
fn request_sense_reports_no_sense_and_rejects_descriptor_format() {
    let mut l = lun();
    let r = exec(&mut l, &[0x03, 0, 0, 0, 252, 0], &[], 252);
    assert_eq!(
        r.good(),
        &[0x70, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    let s = exec(&mut l, &[0x03, 1, 0, 0, 252, 0], &[], 252).check();
    assert_eq!(s, Sense::invalid_field_in_cdb(1, Some(0)));
}

// ---- Unit attention -----------------------------------------------------------------------------

#[test]
fn unit_attention_is_reported_once_and_spares_inquiry() {
    let mut l = lun();
    l.raise_unit_attention(UnitAttention::ReportedLunsChanged);
    l.raise_unit_attention(UnitAttention::PowerOnReset);
    exec(&mut l, &[0x12, 0, 0, 0, 36, 0], &[], 36).good();
    let s = exec(&mut l, &[0x00, 0, 0, 0, 0, 0], &[], 0).check();
    assert_eq!(kcq(s), (SenseKey::UnitAttention, 0x29, 0x00));
    // Power-on reset replaced the LUN inventory change.
    exec(&mut l, &[0x00, 0, 0, 0, 0, 0], &[], 0).good();

    l.raise_unit_attention(UnitAttention::ReportedLunsChanged);
    let r = exec(&mut l, &[0x03, 0, 0, 0, 18, 0], &[], 18);
    assert_eq!(&r.good()[12..14], &[0x3f, 0x0e]);
    assert_eq!(l.pending_unit_attention(), None);

    l.raise_unit_attention(UnitAttention::ReportedLunsChanged);
    exec(&mut l, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], &[], 64).good();
    assert_eq!(
        l.pending_unit_attention(),
        None,
        "REPORT LUNS clears the inventory change"
    );
}

#[test]
fn resize_reports_capacity_changed_once_then_the_new_capacity() {
    let mut l = lun();
    assert!(l.resize(0).is_err(), "a unit of no blocks is refused");
    assert_eq!(l.pending_unit_attention(), None);
    l.resize(0x1000).unwrap();
    assert_eq!(l.config().num_blocks, 0x1000);
    let s = exec(&mut l, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8).check();
    assert_eq!(kcq(s), (SenseKey::UnitAttention, 0x2a, 0x09));
    let r = exec(&mut l, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    assert_eq!(r.good(), &[0x00, 0x00, 0x0f, 0xff, 0x00, 0x00, 0x02, 0x00]);
}

// ---- REPORT LUNS ---------------------------------------------------------------------------------

#[test]
fn report_luns_lists_peripheral_and_flat_luns() {
    let mut l = lun();
    let r = exec(&mut l, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], &[], 64);
    assert_eq!(
        r.good(),
        &[
            0, 0, 0, 24, 0, 0, 0, 0, //
            0x00, 0x00, 0, 0, 0, 0, 0, 0, //
            0x00, 0x01, 0, 0, 0, 0, 0, 0, //
            0x41, 0x2c, 0, 0, 0, 0, 0, 0,
        ]
    );
    // Truncation keeps the full LUN LIST LENGTH.
    let r = exec(&mut l, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], &[], 64);
    assert_eq!(r.good(), &[0, 0, 0, 24, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    // Well-known LUNs only: none.
    let r = exec(&mut l, &[0xa0, 0, 1, 0, 0, 0, 0, 0, 0, 64, 0, 0], &[], 64);
    assert_eq!(r.good(), &[0; 8]);
    let s = exec(&mut l, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], &[], 64).check();
    assert_eq!(s, Sense::invalid_field_in_cdb(6, None));
    let s = exec(
        &mut l,
        &[0xa0, 0, 0x13, 0, 0, 0, 0, 0, 0, 64, 0, 0],
        &[],
        64,
    )
    .check();
    assert_eq!(s, Sense::invalid_field_in_cdb(2, None));
}

// ---- REPORT SUPPORTED OPERATION CODES -------------------------------------------------------------

#[test]
fn report_supported_opcodes_all_commands() {
    let mut l = lun();
    let cdb = [0xa3, 0x0c, 0x00, 0, 0, 0, 0, 0, 0x10, 0x00, 0, 0];
    let r = exec(&mut l, &cdb, &[], 4096);
    let data = r.good();
    let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
    assert_eq!(len, data.len() - 4);
    assert_eq!(len % 8, 0);
    let descriptors: Vec<&[u8]> = data[4..].chunks(8).collect();
    assert_eq!(descriptors[0], &[0x00, 0, 0, 0, 0, 0, 0, 6]);
    assert!(descriptors.contains(&&[0x9e, 0, 0x00, 0x10, 0, 0x01, 0, 16][..]));
    assert!(descriptors.contains(&&[0x28, 0, 0, 0, 0, 0, 0, 10][..]));
    assert!(descriptors.contains(&&[0x42, 0, 0, 0, 0, 0, 0, 10][..]));
    // Every command listed is accepted by the model (no INVALID COMMAND OPERATION CODE).
    for d in &descriptors {
        let mut cdb = [0u8; 16];
        cdb[0] = d[0];
        cdb[1] = d[3];
        let r = exec(&mut l, &cdb, &[], 0);
        if let Outcome::Done(c) = r.outcome {
            if c.status == ScsiStatus::CheckCondition {
                assert_ne!(
                    Sense::parse_fixed(&r.sense).unwrap(),
                    Sense::INVALID_COMMAND_OPERATION_CODE
                );
            }
        }
    }
    // Without unmap support UNMAP is not listed.
    let mut cfg = config();
    cfg.supports_unmap = false;
    let mut l = ScsiLun::new(cfg).unwrap();
    let r = exec(&mut l, &cdb, &[], 4096);
    assert!(!r.good()[4..].chunks(8).any(|d| d[0] == 0x42));
}

#[test]
fn report_supported_opcodes_one_command() {
    let mut l = lun();
    let r = exec(
        &mut l,
        &[0xa3, 0x0c, 0x01, 0x28, 0, 0, 0, 0, 0, 64, 0, 0],
        &[],
        64,
    );
    assert_eq!(
        r.good(),
        &[0, 0x03, 0, 10, 0x28, 0xf8, 0xff, 0xff, 0xff, 0xff, 0x00, 0xff, 0xff, 0x04]
    );
    let r = exec(
        &mut l,
        &[0xa3, 0x0c, 0x02, 0x9e, 0, 0x10, 0, 0, 0, 64, 0, 0],
        &[],
        64,
    );
    assert_eq!(&r.good()[..4], &[0, 0x03, 0, 16]);
    // With RCTD: CTDP and a command timeouts descriptor.
    let r = exec(
        &mut l,
        &[0xa3, 0x0c, 0x81, 0x00, 0, 0, 0, 0, 0, 64, 0, 0],
        &[],
        64,
    );
    assert_eq!(
        r.good(),
        &[0, 0x83, 0, 6, 0x00, 0, 0, 0, 0, 0x04, 0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    // Not supported.
    let r = exec(
        &mut l,
        &[0xa3, 0x0c, 0x01, 0xc0, 0, 0, 0, 0, 0, 64, 0, 0],
        &[],
        64,
    );
    assert_eq!(r.good(), &[0, 0x01, 0, 0]);
    // Option 1 on an opcode with service actions, option 2 on one without, reserved options.
    for options in [[0x01, 0x9e], [0x02, 0x28], [0x05, 0x28]] {
        let cdb = [0xa3, 0x0c, options[0], options[1], 0, 0, 0, 0, 0, 64, 0, 0];
        let s = exec(&mut l, &cdb, &[], 64).check();
        assert_eq!(s, Sense::invalid_field_in_cdb(2, Some(2)));
    }
}

// ---- Errors common to every command --------------------------------------------------------------

#[test]
fn malformed_cdbs_get_the_right_sense() {
    let mut l = lun();
    // LOG SENSE: not implemented.
    let s = exec(&mut l, &[0x4d, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0).check();
    assert_eq!(s, Sense::INVALID_COMMAND_OPERATION_CODE);
    // Variable-length CDB.
    let s = exec(&mut l, &[0x7f, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0).check();
    assert_eq!(s, Sense::INVALID_COMMAND_OPERATION_CODE);
    // Shorter than its group code says.
    let s = exec(&mut l, &[0x28, 0, 0], &[], 0).check();
    assert_eq!(kcq(s), (SenseKey::IllegalRequest, 0x24, 0x00));
    // Empty.
    let s = exec(&mut l, &[], &[], 0).check();
    assert_eq!(s, Sense::INVALID_COMMAND_OPERATION_CODE);
    // NACA set in CONTROL.
    let s = exec(&mut l, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0x04], &[], 512).check();
    assert_eq!(s, Sense::invalid_field_in_cdb(9, Some(2)));
}

#[test]
fn check_condition_sense_is_truncated_to_the_sense_buffer() {
    let mut l = lun();
    let mut data = [0u8; 16];
    let mut sense = [0u8; 8];
    let req = Request {
        cdb: &[0x4d, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        data_out: &[],
        data_out_len: 0,
        data_in_len: 0,
        luns: &LUNS,
    };
    let Outcome::Done(c) = l.execute(&req, &mut data, &mut sense) else {
        panic!()
    };
    assert_eq!(c.sense_len, 8);
    assert_eq!(sense, [0x70, 0, 0x05, 0, 0, 0, 0, 10]);
}

#[test]
fn data_out_copy_len_covers_parameter_lists_and_write_same() {
    let l = lun();
    assert_eq!(l.data_out_copy_len(&[0x42, 0, 0, 0, 0, 0, 0, 0, 40, 0]), 40);
    assert_eq!(l.data_out_copy_len(&[0x15, 0x10, 0, 0, 24, 0]), 24);
    assert_eq!(l.data_out_copy_len(&[0x41, 0, 0, 0, 0, 0, 0, 0, 1, 0]), 512);
    assert_eq!(
        l.data_out_copy_len(&[0x93, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]),
        0
    );
    assert_eq!(l.data_out_copy_len(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0]), 0);
    assert_eq!(
        l.data_out_copy_len(&[0x42, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0]),
        8 + 16 * 256
    );
    // Parameter lists are capped at MAX_PARAMETER_LIST_LEN whatever the block size.
    let mut cfg = config();
    cfg.block_size = 65536;
    let big = ScsiLun::new(cfg).unwrap();
    assert_eq!(
        big.data_out_copy_len(&[0x55, 0x10, 0, 0, 0, 0, 0, 0x13, 0x88, 0]),
        8 + 16 * 256
    );
    assert_eq!(
        big.data_out_copy_len(&[0x41, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
        65536
    );
}

/// The opcode check in front of `data_out_copy_len` must never change its answer: for every
/// opcode, with length fields at zero, small and all-ones, it agrees with a full parse.
#[test]
fn data_out_copy_len_agrees_with_the_parsed_command_for_every_opcode() {
    use rvhost_core::scsi::lun::MAX_PARAMETER_LIST_LEN;
    use rvhost_core::scsi::Command;
    let l = lun();
    let reference = |cdb: &[u8]| match Command::parse(cdb) {
        Ok(Command::Unmap { param_len, .. }) => usize::from(param_len).min(MAX_PARAMETER_LIST_LEN),
        Ok(Command::ModeSelect(m)) => usize::from(m.param_len).min(MAX_PARAMETER_LIST_LEN),
        Ok(Command::WriteSame(w)) if !w.ndob => 512,
        _ => 0,
    };
    for opcode in 0..=255u8 {
        for fill in [0x00u8, 0x01, 0x18, 0xff] {
            for len in [6usize, 10, 12, 16, 32] {
                let mut cdb = vec![fill; len];
                cdb[0] = opcode;
                cdb[1] &= 0x1f;
                assert_eq!(
                    l.data_out_copy_len(&cdb),
                    reference(&cdb),
                    "opcode {opcode:#04x}, fill {fill:#04x}, length {len}"
                );
            }
        }
    }
}

// ---- Absent LUN -----------------------------------------------------------------------------------

#[test]
fn absent_lun_answers_inquiry_and_report_luns_only() {
    let mut data = [0u8; 256];
    let mut sense = [0u8; 96];
    let req = Request {
        cdb: &[0x12, 0, 0, 0, 36, 0],
        data_out: &[],
        data_out_len: 0,
        data_in_len: 36,
        luns: &LUNS,
    };
    let c = execute_without_lun(&req, &mut data, &mut sense);
    assert_eq!(c.status, ScsiStatus::Good);
    assert_eq!(c.transferred, 36);
    assert_eq!(&data[..5], &[0x7f, 0x00, 0x07, 0x02, 31]);

    let req = Request {
        cdb: &[0x00, 0, 0, 0, 0, 0],
        ..req
    };
    let c = execute_without_lun(&req, &mut data, &mut sense);
    assert_eq!(c.status, ScsiStatus::CheckCondition);
    assert_eq!(
        Sense::parse_fixed(&sense).unwrap(),
        Sense::LOGICAL_UNIT_NOT_SUPPORTED
    );

    let req = Request {
        cdb: &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0],
        data_in_len: 64,
        ..req
    };
    let c = execute_without_lun(&req, &mut data, &mut sense);
    assert_eq!(c.status, ScsiStatus::Good);
    assert_eq!(&data[..4], &[0, 0, 0, 24]);

    let req = Request {
        cdb: &[0x03, 0, 0, 0, 18, 0],
        data_in_len: 18,
        ..req
    };
    let c = execute_without_lun(&req, &mut data, &mut sense);
    assert_eq!(c.status, ScsiStatus::Good);
    assert_eq!(&data[12..14], &[0x25, 0x00]);
}

#[test]
fn config_validation_rejects_bad_devices() {
    assert!(ScsiLun::new(LunConfig::new(500, 10, UUID)).is_err());
    assert!(ScsiLun::new(LunConfig::new(512, 0, UUID)).is_err());
    assert!(ScsiLun::new(LunConfig::new(4096, u64::MAX / 2, UUID)).is_err());
    assert!(LunConfig::new(512, 1, UUID)
        .with_bdev_kind("AVeryLongKind")
        .is_err());
    assert!(LunConfig::new(512, 1, UUID).with_serial("").is_err());
    assert!(LunConfig::new(512, 1, UUID)
        .with_serial("tab\there")
        .is_err());
    let cfg = LunConfig::new(4096, 1, UUID);
    assert_eq!(cfg.serial.as_bytes(), b"00112233445566778899aabbccddeeff");
    assert_eq!(cfg.max_transfer_blocks, 1024);
}

#[test]
fn unmap_list_longer_than_the_copy_limit_is_read_from_its_header() {
    let mut l = lun();
    let list = unmap_list(&[(8, 16)]);
    let req = Request {
        cdb: &[0x42, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0],
        data_out: &list,
        data_out_len: 0xffff,
        data_in_len: 0,
        luns: &LUNS,
    };
    let (mut data, mut sense) = ([0u8; 16], [0u8; 96]);
    let Outcome::Io(plan) = l.execute(&req, &mut data, &mut sense) else {
        panic!()
    };
    let IoOp::Unmap(ranges) = plan.op else {
        panic!()
    };
    assert_eq!(
        ranges.iter().collect::<Vec<_>>(),
        vec![BlockRange { lba: 8, blocks: 16 }]
    );
}

#[test]
fn write_same_of_zeros_without_write_zeroes_support_writes_the_block() {
    let mut cfg = config();
    cfg.supports_write_zeroes = false;
    let mut l = ScsiLun::new(cfg).unwrap();
    let zero = [0u8; 512];
    let cdb = [0x41, 0, 0, 0, 0, 0x10, 0, 0, 0x20, 0];
    let r = exec(&mut l, &cdb, &zero, 0);
    assert_eq!(
        r.plan().op,
        IoOp::WriteSame {
            lba: 16,
            blocks: 32,
            block: &zero[..]
        }
    );
    // NDOB has no block to replicate: the target emulates write-zeroes.
    let cdb = [0x93, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x20, 0, 0];
    assert_eq!(
        exec(&mut l, &cdb, &[], 0).plan().op,
        IoOp::WriteZeroes {
            lba: 16,
            blocks: 32
        }
    );
}
