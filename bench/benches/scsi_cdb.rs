//! Per-command cost of the SCSI model: a READ(16)/WRITE(16) CDB decoded into an I/O plan, and an
//! INQUIRY answered into a buffer. Run: `cargo bench -p rvhost-bench --bench scsi_cdb`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rvhost_core::scsi::cdb::Command;
use rvhost_core::scsi::lun::{LunConfig, Outcome, Request, ScsiLun};

const LUNS: [u16; 1] = [0];

fn lun() -> ScsiLun {
    let mut cfg = LunConfig::new(512, 1 << 30, [0x42; 16])
        .with_bdev_kind("Malloc")
        .and_then(|c| c.with_serial("Malloc0"))
        .expect("valid identification");
    cfg.supports_unmap = true;
    cfg.supports_flush = true;
    cfg.write_cache = true;
    ScsiLun::new(cfg).expect("valid LUN configuration")
}

/// READ(16) or WRITE(16) of 8 blocks (4 KiB) at LBA 0x123456.
fn rw16(opcode: u8) -> [u8; 32] {
    let mut cdb = [0u8; 32];
    cdb[0] = opcode;
    cdb[2..10].copy_from_slice(&0x12_3456u64.to_be_bytes());
    cdb[10..14].copy_from_slice(&8u32.to_be_bytes());
    cdb
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("scsi_cdb");
    group.throughput(Throughput::Elements(1));
    let mut data_in = [0u8; 4096];
    let mut sense = [0u8; 96];

    for (name, opcode, is_read) in [
        ("read16_to_plan", 0x88u8, true),
        ("write16_to_plan", 0x8a, false),
    ] {
        let mut l = lun();
        let cdb = rw16(opcode);
        group.bench_function(name, |b| {
            b.iter(|| {
                let req = Request {
                    cdb: black_box(&cdb[..]),
                    data_out: &[],
                    data_out_len: if is_read { 0 } else { 4096 },
                    data_in_len: if is_read { 4096 } else { 0 },
                    luns: &LUNS,
                };
                match l.execute(&req, &mut data_in, &mut sense) {
                    Outcome::Io(plan) => black_box(plan.data_len),
                    Outcome::Done(c) => panic!("expected an I/O plan, got {c:?}"),
                }
            })
        });
    }

    let mut l = lun();
    let inquiry = [0x12u8, 0, 0, 0, 96, 0];
    group.bench_function("inquiry_standard", |b| {
        b.iter(|| {
            let req = Request {
                cdb: black_box(&inquiry[..]),
                data_out: &[],
                data_out_len: 0,
                data_in_len: 96,
                luns: &LUNS,
            };
            match l.execute(&req, &mut data_in, &mut sense) {
                Outcome::Done(c) => black_box(c.transferred),
                Outcome::Io(p) => panic!("INQUIRY planned I/O: {p:?}"),
            }
        })
    });

    let vpd83 = [0x12u8, 1, 0x83, 0, 255, 0];
    group.bench_function("inquiry_vpd_device_identification", |b| {
        b.iter(|| {
            let req = Request {
                cdb: black_box(&vpd83[..]),
                data_out: &[],
                data_out_len: 0,
                data_in_len: 255,
                luns: &LUNS,
            };
            match l.execute(&req, &mut data_in, &mut sense) {
                Outcome::Done(c) => black_box(c.transferred),
                Outcome::Io(p) => panic!("INQUIRY planned I/O: {p:?}"),
            }
        })
    });

    let read16 = rw16(0x88);
    group.bench_function("read16_parse_only", |b| {
        b.iter(|| black_box(Command::parse(black_box(&read16[..]))))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
