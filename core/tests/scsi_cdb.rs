//! CDB parsing and emission against literal CDBs laid out as in the SBC-4 / SPC-5 tables.

use rvhost_core::scsi::cdb::{
    Cdb, CdbError, CdbSize, Command, ModeSelect, ModeSense, PageControl, ReadWrite,
    ReportSupportedOpcodes, StartStopUnit, SynchronizeCache, Verify, WriteSame,
};
use rvhost_core::scsi::sense::Sense;

fn rw(size: CdbSize, lba: u64, blocks: u32, fua: bool) -> ReadWrite {
    ReadWrite {
        size,
        lba,
        blocks,
        protect: 0,
        dpo: false,
        fua,
        group: 0,
    }
}

/// Canonical CDBs (reserved bits zero, CONTROL zero) and what they mean.
fn table() -> Vec<(Vec<u8>, Command)> {
    vec![
        (vec![0x00, 0, 0, 0, 0, 0], Command::TestUnitReady),
        (
            vec![0x03, 0, 0, 0, 252, 0],
            Command::RequestSense {
                desc: false,
                alloc_len: 252,
            },
        ),
        (
            vec![0x12, 0, 0, 0x01, 0x00, 0],
            Command::Inquiry {
                evpd: false,
                page_code: 0,
                alloc_len: 256,
            },
        ),
        (
            vec![0x12, 1, 0x83, 0x00, 0xff, 0],
            Command::Inquiry {
                evpd: true,
                page_code: 0x83,
                alloc_len: 255,
            },
        ),
        (
            vec![0x1a, 0x08, 0x3f, 0x00, 0xc0, 0],
            Command::ModeSense(ModeSense {
                ten: false,
                dbd: true,
                llbaa: false,
                pc: PageControl::Current,
                page: 0x3f,
                subpage: 0,
                alloc_len: 0xc0,
            }),
        ),
        (
            vec![0x5a, 0x10, 0x48, 0xff, 0, 0, 0, 0x02, 0x00, 0],
            Command::ModeSense(ModeSense {
                ten: true,
                dbd: false,
                llbaa: true,
                pc: PageControl::Changeable,
                page: 0x08,
                subpage: 0xff,
                alloc_len: 512,
            }),
        ),
        (
            vec![0x15, 0x10, 0, 0, 24, 0],
            Command::ModeSelect(ModeSelect {
                ten: false,
                pf: true,
                sp: false,
                param_len: 24,
            }),
        ),
        (
            vec![0x55, 0x11, 0, 0, 0, 0, 0, 0x01, 0x04, 0],
            Command::ModeSelect(ModeSelect {
                ten: true,
                pf: true,
                sp: true,
                param_len: 260,
            }),
        ),
        (
            vec![0x1b, 0x01, 0, 0x02, 0x35, 0],
            Command::StartStopUnit(StartStopUnit {
                immed: true,
                power_condition_modifier: 2,
                power_condition: 3,
                no_flush: true,
                loej: false,
                start: true,
            }),
        ),
        (
            vec![0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            Command::ReadCapacity10,
        ),
        (
            vec![0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0],
            Command::ReadCapacity16 { alloc_len: 32 },
        ),
        (
            vec![0x08, 0x1f, 0xff, 0xfe, 0x00, 0],
            Command::Read(rw(CdbSize::Six, 0x1f_fffe, 256, false)),
        ),
        (
            vec![0x0a, 0x00, 0x00, 0x10, 0x08, 0],
            Command::Write(rw(CdbSize::Six, 16, 8, false)),
        ),
        (
            vec![0x28, 0x18, 0x12, 0x34, 0x56, 0x78, 0x05, 0xab, 0xcd, 0],
            Command::Read(ReadWrite {
                size: CdbSize::Ten,
                lba: 0x1234_5678,
                blocks: 0xabcd,
                protect: 0,
                dpo: true,
                fua: true,
                group: 5,
            }),
        ),
        (
            vec![0x2a, 0x08, 0, 0, 0, 0x10, 0, 0, 0x08, 0],
            Command::Write(rw(CdbSize::Ten, 16, 8, true)),
        ),
        (
            vec![0xa8, 0, 0, 0, 0, 1, 0x00, 0x01, 0x00, 0x00, 0, 0],
            Command::Read(rw(CdbSize::Twelve, 1, 0x1_0000, false)),
        ),
        (
            vec![0xaa, 0x08, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 0x3f, 0],
            Command::Write(ReadWrite {
                group: 0x3f,
                ..rw(CdbSize::Twelve, 0xffff_ffff, 1, true)
            }),
        ),
        (
            vec![
                0x88, 0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0, 0, 0x01, 0x00, 0, 0,
            ],
            Command::Read(rw(CdbSize::Sixteen, 0x0123_4567_89ab_cdef, 256, false)),
        ),
        (
            vec![
                0x8a, 0xe8, 0, 0, 0, 0, 0, 0, 0, 0x10, 0xff, 0xff, 0xff, 0xff, 0, 0,
            ],
            Command::Write(ReadWrite {
                protect: 7,
                ..rw(CdbSize::Sixteen, 16, u32::MAX, true)
            }),
        ),
        (
            vec![0x2f, 0x12, 0, 0, 0, 4, 0, 0, 2, 0],
            Command::Verify(Verify {
                size: CdbSize::Ten,
                lba: 4,
                blocks: 2,
                protect: 0,
                dpo: true,
                bytchk: 1,
                group: 0,
            }),
        ),
        (
            vec![0x8f, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 2, 0, 0],
            Command::Verify(Verify {
                size: CdbSize::Sixteen,
                lba: 4,
                blocks: 2,
                protect: 0,
                dpo: false,
                bytchk: 0,
                group: 0,
            }),
        ),
        (
            vec![0x35, 0x02, 0, 0, 0, 0, 0, 0, 0, 0],
            Command::SynchronizeCache(SynchronizeCache {
                size: CdbSize::Ten,
                lba: 0,
                blocks: 0,
                immed: true,
                group: 0,
            }),
        ),
        (
            vec![0x91, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 8, 0, 0],
            Command::SynchronizeCache(SynchronizeCache {
                size: CdbSize::Sixteen,
                lba: 8,
                blocks: 8,
                immed: false,
                group: 0,
            }),
        ),
        (
            vec![0x41, 0x08, 0, 0, 0, 0x10, 0, 0, 0x20, 0],
            Command::WriteSame(WriteSame {
                size: CdbSize::Ten,
                lba: 16,
                blocks: 32,
                protect: 0,
                anchor: false,
                unmap: true,
                ndob: false,
                group: 0,
            }),
        ),
        (
            vec![0x93, 0x19, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x20, 0, 0],
            Command::WriteSame(WriteSame {
                size: CdbSize::Sixteen,
                lba: 16,
                blocks: 32,
                protect: 0,
                anchor: true,
                unmap: true,
                ndob: true,
                group: 0,
            }),
        ),
        (
            vec![0x42, 0x01, 0, 0, 0, 0, 0x02, 0, 24, 0],
            Command::Unmap {
                anchor: true,
                group: 2,
                param_len: 24,
            },
        ),
        (
            vec![0xa0, 0, 0x02, 0, 0, 0, 0, 0, 0x10, 0, 0, 0],
            Command::ReportLuns {
                select_report: 2,
                alloc_len: 4096,
            },
        ),
        (
            vec![0xa3, 0x0c, 0x82, 0x9e, 0x00, 0x10, 0, 0, 0x02, 0, 0, 0],
            Command::ReportSupportedOpcodes(ReportSupportedOpcodes {
                rctd: true,
                options: 2,
                opcode: 0x9e,
                service_action: 0x10,
                alloc_len: 512,
            }),
        ),
    ]
}

#[test]
fn every_command_parses_from_and_emits_to_its_literal_cdb() {
    for (bytes, cmd) in table() {
        assert_eq!(Command::parse(&bytes), Ok(cmd), "parsing {bytes:02x?}");
        let mut out = [0xeeu8; 16];
        let n = cmd.emit(&mut out).unwrap();
        assert_eq!(&out[..n], &bytes[..], "emitting {cmd:?}");
        assert_eq!(cmd.cdb_len(), bytes.len());
    }
}

#[test]
fn virtio_padding_after_the_cdb_is_ignored() {
    for (bytes, cmd) in table() {
        let mut padded = bytes.clone();
        padded.resize(32, 0xa5);
        assert_eq!(Command::parse(&padded), Ok(cmd));
    }
}

#[test]
fn view_accessors_follow_the_group_code() {
    let cdb =
        Cdb::new_checked(&[0x88u8, 0x08, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 1, 0, 0x3f, 0][..]).unwrap();
    assert_eq!(cdb.len(), 16);
    assert_eq!(cdb.lba(), 0x0102_0304_0506_0708);
    assert_eq!(cdb.transfer_length(), 256);
    assert_eq!(cdb.group_number(), 0x3f);
    assert!(cdb.bit(1, 3));
    let cdb = Cdb::new_checked(&[0x08u8, 0xff, 0xff, 0xff, 0x00, 0x00][..]).unwrap();
    assert_eq!(cdb.lba(), 0x1f_ffff, "top three bits of byte 1 are not LBA");
    assert_eq!(cdb.transfer_length(), 0);
    let cdb = Cdb::new_checked(&[0xa8u8, 0, 0, 0, 0, 9, 0, 0, 0, 7, 0x21, 0x00][..]).unwrap();
    assert_eq!(
        (
            cdb.lba(),
            cdb.transfer_length(),
            cdb.group_number(),
            cdb.control()
        ),
        (9, 7, 0x21, 0)
    );
}

#[test]
fn length_and_opcode_errors() {
    assert_eq!(Command::parse(&[]), Err(CdbError::Empty));
    assert_eq!(
        Command::parse(&[0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        Err(CdbError::TooShort {
            opcode: 0x88,
            needed: 16,
            got: 10
        })
    );
    assert_eq!(
        Command::parse(&[0x7f, 0, 0, 0, 0, 0, 0, 0, 0x18, 0]),
        Err(CdbError::UnsupportedOpcode {
            opcode: 0x7f,
            service_action: None
        })
    );
    assert_eq!(
        Command::parse(&[0xc0, 0, 0, 0, 0, 0]),
        Err(CdbError::UnsupportedOpcode {
            opcode: 0xc0,
            service_action: None
        })
    );
    assert_eq!(
        Command::parse(&[0x5e, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        Err(CdbError::UnsupportedOpcode {
            opcode: 0x5e,
            service_action: None
        })
    );
    assert_eq!(
        Command::parse(&[0xa3, 0x05, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        Err(CdbError::UnsupportedOpcode {
            opcode: 0xa3,
            service_action: Some(5)
        })
    );
}

#[test]
fn field_errors_point_at_the_field() {
    // Page code with EVPD clear.
    assert_eq!(
        Command::parse(&[0x12, 0, 0x80, 0, 0xff, 0]),
        Err(CdbError::InvalidField { byte: 2, bit: None })
    );
    // CMDDT.
    assert_eq!(
        Command::parse(&[0x12, 0x02, 0, 0, 0xff, 0]),
        Err(CdbError::InvalidField {
            byte: 1,
            bit: Some(1)
        })
    );
    // NACA in the CONTROL byte of a 6/10/12/16-byte CDB.
    for cdb in [
        &[0x00, 0, 0, 0, 0, 0x04][..],
        &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0x04][..],
        &[0xa8, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0x04][..],
        &[0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0x04][..],
    ] {
        let last = (cdb.len() - 1) as u16;
        assert_eq!(
            Command::parse(cdb),
            Err(CdbError::InvalidField {
                byte: last,
                bit: Some(2)
            })
        );
    }
}

#[test]
fn cdb_errors_map_to_spc_sense() {
    assert_eq!(
        CdbError::Empty.sense(),
        Sense::INVALID_COMMAND_OPERATION_CODE
    );
    assert_eq!(
        CdbError::UnsupportedOpcode {
            opcode: 0x4d,
            service_action: None
        }
        .sense(),
        Sense::INVALID_COMMAND_OPERATION_CODE
    );
    assert_eq!(
        CdbError::UnsupportedOpcode {
            opcode: 0x9e,
            service_action: Some(0x12)
        }
        .sense(),
        Sense::invalid_field_in_cdb(1, Some(4))
    );
    assert_eq!(
        CdbError::InvalidField { byte: 2, bit: None }.sense(),
        Sense::invalid_field_in_cdb(2, None)
    );
}

#[test]
fn emit_needs_room() {
    let mut small = [0u8; 9];
    assert!(Command::ReadCapacity10.emit(&mut small).is_err());
    assert_eq!(Command::TestUnitReady.emit(&mut small), Ok(6));
}

/// `Cdb::be` reads any range as the big-endian number a shift per byte would give, keeping the
/// last 8 bytes of a longer range.
#[test]
fn be_matches_a_bytewise_fold_for_every_range() {
    let bytes: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(0x91))
        .collect();
    let cdb = Cdb::new_unchecked(&bytes[..]);
    for start in 0..bytes.len() {
        for end in start..=bytes.len() {
            let folded = bytes[start..end]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
            assert_eq!(cdb.be(start..end), folded, "range {start}..{end}");
        }
    }
}

/// An unchecked view over a buffer shorter than its CDB reads zeros past the end instead of
/// panicking: no accessor indexes guest bytes unchecked.
#[test]
fn an_unchecked_view_of_a_short_buffer_never_panics() {
    // READ(16) needs 16 bytes; only the opcode, flags and 4 LBA bytes are here.
    let bytes = [0x88u8, 0x08, 0x01, 0x02, 0x03, 0x04];
    let cdb = Cdb::new_unchecked(&bytes[..]);
    assert_eq!(cdb.opcode(), 0x88);
    assert_eq!(cdb.len(), 16);
    assert_eq!(cdb.bytes(), &bytes[..]);
    assert_eq!(cdb.byte(1), 0x08);
    assert_eq!(cdb.byte(6), 0);
    assert_eq!(cdb.byte(usize::MAX), 0);
    assert_eq!(cdb.be(2..6), 0x0102_0304);
    assert_eq!(cdb.lba(), 0, "the LBA field reaches past the buffer");
    assert_eq!(cdb.transfer_length(), 0);
    assert_eq!(cdb.control(), 0);
    assert_eq!(cdb.group_number(), 0);
    let empty = Cdb::new_unchecked(&[][..]);
    assert_eq!(empty.opcode(), 0);
    assert_eq!(empty.be(0..8), 0);
    assert_eq!(
        Cdb::new_checked(&bytes[..]).err().map(|e| e.sense()),
        Some(Sense::INVALID_FIELD_IN_CDB)
    );
}

/// The data-path decoder accepts exactly the READ/WRITE(10/16) CDBs the general parser turns into
/// `Read`/`Write`, with the same fields, and nothing else.
#[test]
fn parse_read_write_agrees_with_parse() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let opcodes = [
        0x28u8, 0x88, 0x2a, 0x8a, 0x08, 0x0a, 0xa8, 0xaa, 0x2f, 0x35, 0x00, 0x12,
    ];
    for round in 0..20_000 {
        let mut cdb = [0u8; 16];
        for b in cdb.iter_mut() {
            *b = next() as u8;
        }
        cdb[0] = opcodes[round % opcodes.len()];
        // Mostly well-formed: clear the control byte's NACA bit three times in four.
        if round % 4 != 0 {
            cdb[9] &= !0x04;
            cdb[15] &= !0x04;
        }
        for len in [6usize, 9, 10, 16] {
            let bytes = &cdb[..len];
            let expected = match Command::parse(bytes) {
                Ok(Command::Read(rw)) if matches!(bytes[0], 0x28 | 0x88) => Some((rw, false)),
                Ok(Command::Write(rw)) if matches!(bytes[0], 0x2a | 0x8a) => Some((rw, true)),
                _ => None,
            };
            assert_eq!(Command::parse_read_write(bytes), expected, "{bytes:02x?}");
        }
    }
}
