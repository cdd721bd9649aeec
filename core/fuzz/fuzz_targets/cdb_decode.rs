//! Fuzzes the SCSI logical-unit model: a LUN configuration, then a sequence of commands, each an
//! arbitrary CDB with arbitrary data-out and buffer sizes. Checks that nothing panics, that
//! responses stay inside the buffers the initiator and the caller gave, that every I/O plan lies
//! inside the device, and that every CDB the parser accepts survives an emit/parse round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rvhost_core::scsi::cdb::Command;
use rvhost_core::scsi::lun::{
    execute_without_lun, IoError, IoOp, LunConfig, Outcome, Request, ScsiLun, UnitAttention,
};
use rvhost_core::scsi::ScsiStatus;

/// Pops `n` bytes off the front of `input` (fewer if it is shorter).
fn take<'a>(input: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = input.split_at(n.min(input.len()));
    *input = tail;
    head
}

fn byte(input: &mut &[u8]) -> u8 {
    take(input, 1).first().copied().unwrap_or(0)
}

fn u16le(input: &mut &[u8]) -> u16 {
    u16::from(byte(input)) | (u16::from(byte(input)) << 8)
}

fn config(input: &mut &[u8]) -> LunConfig {
    let bs = 512u32 << (byte(input) % 8);
    let shift = byte(input) % 40;
    let blocks = (u64::from(u16le(input)) << shift).max(1);
    let flags = byte(input);
    let mut c = LunConfig::new(bs, blocks, [0x5a; 16]);
    c.read_only = flags & 0x01 != 0;
    c.supports_unmap = flags & 0x02 != 0;
    c.unmap_reads_zeroes = flags & 0x04 != 0;
    c.supports_write_zeroes = flags & 0x08 != 0;
    c.supports_flush = flags & 0x10 != 0;
    c.write_cache = flags & 0x20 != 0;
    c.max_transfer_blocks = u32::from(u16le(input)).max(1);
    c.max_write_same_blocks = c.max_transfer_blocks;
    c.max_unmap_blocks = u32::from(u16le(input)).max(1);
    c.max_unmap_descriptors = u16::from(byte(input)).max(1);
    c
}

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let cfg = config(&mut input);
    let Ok(mut lun) = ScsiLun::new(cfg) else {
        return;
    };
    let luns = [0u16, 1, 255, 256, 0x3fff];
    let mut data_in = vec![0u8; 8192];
    let mut sense = vec![0u8; 96];
    while !input.is_empty() {
        let ctl = byte(&mut input);
        let cdb_len = usize::from(byte(&mut input) % 40);
        let cdb = take(&mut input, cdb_len);
        let out_len = usize::from(u16le(&mut input) % 8192);
        let data_out = take(&mut input, out_len);
        let extra_out = u64::from(byte(&mut input)) << (ctl % 34);
        let data_in_len = u64::from(u16le(&mut input)) << (byte(&mut input) % 40);
        let in_cap = usize::from(u16le(&mut input) % 8193);
        let sense_cap = usize::from(byte(&mut input) % 97);
        if ctl & 0x80 != 0 {
            lun.raise_unit_attention(UnitAttention::ReportedLunsChanged);
        }
        if ctl & 0x40 != 0 {
            lun.reset();
        }

        if let Ok(cmd) = Command::parse(cdb) {
            let mut out = [0u8; 16];
            let n = cmd.emit(&mut out).expect("16 bytes hold every CDB");
            assert_eq!(Command::parse(&out[..n]), Ok(cmd));
        }

        let data_out_len = (data_out.len() as u64).saturating_add(extra_out);
        let req = Request {
            cdb,
            data_out,
            data_out_len,
            data_in_len,
            luns: &luns,
        };
        let copy = lun.data_out_copy_len(cdb);
        assert!(copy <= 8 + 16 * 256 || copy == cfg.block_size as usize);

        let (din, sns) = (&mut data_in[..in_cap], &mut sense[..sense_cap]);
        if ctl & 0x20 != 0 {
            let c = execute_without_lun(&req, din, sns);
            assert!(c.transferred <= in_cap as u64 && c.transferred <= data_in_len);
            assert!(c.sense_len <= sense_cap);
            continue;
        }
        match lun.execute(&req, din, sns) {
            Outcome::Done(c) => {
                assert!(c.transferred <= in_cap as u64 && c.transferred <= data_in_len);
                assert!(c.sense_len <= sense_cap);
                if c.status == ScsiStatus::Good {
                    assert_eq!(c.sense_len, 0);
                }
            }
            Outcome::Io(plan) => {
                let cap = cfg.num_blocks;
                let inside = |lba: u64, n: u64| n > 0 && lba < cap && n <= cap - lba;
                let bs = u64::from(cfg.block_size);
                match plan.op {
                    IoOp::Read { lba, blocks, .. } => {
                        assert!(inside(lba, blocks));
                        assert!(blocks * bs <= data_in_len);
                    }
                    IoOp::Write { lba, blocks, .. } => {
                        assert!(!cfg.read_only && inside(lba, blocks));
                        assert!(blocks * bs <= data_out_len);
                    }
                    IoOp::Flush { lba, blocks } | IoOp::WriteZeroes { lba, blocks } => {
                        assert!(inside(lba, blocks));
                    }
                    IoOp::WriteSame { lba, blocks, block } => {
                        assert!(!cfg.read_only && inside(lba, blocks));
                        assert_eq!(block.len() as u64, bs);
                    }
                    IoOp::Unmap(ranges) => {
                        assert!(cfg.supports_unmap && !cfg.read_only);
                        let mut total = 0u64;
                        for r in ranges.iter() {
                            assert!(inside(r.lba, r.blocks));
                            total += r.blocks;
                        }
                        assert!(total > 0);
                    }
                }
                let result = match ctl & 3 {
                    0 => Ok(()),
                    1 => Err(IoError::Medium),
                    2 => Err(IoError::Unsupported),
                    _ => Err(IoError::NotReady),
                };
                let c = lun.complete_io(&plan, result, &mut sense[..sense_cap]);
                assert!(c.sense_len <= sense_cap);
            }
        }
    }
});
