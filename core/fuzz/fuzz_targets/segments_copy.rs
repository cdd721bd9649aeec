//! Fuzzes `segments`: arbitrary segment lists (including ones reaching outside guest memory) and
//! windows over them, copied into and out of guest memory, against a flat model of the bytes; and
//! the whole virtio-scsi command response written through `CmdRespRepr::emit_with_sense`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rvhost_core::mem::{ByteMemory, Direction, GuestMemory, Segment};
use rvhost_core::segments::{SegmentIoError, SegmentRange};
use rvhost_core::virtio_scsi::{CmdResp, CmdRespRepr, Response};

/// Guest memory: 4 KiB at guest address 0x1_0000; segments may point anywhere near it.
const BASE: u64 = 0x1_0000;
const SIZE: usize = 0x1000;
const HOST: u64 = 0x7f00_0000_0000;

fn u16_at(data: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([
        data.get(at).copied().unwrap_or(0),
        data.get(at + 1).copied().unwrap_or(0),
    ])
}

fuzz_target!(|data: &[u8]| {
    // Control: segment count (0..16), skip, length, split point; then 4 bytes per segment
    // (offset from BASE - 0x100, length up to 0x3ff); the rest is the payload.
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(count % 16);
    let skip = u64::from(u16_at(rest, 0) % 0x1000);
    let len = u64::from(u16_at(rest, 2) % 0x1000);
    let split = usize::from(u16_at(rest, 4));
    let specs = rest.get(6..).unwrap_or(&[]);
    let mut segments = Vec::new();
    for i in 0..count {
        let addr = (BASE - 0x100) + u64::from(u16_at(specs, 4 * i) % 0x1200);
        let seg_len = u32::from(u16_at(specs, 4 * i + 2) % 0x400);
        segments.push(Segment {
            guest_addr: addr,
            host_addr: HOST.wrapping_add(addr.wrapping_sub(BASE)),
            len: seg_len,
            direction: Direction::DeviceWritable,
        });
    }
    let payload = specs.get(4 * count..).unwrap_or(&[]);
    // The flat model: the guest address of every byte of the segments, end to end.
    let flat: Vec<u64> = segments
        .iter()
        .flat_map(|s| (0..u64::from(s.len)).map(move |o| s.guest_addr + o))
        .collect();
    let mapped = |a: u64| a >= BASE && a < BASE + SIZE as u64;

    let mut ram = vec![0u8; SIZE];
    let mem = ByteMemory::new(BASE, HOST, &mut ram);
    let range = match SegmentRange::new(&segments, skip, len) {
        Ok(r) => r,
        Err(t) => {
            assert!(skip + len > flat.len() as u64);
            assert_eq!(t.got, flat.len());
            return;
        }
    };
    assert_eq!(range.len(), len);
    let window = &flat[skip as usize..(skip + len) as usize];
    let pieces: Vec<u64> = range
        .iter()
        .inspect(|p| assert!(p.len > 0))
        .flat_map(|p| (0..u64::from(p.len)).map(move |o| p.guest_addr + o))
        .collect();
    assert_eq!(&pieces[..], window);

    // Write the payload in two parts; a piece that is not wholly mapped stops the copy there,
    // with the writer standing at it.
    let mut w = range.writer();
    let split = split.min(payload.len());
    let first = w.write(&mem, &payload[..split]);
    let second = first
        .as_ref()
        .ok()
        .map(|&n| w.write(&mem, &payload[n..]));
    let written = (len - w.remaining()) as usize;
    if let (Ok(n), Some(Ok(m))) = (&first, &second) {
        assert_eq!(n + m, written);
        assert_eq!(written as u64, (payload.len() as u64).min(len));
    } else {
        assert!(window.iter().any(|&a| !mapped(a)));
    }
    for (i, &addr) in window.iter().enumerate().take(written) {
        assert!(mapped(addr), "byte {i} was written outside guest memory");
        // Segments may overlap: the byte holds the last write to its address.
        let last = window[..written].iter().rposition(|&a| a == addr).unwrap_or(i);
        let mut b = [0u8];
        mem.read(addr, &mut b).unwrap();
        assert_eq!(b[0], payload[last]);
    }
    // write_all writes all or nothing.
    let mut w = range.writer();
    match w.write_all(&mem, payload) {
        Ok(()) => assert!(payload.len() as u64 <= len && window.iter().take(payload.len()).all(|&a| mapped(a))),
        Err(SegmentIoError::Truncated(_)) => {
            assert!(payload.len() as u64 > len);
            assert_eq!(w.remaining(), len);
        }
        Err(SegmentIoError::Memory(_)) => assert!(window.iter().any(|&a| !mapped(a))),
    }
    let mut back = vec![0u8; payload.len()];
    let _ = range.reader().read(&mem, &mut back);

    // The whole SCSI response: header, sense cut to sense_len and to the area, zeros after.
    let sense_len = u32::from(payload.first().copied().unwrap_or(0));
    let repr = CmdRespRepr {
        sense_len,
        residual: len as u32,
        status_qualifier: 0,
        status: 2,
        response: Response::Ok,
    };
    let mut buf = vec![0xee_u8; 12 + split % 128];
    if let Ok(mut view) = CmdResp::new_checked(&mut buf[..]) {
        repr.emit_with_sense(payload, &mut view);
        let copied = (sense_len as usize).min(payload.len()).min(buf.len() - 12);
        assert_eq!(u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize, copied);
        assert_eq!(&buf[12..12 + copied], &payload[..copied]);
        assert!(buf[12 + copied..].iter().all(|&b| b == 0));
    }
});
