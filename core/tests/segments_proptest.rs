//! Property tests of `segments`: a range over scattered segments behaves exactly like the same
//! bytes laid end to end (a flat model), for every split of the segments and every window.

use proptest::prelude::*;
use rvhost_core::mem::{ByteMemory, Direction, GuestMemory, Segment};
use rvhost_core::segments::{SegmentIoError, SegmentRange};
use rvhost_core::wire::Truncated;

const BASE: u64 = 0x1_0000;
const RAM: usize = 0x2000;
const HOST: u64 = 0x7f00_0000_0000;

/// Segments at scattered, non-overlapping addresses: segment `i` starts at `BASE + 0x100 * i` and
/// holds `lens[i]` bytes (0..=0x100). Returns them and their flat model: the guest address of each
/// byte of the concatenation.
fn layout(lens: &[u32]) -> (Vec<Segment>, Vec<u64>) {
    let mut segs = Vec::new();
    let mut flat = Vec::new();
    for (i, &len) in lens.iter().enumerate() {
        let addr = BASE + 0x100 * i as u64;
        segs.push(Segment {
            guest_addr: addr,
            host_addr: HOST + (addr - BASE),
            len,
            direction: Direction::DeviceWritable,
        });
        flat.extend((0..u64::from(len)).map(|o| addr + o));
    }
    (segs, flat)
}

fn lens() -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(prop_oneof![1 => Just(0u32), 4 => 1u32..=0x100], 0..12)
}

proptest! {
    #[test]
    fn pieces_cover_exactly_the_window(lens in lens(), skip in 0u64..0x1000, len in 0u64..0x1000) {
        let (segs, flat) = layout(&lens);
        let total = flat.len() as u64;
        let range = SegmentRange::new(&segs, skip, len);
        if skip + len > total {
            prop_assert_eq!(
                range,
                Err(Truncated { needed: (skip + len) as usize, got: total as usize })
            );
            return Ok(());
        }
        let range = range.unwrap();
        prop_assert_eq!(range.len(), len);
        let mut covered = Vec::new();
        for piece in range.iter() {
            prop_assert!(piece.len > 0, "no empty pieces");
            prop_assert_eq!(piece.host_addr - HOST, piece.guest_addr - BASE);
            covered.extend((0..u64::from(piece.len)).map(|o| piece.guest_addr + o));
        }
        prop_assert_eq!(&covered[..], &flat[skip as usize..(skip + len) as usize]);
    }

    #[test]
    fn copies_match_the_flat_model(
        lens in lens(),
        skip in 0u64..0x400,
        data in prop::collection::vec(any::<u8>(), 0..0x400),
        split in 0usize..0x400,
    ) {
        let (segs, flat) = layout(&lens);
        let mut ram = vec![0u8; RAM];
        let mem = ByteMemory::new(BASE, HOST, &mut ram);
        let Ok(window) = SegmentRange::whole(&segs).tail(skip) else {
            prop_assert!(skip > flat.len() as u64);
            return Ok(());
        };
        // write_all either writes everything or nothing.
        let mut w = window.writer();
        let fits = data.len() as u64 <= window.len();
        match w.write_all(&mem, &data) {
            Ok(()) => prop_assert!(fits),
            Err(SegmentIoError::Truncated(t)) => {
                prop_assert!(!fits);
                prop_assert_eq!(t, Truncated { needed: data.len(), got: window.len() as usize });
                prop_assert_eq!(w.remaining(), window.len());
                let mut untouched = vec![0u8; RAM];
                mem.read(BASE, &mut untouched).unwrap();
                prop_assert!(untouched.iter().all(|&b| b == 0));
            }
            Err(e) => prop_assert!(false, "unexpected {e:?}"),
        }
        // `write` writes what fits, in two calls split anywhere.
        let mut w = window.writer();
        let split = split.min(data.len());
        let first = w.write(&mem, &data[..split]).unwrap();
        let second = w.write(&mem, &data[first..]).unwrap();
        let written = first + second;
        prop_assert_eq!(written as u64, (data.len() as u64).min(window.len()));
        for (i, &b) in data.iter().take(written).enumerate() {
            let mut got = [0u8];
            mem.read(flat[skip as usize + i], &mut got).unwrap();
            prop_assert_eq!(got[0], b);
        }
        // Reading back through a reader gives the same bytes, also when skipping first.
        let mut back = vec![0u8; written];
        let mut r = window.reader();
        r.read_exact(&mem, &mut back).unwrap();
        prop_assert_eq!(&back[..], &data[..written]);
        let mut r = window.reader();
        let hop = (split as u64).min(written as u64);
        r.skip(hop).unwrap();
        let mut rest = vec![0u8; written - hop as usize];
        prop_assert_eq!(r.read(&mem, &mut rest).unwrap(), rest.len());
        prop_assert_eq!(&rest[..], &data[hop as usize..written]);
    }
}
