//! Property tests: the SCSI model never panics on anything an initiator can send and keeps its
//! promises about buffers and ranges; every CDB and virtio-scsi structure round-trips.

use proptest::prelude::*;
use rvhost_core::scsi::cdb::{
    CdbSize, Command, ModeSelect, ModeSense, PageControl, ReadWrite, ReportSupportedOpcodes,
    StartStopUnit, SynchronizeCache, Verify, WriteSame,
};
use rvhost_core::scsi::lun::{execute_without_lun, IoOp, LunConfig, Outcome, Request, ScsiLun};
use rvhost_core::scsi::opcode;
use rvhost_core::scsi::ScsiStatus;
use rvhost_core::virtio_scsi::*;

fn lun_config() -> impl Strategy<Value = LunConfig> {
    (
        prop::sample::select(vec![512u32, 4096]),
        1u64..=(1 << 40),
        any::<[bool; 6]>(),
        1u32..=4096,
        1u16..=256,
    )
        .prop_map(|(bs, blocks, flags, max_xfer, max_desc)| {
            let mut c = LunConfig::new(bs, blocks, [7; 16]);
            c.read_only = flags[0];
            c.supports_unmap = flags[1];
            c.unmap_reads_zeroes = flags[2];
            c.supports_write_zeroes = flags[3];
            c.supports_flush = flags[4];
            c.write_cache = flags[5];
            c.max_transfer_blocks = max_xfer;
            c.max_write_same_blocks = max_xfer;
            c.max_unmap_descriptors = max_desc;
            c
        })
}

/// CDBs biased towards implemented opcodes so the deeper paths are reached.
fn cdb_bytes() -> impl Strategy<Value = Vec<u8>> {
    let implemented = prop::sample::select(vec![
        opcode::TEST_UNIT_READY,
        opcode::REQUEST_SENSE,
        opcode::READ_6,
        opcode::WRITE_6,
        opcode::INQUIRY,
        opcode::MODE_SELECT_6,
        opcode::MODE_SENSE_6,
        opcode::START_STOP_UNIT,
        opcode::READ_CAPACITY_10,
        opcode::READ_10,
        opcode::WRITE_10,
        opcode::VERIFY_10,
        opcode::SYNCHRONIZE_CACHE_10,
        opcode::WRITE_SAME_10,
        opcode::UNMAP,
        opcode::MODE_SELECT_10,
        opcode::MODE_SENSE_10,
        opcode::READ_16,
        opcode::WRITE_16,
        opcode::VERIFY_16,
        opcode::SYNCHRONIZE_CACHE_16,
        opcode::WRITE_SAME_16,
        opcode::SERVICE_ACTION_IN_16,
        opcode::REPORT_LUNS,
        opcode::MAINTENANCE_IN,
        opcode::READ_12,
        opcode::WRITE_12,
    ]);
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..40),
        (implemented, prop::collection::vec(any::<u8>(), 0..32)).prop_map(|(op, mut rest)| {
            // Keep the CONTROL byte's NACA clear most of the time so the command is executed.
            if let Some(last) = rest.get_mut(..).and_then(|r| r.get_mut(14)) {
                *last &= !0x04;
            }
            rest.insert(0, op);
            rest
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn lun_never_panics_and_respects_buffers(
        cfg in lun_config(),
        cdb in cdb_bytes(),
        data_out in prop::collection::vec(any::<u8>(), 0..600),
        extra_out in 0u64..1 << 33,
        data_in_len in prop_oneof![0u64..8192, any::<u64>()],
        data_in_cap in 0usize..1024,
        sense_cap in 0usize..100,
        stopped in any::<bool>(),
        ua in any::<bool>(),
    ) {
        let mut lun = ScsiLun::new(cfg).unwrap();
        if ua {
            lun.raise_unit_attention(rvhost_core::scsi::lun::UnitAttention::PowerOnReset);
        }
        if stopped {
            let _ = lun.execute(
                &Request { cdb: &[0x1b, 0, 0, 0, 0x04, 0], data_out: &[], data_out_len: 0, data_in_len: 0, luns: &[0] },
                &mut [0u8; 0],
                &mut [0u8; 0],
            );
        }
        let mut data_in = vec![0u8; data_in_cap];
        let mut sense = vec![0u8; sense_cap];
        let data_out_len = (data_out.len() as u64).saturating_add(extra_out);
        let req = Request { cdb: &cdb, data_out: &data_out, data_out_len, data_in_len, luns: &[0, 1, 2, 400] };
        match lun.execute(&req, &mut data_in, &mut sense) {
            Outcome::Done(c) => {
                prop_assert!(c.transferred <= data_in_cap as u64);
                prop_assert!(c.transferred <= data_in_len);
                prop_assert!(c.sense_len <= sense_cap);
                match c.status {
                    ScsiStatus::Good => prop_assert_eq!(c.sense_len, 0),
                    ScsiStatus::CheckCondition => {
                        prop_assert_eq!(c.sense_len, sense_cap.min(18));
                        prop_assert_eq!(c.transferred, 0);
                    }
                    other => prop_assert!(false, "unexpected status {:?}", other),
                }
            }
            Outcome::Io(plan) => {
                let cap = cfg.num_blocks;
                let bs = u64::from(cfg.block_size);
                let in_range = |lba: u64, n: u64| n > 0 && lba < cap && n <= cap - lba;
                match plan.op {
                    IoOp::Read { lba, blocks, .. } => {
                        prop_assert!(in_range(lba, blocks));
                        prop_assert_eq!(plan.data_len, blocks * bs);
                        prop_assert!(plan.data_len <= data_in_len);
                        prop_assert!(blocks <= u64::from(cfg.max_transfer_blocks));
                    }
                    IoOp::Write { lba, blocks, .. } => {
                        prop_assert!(!cfg.read_only);
                        prop_assert!(in_range(lba, blocks));
                        prop_assert_eq!(plan.data_len, blocks * bs);
                        prop_assert!(plan.data_len <= data_out_len);
                    }
                    IoOp::Flush { lba, blocks } => {
                        prop_assert!(cfg.supports_flush);
                        prop_assert!(in_range(lba, blocks));
                    }
                    IoOp::Unmap(ranges) => {
                        prop_assert!(cfg.supports_unmap && !cfg.read_only);
                        prop_assert!(!ranges.is_empty());
                        for r in ranges.iter() {
                            prop_assert!(in_range(r.lba, r.blocks));
                        }
                    }
                    IoOp::WriteZeroes { lba, blocks } => {
                        prop_assert!(!cfg.read_only);
                        prop_assert!(in_range(lba, blocks));
                    }
                    IoOp::WriteSame { lba, blocks, block } => {
                        prop_assert!(!cfg.read_only);
                        prop_assert!(in_range(lba, blocks));
                        prop_assert_eq!(block.len() as u64, bs);
                        prop_assert!(!cfg.supports_write_zeroes || block.iter().any(|&b| b != 0));
                    }
                }
                let c = lun.complete_io(&plan, Err(rvhost_core::scsi::lun::IoError::Medium), &mut sense);
                prop_assert_eq!(c.status, ScsiStatus::CheckCondition);
                prop_assert!(c.sense_len <= sense_cap);
            }
        }
    }

    #[test]
    fn absent_lun_never_panics(cdb in cdb_bytes(), data_in_len in any::<u64>(), cap in 0usize..300, sense_cap in 0usize..40) {
        let mut data_in = vec![0u8; cap];
        let mut sense = vec![0u8; sense_cap];
        let req = Request { cdb: &cdb, data_out: &[], data_out_len: 0, data_in_len, luns: &[1] };
        let c = execute_without_lun(&req, &mut data_in, &mut sense);
        prop_assert!(c.transferred <= cap as u64);
        prop_assert!(c.sense_len <= sense_cap);
    }

    #[test]
    fn parsed_cdbs_round_trip_through_emit(cdb in cdb_bytes()) {
        if let Ok(cmd) = Command::parse(&cdb) {
            let mut out = [0u8; 16];
            let n = cmd.emit(&mut out).unwrap();
            prop_assert_eq!(n, cmd.cdb_len());
            prop_assert_eq!(Command::parse(&out[..n]), Ok(cmd));
        }
    }

    #[test]
    fn command_reprs_round_trip(cmd in command()) {
        let mut out = [0u8; 16];
        let n = cmd.emit(&mut out).unwrap();
        prop_assert_eq!(Command::parse(&out[..n]), Ok(cmd));
    }

    #[test]
    fn cmd_req_round_trips(bytes in prop::collection::vec(any::<u8>(), 51), pi in any::<bool>()) {
        let (view, len) = if pi {
            (CmdReq::new_checked_pi(&bytes[..], 24).unwrap(), cmd_req_pi_len(24))
        } else {
            (CmdReq::new_checked(&bytes[..], 32).unwrap(), cmd_req_len(32))
        };
        let repr = CmdReqRepr::parse(&view);
        let mut out = vec![0u8; len];
        let mut out_view = if pi { CmdReq::new_checked_pi(&mut out[..], 24).unwrap() } else { CmdReq::new_checked(&mut out[..], 32).unwrap() };
        repr.emit(&mut out_view);
        prop_assert_eq!(&out[..], &bytes[..len]);
        let _ = repr.lun_address();
    }

    #[test]
    fn cmd_resp_round_trips(sense_len in any::<u32>(), residual in any::<u32>(), sq in any::<u16>(), status in any::<u8>(), code in 0u8..=12) {
        let repr = CmdRespRepr { sense_len, residual, status_qualifier: sq, status, response: Response::try_from(code).unwrap() };
        let bytes = repr.to_bytes();
        prop_assert_eq!(CmdRespRepr::parse(&CmdResp::new_checked(&bytes[..]).unwrap()), Ok(repr));
    }

    #[test]
    fn lun_addresses_round_trip(target in any::<u8>(), lun in 0u16..=0x3fff) {
        let a = LunAddress { target, lun };
        prop_assert_eq!(LunAddress::parse(&a.emit()), Ok(a));
    }

    #[test]
    fn control_requests_round_trip_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..32)) {
        match ControlRequest::parse(&bytes) {
            Ok(ControlRequest::Tmf(t)) => {
                let mut out = [0u8; TMF_REQ_LEN];
                t.emit(&mut TmfReq::new_checked(&mut out[..]).unwrap());
                prop_assert_eq!(&out[..], &bytes[..TMF_REQ_LEN]);
            }
            Ok(ControlRequest::An(a)) => {
                let mut out = [0u8; AN_REQ_LEN];
                a.emit(&mut AnReq::new_checked(&mut out[..]).unwrap());
                prop_assert_eq!(&out[..], &bytes[..AN_REQ_LEN]);
            }
            Err(_) => {}
        }
    }

    #[test]
    fn events_and_config_round_trip(e in prop::collection::vec(any::<u8>(), 16), c in prop::collection::vec(any::<u8>(), 36)) {
        let ev = EventRepr::parse(&Event::new_checked(&e[..]).unwrap());
        prop_assert_eq!(&ev.to_bytes()[..], &e[..]);
        let cfg = ConfigRepr::parse(&c).unwrap();
        prop_assert_eq!(&cfg.to_bytes()[..], &c[..]);
    }
}

fn lba_for(size: CdbSize, lba: u64) -> u64 {
    match size {
        CdbSize::Six => lba & 0x1f_ffff,
        CdbSize::Ten | CdbSize::Twelve => lba & 0xffff_ffff,
        CdbSize::Sixteen => lba,
    }
}

fn len_for(size: CdbSize, n: u32) -> u32 {
    match size {
        CdbSize::Six => (n & 0xff).max(1),
        CdbSize::Ten => n & 0xffff,
        _ => n,
    }
}

fn read_write() -> impl Strategy<Value = ReadWrite> {
    (
        prop::sample::select(vec![
            CdbSize::Six,
            CdbSize::Ten,
            CdbSize::Twelve,
            CdbSize::Sixteen,
        ]),
        any::<u64>(),
        1u32..=u32::MAX,
        0u8..8,
        any::<bool>(),
        any::<bool>(),
        0u8..64,
    )
        .prop_map(|(size, lba, n, protect, dpo, fua, group)| {
            if size == CdbSize::Six {
                let blocks = if n % 256 == 0 { 256 } else { n % 256 };
                ReadWrite {
                    size,
                    lba: lba_for(size, lba),
                    blocks,
                    protect: 0,
                    dpo: false,
                    fua: false,
                    group: 0,
                }
            } else {
                ReadWrite {
                    size,
                    lba: lba_for(size, lba),
                    blocks: len_for(size, n),
                    protect,
                    dpo,
                    fua,
                    group,
                }
            }
        })
}

fn command() -> BoxedStrategy<Command> {
    let ten_or_sixteen = || prop::sample::select(vec![CdbSize::Ten, CdbSize::Sixteen]);
    prop_oneof![
        Just(Command::TestUnitReady),
        Just(Command::ReadCapacity10),
        (any::<bool>(), any::<u8>())
            .prop_map(|(desc, alloc_len)| Command::RequestSense { desc, alloc_len }),
        (any::<u8>(), any::<u16>()).prop_map(|(p, alloc_len)| Command::Inquiry {
            evpd: true,
            page_code: p,
            alloc_len
        }),
        any::<u16>().prop_map(|alloc_len| Command::Inquiry {
            evpd: false,
            page_code: 0,
            alloc_len
        }),
        (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            0u8..4,
            0u8..64,
            any::<u8>(),
            any::<u16>()
        )
            .prop_map(|(ten, dbd, llbaa, pc, page, subpage, alloc_len)| {
                let pc = [
                    PageControl::Current,
                    PageControl::Changeable,
                    PageControl::Default,
                    PageControl::Saved,
                ][usize::from(pc)];
                Command::ModeSense(ModeSense {
                    ten,
                    dbd,
                    llbaa: llbaa && ten,
                    pc,
                    page,
                    subpage,
                    alloc_len: if ten { alloc_len } else { alloc_len & 0xff },
                })
            }),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<u16>()).prop_map(
            |(ten, pf, sp, len)| {
                Command::ModeSelect(ModeSelect {
                    ten,
                    pf,
                    sp,
                    param_len: if ten { len } else { len & 0xff },
                })
            }
        ),
        (any::<bool>(), 0u8..16, 0u8..16, any::<[bool; 3]>()).prop_map(|(immed, m, pc, f)| {
            Command::StartStopUnit(StartStopUnit {
                immed,
                power_condition_modifier: m,
                power_condition: pc,
                no_flush: f[0],
                loej: f[1],
                start: f[2],
            })
        }),
        any::<u32>().prop_map(|alloc_len| Command::ReadCapacity16 { alloc_len }),
        read_write().prop_map(Command::Read),
        read_write().prop_map(Command::Write),
        (
            ten_or_sixteen(),
            any::<u64>(),
            any::<u32>(),
            0u8..8,
            any::<bool>(),
            0u8..4,
            0u8..64
        )
            .prop_map(
                |(size, lba, n, protect, dpo, bytchk, group)| Command::Verify(Verify {
                    size,
                    lba: lba_for(size, lba),
                    blocks: len_for(size, n),
                    protect,
                    dpo,
                    bytchk,
                    group
                })
            ),
        (
            ten_or_sixteen(),
            any::<u64>(),
            any::<u32>(),
            any::<bool>(),
            0u8..64
        )
            .prop_map(|(size, lba, n, immed, group)| Command::SynchronizeCache(
                SynchronizeCache {
                    size,
                    lba: lba_for(size, lba),
                    blocks: len_for(size, n),
                    immed,
                    group
                }
            )),
        (
            ten_or_sixteen(),
            any::<u64>(),
            any::<u32>(),
            0u8..8,
            any::<[bool; 3]>(),
            0u8..64
        )
            .prop_map(
                |(size, lba, n, protect, f, group)| Command::WriteSame(WriteSame {
                    size,
                    lba: lba_for(size, lba),
                    blocks: len_for(size, n),
                    protect,
                    anchor: f[0],
                    unmap: f[1],
                    ndob: f[2] && size == CdbSize::Sixteen,
                    group,
                })
            ),
        (any::<bool>(), 0u8..64, any::<u16>()).prop_map(|(anchor, group, param_len)| {
            Command::Unmap {
                anchor,
                group,
                param_len,
            }
        }),
        (any::<u8>(), any::<u32>()).prop_map(|(select_report, alloc_len)| Command::ReportLuns {
            select_report,
            alloc_len
        }),
        (
            any::<bool>(),
            0u8..8,
            any::<u8>(),
            any::<u16>(),
            any::<u32>()
        )
            .prop_map(|(rctd, options, opcode, service_action, alloc_len)| {
                Command::ReportSupportedOpcodes(ReportSupportedOpcodes {
                    rctd,
                    options,
                    opcode,
                    service_action,
                    alloc_len,
                })
            }),
    ]
    .boxed()
}
