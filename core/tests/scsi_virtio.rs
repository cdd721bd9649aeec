//! virtio-scsi wire formats against literal bytes laid out as in virtio 1.2 §5.6, and every
//! constant and layout cross-checked against Linux's uapi header via `virtio-bindings`.

use std::mem::{offset_of, size_of};

use rvhost_core::virtio_scsi::*;
use virtio_bindings::virtio_scsi as vb;

#[test]
fn constants_match_virtio_bindings() {
    assert_eq!(feature::VIRTIO_SCSI_F_INOUT, vb::VIRTIO_SCSI_F_INOUT);
    assert_eq!(feature::VIRTIO_SCSI_F_HOTPLUG, vb::VIRTIO_SCSI_F_HOTPLUG);
    assert_eq!(feature::VIRTIO_SCSI_F_CHANGE, vb::VIRTIO_SCSI_F_CHANGE);
    assert_eq!(feature::VIRTIO_SCSI_F_T10_PI, vb::VIRTIO_SCSI_F_T10_PI);
    assert_eq!(
        VIRTIO_SCSI_CDB_DEFAULT_SIZE,
        vb::VIRTIO_SCSI_CDB_DEFAULT_SIZE
    );
    assert_eq!(
        VIRTIO_SCSI_SENSE_DEFAULT_SIZE,
        vb::VIRTIO_SCSI_SENSE_DEFAULT_SIZE
    );
    let responses = [
        (Response::Ok, vb::VIRTIO_SCSI_S_OK),
        (Response::FUNCTION_COMPLETE, vb::VIRTIO_SCSI_S_OK),
        (Response::Overrun, vb::VIRTIO_SCSI_S_OVERRUN),
        (Response::Aborted, vb::VIRTIO_SCSI_S_ABORTED),
        (Response::BadTarget, vb::VIRTIO_SCSI_S_BAD_TARGET),
        (Response::Reset, vb::VIRTIO_SCSI_S_RESET),
        (Response::Busy, vb::VIRTIO_SCSI_S_BUSY),
        (
            Response::TransportFailure,
            vb::VIRTIO_SCSI_S_TRANSPORT_FAILURE,
        ),
        (Response::TargetFailure, vb::VIRTIO_SCSI_S_TARGET_FAILURE),
        (Response::NexusFailure, vb::VIRTIO_SCSI_S_NEXUS_FAILURE),
        (Response::Failure, vb::VIRTIO_SCSI_S_FAILURE),
        (
            Response::FunctionSucceeded,
            vb::VIRTIO_SCSI_S_FUNCTION_SUCCEEDED,
        ),
        (
            Response::FunctionRejected,
            vb::VIRTIO_SCSI_S_FUNCTION_REJECTED,
        ),
        (Response::IncorrectLun, vb::VIRTIO_SCSI_S_INCORRECT_LUN),
    ];
    for (r, code) in responses {
        assert_eq!(u32::from(r.code()), code, "{r:?}");
        assert_eq!(Response::try_from(r.code()), Ok(r));
    }
    assert_eq!(Response::try_from(13), Err(13));
    assert_eq!(ctrl_type::VIRTIO_SCSI_T_TMF, vb::VIRTIO_SCSI_T_TMF);
    assert_eq!(
        ctrl_type::VIRTIO_SCSI_T_AN_QUERY,
        vb::VIRTIO_SCSI_T_AN_QUERY
    );
    assert_eq!(
        ctrl_type::VIRTIO_SCSI_T_AN_SUBSCRIBE,
        vb::VIRTIO_SCSI_T_AN_SUBSCRIBE
    );
    let tmfs = [
        (TmfSubtype::AbortTask, vb::VIRTIO_SCSI_T_TMF_ABORT_TASK),
        (
            TmfSubtype::AbortTaskSet,
            vb::VIRTIO_SCSI_T_TMF_ABORT_TASK_SET,
        ),
        (TmfSubtype::ClearAca, vb::VIRTIO_SCSI_T_TMF_CLEAR_ACA),
        (
            TmfSubtype::ClearTaskSet,
            vb::VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET,
        ),
        (
            TmfSubtype::ITNexusReset,
            vb::VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET,
        ),
        (
            TmfSubtype::LogicalUnitReset,
            vb::VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
        ),
        (TmfSubtype::QueryTask, vb::VIRTIO_SCSI_T_TMF_QUERY_TASK),
        (
            TmfSubtype::QueryTaskSet,
            vb::VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
        ),
    ];
    for (t, code) in tmfs {
        assert_eq!(t as u32, code);
        assert_eq!(TmfSubtype::try_from(code), Ok(t));
    }
    assert_eq!(event::VIRTIO_SCSI_T_NO_EVENT, vb::VIRTIO_SCSI_T_NO_EVENT);
    assert_eq!(
        event::VIRTIO_SCSI_T_TRANSPORT_RESET,
        vb::VIRTIO_SCSI_T_TRANSPORT_RESET
    );
    assert_eq!(
        event::VIRTIO_SCSI_T_ASYNC_NOTIFY,
        vb::VIRTIO_SCSI_T_ASYNC_NOTIFY
    );
    assert_eq!(
        event::VIRTIO_SCSI_T_PARAM_CHANGE,
        vb::VIRTIO_SCSI_T_PARAM_CHANGE
    );
    assert_eq!(
        event::VIRTIO_SCSI_T_EVENTS_MISSED,
        vb::VIRTIO_SCSI_T_EVENTS_MISSED
    );
    assert_eq!(
        event::VIRTIO_SCSI_EVT_RESET_HARD,
        vb::VIRTIO_SCSI_EVT_RESET_HARD
    );
    assert_eq!(
        event::VIRTIO_SCSI_EVT_RESET_RESCAN,
        vb::VIRTIO_SCSI_EVT_RESET_RESCAN
    );
    assert_eq!(
        event::VIRTIO_SCSI_EVT_RESET_REMOVED,
        vb::VIRTIO_SCSI_EVT_RESET_REMOVED
    );
    assert_eq!(u32::from(VIRTIO_SCSI_S_SIMPLE), vb::VIRTIO_SCSI_S_SIMPLE);
    assert_eq!(u32::from(VIRTIO_SCSI_S_ORDERED), vb::VIRTIO_SCSI_S_ORDERED);
    assert_eq!(u32::from(VIRTIO_SCSI_S_HEAD), vb::VIRTIO_SCSI_S_HEAD);
    assert_eq!(u32::from(VIRTIO_SCSI_S_ACA), vb::VIRTIO_SCSI_S_ACA);
}

#[test]
fn layouts_match_virtio_bindings() {
    assert_eq!(cmd_req_len(32), size_of::<vb::virtio_scsi_cmd_req>());
    assert_eq!(offset_of!(vb::virtio_scsi_cmd_req, cdb), cmd_req_len(0));
    assert_eq!(cmd_req_pi_len(32), size_of::<vb::virtio_scsi_cmd_req_pi>());
    assert_eq!(
        offset_of!(vb::virtio_scsi_cmd_req_pi, cdb),
        cmd_req_pi_len(0)
    );
    assert_eq!(cmd_resp_len(96), size_of::<vb::virtio_scsi_cmd_resp>());
    assert_eq!(
        offset_of!(vb::virtio_scsi_cmd_resp, sense),
        CMD_RESP_HEADER_LEN
    );
    assert_eq!(TMF_REQ_LEN, size_of::<vb::virtio_scsi_ctrl_tmf_req>());
    assert_eq!(TMF_RESP_LEN, size_of::<vb::virtio_scsi_ctrl_tmf_resp>());
    assert_eq!(AN_REQ_LEN, size_of::<vb::virtio_scsi_ctrl_an_req>());
    assert_eq!(AN_RESP_LEN, size_of::<vb::virtio_scsi_ctrl_an_resp>());
    assert_eq!(EVENT_LEN, size_of::<vb::virtio_scsi_event>());
    assert_eq!(CONFIG_LEN, size_of::<vb::virtio_scsi_config>());
    assert_eq!(
        CONFIG_SENSE_SIZE_OFFSET,
        offset_of!(vb::virtio_scsi_config, sense_size)
    );
    assert_eq!(
        CONFIG_CDB_SIZE_OFFSET,
        offset_of!(vb::virtio_scsi_config, cdb_size)
    );
}

/// A READ(10) of LUN 2 on target 1, tag 0x1122334455667788, as Linux's virtio_scsi sends it.
const CMD_REQ: [u8; 51] = [
    0x01, 0x01, 0x40, 0x02, 0, 0, 0, 0, // lun
    0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // tag (le64)
    0x00, 0x00, 0x00, // task_attr, prio, crn
    0x28, 0, 0, 0, 0, 0x10, 0, 0, 0x08, 0, 0, 0, 0, 0, 0, 0, // cdb[32]
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

#[test]
fn command_request_from_literal_bytes() {
    let view = CmdReq::new_checked(&CMD_REQ[..], 32).unwrap();
    let repr = CmdReqRepr::parse(&view);
    assert_eq!(repr.lun_address(), Ok(LunAddress { target: 1, lun: 2 }));
    assert_eq!(repr.tag, 0x1122_3344_5566_7788);
    assert_eq!(
        (repr.task_attr, repr.prio, repr.crn, repr.pi),
        (0, 0, 0, None)
    );
    assert_eq!(&repr.cdb()[..10], &[0x28, 0, 0, 0, 0, 0x10, 0, 0, 0x08, 0]);
    assert_eq!(TaskAttr::try_from(repr.task_attr), Ok(TaskAttr::Simple));
    let mut out = [0xffu8; 51];
    repr.emit(&mut CmdReq::new_checked(&mut out[..], 32).unwrap());
    assert_eq!(out, CMD_REQ);
    assert_eq!(
        CmdReq::new_checked(&CMD_REQ[..50], 32).err(),
        Some(Truncated {
            needed: 51,
            got: 50
        })
    );
}

#[test]
fn command_request_with_t10_pi_and_small_cdb_size() {
    let mut bytes = vec![
        0x01, 0x00, 0x00, 0x05, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x02, 0x03,
    ];
    bytes.extend_from_slice(&0x200u32.to_le_bytes());
    bytes.extend_from_slice(&0x10u32.to_le_bytes());
    bytes.extend_from_slice(&[0x00; 16]);
    let view = CmdReq::new_checked_pi(&bytes[..], 16).unwrap();
    let repr = CmdReqRepr::parse(&view);
    assert_eq!(repr.pi, Some((0x200, 0x10)));
    assert_eq!((repr.task_attr, repr.prio, repr.crn), (1, 2, 3));
    assert_eq!(repr.cdb_len, 16);
    assert_eq!(repr.lun_address(), Ok(LunAddress { target: 0, lun: 5 }));
}

#[test]
fn lun_addressing() {
    assert_eq!(
        LunAddress::parse(&[1, 0, 0x40, 0, 0, 0, 0, 0]),
        Ok(LunAddress { target: 0, lun: 0 })
    );
    assert_eq!(
        LunAddress::parse(&[1, 7, 0x7f, 0xff, 0, 0, 0, 0]),
        Ok(LunAddress {
            target: 7,
            lun: 0x3fff
        })
    );
    assert_eq!(
        LunAddress::parse(&[1, 3, 0x00, 0x09, 0, 0, 0, 0]),
        Ok(LunAddress { target: 3, lun: 9 })
    );
    for bad in [
        [0, 0, 0x40, 0, 0, 0, 0, 0],    // byte 0 must be 1
        [2, 0, 0x40, 0, 0, 0, 0, 0],    //
        [1, 0, 0x80, 0, 0, 0, 0, 0],    // logical unit addressing
        [1, 0, 0xc1, 0x01, 0, 0, 0, 0], // extended addressing (REPORT LUNS W-LUN)
        [1, 0, 0x01, 0, 0, 0, 0, 0],    // peripheral with a bus number
        [1, 0, 0x40, 0, 0, 0, 0, 1],    // second level
    ] {
        assert_eq!(LunAddress::parse(&bad), Err(VirtioScsiError::BadLun(bad)));
    }
    assert_eq!(
        LunAddress {
            target: 1,
            lun: 300
        }
        .emit(),
        [1, 1, 0x41, 0x2c, 0, 0, 0, 0]
    );
}

#[test]
fn command_response_literal_bytes() {
    let repr = CmdRespRepr {
        sense_len: 18,
        residual: 0x1000,
        status_qualifier: 0,
        status: 0x02,
        response: Response::Ok,
    };
    assert_eq!(
        repr.to_bytes(),
        [18, 0, 0, 0, 0x00, 0x10, 0, 0, 0, 0, 0x02, 0x00]
    );
    let mut buf = [0u8; 12 + 96];
    let mut view = CmdResp::new_checked(&mut buf[..]).unwrap();
    repr.emit(&mut view);
    view.sense_mut()[..3].copy_from_slice(&[0x70, 0, 0x05]);
    let view = CmdResp::new_checked(&buf[..]).unwrap();
    assert_eq!(CmdRespRepr::parse(&view), Ok(repr));
    assert_eq!(&view.sense()[..3], &[0x70, 0, 0x05]);
    assert_eq!(view.sense().len(), 96);
    let bad_target = CmdRespRepr {
        sense_len: 0,
        residual: 0,
        status_qualifier: 0,
        status: 0,
        response: Response::BadTarget,
    };
    assert_eq!(bad_target.to_bytes()[11], 3);
}

#[test]
fn task_management_request_and_response() {
    // LOGICAL UNIT RESET of target 0 LUN 1.
    let bytes = [
        0, 0, 0, 0, // type = TMF
        5, 0, 0, 0, // subtype = LOGICAL_UNIT_RESET
        1, 0, 0x40, 1, 0, 0, 0, 0, // lun
        0, 0, 0, 0, 0, 0, 0, 0, // tag
    ];
    let req = ControlRequest::parse(&bytes).unwrap();
    let ControlRequest::Tmf(tmf) = req else {
        panic!("{req:?}")
    };
    assert_eq!(tmf.subtype, TmfSubtype::LogicalUnitReset);
    assert_eq!(
        LunAddress::parse(&tmf.lun),
        Ok(LunAddress { target: 0, lun: 1 })
    );
    assert_eq!(req.response_len(), 1);
    let mut out = [0u8; 24];
    tmf.emit(&mut TmfReq::new_checked(&mut out[..]).unwrap());
    assert_eq!(out, bytes);
    assert_eq!(tmf_resp(Response::FUNCTION_COMPLETE), [0]);
    assert_eq!(tmf_resp(Response::FunctionRejected), [11]);
    let mut bad = bytes;
    bad[4] = 8;
    assert_eq!(
        ControlRequest::parse(&bad),
        Err(VirtioScsiError::UnknownTmfSubtype(8))
    );
    assert_eq!(
        ControlRequest::parse(&bytes[..20]),
        Err(VirtioScsiError::Truncated(Truncated {
            needed: 24,
            got: 20
        }))
    );
}

#[test]
fn asynchronous_notification_query_and_subscribe() {
    let bytes = [2, 0, 0, 0, 1, 0, 0x40, 0, 0, 0, 0, 0, 0x12, 0, 0, 0];
    let ControlRequest::An(an) = ControlRequest::parse(&bytes).unwrap() else {
        panic!()
    };
    assert!(an.subscribe);
    assert_eq!(
        an.event_requested,
        an_event::OPERATIONAL_CHANGE | an_event::MEDIA_CHANGE
    );
    let mut out = [0u8; 16];
    an.emit(&mut AnReq::new_checked(&mut out[..]).unwrap());
    assert_eq!(out, bytes);
    let query = AnReqRepr {
        subscribe: false,
        ..an
    };
    query.emit(&mut AnReq::new_checked(&mut out[..]).unwrap());
    assert_eq!(out[0], 1);
    let resp = AnRespRepr {
        event_actual: 0,
        response: Response::Ok,
    };
    assert_eq!(resp.to_bytes(), [0, 0, 0, 0, 0]);
    assert_eq!(
        AnRespRepr::parse(&[0x10, 0, 0, 0, 0]),
        Ok(AnRespRepr {
            event_actual: 16,
            response: Response::Ok
        })
    );
    assert_eq!(
        ControlRequest::parse(&[9, 0, 0, 0]),
        Err(VirtioScsiError::UnknownControlType(9))
    );
}

#[test]
fn events_literal_bytes() {
    let addr = LunAddress { target: 0, lun: 3 };
    let rescan = EventRepr::transport_reset(addr, ResetReason::Rescan);
    assert_eq!(
        rescan.to_bytes(),
        [1, 0, 0, 0, 1, 0, 0x40, 3, 0, 0, 0, 0, 1, 0, 0, 0]
    );
    let removed = EventRepr::transport_reset(addr, ResetReason::Removed);
    assert_eq!(removed.to_bytes()[12], 2);
    // Capacity data has changed: ASC 2Ah, ASCQ 09h.
    let change = EventRepr::param_change(addr, 0x2a, 0x09);
    assert_eq!(
        change.to_bytes(),
        [3, 0, 0, 0, 1, 0, 0x40, 3, 0, 0, 0, 0, 0x2a, 0x09, 0, 0]
    );
    let missed = EventRepr {
        events_missed: true,
        ..EventRepr::transport_reset(addr, ResetReason::Hard)
    };
    let bytes = missed.to_bytes();
    assert_eq!(&bytes[..4], &[1, 0, 0, 0x80]);
    assert_eq!(
        EventRepr::parse(&Event::new_checked(&bytes[..]).unwrap()),
        missed
    );
}

#[test]
fn config_space_literal_bytes_and_driver_writes() {
    let cfg = ConfigRepr {
        num_queues: 4,
        seg_max: 126,
        max_sectors: 0xffff,
        cmd_per_lun: 128,
        event_info_size: 16,
        sense_size: 96,
        cdb_size: 32,
        max_channel: 0,
        max_target: 255,
        max_lun: 16383,
    };
    let expected: [u8; 36] = [
        4, 0, 0, 0, 126, 0, 0, 0, 0xff, 0xff, 0, 0, 128, 0, 0, 0, 16, 0, 0, 0, 96, 0, 0, 0, 32, 0,
        0, 0, 0, 0, 255, 0, 0xff, 0x3f, 0, 0,
    ];
    assert_eq!(cfg.to_bytes(), expected);
    assert_eq!(ConfigRepr::parse(&expected), Ok(cfg));
    let mut written = cfg;
    written
        .apply_driver_write(CONFIG_SENSE_SIZE_OFFSET, &64u32.to_le_bytes())
        .unwrap();
    written
        .apply_driver_write(CONFIG_CDB_SIZE_OFFSET, &16u32.to_le_bytes())
        .unwrap();
    assert_eq!((written.sense_size, written.cdb_size), (64, 16));
    assert!(written.apply_driver_write(0, &[1, 0, 0, 0]).is_err());
    assert!(written
        .apply_driver_write(CONFIG_CDB_SIZE_OFFSET, &[1, 0])
        .is_err());
    assert_eq!(written.num_queues, 4);
}

#[test]
fn response_for_a_scsi_completion() {
    use rvhost_core::scsi::{Completion, ScsiStatus};
    let c = Completion {
        status: ScsiStatus::CheckCondition,
        transferred: 0,
        residual: 512,
        sense_len: 18,
    };
    let repr = CmdRespRepr::for_completion(&c, 96);
    assert_eq!(
        repr.to_bytes(),
        [18, 0, 0, 0, 0x00, 0x02, 0, 0, 0, 0, 0x02, 0x00]
    );
    assert_eq!(CmdRespRepr::for_completion(&c, 8).sense_len, 8);
}

#[test]
fn header_lengths_saturate_for_absurd_driver_sizes() {
    assert_eq!(
        cmd_req_len(u32::MAX),
        19usize.saturating_add(u32::MAX as usize)
    );
    assert!(cmd_resp_len(u32::MAX) >= u32::MAX as usize);
    assert!(CmdReq::new_checked(&CMD_REQ[..], u32::MAX).is_err());
}

#[test]
fn whole_response_with_sense_literal_bytes() {
    use rvhost_core::scsi::sense::Sense;
    use rvhost_core::scsi::{Completion, ScsiStatus};
    let c = Completion {
        status: ScsiStatus::CheckCondition,
        transferred: 0,
        residual: 512,
        sense_len: 18,
    };
    let mut sense = [0u8; 96];
    assert_eq!(Sense::INVALID_FIELD_IN_CDB.emit_fixed(&mut sense), 18);
    let repr = CmdRespRepr::for_completion(&c, 96);
    // Stale bytes in the sense area beyond the sense are zeroed.
    let mut buf = [0xeeu8; 12 + 96];
    repr.emit_with_sense(&sense, &mut CmdResp::new_checked(&mut buf[..]).unwrap());
    assert_eq!(buf[..12], [18, 0, 0, 0, 0x00, 0x02, 0, 0, 0, 0, 0x02, 0x00]);
    assert_eq!(
        buf[12..30],
        [0x70, 0, 0x05, 0, 0, 0, 0, 0x0a, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0]
    );
    assert!(buf[30..].iter().all(|&b| b == 0));
    let bytes: [u8; 12 + 96] = repr.to_response_bytes(&sense);
    assert_eq!(bytes, buf);

    // A sense area smaller than the sense (the driver negotiated sense_size 8): sense_len says
    // what was copied.
    let cut: [u8; 12 + 8] = repr.to_response_bytes(&sense);
    assert_eq!(cut[..4], [8, 0, 0, 0]);
    assert_eq!(cut[12..], sense[..8]);
    // Fewer sense bytes at hand than sense_len claims: only those are reported.
    let short: [u8; 12 + 96] = repr.to_response_bytes(&sense[..4]);
    assert_eq!(short[..4], [4, 0, 0, 0]);
    assert_eq!(short[12..16], sense[..4]);
    assert!(short[16..].iter().all(|&b| b == 0));
    // No sense at all (GOOD): header only, zeroed sense area.
    let good = CmdRespRepr {
        sense_len: 0,
        residual: 0,
        status_qualifier: 0,
        status: 0,
        response: Response::Ok,
    };
    let ok: [u8; 12 + 96] = good.to_response_bytes(&sense);
    assert!(ok.iter().all(|&b| b == 0));
}
