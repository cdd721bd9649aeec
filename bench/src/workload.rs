//! What to run: fio-like options, the offset/direction generator and the verify patterns.

use std::time::Duration;

use crate::PerfError;

/// Access pattern, as fio's `--rw`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RwMode {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random reads and writes, `--rwmixread` percent reads.
    Randrw,
}

/// The vhost-user device type behind the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceType {
    /// vhost-user-blk.
    Blk,
    /// vhost-user-scsi (target 0, LUN 0; READ(16)/WRITE(16)).
    Scsi,
}

/// Everything a run needs besides the socket.
#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    /// Device type.
    pub device: DeviceType,
    /// Access pattern.
    pub rw: RwMode,
    /// Percentage of reads for `randrw`.
    pub rwmixread: u8,
    /// Bytes per request (a multiple of the device's block size).
    pub block_size: u32,
    /// Requests in flight per queue.
    pub queue_depth: u16,
    /// Request queues.
    pub queues: u16,
    /// How long to run.
    pub time: Duration,
    /// Bytes of the device to address from offset 0 (`None`: all of it).
    pub size: Option<u64>,
    /// Write patterns and check them on read.
    pub verify: bool,
    /// Negotiate `VIRTIO_F_RING_EVENT_IDX` when offered.
    pub event_idx: bool,
    /// Drive packed virtqueues (`VIRTIO_F_RING_PACKED`, which the target must offer).
    pub packed: bool,
    /// Offer each request as one descriptor pointing at an indirect table
    /// (`VIRTIO_F_RING_INDIRECT_DESC`, which the target must offer), as a Linux guest does.
    pub indirect: bool,
    /// Try hugepages for the shared memory.
    pub hugepages: bool,
    /// Seed for the offset generator.
    pub seed: u64,
    /// Act as a migrating frontend: hand the target a dirty log (and turn logging on).
    pub dirty_log: Option<crate::dirty_log::DirtyLogMode>,
    /// Offered load in requests per second over all queues (`None`: closed loop, every completed
    /// request is resubmitted at once). With a rate, `queue_depth` bounds what is in flight.
    pub rate: Option<u64>,
}

/// Direction of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Device writes our buffer.
    Read,
    /// Device reads our buffer.
    Write,
}

/// xorshift64*: a few cycles per number, plenty random for offsets.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is remapped: xorshift's state must be nonzero).
    pub fn new(seed: u64) -> Self {
        Rng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n > 0`) without a division (Lemire's multiply-shift).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Chooses each request's direction and block (in units of the request size).
#[derive(Debug, Clone)]
pub struct Generator {
    rw: RwMode,
    rwmixread: u64,
    /// Request-sized blocks in the addressed range.
    blocks: u64,
    cursor: u64,
    rng: Rng,
}

impl Generator {
    /// A generator over `blocks` request-sized blocks.
    pub fn new(rw: RwMode, rwmixread: u8, blocks: u64, seed: u64) -> Result<Self, PerfError> {
        if blocks == 0 {
            return Err(PerfError::Options(
                "the addressed range holds no whole request".into(),
            ));
        }
        if rwmixread > 100 {
            return Err(PerfError::Options("--rwmixread is a percentage".into()));
        }
        Ok(Generator {
            rw,
            rwmixread: u64::from(rwmixread),
            blocks,
            cursor: 0,
            rng: Rng::new(seed),
        })
    }

    /// Request-sized blocks in range.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The next request.
    #[inline]
    pub fn next_request(&mut self) -> (Dir, u64) {
        match self.rw {
            RwMode::Read | RwMode::Write => {
                let block = self.cursor;
                self.cursor = if self.cursor + 1 >= self.blocks {
                    0
                } else {
                    self.cursor + 1
                };
                let dir = if self.rw == RwMode::Read {
                    Dir::Read
                } else {
                    Dir::Write
                };
                (dir, block)
            }
            RwMode::Randread => (Dir::Read, self.rng.below(self.blocks)),
            RwMode::Randwrite => (Dir::Write, self.rng.below(self.blocks)),
            RwMode::Randrw => {
                let dir = if self.rng.below(100) < self.rwmixread {
                    Dir::Read
                } else {
                    Dir::Write
                };
                (dir, self.rng.below(self.blocks))
            }
        }
    }

    /// Another block for the same direction (when the first choice is busy under `--verify`).
    pub fn reroll(&mut self, block: u64) -> u64 {
        match self.rw {
            RwMode::Read | RwMode::Write => self.next_request().1,
            _ => {
                let b = self.rng.below(self.blocks);
                if b == block {
                    (b + 1) % self.blocks
                } else {
                    b
                }
            }
        }
    }
}

/// Marker at the start of every verify block.
pub const VERIFY_MAGIC: u64 = 0x7276_6870_6572_6621; // "rvhperf!"
/// Generation of a block whose content is unknown (a failed write).
const UNKNOWN: u32 = u32::MAX;

/// What a read returned, compared with what was last written there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyOutcome {
    /// Never written in this run (or after a failed write): not checked.
    Unchecked,
    /// Matches.
    Good,
    /// Differs at this byte offset.
    Bad {
        /// First differing byte.
        offset: usize,
    },
}

/// Block generations and in-flight locks for `--verify`: every block written gets a pattern
/// derived from its number and a generation counter; a read must return the last completed
/// generation's pattern. A block with a request in flight is never chosen again until it
/// completes, so the expected content is always defined.
#[derive(Debug)]
pub struct Verifier {
    generation: Vec<u32>,
    busy: Vec<bool>,
    expected: Vec<u8>,
}

impl Verifier {
    /// State for `blocks` blocks of `block_size` bytes.
    pub fn new(blocks: u64, block_size: usize) -> Result<Self, PerfError> {
        let n = usize::try_from(blocks)
            .map_err(|_| PerfError::Options("too many blocks for --verify".into()))?;
        Ok(Verifier {
            generation: vec![0; n],
            busy: vec![false; n],
            expected: vec![0; block_size],
        })
    }

    /// Whether `block` has a request in flight.
    pub fn is_busy(&self, block: u64) -> bool {
        self.busy.get(block as usize).copied().unwrap_or(true)
    }

    /// Locks `block` for a request; a write returns the generation it will stamp.
    pub fn start(&mut self, block: u64, dir: Dir) -> u32 {
        let i = block as usize;
        if let Some(b) = self.busy.get_mut(i) {
            *b = true;
        }
        match dir {
            Dir::Read => 0,
            Dir::Write => {
                let g = self.generation.get(i).copied().unwrap_or(0);
                match g.wrapping_add(1) {
                    0 | UNKNOWN => 1,
                    n => n,
                }
            }
        }
    }

    /// A write of `generation` to `block` completed (`ok`: the device said success).
    pub fn finish_write(&mut self, block: u64, generation: u32, ok: bool) {
        let i = block as usize;
        if let Some(g) = self.generation.get_mut(i) {
            *g = if ok { generation } else { UNKNOWN };
        }
        if let Some(b) = self.busy.get_mut(i) {
            *b = false;
        }
    }

    /// A read of `block` completed with `data`.
    pub fn finish_read(&mut self, block: u64, data: &[u8]) -> VerifyOutcome {
        let i = block as usize;
        if let Some(b) = self.busy.get_mut(i) {
            *b = false;
        }
        let g = self.generation.get(i).copied().unwrap_or(0);
        if g == 0 || g == UNKNOWN {
            return VerifyOutcome::Unchecked;
        }
        fill_pattern(&mut self.expected, block, g);
        match self.expected.iter().zip(data).position(|(a, b)| a != b) {
            None if self.expected.len() == data.len() => VerifyOutcome::Good,
            None => VerifyOutcome::Bad {
                offset: self.expected.len().min(data.len()),
            },
            Some(offset) => VerifyOutcome::Bad { offset },
        }
    }
}

/// The verify pattern of `block` at `generation`: a 24-byte header (magic, block, generation)
/// so a misdirected or stale block is recognisable, then a per-block pseudo-random stream.
pub fn fill_pattern(buf: &mut [u8], block: u64, generation: u32) {
    let mut header = [0u8; 24];
    header[0..8].copy_from_slice(&VERIFY_MAGIC.to_le_bytes());
    header[8..16].copy_from_slice(&block.to_le_bytes());
    header[16..20].copy_from_slice(&generation.to_le_bytes());
    let mut rng = Rng::new(block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(generation));
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let word = rng.next_u64().to_le_bytes();
        let n = chunk.len();
        if i < 3 {
            chunk.copy_from_slice(&header[i * 8..i * 8 + n]);
        } else {
            chunk.copy_from_slice(&word[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_offsets_stay_in_range_and_cover_it() {
        let mut g = Generator::new(RwMode::Randread, 100, 10, 1).unwrap();
        let mut seen = [false; 10];
        for _ in 0..1000 {
            let (dir, b) = g.next_request();
            assert_eq!(dir, Dir::Read);
            seen[b as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn sequential_wraps_at_the_end() {
        let mut g = Generator::new(RwMode::Write, 0, 3, 1).unwrap();
        let blocks: Vec<u64> = (0..7).map(|_| g.next_request().1).collect();
        assert_eq!(blocks, [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(g.next_request().0, Dir::Write);
    }

    #[test]
    fn mix_honours_rwmixread() {
        let mut g = Generator::new(RwMode::Randrw, 70, 1 << 20, 7).unwrap();
        let reads = (0..10_000)
            .filter(|_| g.next_request().0 == Dir::Read)
            .count();
        assert!((6500..7500).contains(&reads), "{reads}");
        let mut all_writes = Generator::new(RwMode::Randrw, 0, 8, 7).unwrap();
        assert!((0..100).all(|_| all_writes.next_request().0 == Dir::Write));
    }

    #[test]
    fn options_are_checked() {
        assert!(Generator::new(RwMode::Read, 0, 0, 1).is_err());
        assert!(Generator::new(RwMode::Randrw, 101, 5, 1).is_err());
    }

    #[test]
    fn verifier_detects_stale_and_corrupt_data() {
        let mut v = Verifier::new(4, 64).unwrap();
        let mut buf = vec![0u8; 64];
        // Never written: not checked.
        v.start(2, Dir::Read);
        assert_eq!(v.finish_read(2, &buf), VerifyOutcome::Unchecked);
        // Write generation 1, read it back.
        let g1 = v.start(2, Dir::Write);
        assert_eq!(g1, 1);
        assert!(v.is_busy(2));
        fill_pattern(&mut buf, 2, g1);
        assert_eq!(&buf[0..8], &VERIFY_MAGIC.to_le_bytes());
        v.finish_write(2, g1, true);
        assert!(!v.is_busy(2));
        v.start(2, Dir::Read);
        assert_eq!(v.finish_read(2, &buf), VerifyOutcome::Good);
        // Generation 2 written; the old content is now stale.
        let g2 = v.start(2, Dir::Write);
        v.finish_write(2, g2, true);
        v.start(2, Dir::Read);
        assert_eq!(v.finish_read(2, &buf), VerifyOutcome::Bad { offset: 16 });
        // Another block's pattern is caught by the header.
        let mut other = vec![0u8; 64];
        fill_pattern(&mut other, 3, g2);
        v.start(2, Dir::Read);
        assert_eq!(v.finish_read(2, &other), VerifyOutcome::Bad { offset: 8 });
        // A failed write makes the block unknown.
        let g3 = v.start(2, Dir::Write);
        v.finish_write(2, g3, false);
        v.start(2, Dir::Read);
        assert_eq!(v.finish_read(2, &buf), VerifyOutcome::Unchecked);
        // One flipped bit deep in the block.
        let g4 = v.start(1, Dir::Write);
        fill_pattern(&mut buf, 1, g4);
        v.finish_write(1, g4, true);
        buf[50] ^= 4;
        v.start(1, Dir::Read);
        assert_eq!(v.finish_read(1, &buf), VerifyOutcome::Bad { offset: 50 });
    }
}
