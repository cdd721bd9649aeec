//! `blkcheck`: the block-device checker that runs inside the QEMU test guest.
//!
//! Busybox `dd` can do O_DIRECT but cannot generate or verify a position-dependent pattern, so a
//! misdirected write (right data, wrong sector) would go unnoticed. Every 8-byte word written here is
//! a function of a seed and its absolute byte offset on the device, so any request that lands at the
//! wrong place, is torn, or is served from stale data shows up as a mismatch at a precise offset.
//!
//! Each subcommand prints exactly one line on stdout (`ok`, or what went wrong) and exits non-zero
//! on failure; the guest scripts turn that line into a `RESULT key=value` line.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::ExitCode;

use rustix::fs::{FallocateFlags, OFlags};

const PAGE_SIZE: usize = 4096;

const USAGE: &str = "usage:
  blkcheck write  DEV OFFSET LEN SEED [IO_SIZE [BUF_MISALIGN]]
  blkcheck verify DEV OFFSET LEN SEED [IO_SIZE [BUF_MISALIGN]]
  blkcheck zeros  DEV OFFSET LEN
  blkcheck zeroout DEV OFFSET LEN      (fallocate ZERO_RANGE: the BLKZEROOUT path)
  blkcheck punch  DEV OFFSET LEN       (fallocate PUNCH_HOLE: write-zeroes that must be offloaded)
  blkcheck flush  DEV
  blkcheck size   DEV
  blkcheck expect-write-error DEV OFFSET LEN
  blkcheck writers DEV OFFSET LEN THREADS SECONDS HANG_SECONDS
                                       (verifying writers: each thread writes its own 4 KiB blocks
                                        with a sequence number, reads each back once acknowledged,
                                        and at the end every block must hold its last acknowledged
                                        write; prints ok:writes=N:max_ms=M, the first error, or
                                        hung:... as soon as one I/O takes HANG_SECONDS)
  blkcheck readhold DEV OFFSET SLOT_LEN REGIONS SLOTS SEED MARKER_OFFSET MARKER HANG_SECONDS READY
                                       (the device writes guest memory: reads region i % REGIONS
                                        (SLOT_LEN bytes at OFFSET + r * SLOT_LEN, written with seed
                                        SEED + r) into slot i % SLOTS of one buffer, again and
                                        again, until the 8 bytes at MARKER_OFFSET read MARKER; then
                                        every slot must hold the region last read into it; creates
                                        the file READY once reading; prints ok:reads=N,
                                        stale:slots=K/SLOTS:..., or hung:...)
  blkcheck randread DEV LEN THREADS SECONDS
                                       (load from THREADS threads, each one synchronous random
                                        4 KiB O_DIRECT read of the first LEN bytes at a time, for
                                        SECONDS; prints ok:ios=N:ms=M:iops=R)
  blkcheck qdread DEV LEN DEPTH BLOCK SECONDS
                                       (load from one thread: DEPTH random BLOCK-byte O_DIRECT
                                        reads of the first LEN bytes kept in flight through
                                        io_uring for SECONDS; prints
                                        ok:ios=N:ms=M:iops=R:kibps=K:secs=A,B,... with the reads
                                        completed in each whole second)
All numbers are bytes (decimal, or hex with 0x); OFFSET, LEN, IO_SIZE and BUF_MISALIGN must suit
O_DIRECT (multiples of the logical block size).";

/// Why a check did not pass; printed as the single stdout line.
#[derive(Debug)]
enum CheckError {
    Usage(String),
    Io {
        what: &'static str,
        offset: u64,
        source: io::Error,
    },
    Mismatch {
        offset: u64,
        expected: u64,
        found: u64,
        bad_words: u64,
    },
    NotZero {
        offset: u64,
        found: u64,
    },
    WriteAccepted,
    Stale {
        slots: usize,
        of: usize,
        bad_words: u64,
        reads: u64,
    },
}

impl std::fmt::Display for CheckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Usage(msg) => write!(f, "usage-error:{msg}"),
            Self::Io { what, offset, source } => {
                let errno = source.raw_os_error().unwrap_or(0);
                write!(f, "io-error:{what}@{offset}:errno={errno}:{source}")
            }
            Self::Mismatch { offset, expected, found, bad_words } => write!(
                f,
                "mismatch@{offset}:expected={expected:#018x}:found={found:#018x}:bad_words={bad_words}"
            ),
            Self::NotZero { offset, found } => write!(f, "not-zero@{offset}:found={found:#018x}"),
            Self::WriteAccepted => write!(f, "write-accepted"),
            Self::Stale { slots, of, bad_words, reads } => write!(
                f,
                "stale:slots={slots}/{of}:bad_words={bad_words}:reads={reads}"
            ),
        }
    }
}

/// The pattern word for the 8-byte word at `byte_offset` (splitmix64 of seed and position).
fn pattern_word(seed: u64, byte_offset: u64) -> u64 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(byte_offset / 8)
        .wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A heap buffer whose usable part starts `misalign` bytes after a page boundary, so that O_DIRECT
/// requests can be made to straddle pages (more, smaller segments per request).
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize, misalign: usize) -> Result<Self, CheckError> {
        let total = len
            .checked_add(misalign)
            .and_then(|n| n.checked_add(PAGE_SIZE))
            .ok_or_else(|| CheckError::Usage("buffer size overflows".into()))?;
        let storage = vec![0u8; total];
        let addr = storage.as_ptr() as usize;
        let to_page = (PAGE_SIZE - addr % PAGE_SIZE) % PAGE_SIZE;
        Ok(Self {
            storage,
            start: to_page + misalign,
            len,
        })
    }

    fn bytes(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

fn parse_num(text: &str, what: &str) -> Result<u64, CheckError> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| CheckError::Usage(format!("{what} {text:?} is not a number")))
}

fn to_usize(value: u64, what: &str) -> Result<usize, CheckError> {
    usize::try_from(value).map_err(|_| CheckError::Usage(format!("{what} too large")))
}

fn open_direct(path: &str, write: bool) -> Result<File, CheckError> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(OFlags::DIRECT.bits() as i32)
        .open(path)
        .map_err(|source| CheckError::Io {
            what: "open",
            offset: 0,
            source,
        })
}

/// Byte ranges `[offset, offset+len)` cut into requests of at most `io_size` bytes.
fn chunks(offset: u64, len: u64, io_size: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset.saturating_add(len);
    let step = io_size.max(1);
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let this = step.min(end - pos);
        let item = (pos, this);
        pos += this;
        Some(item)
    })
}

struct PatternArgs {
    dev: String,
    offset: u64,
    len: u64,
    seed: u64,
    io_size: u64,
    misalign: usize,
}

fn pattern_args(args: &[String]) -> Result<PatternArgs, CheckError> {
    let [dev, offset, len, seed, rest @ ..] = args else {
        return Err(CheckError::Usage("need DEV OFFSET LEN SEED".into()));
    };
    let len_n = parse_num(len, "LEN")?;
    let io_size = match rest.first() {
        Some(v) => parse_num(v, "IO_SIZE")?,
        None => len_n.min(1 << 20),
    };
    let misalign = match rest.get(1) {
        Some(v) => to_usize(parse_num(v, "BUF_MISALIGN")?, "BUF_MISALIGN")?,
        None => 0,
    };
    if io_size == 0 || len_n == 0 {
        return Err(CheckError::Usage("LEN and IO_SIZE must be non-zero".into()));
    }
    Ok(PatternArgs {
        dev: dev.clone(),
        offset: parse_num(offset, "OFFSET")?,
        len: len_n,
        seed: parse_num(seed, "SEED")?,
        io_size,
        misalign,
    })
}

fn fill_pattern(buf: &mut [u8], seed: u64, device_offset: u64) {
    for (i, word) in buf.chunks_exact_mut(8).enumerate() {
        let at = device_offset.wrapping_add((i as u64) * 8);
        word.copy_from_slice(&pattern_word(seed, at).to_le_bytes());
    }
}

fn write_pattern(a: &PatternArgs) -> Result<(), CheckError> {
    write_pattern_to(&open_direct(&a.dev, true)?, a)
}

fn write_pattern_to(file: &File, a: &PatternArgs) -> Result<(), CheckError> {
    let mut buf = AlignedBuf::new(to_usize(a.io_size, "IO_SIZE")?, a.misalign)?;
    for (pos, n) in chunks(a.offset, a.len, a.io_size) {
        let n = to_usize(n, "IO_SIZE")?;
        fill_pattern(&mut buf.bytes_mut()[..n], a.seed, pos);
        file.write_all_at(&buf.bytes()[..n], pos)
            .map_err(|source| CheckError::Io {
                what: "write",
                offset: pos,
                source,
            })?;
    }
    Ok(())
}

fn verify_pattern(a: &PatternArgs) -> Result<(), CheckError> {
    verify_pattern_in(&open_direct(&a.dev, false)?, a)
}

fn verify_pattern_in(file: &File, a: &PatternArgs) -> Result<(), CheckError> {
    let mut buf = AlignedBuf::new(to_usize(a.io_size, "IO_SIZE")?, a.misalign)?;
    let mut first_bad: Option<(u64, u64, u64)> = None;
    let mut bad_words = 0u64;
    for (pos, n) in chunks(a.offset, a.len, a.io_size) {
        let n = to_usize(n, "IO_SIZE")?;
        let data = &mut buf.bytes_mut()[..n];
        // Poison first: a read that "succeeds" without transferring data must not pass.
        data.fill(0xA5);
        file.read_exact_at(data, pos)
            .map_err(|source| CheckError::Io {
                what: "read",
                offset: pos,
                source,
            })?;
        for (i, word) in data.chunks_exact(8).enumerate() {
            let at = pos.wrapping_add((i as u64) * 8);
            let mut raw = [0u8; 8];
            raw.copy_from_slice(word);
            let found = u64::from_le_bytes(raw);
            let expected = pattern_word(a.seed, at);
            if found != expected {
                bad_words += 1;
                first_bad.get_or_insert((at, expected, found));
            }
        }
    }
    match first_bad {
        None => Ok(()),
        Some((offset, expected, found)) => Err(CheckError::Mismatch {
            offset,
            expected,
            found,
            bad_words,
        }),
    }
}

fn range_args(args: &[String]) -> Result<(String, u64, u64), CheckError> {
    let [dev, offset, len] = args else {
        return Err(CheckError::Usage("need DEV OFFSET LEN".into()));
    };
    Ok((
        dev.clone(),
        parse_num(offset, "OFFSET")?,
        parse_num(len, "LEN")?,
    ))
}

fn verify_zeros(args: &[String]) -> Result<(), CheckError> {
    let (dev, offset, len) = range_args(args)?;
    let file = open_direct(&dev, false)?;
    let io_size = len.min(1 << 20);
    let mut buf = AlignedBuf::new(to_usize(io_size, "LEN")?, 0)?;
    for (pos, n) in chunks(offset, len, io_size) {
        let n = to_usize(n, "LEN")?;
        let data = &mut buf.bytes_mut()[..n];
        data.fill(0xA5);
        file.read_exact_at(data, pos)
            .map_err(|source| CheckError::Io {
                what: "read",
                offset: pos,
                source,
            })?;
        if let Some(i) = data.chunks_exact(8).position(|w| w.iter().any(|&b| b != 0)) {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&data[i * 8..i * 8 + 8]);
            let at = pos.wrapping_add((i as u64) * 8);
            return Err(CheckError::NotZero {
                offset: at,
                found: u64::from_le_bytes(raw),
            });
        }
    }
    Ok(())
}

/// On a block device, fallocate(ZERO_RANGE) takes the same kernel path as the BLKZEROOUT ioctl
/// (blkdev_issue_zeroout, may fall back to writing zero pages), and PUNCH_HOLE requires the device
/// to do WRITE_ZEROES itself (no fallback), which proves the request reached the device.
fn fallocate_range(args: &[String], mode: FallocateFlags) -> Result<(), CheckError> {
    let (dev, offset, len) = range_args(args)?;
    let file = open_direct(&dev, true)?;
    rustix::fs::fallocate(&file, mode | FallocateFlags::KEEP_SIZE, offset, len).map_err(|e| {
        CheckError::Io {
            what: "fallocate",
            offset,
            source: io::Error::from(e),
        }
    })
}

fn flush(args: &[String]) -> Result<(), CheckError> {
    let [dev] = args else {
        return Err(CheckError::Usage("need DEV".into()));
    };
    let file = open_direct(dev, true)?;
    file.sync_all().map_err(|source| CheckError::Io {
        what: "fsync",
        offset: 0,
        source,
    })
}

fn size(args: &[String]) -> Result<u64, CheckError> {
    let [dev] = args else {
        return Err(CheckError::Usage("need DEV".into()));
    };
    let mut file = open_direct(dev, false)?;
    file.seek(SeekFrom::End(0))
        .map_err(|source| CheckError::Io {
            what: "seek",
            offset: 0,
            source,
        })
}

/// A read-only device must refuse the write somewhere: at open, at write or at flush.
fn expect_write_error(args: &[String]) -> Result<String, CheckError> {
    let (dev, offset, len) = range_args(args)?;
    let file = match open_direct(&dev, true) {
        Ok(file) => file,
        Err(CheckError::Io { source, .. }) => {
            return Ok(format!(
                "refused-at-open:errno={}",
                source.raw_os_error().unwrap_or(0)
            ));
        }
        Err(other) => return Err(other),
    };
    let mut buf = AlignedBuf::new(to_usize(len, "LEN")?, 0)?;
    fill_pattern(buf.bytes_mut(), 0xDEAD, offset);
    if let Err(e) = file.write_all_at(buf.bytes(), offset) {
        return Ok(format!(
            "refused-at-write:errno={}",
            e.raw_os_error().unwrap_or(0)
        ));
    }
    if let Err(e) = file.sync_all() {
        return Ok(format!(
            "refused-at-flush:errno={}",
            e.raw_os_error().unwrap_or(0)
        ));
    }
    Err(CheckError::WriteAccepted)
}

const WRITER_BLOCK: u64 = 4096;

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
/// One verifying writer: thread `t` of `threads` owns every `threads`-th block of the range.
/// Returns the writes done and the seed of each block's last acknowledged write.
fn writer(
    file: &File,
    offset: u64,
    blocks: u64,
    t: u64,
    threads: u64,
    until: std::time::Instant,
    busy_since_ms: &std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
) -> Result<(u64, Vec<(u64, u64)>), CheckError> {
    use std::sync::atomic::Ordering;
    let mut wbuf = AlignedBuf::new(WRITER_BLOCK as usize, 0)?;
    let mut rbuf = AlignedBuf::new(WRITER_BLOCK as usize, 0)?;
    let mine: Vec<u64> = (t..blocks).step_by(threads as usize).collect();
    let mut last = vec![0u64; mine.len()];
    let mut writes = 0u64;
    let mut i = 0usize;
    while std::time::Instant::now() < until && !mine.is_empty() {
        let k = i % mine.len();
        i += 1;
        let pos = offset + mine[k] * WRITER_BLOCK;
        writes += 1;
        // The seed names the thread and the sequence number: a stale or lost write reads back
        // as another seed's pattern.
        let seed = (t << 40) | writes;
        fill_pattern(wbuf.bytes_mut(), seed, pos);
        let since = epoch.elapsed().as_millis() as u64 + 1;
        busy_since_ms.store(since, Ordering::Relaxed);
        file.write_all_at(wbuf.bytes(), pos)
            .map_err(|source| CheckError::Io {
                what: "write",
                offset: pos,
                source,
            })?;
        last[k] = seed;
        rbuf.bytes_mut().fill(0xA5);
        busy_since_ms.store(epoch.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
        file.read_exact_at(rbuf.bytes_mut(), pos)
            .map_err(|source| CheckError::Io {
                what: "read",
                offset: pos,
                source,
            })?;
        busy_since_ms.store(0, Ordering::Relaxed);
        check_block(rbuf.bytes(), seed, pos)?;
    }
    Ok((writes, mine.iter().copied().zip(last).collect()))
}

fn check_block(data: &[u8], seed: u64, pos: u64) -> Result<(), CheckError> {
    let mut bad = data.chunks_exact(8).enumerate().filter_map(|(i, word)| {
        let at = pos + i as u64 * 8;
        let mut raw = [0u8; 8];
        raw.copy_from_slice(word);
        let found = u64::from_le_bytes(raw);
        let expected = pattern_word(seed, at);
        (found != expected).then_some((at, expected, found))
    });
    match bad.next() {
        None => Ok(()),
        Some((offset, expected, found)) => Err(CheckError::Mismatch {
            offset,
            expected,
            found,
            bad_words: 1 + bad.count() as u64,
        }),
    }
}

/// Reads random 4 KiB blocks from `THREADS` threads for `SECONDS` (a fixed queue depth of
/// `THREADS`, as fio's `--iodepth` with synchronous reads in `--numjobs`) and reports the rate.
fn randread(args: &[String]) -> Result<String, CheckError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};
    const BLOCK: u64 = 4096;
    let [dev, len, threads, seconds] = args else {
        return Err(CheckError::Usage("need DEV LEN THREADS SECONDS".into()));
    };
    let blocks = (parse_num(len, "LEN")? / BLOCK).max(1);
    let threads = parse_num(threads, "THREADS")?.clamp(1, 64);
    let run = Duration::from_secs(parse_num(seconds, "SECONDS")?);
    let ios = AtomicU64::new(0);
    let start = Instant::now();
    let until = start + run;
    let results: Vec<Result<(), CheckError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let ios = &ios;
                scope.spawn(move || {
                    let file = open_direct(dev, false)?;
                    let mut buf = AlignedBuf::new(BLOCK as usize, 0)?;
                    // xorshift64*: a different sequence per thread, no dependency.
                    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1).wrapping_mul(0xbf58_476d);
                    while Instant::now() < until {
                        state ^= state >> 12;
                        state ^= state << 25;
                        state ^= state >> 27;
                        let block = state.wrapping_mul(0x2545_f491_4f6c_dd1d) % blocks;
                        let pos = block * BLOCK;
                        file.read_exact_at(buf.bytes_mut(), pos).map_err(|source| {
                            CheckError::Io {
                                what: "read",
                                offset: pos,
                                source,
                            }
                        })?;
                        ios.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or(Err(CheckError::Usage("reader panicked".into())))
            })
            .collect()
    });
    let ms = start.elapsed().as_millis().max(1) as u64;
    for result in results {
        result?;
    }
    let ios = ios.load(Ordering::Relaxed);
    Ok(format!("ok:ios={ios}:ms={ms}:iops={}", ios * 1000 / ms))
}

/// Keeps `DEPTH` random reads of `BLOCK` bytes in flight from one thread through io_uring for
/// `SECONDS` and reports the rate, overall and per whole second. One thread submitting and
/// reaping in batches costs a slow (TCG) guest far less per read than as many threads each
/// blocked in a synchronous read, so the device, not the guest, sets the rate.
fn qdread(args: &[String]) -> Result<String, CheckError> {
    use rvhost_platform_linux::uring::{AlignedBuf as RingBuf, FileOp, Uring};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let [dev, len, depth, block, seconds] = args else {
        return Err(CheckError::Usage("need DEV LEN DEPTH BLOCK SECONDS".into()));
    };
    let block = parse_num(block, "BLOCK")?;
    if block == 0 || block % 512 != 0 || block > 1 << 20 {
        return Err(CheckError::Usage(format!(
            "BLOCK {block}: a multiple of 512 up to 1 MiB"
        )));
    }
    let blocks = (parse_num(len, "LEN")? / block).max(1);
    let depth = parse_num(depth, "DEPTH")?.clamp(1, 256);
    let seconds = parse_num(seconds, "SECONDS")?.max(1);
    let file = Arc::new(open_direct(dev, false)?);
    let ring_error = |what: &'static str, e: &dyn std::fmt::Display| CheckError::Io {
        what,
        offset: 0,
        source: io::Error::other(e.to_string()),
    };
    let mut ring = Uring::new(
        u32::try_from(depth.next_power_of_two()).map_err(|_| CheckError::Usage("DEPTH".into()))?,
    )
    .map_err(|e| ring_error("io_uring setup", &e))?;
    let block_len = to_usize(block, "BLOCK")?;
    // xorshift64*: a random block for each read.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_offset = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d) % blocks * block
    };
    let read = |buf: RingBuf, offset: u64| FileOp::Read {
        file: Arc::clone(&file),
        offset,
        buf,
        range: 0..block_len,
    };
    for _ in 0..depth {
        let buf = RingBuf::new(block_len).map_err(|e| ring_error("buffer", &e))?;
        ring.submit(read(buf, next_offset()), 0)
            .map_err(|b| ring_error("io_uring submit", &b.1))?;
    }
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    let mut per_second = vec![0u64; to_usize(seconds, "SECONDS")?];
    let mut done = Vec::with_capacity(to_usize(depth, "DEPTH")?);
    let mut failed: Option<CheckError> = None;
    while ring.in_flight() > 0 {
        ring.wait(&mut |c| done.push(c));
        let now = Instant::now();
        let second = usize::try_from(now.duration_since(start).as_secs()).unwrap_or(usize::MAX);
        for c in done.drain(..) {
            let FileOp::Read { buf, offset, .. } = c.op else {
                continue;
            };
            match c.result {
                Ok(n) if n == block_len => {
                    if let Some(count) = per_second.get_mut(second) {
                        *count += 1;
                    }
                }
                Ok(n) => {
                    failed.get_or_insert(CheckError::Io {
                        what: "short read",
                        offset,
                        source: io::Error::other(format!("{n} of {block_len} bytes")),
                    });
                }
                Err(errno) => {
                    failed.get_or_insert(CheckError::Io {
                        what: "read",
                        offset,
                        source: io::Error::from_raw_os_error(errno),
                    });
                }
            }
            if now < until && failed.is_none() {
                ring.submit(read(buf, next_offset()), 0)
                    .map_err(|b| ring_error("io_uring submit", &b.1))?;
            }
        }
    }
    if let Some(err) = failed {
        return Err(err);
    }
    let ios: u64 = per_second.iter().sum();
    let ms = (seconds * 1000).max(1);
    let secs: Vec<String> = per_second.iter().map(u64::to_string).collect();
    Ok(format!(
        "ok:ios={ios}:ms={ms}:iops={}:kibps={}:secs={}",
        ios * 1000 / ms,
        ios * block / 1024 * 1000 / ms,
        secs.join(",")
    ))
}

fn writers(args: &[String]) -> Result<String, CheckError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};
    let [dev, offset, len, threads, seconds, hang] = args else {
        return Err(CheckError::Usage(
            "need DEV OFFSET LEN THREADS SECONDS HANG_SECONDS".into(),
        ));
    };
    let offset = parse_num(offset, "OFFSET")?;
    let blocks = parse_num(len, "LEN")? / WRITER_BLOCK;
    let threads = parse_num(threads, "THREADS")?.clamp(1, 64);
    let until = Instant::now() + Duration::from_secs(parse_num(seconds, "SECONDS")?);
    let hang_ms = parse_num(hang, "HANG_SECONDS")? * 1000;
    let epoch = Instant::now();
    let busy: Vec<AtomicU64> = (0..threads).map(|_| AtomicU64::new(0)).collect();
    let max_ms = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (busy, done) = (&busy[t as usize], &done);
                let dev = dev.clone();
                scope.spawn(move || {
                    let result = open_direct(&dev, true).and_then(|file| {
                        writer(&file, offset, blocks, t, threads, until, busy, epoch)
                    });
                    done.fetch_add(1, Ordering::Relaxed);
                    result
                })
            })
            .collect();
        // The watchdog: the longest any I/O has waited, and a hang reported while the stuck
        // thread still waits (the process cannot exit before its I/O completes).
        while done.load(Ordering::Relaxed) < threads {
            let now = epoch.elapsed().as_millis() as u64 + 1;
            for (t, b) in busy.iter().enumerate() {
                let since = b.load(Ordering::Relaxed);
                if since != 0 {
                    let waited = now.saturating_sub(since);
                    max_ms.fetch_max(waited, Ordering::Relaxed);
                    if waited >= hang_ms {
                        println!("hung:thread={t}:waited_ms={waited}");
                        let _ = std::io::Write::flush(&mut std::io::stdout());
                        std::process::exit(3);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or(Err(CheckError::Usage("writer panicked".into())))
            })
            .collect::<Vec<_>>()
    });
    let file = open_direct(dev, false)?;
    let mut rbuf = AlignedBuf::new(WRITER_BLOCK as usize, 0)?;
    let mut writes = 0;
    for result in results {
        let (n, last) = result?;
        writes += n;
        // Every write was acknowledged: each block holds its last one.
        for (block, seed) in last.into_iter().filter(|(_, seed)| *seed != 0) {
            let pos = offset + block * WRITER_BLOCK;
            rbuf.bytes_mut().fill(0xA5);
            file.read_exact_at(rbuf.bytes_mut(), pos)
                .map_err(|source| CheckError::Io {
                    what: "read",
                    offset: pos,
                    source,
                })?;
            check_block(rbuf.bytes(), seed, pos)?;
        }
    }
    Ok(format!(
        "ok:writes={writes}:max_ms={}",
        max_ms.load(Ordering::Relaxed)
    ))
}

/// The `readhold` loop's parameters.
struct ReadHold {
    offset: u64,
    slot_len: u64,
    regions: u64,
    slots: u64,
    seed: u64,
    marker_offset: u64,
    marker: u64,
    /// Created once the first read completed (the host may then start moving the VM).
    ready: String,
}

impl ReadHold {
    fn region_offset(&self, region: u64) -> u64 {
        self.offset + region * self.slot_len
    }
}

/// Reads regions into slots until the marker appears; returns the reads done and, per slot, the
/// region it last received (`u64::MAX`: none).
fn readhold_loop(
    file: &File,
    p: &ReadHold,
    buf: &mut AlignedBuf,
    busy_since_ms: &std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
) -> Result<(u64, Vec<u64>), CheckError> {
    use std::sync::atomic::Ordering;
    let slot_len = to_usize(p.slot_len, "SLOT_LEN")?;
    let mut marker = AlignedBuf::new(PAGE_SIZE, 0)?;
    let mut last = vec![u64::MAX; to_usize(p.slots, "SLOTS")?];
    let mut reads = 0u64;
    loop {
        let region = reads % p.regions;
        let slot = to_usize(reads % p.slots, "SLOTS")?;
        let pos = p.region_offset(region);
        let data = &mut buf.bytes_mut()[slot * slot_len..(slot + 1) * slot_len];
        busy_since_ms.store(epoch.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
        file.read_exact_at(data, pos)
            .map_err(|source| CheckError::Io {
                what: "read",
                offset: pos,
                source,
            })?;
        last[slot] = region;
        reads += 1;
        if reads == 1 {
            File::create(&p.ready).map_err(|source| CheckError::Io {
                what: "create ready file",
                offset: 0,
                source,
            })?;
        }
        file.read_exact_at(marker.bytes_mut(), p.marker_offset)
            .map_err(|source| CheckError::Io {
                what: "read marker",
                offset: p.marker_offset,
                source,
            })?;
        busy_since_ms.store(0, Ordering::Relaxed);
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&marker.bytes()[..8]);
        if u64::from_le_bytes(raw) == p.marker {
            return Ok((reads, last));
        }
    }
}

/// The device writes guest memory the guest never touches: it reads known regions into the
/// slots of one large buffer until the host says (through the marker block) that the VM moved,
/// then checks every slot. A migration that did not re-send what the device wrote after a page
/// was copied leaves stale slots on the destination.
fn readhold(args: &[String]) -> Result<String, CheckError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};
    let [dev, offset, slot_len, regions, slots, seed, marker_offset, marker, hang, ready] = args
    else {
        return Err(CheckError::Usage(
            "need DEV OFFSET SLOT_LEN REGIONS SLOTS SEED MARKER_OFFSET MARKER HANG_SECONDS READY"
                .into(),
        ));
    };
    let p = ReadHold {
        offset: parse_num(offset, "OFFSET")?,
        slot_len: parse_num(slot_len, "SLOT_LEN")?,
        regions: parse_num(regions, "REGIONS")?,
        slots: parse_num(slots, "SLOTS")?,
        seed: parse_num(seed, "SEED")?,
        marker_offset: parse_num(marker_offset, "MARKER_OFFSET")?,
        marker: parse_num(marker, "MARKER")?,
        ready: ready.clone(),
    };
    if p.slot_len == 0 || p.regions == 0 || p.slots == 0 {
        return Err(CheckError::Usage(
            "SLOT_LEN, REGIONS and SLOTS must be non-zero".into(),
        ));
    }
    let hang_ms = parse_num(hang, "HANG_SECONDS")? * 1000;
    let total = p
        .slot_len
        .checked_mul(p.slots)
        .ok_or_else(|| CheckError::Usage("buffer size overflows".into()))?;
    let mut buf = AlignedBuf::new(to_usize(total, "buffer")?, 0)?;
    // Written by the CPU once (so every page exists), afterwards only by the device.
    buf.bytes_mut().fill(0xA5);
    let file = open_direct(dev, false)?;
    let epoch = Instant::now();
    let busy = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let result = std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            let result = readhold_loop(&file, &p, &mut buf, &busy, epoch);
            done.store(1, Ordering::Relaxed);
            result
        });
        while done.load(Ordering::Relaxed) == 0 {
            let since = busy.load(Ordering::Relaxed);
            let now = epoch.elapsed().as_millis() as u64 + 1;
            if since != 0 && now.saturating_sub(since) >= hang_ms {
                println!("hung:waited_ms={}", now.saturating_sub(since));
                let _ = std::io::Write::flush(&mut std::io::stdout());
                std::process::exit(3);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        handle
            .join()
            .unwrap_or(Err(CheckError::Usage("reader panicked".into())))
    });
    let (reads, last) = result?;
    let slot_len = to_usize(p.slot_len, "SLOT_LEN")?;
    let mut stale = Vec::new();
    let mut bad_words = 0u64;
    for (slot, &region) in last.iter().enumerate() {
        if region == u64::MAX {
            continue;
        }
        let data = &buf.bytes()[slot * slot_len..(slot + 1) * slot_len];
        if let Err(CheckError::Mismatch { bad_words: n, .. }) =
            check_block(data, p.seed + region, p.region_offset(region))
        {
            stale.push(slot);
            bad_words += n;
        }
    }
    if stale.is_empty() {
        Ok(format!("ok:reads={reads}"))
    } else {
        Err(CheckError::Stale {
            slots: stale.len(),
            of: last.len(),
            bad_words,
            reads,
        })
    }
}

fn run(args: &[String]) -> Result<String, CheckError> {
    let Some((command, rest)) = args.split_first() else {
        return Err(CheckError::Usage("no command".into()));
    };
    match command.as_str() {
        "write" => write_pattern(&pattern_args(rest)?).map(|()| "ok".into()),
        "verify" => verify_pattern(&pattern_args(rest)?).map(|()| "ok".into()),
        "zeros" => verify_zeros(rest).map(|()| "ok".into()),
        "zeroout" => fallocate_range(rest, FallocateFlags::ZERO_RANGE).map(|()| "ok".into()),
        "punch" => fallocate_range(rest, FallocateFlags::PUNCH_HOLE).map(|()| "ok".into()),
        "flush" => flush(rest).map(|()| "ok".into()),
        "size" => size(rest).map(|n| n.to_string()),
        "expect-write-error" => expect_write_error(rest),
        "writers" => writers(rest),
        "readhold" => readhold(rest),
        "randread" => randread(rest),
        "qdread" => qdread(rest),
        other => Err(CheckError::Usage(format!("unknown command {other:?}"))),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            println!("{err}");
            if matches!(err, CheckError::Usage(_)) {
                eprintln!("{USAGE}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_depends_on_seed_and_position() {
        assert_ne!(pattern_word(1, 0), pattern_word(1, 8));
        assert_ne!(pattern_word(1, 0), pattern_word(2, 0));
        // Words inside the same 8-byte slot are one value; the next slot differs.
        assert_eq!(pattern_word(7, 4096), pattern_word(7, 4096 + 7));
        assert_ne!(pattern_word(7, 4096), pattern_word(7, 4096 + 8));
    }

    #[test]
    fn chunks_cover_range_exactly() {
        let got: Vec<_> = chunks(4096, 10_000, 4096).collect();
        assert_eq!(got, vec![(4096, 4096), (8192, 4096), (12288, 1808)]);
        assert_eq!(chunks(0, 0, 512).count(), 0);
    }

    #[test]
    fn aligned_buffer_is_page_aligned_plus_misalign() {
        for misalign in [0usize, 512, 3584] {
            let buf = AlignedBuf::new(8192, misalign).expect("small buffer");
            assert_eq!(buf.bytes().as_ptr() as usize % PAGE_SIZE, misalign);
            assert_eq!(buf.bytes().len(), 8192);
        }
    }

    #[test]
    fn round_trip_and_mismatch_report_on_a_file() {
        // A plain file (buffered I/O) stands in for the device: this checks the pattern logic,
        // the guest tests check the O_DIRECT path.
        let dir = std::env::temp_dir().join(format!("blkcheck-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("dev");
        std::fs::write(&path, vec![0u8; 65536]).expect("create");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let args = PatternArgs {
            dev: String::new(),
            offset: 4096,
            len: 3 * 8192 + 512,
            seed: 42,
            io_size: 8192,
            misalign: 512,
        };
        write_pattern_to(&file, &args).expect("write");
        verify_pattern_in(&file, &args).expect("intact pattern verifies");
        let other_seed = PatternArgs { seed: 43, ..args };
        assert!(matches!(
            verify_pattern_in(&file, &other_seed),
            Err(CheckError::Mismatch { offset: 4096, .. })
        ));

        let mut corrupt = [0u8; 1];
        file.read_exact_at(&mut corrupt, 9000).expect("read");
        corrupt[0] ^= 0x10;
        file.write_all_at(&corrupt, 9000).expect("corrupt");
        let args = PatternArgs {
            seed: 42,
            ..other_seed
        };
        match verify_pattern_in(&file, &args) {
            Err(CheckError::Mismatch {
                offset, bad_words, ..
            }) => {
                assert_eq!((offset, bad_words), (9000 & !7, 1));
            }
            other => panic!("expected a mismatch at 9000, got {other:?}"),
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
