//! Fixed-format sense data (SPC-5 §4.4.3) for every condition rvhost reports.

use rvhost_core::scsi::sense::{Sense, SenseKey, SenseParseError};

fn fixed(key: u8, asc: u8, ascq: u8) -> [u8; 18] {
    [
        0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0,
    ]
}

#[test]
fn every_reported_condition_has_its_spc_code() {
    let cases: [(Sense, [u8; 18]); 16] = [
        (Sense::NO_SENSE, fixed(0x0, 0x00, 0x00)),
        (
            Sense::INVALID_COMMAND_OPERATION_CODE,
            fixed(0x5, 0x20, 0x00),
        ),
        (Sense::INVALID_FIELD_IN_CDB, fixed(0x5, 0x24, 0x00)),
        (Sense::LBA_OUT_OF_RANGE, fixed(0x5, 0x21, 0x00)),
        (
            Sense::INVALID_FIELD_IN_PARAMETER_LIST,
            fixed(0x5, 0x26, 0x00),
        ),
        (Sense::PARAMETER_LIST_LENGTH_ERROR, fixed(0x5, 0x1a, 0x00)),
        (Sense::LOGICAL_UNIT_NOT_SUPPORTED, fixed(0x5, 0x25, 0x00)),
        (
            Sense::SAVING_PARAMETERS_NOT_SUPPORTED,
            fixed(0x5, 0x39, 0x00),
        ),
        (Sense::WRITE_PROTECTED, fixed(0x7, 0x27, 0x00)),
        (Sense::UNRECOVERED_READ_ERROR, fixed(0x3, 0x11, 0x00)),
        (Sense::WRITE_ERROR, fixed(0x3, 0x0c, 0x00)),
        (
            Sense::NOT_READY_CAUSE_NOT_REPORTABLE,
            fixed(0x2, 0x04, 0x00),
        ),
        (
            Sense::NOT_READY_INITIALIZING_COMMAND_REQUIRED,
            fixed(0x2, 0x04, 0x02),
        ),
        (Sense::POWER_ON_RESET, fixed(0x6, 0x29, 0x00)),
        (Sense::REPORTED_LUNS_DATA_CHANGED, fixed(0x6, 0x3f, 0x0e)),
        (Sense::MODE_PARAMETERS_CHANGED, fixed(0x6, 0x2a, 0x01)),
    ];
    for (sense, bytes) in cases {
        let mut buf = [0xffu8; 96];
        assert_eq!(sense.emit_fixed(&mut buf), 18);
        assert_eq!(buf[..18], bytes, "{sense}");
        assert_eq!(Sense::parse_fixed(&bytes), Ok(sense));
    }
}

#[test]
fn field_pointers_for_cdb_and_parameter_list() {
    let mut buf = [0u8; 18];
    Sense::invalid_field_in_cdb(10, None).emit_fixed(&mut buf);
    assert_eq!(buf[15..18], [0xc0, 0x00, 0x0a]);
    Sense::invalid_field_in_parameter_list(0x0123, Some(5)).emit_fixed(&mut buf);
    assert_eq!(buf[12..18], [0x26, 0x00, 0, 0x8d, 0x01, 0x23]);
}

#[test]
fn information_field_sets_valid() {
    let s = Sense {
        information: Some(0x0102_0304),
        ..Sense::UNRECOVERED_READ_ERROR
    };
    let mut buf = [0u8; 18];
    s.emit_fixed(&mut buf);
    assert_eq!(buf[..8], [0xf0, 0, 0x03, 1, 2, 3, 4, 10]);
    assert_eq!(Sense::parse_fixed(&buf), Ok(s));
}

#[test]
fn parse_rejects_what_is_not_fixed_format() {
    assert_eq!(
        Sense::parse_fixed(&[0x70; 10]),
        Err(SenseParseError::Truncated { len: 10 })
    );
    let mut d = fixed(5, 0x24, 0);
    d[0] = 0x72;
    assert_eq!(
        Sense::parse_fixed(&d),
        Err(SenseParseError::NotFixedFormat {
            response_code: 0x72
        })
    );
    let mut d = fixed(0xc, 0, 0);
    d[2] = 0x0c;
    assert_eq!(
        Sense::parse_fixed(&d),
        Err(SenseParseError::ReservedKey(0xc))
    );
    assert_eq!(SenseKey::from_code(0xc), None);
}
