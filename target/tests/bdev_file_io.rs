//! File bdevs on real files, through both engines (io_uring and the forced Linux AIO path):
//! pattern round trips checked against the file's bytes, flush, discard leaving a hole
//! (`SEEK_HOLE`), write zeroes, a short read at a shrunk end of file failing instead of
//! succeeding, and ENOSPC on a tiny tmpfs failing writes while the bdev keeps serving.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rvhost_platform_linux::uring::next_hole;
use rvhost_target::bdev::file::{FileBdev, FileBdevConfig, FileEngine};
use rvhost_target::bdev::testing::TestMemory;
use rvhost_target::bdev::{Bdev, BdevChannel, BdevIo, HostMemory, IoKind, IoStatus, IoVec};

struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn new(dir: &Path, tag: &str, len: u64) -> Self {
        let path = dir.join(format!("rvhost-file-bdev-{}-{tag}", std::process::id()));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(len).unwrap();
        Scratch { path }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A directory on a real (O_DIRECT-capable) filesystem: the build directory's parent.
fn disk_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../build/file-bdev-tests");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(path: &Path, engine: FileEngine) -> FileBdevConfig {
    FileBdevConfig {
        name: format!("{engine:?}0"),
        filename: path.to_owned(),
        block_size: None,
        readonly: false,
        fallocate: true,
        uuid: [7; 16],
        engine,
        direct: true,
        worker_cores: None,
    }
}

fn run(
    ch: &mut dyn BdevChannel,
    mem: &TestMemory,
    kind: IoKind,
    offset_blocks: u64,
    num_blocks: u64,
    iovs: &[IoVec],
) -> IoStatus {
    let tag = 0xfeed_0000 + offset_blocks;
    ch.submit(&mem.bdev_io(kind, offset_blocks, num_blocks, iovs, tag))
        .unwrap();
    let mut status = None;
    for _ in 0..1_000_000 {
        ch.poll(&mut |t, s| {
            assert_eq!(t, tag);
            status = Some(s);
        });
        if let Some(s) = status {
            assert_eq!(ch.in_flight(), 0);
            return s;
        }
        std::thread::yield_now();
    }
    panic!("{kind:?} never completed");
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(u32::from(seed)) as u8)
        .collect()
}

fn round_trip_flush_discard_zeroes(engine: FileEngine) {
    let scratch = Scratch::new(&disk_dir(), &format!("{engine:?}-rt"), 4 << 20);
    let bdev = FileBdev::open(config(&scratch.path, engine)).unwrap();
    assert_eq!(bdev.block_size(), 512);
    assert_eq!(bdev.num_blocks(), (4 << 20) / 512);
    let mut ch = Arc::clone(&bdev).open_channel().unwrap();
    let mem = TestMemory::new(1 << 20);
    let base = mem.addr(0);

    // 64 KiB at block 10, from three scattered, unaligned guest buffers.
    let data = pattern(65536, 3);
    mem.io_memory()
        .copy_to_host(base + 3, &data[..1000])
        .unwrap();
    mem.io_memory()
        .copy_to_host(base + 0x4001, &data[1000..40000])
        .unwrap();
    mem.io_memory()
        .copy_to_host(base + 0x2_0000, &data[40000..])
        .unwrap();
    let iovs = [
        IoVec {
            addr: base + 3,
            len: 1000,
        },
        IoVec {
            addr: base + 0x4001,
            len: 39000,
        },
        IoVec {
            addr: base + 0x2_0000,
            len: 25536,
        },
    ];
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Write, 10, 128, &iovs),
        IoStatus::Success
    );
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Flush, 0, 0, &[]),
        IoStatus::Success
    );
    let on_disk = std::fs::read(&scratch.path).unwrap();
    assert_eq!(&on_disk[10 * 512..10 * 512 + 65536], &data[..]);
    assert!(on_disk[..10 * 512].iter().all(|b| *b == 0));

    // Read it back into other unaligned buffers.
    let back = [
        IoVec {
            addr: base + 0x8_0007,
            len: 512 * 100,
        },
        IoVec {
            addr: base + 0x9_0000 + 1,
            len: 65536 - 512 * 100,
        },
    ];
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Read, 10, 128, &back),
        IoStatus::Success
    );
    let bytes = mem.read(0, 1 << 20);
    assert_eq!(&bytes[0x8_0007..0x8_0007 + 51200], &data[..51200]);
    assert_eq!(&bytes[0x9_0001..0x9_0001 + 14336], &data[51200..]);

    // Fill the first 2 MiB, then discard 1 MiB at 1 MiB: a hole appears there.
    let fill = pattern(1 << 20, 9);
    mem.io_memory().copy_to_host(base, &fill).unwrap();
    let whole = [IoVec {
        addr: base,
        len: 1 << 20,
    }];
    for start in [0u64, 2048] {
        assert_eq!(
            run(&mut *ch, &mem, IoKind::Write, start, 2048, &whole),
            IoStatus::Success
        );
    }
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Flush, 0, 0, &[]),
        IoStatus::Success
    );
    let file = File::open(&scratch.path).unwrap();
    assert!(
        next_hole(&file, 0).unwrap() >= 2 << 20,
        "no hole before the discard"
    );
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Unmap, 2048, 2048, &[]),
        IoStatus::Success
    );
    assert_eq!(
        next_hole(&file, 0).unwrap(),
        1 << 20,
        "discard left no hole"
    );
    let mut buf = vec![0xffu8; 1 << 20];
    file.read_exact_at(&mut buf, 1 << 20).unwrap();
    assert!(buf.iter().all(|b| *b == 0));

    // Write zeroes over blocks 5..9 only.
    assert_eq!(
        run(&mut *ch, &mem, IoKind::WriteZeroes, 5, 4, &[]),
        IoStatus::Success
    );
    file.read_exact_at(&mut buf[..8192], 0).unwrap();
    assert_eq!(&buf[..5 * 512], &fill[..5 * 512]);
    assert!(buf[5 * 512..9 * 512].iter().all(|b| *b == 0));
    assert_eq!(&buf[9 * 512..8192], &fill[9 * 512..8192]);

    let info = bdev.driver_specific();
    let module = if engine == FileEngine::Uring {
        "uring"
    } else {
        "aio"
    };
    assert_eq!(info[module]["io_errors"], 0);
    // The scattered, unaligned write is bounced; every read and write is one or the other.
    let bounced = info[module]["bounced_ios"].as_u64().unwrap();
    let zero_copy = info[module]["zero_copy_ios"].as_u64().unwrap();
    assert!(bounced >= 1, "{info}");
    assert_eq!(bounced + zero_copy, 4, "{info}");
    // A filesystem that takes O_DIRECT was used (the build dir is not on tmpfs here).
    assert_eq!(info[module]["o_direct"], bdev.o_direct());
}

#[test]
fn uring_round_trip_flush_discard_zeroes() {
    round_trip_flush_discard_zeroes(FileEngine::Uring);
}

#[test]
fn aio_round_trip_flush_discard_zeroes() {
    round_trip_flush_discard_zeroes(FileEngine::Aio);
}

fn short_read_past_shrunk_end_fails(engine: FileEngine) {
    let scratch = Scratch::new(&disk_dir(), &format!("{engine:?}-short"), 1 << 20);
    let mut cfg = config(&scratch.path, engine);
    // Buffered, so the file can end mid-block and the kernel returns a short read.
    cfg.direct = false;
    let bdev = FileBdev::open(cfg).unwrap();
    let mut ch = Arc::clone(&bdev).open_channel().unwrap();
    let mem = TestMemory::new(1 << 16);
    let base = mem.addr(0);
    // Shrink the file underneath the bdev to end 256 bytes into block 100.
    OpenOptions::new()
        .write(true)
        .open(&scratch.path)
        .unwrap()
        .set_len(100 * 512 + 256)
        .unwrap();
    let iov = [IoVec {
        addr: base,
        len: 4 * 512,
    }];
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Read, 98, 4, &iov),
        IoStatus::Failed
    );
    assert!(
        bdev.stats()
            .short_ios
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert_eq!(
        bdev.stats()
            .io_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Blocks still inside the file keep working.
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Read, 0, 4, &iov),
        IoStatus::Success
    );
    // Rescan picks up the new size.
    assert_eq!(bdev.rescan().unwrap(), 100);
}

#[test]
fn uring_short_read_past_shrunk_end_fails() {
    short_read_past_shrunk_end_fails(FileEngine::Uring);
}

#[test]
fn aio_short_read_past_shrunk_end_fails() {
    short_read_past_shrunk_end_fails(FileEngine::Aio);
}

/// A 1 MiB tmpfs, unmounted on drop.
struct TinyTmpfs {
    dir: PathBuf,
}

impl TinyTmpfs {
    fn mount(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rvhost-tinyfs-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1M", "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount (these tests need root)");
        assert!(
            status.success(),
            "mounting a 1 MiB tmpfs failed (needs root)"
        );
        TinyTmpfs { dir }
    }
}

impl Drop for TinyTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn enospc_fails_writes_and_keeps_serving(engine: FileEngine) {
    let fs = TinyTmpfs::mount(&format!("{engine:?}"));
    // A sparse 4 MiB file on a 1 MiB filesystem.
    let scratch = Scratch::new(&fs.dir, "full", 4 << 20);
    let bdev = FileBdev::open(config(&scratch.path, engine)).unwrap();
    // tmpfs takes O_DIRECT since Linux 6.6; before, the bdev falls back to buffered I/O.
    let mut ch = Arc::clone(&bdev).open_channel().unwrap();
    let mem = TestMemory::new(1 << 16);
    let base = mem.addr(0);
    mem.io_memory().fill_host(base, 1 << 16, 0xa5).unwrap();
    let iov = [IoVec {
        addr: base,
        len: 1 << 16,
    }];
    let mut failed = 0;
    let mut succeeded = 0;
    for step in 0..32u64 {
        match run(&mut *ch, &mem, IoKind::Write, step * 128, 128, &iov) {
            IoStatus::Success => succeeded += 1,
            IoStatus::Failed => failed += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(succeeded >= 8, "only {succeeded} writes fit");
    assert!(
        failed >= 8,
        "only {failed} writes failed on a full filesystem"
    );
    let errors = bdev
        .stats()
        .io_errors
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(errors, failed);
    // Still serving: the first 64 KiB read back as written.
    mem.io_memory().fill_host(base, 1 << 16, 0).unwrap();
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Read, 0, 128, &iov),
        IoStatus::Success
    );
    assert!(mem.read(0, 1 << 16).iter().all(|b| *b == 0xa5));
    drop(ch);
    drop(bdev);
    drop(scratch);
}

#[test]
fn uring_enospc_fails_writes_and_keeps_serving() {
    enospc_fails_writes_and_keeps_serving(FileEngine::Uring);
}

#[test]
fn aio_enospc_fails_writes_and_keeps_serving() {
    enospc_fails_writes_and_keeps_serving(FileEngine::Aio);
}

#[test]
fn shm_file_works_with_or_without_o_direct() {
    let scratch = Scratch::new(Path::new("/dev/shm"), "shm", 1 << 20);
    let bdev = FileBdev::open(config(&scratch.path, FileEngine::Uring)).unwrap();
    let mut ch = Arc::clone(&bdev).open_channel().unwrap();
    let mem = TestMemory::new(4096);
    let base = mem.addr(0);
    let data = pattern(4096, 77);
    mem.io_memory().copy_to_host(base, &data).unwrap();
    let iov = [IoVec {
        addr: base,
        len: 4096,
    }];
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Write, 8, 8, &iov),
        IoStatus::Success
    );
    assert_eq!(
        &std::fs::read(&scratch.path).unwrap()[4096..8192],
        &data[..]
    );
    // tmpfs has no FALLOC_FL_ZERO_RANGE; write zeroes still works (by writing zeroes).
    assert_eq!(
        run(&mut *ch, &mem, IoKind::WriteZeroes, 9, 2, &[]),
        IoStatus::Success
    );
    let file = std::fs::read(&scratch.path).unwrap();
    // Reads and writes ran inline, not through io_uring's workers.
    assert_eq!(bdev.driver_specific()["uring"]["tmpfs"], true);
    assert_eq!(&file[4096..4608], &data[..512]);
    assert!(file[4608..5632].iter().all(|b| *b == 0));
    assert_eq!(&file[5632..8192], &data[1536..]);
}

#[test]
fn geometry_readonly_and_bad_files() {
    let dir = disk_dir();
    let scratch = Scratch::new(&dir, "geo", 1 << 20);
    let mut cfg = config(&scratch.path, FileEngine::Aio);
    cfg.block_size = Some(4096);
    cfg.readonly = true;
    let bdev = FileBdev::open(cfg.clone()).unwrap();
    assert_eq!((bdev.block_size(), bdev.num_blocks()), (4096, 256));
    assert!(!bdev.supports(IoKind::Write) && !bdev.supports(IoKind::Unmap));
    let mut ch = Arc::clone(&bdev).open_channel().unwrap();
    let mem = TestMemory::new(4096);
    let base = mem.addr(0);
    let iov = [IoVec {
        addr: base,
        len: 4096,
    }];
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Write, 0, 1, &iov),
        IoStatus::Unsupported
    );
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Read, 0, 1, &iov),
        IoStatus::Success
    );
    // Out of range and mismatched buffers are refused at submission.
    for (offset, blocks) in [(256u64, 1u64), (255, 2), (u64::MAX, 1)] {
        assert!(ch
            .submit(&mem.bdev_io(IoKind::Read, offset, blocks, &iov, 1))
            .is_err());
    }
    for bs in [256, 1000, 131072] {
        cfg.block_size = Some(bs);
        assert!(FileBdev::open(cfg.clone()).is_err(), "block size {bs}");
    }
    cfg.block_size = None;
    cfg.filename = dir.join("does-not-exist");
    assert!(FileBdev::open(cfg.clone()).is_err());
    cfg.filename = dir.clone();
    assert!(FileBdev::open(cfg.clone()).is_err(), "a directory");
    let tiny = Scratch::new(&dir, "tiny", 100);
    cfg.filename = tiny.path.clone();
    assert!(FileBdev::open(cfg).is_err(), "smaller than a block");
}

/// A loop device over a file, detached on drop.
struct LoopDevice {
    dev: PathBuf,
}

impl LoopDevice {
    fn attach(backing: &Path, sector_size: u32) -> Self {
        let out = Command::new("losetup")
            .args(["-f", "--show", "--sector-size", &sector_size.to_string()])
            .arg(backing)
            .output()
            .expect("run losetup (this test needs root)");
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice {
            dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A kernel block device: geometry from BLKGETSIZE64/BLKSSZGET, data through O_DIRECT, discard
/// through BLKDISCARD (which punches a hole in the loop device's backing file).
fn block_device_geometry_io_and_discard(engine: FileEngine) {
    let scratch = Scratch::new(&disk_dir(), &format!("{engine:?}-loop"), 4 << 20);
    let data = pattern(4 << 20, 11);
    std::fs::write(&scratch.path, &data).unwrap();
    let loop_dev = LoopDevice::attach(&scratch.path, 4096);
    let mut cfg = config(&loop_dev.dev, engine);
    cfg.block_size = Some(512);
    assert!(
        FileBdev::open(cfg.clone()).is_err(),
        "a block size below the device's must be refused"
    );
    cfg.block_size = None;
    let bdev = FileBdev::open(cfg).unwrap();
    assert_eq!((bdev.block_size(), bdev.num_blocks()), (4096, 1024));
    assert_eq!(
        bdev.driver_specific()[format!("{engine:?}").to_lowercase()]["block_device"],
        true
    );
    // The device node lives on devtmpfs; the device itself is not tmpfs (its I/O must not run
    // inline, and O_DIRECT alignment applies).
    assert_eq!(
        bdev.driver_specific()[format!("{engine:?}").to_lowercase()]["tmpfs"],
        false
    );
    let mut ch = Arc::clone(&bdev).open_channel().unwrap();
    let mem = TestMemory::new(1 << 16);
    let base = mem.addr(0);
    let iov = [IoVec {
        addr: base + 1,
        len: 8192,
    }];
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Read, 3, 2, &iov),
        IoStatus::Success
    );
    assert_eq!(&mem.read(1, 8192)[..], &data[3 * 4096..5 * 4096]);
    let fresh = pattern(8192, 99);
    mem.io_memory().copy_to_host(base + 1, &fresh).unwrap();
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Write, 10, 2, &iov),
        IoStatus::Success
    );
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Flush, 0, 0, &[]),
        IoStatus::Success
    );
    // Discard 1 MiB at 1 MiB: the loop driver punches it out of the backing file.
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Unmap, 256, 256, &[]),
        IoStatus::Success
    );
    drop(ch);
    let backing = File::open(&scratch.path).unwrap();
    assert_eq!(next_hole(&backing, 0).unwrap(), 1 << 20);
    let mut buf = vec![0u8; 8192];
    backing.read_exact_at(&mut buf, 10 * 4096).unwrap();
    assert_eq!(buf, fresh);
}

#[test]
fn uring_block_device_geometry_io_and_discard() {
    block_device_geometry_io_and_discard(FileEngine::Uring);
}

#[test]
fn aio_block_device_geometry_io_and_discard() {
    block_device_geometry_io_and_discard(FileEngine::Aio);
}

fn counters(bdev: &FileBdev) -> (u64, u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let s = bdev.stats();
    (
        s.zero_copy_ios.load(Relaxed),
        s.bounced_ios.load(Relaxed),
        s.short_ios.load(Relaxed),
    )
}

/// Reads the file's bytes with plain `pread` (through the page cache, which O_DIRECT writes
/// invalidate).
fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut out, offset)
        .unwrap();
    out
}

/// Buffers the kernel can take as they are (addresses and lengths on the file's direct-I/O
/// alignment) go to the file without a bounce buffer, in both directions, and land where they
/// should.
fn aligned_buffers_are_zero_copy(engine: FileEngine) {
    let scratch = Scratch::new(&disk_dir(), &format!("{engine:?}-zc"), 4 << 20);
    let bdev = FileBdev::open(config(&scratch.path, engine)).unwrap();
    assert!(
        bdev.o_direct(),
        "the test needs O_DIRECT on {}",
        scratch.path.display()
    );
    let align = bdev.direct_io_alignment();
    assert!(
        align.memory >= 1 && align.memory <= 4096 && align.offset >= 512,
        "{align:?}"
    );
    let mut ch = Arc::clone(&bdev).open_channel().unwrap();
    let mem = TestMemory::new(1 << 20);
    // 16 KiB at block 64 from three page-aligned buffers, out of order in memory.
    let data = pattern(16384, 9);
    mem.write(0x8000, &data[..4096]);
    mem.write(0x1000, &data[4096..12288]);
    mem.write(0x4_0000, &data[12288..]);
    let iovs = [
        mem.iov(0x8000, 4096),
        mem.iov(0x1000, 8192),
        mem.iov(0x4_0000, 4096),
    ];
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Write, 64, 32, &iovs),
        IoStatus::Success
    );
    assert_eq!(counters(&bdev), (1, 0, 0));
    assert_eq!(file_bytes(&scratch.path, 64 * 512, 16384), data);

    // Read it back into other aligned buffers.
    let back = [mem.iov(0x2_0000, 12288), mem.iov(0x6000, 4096)];
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Read, 64, 32, &back),
        IoStatus::Success
    );
    assert_eq!(counters(&bdev), (2, 0, 0));
    assert_eq!(mem.read(0x2_0000, 12288), data[..12288]);
    assert_eq!(mem.read(0x6000, 4096), data[12288..]);
    let info = bdev.driver_specific();
    let module = format!("{engine:?}").to_lowercase();
    assert_eq!(info[&module]["zero_copy_ios"], 2, "{info}");
    assert_eq!(info[&module]["bounced_ios"], 0, "{info}");
}

#[test]
fn uring_aligned_buffers_are_zero_copy() {
    aligned_buffers_are_zero_copy(FileEngine::Uring);
}

#[test]
fn aio_aligned_buffers_are_zero_copy() {
    aligned_buffers_are_zero_copy(FileEngine::Aio);
}

/// Buffers off the direct-I/O alignment are bounced (and counted); the bytes are right either way,
/// and a bounced read reaches its buffers only when its completion is polled: `submit` neither
/// waits for the file nor copies.
fn unaligned_buffers_bounce_and_reads_complete_at_poll(engine: FileEngine) {
    let scratch = Scratch::new(&disk_dir(), &format!("{engine:?}-bounce"), 4 << 20);
    let bdev = FileBdev::open(config(&scratch.path, engine)).unwrap();
    assert!(bdev.o_direct());
    let mut ch = Arc::clone(&bdev).open_channel().unwrap();
    let mem = TestMemory::new(1 << 20);
    let data = pattern(8192, 21);
    // One buffer at an odd address, one of an odd length.
    mem.write(0x1003, &data[..4096]);
    mem.write(0x9000, &data[4096..]);
    let iovs = [mem.iov(0x1003, 4096), mem.iov(0x9000, 4096)];
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Write, 8, 16, &iovs),
        IoStatus::Success
    );
    let odd_len = [mem.iov(0x3_0000, 1000), mem.iov(0x3_1000, 8192 - 1000)];
    mem.write(0x3_0000, &data[..1000]);
    mem.write(0x3_1000, &data[1000..]);
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Write, 40, 16, &odd_len),
        IoStatus::Success
    );
    assert_eq!(counters(&bdev), (0, 2, 0));
    assert_eq!(file_bytes(&scratch.path, 8 * 512, 8192), data);
    assert_eq!(file_bytes(&scratch.path, 40 * 512, 8192), data);

    // A bounced read: nothing lands in guest memory, and nothing completes, until polled.
    mem.fill(0x5_0001, 8192, 0xee);
    let back = [mem.iov(0x5_0001, 8192)];
    let io = BdevIo {
        kind: IoKind::Read,
        offset_blocks: 40,
        num_blocks: 16,
        iovs: &back,
        tag: 77,
        mem: mem.io_memory(),
    };
    ch.submit(&io).unwrap();
    assert_eq!(ch.in_flight(), 1);
    // Give the kernel time to finish the read itself: the copy-out still waits for the poll.
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(mem.read(0x5_0001, 8192).iter().all(|b| *b == 0xee));
    let mut status = None;
    for _ in 0..1_000_000 {
        ch.poll(&mut |tag, s| {
            assert_eq!(tag, 77);
            status = Some(s);
        });
        if status.is_some() {
            break;
        }
        std::thread::yield_now();
    }
    assert_eq!(status, Some(IoStatus::Success));
    assert_eq!(ch.in_flight(), 0);
    assert_eq!(mem.read(0x5_0001, 8192), data);
    assert_eq!(counters(&bdev), (0, 3, 0));
}

#[test]
fn uring_unaligned_buffers_bounce_and_reads_complete_at_poll() {
    unaligned_buffers_bounce_and_reads_complete_at_poll(FileEngine::Uring);
}

#[test]
fn aio_unaligned_buffers_bounce_and_reads_complete_at_poll() {
    unaligned_buffers_bounce_and_reads_complete_at_poll(FileEngine::Aio);
}

/// Buffered files, and tmpfs whether or not it was opened with `O_DIRECT` (Linux 6.6+ allows
/// it, still through the page cache), take any buffer as it is: zero copy even at odd addresses
/// and lengths.
#[test]
fn buffered_file_is_zero_copy_at_any_alignment() {
    for direct in [false, true] {
        buffered_zero_copy(direct);
    }
}

fn buffered_zero_copy(direct: bool) {
    let scratch = Scratch::new(Path::new("/dev/shm"), &format!("zc-shm-{direct}"), 1 << 20);
    let mut cfg = config(&scratch.path, FileEngine::Aio);
    cfg.direct = direct;
    let bdev = FileBdev::open(cfg).unwrap();
    if !direct {
        assert!(!bdev.o_direct());
    }
    assert_eq!(bdev.direct_io_alignment().memory, 1);
    let mut ch = Arc::clone(&bdev).open_channel().unwrap();
    let mem = TestMemory::new(1 << 16);
    let data = pattern(4096, 5);
    mem.write(0x101, &data[..333]);
    mem.write(0x2007, &data[333..]);
    let iovs = [mem.iov(0x101, 333), mem.iov(0x2007, 4096 - 333)];
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Write, 3, 8, &iovs),
        IoStatus::Success
    );
    assert_eq!(file_bytes(&scratch.path, 3 * 512, 4096), data);
    let back = [mem.iov(0x8003, 4096)];
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Read, 3, 8, &back),
        IoStatus::Success
    );
    assert_eq!(mem.read(0x8003, 4096), data);
    assert_eq!(counters(&bdev), (2, 0, 0));
    // Zero blocks: nothing to do, and no error.
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Read, 3, 0, &[]),
        IoStatus::Success
    );
    assert_eq!(
        run(&mut *ch, &mem, IoKind::Write, 3, 0, &[]),
        IoStatus::Success
    );
}

/// A zero-copy read cut short (the file ended inside the second buffer) resumes inside that
/// buffer and fills the rest of the list once the file has the data. Linux AIO on a buffered file
/// reads at `io_submit`, inside `submit`, so the file can be grown back between the short read
/// and its resumption, at the next poll.
#[test]
fn aio_short_zero_copy_read_resumes_across_buffers() {
    let scratch = Scratch::new(&disk_dir(), "aio-short-zc", 64 << 10);
    let mut cfg = config(&scratch.path, FileEngine::Aio);
    cfg.direct = false;
    let bdev = FileBdev::open(cfg).unwrap();
    let data = pattern(16384, 33);
    let file = OpenOptions::new().write(true).open(&scratch.path).unwrap();
    file.write_all_at(&data, 0).unwrap();
    // The file now ends 6000 bytes in, inside the second buffer.
    file.set_len(6000).unwrap();
    let mut ch = Arc::clone(&bdev).open_channel().unwrap();
    let mem = TestMemory::new(1 << 16);
    let iovs = [
        mem.iov(0x1000, 4096),
        mem.iov(0x4000, 8192),
        mem.iov(0xa000, 4096),
    ];
    let io = BdevIo {
        kind: IoKind::Read,
        offset_blocks: 0,
        num_blocks: 32,
        iovs: &iovs,
        tag: 5,
        mem: mem.io_memory(),
    };
    ch.submit(&io).unwrap();
    file.set_len(64 << 10).unwrap();
    file.write_all_at(&data, 0).unwrap();
    let mut status = None;
    for _ in 0..1_000_000 {
        ch.poll(&mut |_, s| status = Some(s));
        if status.is_some() {
            break;
        }
        std::thread::yield_now();
    }
    assert_eq!(status, Some(IoStatus::Success));
    assert_eq!(counters(&bdev), (1, 0, 1));
    assert_eq!(mem.read(0x1000, 4096), data[..4096]);
    assert_eq!(mem.read(0x4000, 8192), data[4096..12288]);
    assert_eq!(mem.read(0xa000, 4096), data[12288..]);
}
