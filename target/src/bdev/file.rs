//! Bdevs backed by a regular file or a kernel block device, driven asynchronously through
//! io_uring ([`super::uring`]) or Linux AIO ([`super::aio`]).
//!
//! Each reactor channel owns its own ring (or AIO context), polled from [`BdevChannel::poll`].
//! The file is opened with `O_DIRECT` when the filesystem allows it (tmpfs does not: buffered I/O
//! there, logged). Data moves through 4 KiB-aligned bounce buffers, which satisfy `O_DIRECT`
//! whatever the guest's buffer alignment; every bounced I/O is counted and reported in
//! `bdev_get_bdevs`' `driver_specific`.
//!
//! The bdev interface hands the guest memory to `submit` only, so a read has to be copied out
//! before `submit` returns: reads are submitted to the ring and waited for there, while writes,
//! flushes, discards and write-zeroes complete asynchronously at a later poll.
//!
//! Short transfers are resumed where they stopped; a transfer that makes no progress (the file
//! shrank underneath) or any error from the file (EIO, ENOSPC, ...) fails that request only, is
//! counted, and the bdev keeps serving.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rvhost_platform_linux::aio::AioContext;
use rvhost_platform_linux::uring::{
    block_device_geometry, is_on_tmpfs, AlignedBuf, FileCompletion, FileIoError, FileOp, Uring,
};

use super::malloc::{byte_range, check_iovs, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use super::{Bdev, BdevChannel, BdevError, BdevIo, HostMemoryAccess, IoKind, IoStatus, IoVec};

/// Operations each channel's ring (or AIO context) holds at once; more wait in the channel.
const ENGINE_DEPTH: u32 = 256;
/// Bytes of zeroes written per step when the filesystem cannot `FALLOC_FL_ZERO_RANGE`.
const ZERO_CHUNK: usize = 1 << 20;
/// Idle bounce buffers a channel keeps for reuse.
const SPARE_BUFFERS: usize = 32;

/// Which kernel interface a file bdev uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileEngine {
    /// io_uring (`bdev_uring_create`).
    Uring,
    /// Linux AIO (`bdev_aio_create`).
    Aio,
}

impl FileEngine {
    fn module_name(self) -> &'static str {
        match self {
            FileEngine::Uring => "uring",
            FileEngine::Aio => "aio",
        }
    }
}

/// How to create a file bdev.
#[derive(Debug, Clone)]
pub struct FileBdevConfig {
    /// Bdev name.
    pub name: String,
    /// Path of the file or block device.
    pub filename: PathBuf,
    /// Logical block size; `None` for the device's own (or 512 for a file).
    pub block_size: Option<u32>,
    /// Refuse writes.
    pub readonly: bool,
    /// AIO only: offer unmap and write-zeroes through `fallocate` (SPDK's `--fallocate`).
    /// io_uring bdevs always offer them.
    pub fallocate: bool,
    /// UUID.
    pub uuid: [u8; 16],
    /// The kernel interface.
    pub engine: FileEngine,
    /// Try `O_DIRECT` (tests turn it off to exercise buffered files on a real filesystem).
    pub direct: bool,
}

/// I/O statistics of one file bdev, across all channels.
#[derive(Debug, Default)]
pub struct FileBdevStats {
    /// I/Os that went through a bounce buffer.
    pub bounced_ios: AtomicU64,
    /// Requests failed because of an error from the file.
    pub io_errors: AtomicU64,
    /// Short reads/writes whose remainder was resubmitted.
    pub short_ios: AtomicU64,
}

/// A bdev on a file or block device.
#[derive(Debug)]
pub struct FileBdev {
    config: FileBdevConfig,
    file: Arc<File>,
    o_direct: bool,
    block_device: bool,
    block_size: u32,
    num_blocks: AtomicU64,
    removed: AtomicBool,
    stats: FileBdevStats,
}

fn backend(msg: String) -> BdevError {
    BdevError::Backend(msg)
}

fn open(path: &Path, readonly: bool, direct: bool) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(!readonly);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    options.open(path)
}

impl FileBdev {
    /// Opens the file and works out the geometry.
    pub fn open(config: FileBdevConfig) -> Result<Arc<Self>, BdevError> {
        let path = &config.filename;
        let shown = path.display();
        let (file, o_direct) = if config.direct {
            match open(path, config.readonly, true) {
                Ok(file) => (file, true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(bdev = %config.name, file = %shown,
                        "the filesystem refuses O_DIRECT (tmpfs?): using buffered I/O");
                    let file = open(path, config.readonly, false)
                        .map_err(|e| backend(format!("cannot open {shown}: {e}")))?;
                    (file, false)
                }
                Err(e) => return Err(backend(format!("cannot open {shown}: {e}"))),
            }
        } else {
            let file = open(path, config.readonly, false)
                .map_err(|e| backend(format!("cannot open {shown}: {e}")))?;
            (file, false)
        };
        let meta = file
            .metadata()
            .map_err(|e| backend(format!("cannot stat {shown}: {e}")))?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.file_type().is_file() {
            return Err(BdevError::InvalidParams(format!(
                "{shown} is neither a regular file nor a block device"
            )));
        }
        let (size, device_block) = if block_device {
            block_device_geometry(&file)
                .map_err(|e| backend(format!("cannot query block device {shown}: {e}")))?
        } else {
            (meta.len(), MIN_BLOCK_SIZE)
        };
        let block_size = config.block_size.unwrap_or(device_block);
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(BdevError::InvalidParams(format!(
                "block_size {block_size} must be a power of two from {MIN_BLOCK_SIZE} to \
                 {MAX_BLOCK_SIZE}"
            )));
        }
        if block_size < device_block {
            return Err(BdevError::InvalidParams(format!(
                "block_size {block_size} is smaller than the device's logical block size \
                 {device_block}"
            )));
        }
        if config.engine == FileEngine::Uring && is_on_tmpfs(&file).unwrap_or(false) {
            // Measured: ~5k IOPS through io-wq vs ~70k inline with AIO on a loaded two-core host.
            tracing::warn!(bdev = %config.name, file = %shown,
                "io_uring runs tmpfs I/O on a kernel worker thread (slow next to a polling \
                 reactor); bdev_aio_create serves this file faster");
        }
        let num_blocks = size / u64::from(block_size);
        if num_blocks == 0 {
            return Err(BdevError::InvalidParams(format!(
                "{shown} ({size} bytes) is smaller than one block of {block_size} bytes"
            )));
        }
        Ok(Arc::new(FileBdev {
            config,
            file: Arc::new(file),
            o_direct,
            block_device,
            block_size,
            num_blocks: AtomicU64::new(num_blocks),
            removed: AtomicBool::new(false),
            stats: FileBdevStats::default(),
        }))
    }

    /// Re-reads the size of the file or device (after it was resized); returns the new block
    /// count.
    pub fn rescan(&self) -> Result<u64, BdevError> {
        let shown = self.config.filename.display();
        let size = if self.block_device {
            block_device_geometry(&self.file)
                .map_err(|e| backend(format!("cannot query block device {shown}: {e}")))?
                .0
        } else {
            self.file
                .metadata()
                .map_err(|e| backend(format!("cannot stat {shown}: {e}")))?
                .len()
        };
        let blocks = size / u64::from(self.block_size);
        if blocks == 0 {
            return Err(backend(format!("{shown} shrank below one block")));
        }
        let old = self.num_blocks.swap(blocks, Ordering::AcqRel);
        if old != blocks {
            tracing::info!(bdev = %self.config.name, old, new = blocks, "file bdev resized");
        }
        Ok(blocks)
    }

    /// Refuses new I/O from now on (the bdev is being deleted).
    pub fn mark_removed(&self) {
        self.removed.store(true, Ordering::Release);
    }

    /// Whether the bdev has been deleted.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// The I/O counters.
    pub fn stats(&self) -> &FileBdevStats {
        &self.stats
    }

    /// Whether the file was opened with `O_DIRECT`.
    pub fn o_direct(&self) -> bool {
        self.o_direct
    }

    /// The path given at creation.
    pub fn filename(&self) -> &Path {
        &self.config.filename
    }

    /// The engine.
    pub fn engine(&self) -> FileEngine {
        self.config.engine
    }

    /// Whether the bdev refuses writes.
    pub fn readonly(&self) -> bool {
        self.config.readonly
    }

    /// The block size given at creation, if any.
    pub fn block_size_override(&self) -> Option<u32> {
        self.config.block_size
    }

    /// The AIO `fallocate` option.
    pub fn fallocate(&self) -> bool {
        self.config.fallocate
    }

    fn offers_fallocate(&self) -> bool {
        !self.config.readonly && (self.config.engine == FileEngine::Uring || self.config.fallocate)
    }
}

impl Bdev for FileBdev {
    fn name(&self) -> &str {
        &self.config.name
    }
    fn product_name(&self) -> &str {
        match self.config.engine {
            FileEngine::Uring => "URING bdev",
            FileEngine::Aio => "AIO disk",
        }
    }
    fn module_name(&self) -> &'static str {
        self.config.engine.module_name()
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks.load(Ordering::Acquire)
    }
    fn uuid(&self) -> [u8; 16] {
        self.config.uuid
    }
    fn supports(&self, kind: IoKind) -> bool {
        match kind {
            IoKind::Read => true,
            IoKind::Write | IoKind::Flush => !self.config.readonly,
            IoKind::Unmap | IoKind::WriteZeroes => self.offers_fallocate(),
        }
    }
    fn open_channel(self: Arc<Self>) -> Result<Box<dyn BdevChannel>, BdevError> {
        if self.removed.load(Ordering::Acquire) {
            return Err(BdevError::Removed(self.config.name.clone()));
        }
        let engine = match self.config.engine {
            FileEngine::Uring => {
                Engine::Uring(Box::new(Uring::new(ENGINE_DEPTH).map_err(setup_error)?))
            }
            FileEngine::Aio => Engine::Aio(AioContext::new(ENGINE_DEPTH).map_err(setup_error)?),
        };
        Ok(Box::new(FileChannel {
            bdev: self,
            engine,
            requests: Vec::new(),
            free_requests: Vec::new(),
            waiting: VecDeque::new(),
            spare: Vec::new(),
            read_buffer: None,
            completions: VecDeque::new(),
        }))
    }
    fn driver_specific(&self) -> serde_json::Value {
        let stats = &self.stats;
        let mut info = serde_json::json!({
            "filename": self.config.filename.display().to_string(),
            "block_size_override": self.config.block_size.is_some(),
            "o_direct": self.o_direct,
            "block_device": self.block_device,
            "bounced_ios": stats.bounced_ios.load(Ordering::Relaxed),
            "io_errors": stats.io_errors.load(Ordering::Relaxed),
            "short_ios": stats.short_ios.load(Ordering::Relaxed),
        });
        if self.config.engine == FileEngine::Aio {
            info["readonly"] = self.config.readonly.into();
            info["fallocate"] = self.config.fallocate.into();
        }
        serde_json::json!({ self.config.engine.module_name(): info })
    }
}

fn setup_error(e: FileIoError) -> BdevError {
    backend(format!("cannot open an I/O channel: {e}"))
}

enum Engine {
    Uring(Box<Uring>),
    Aio(AioContext),
}

impl Engine {
    fn submit(&mut self, op: FileOp, user_data: u64) -> Result<(), Box<(FileOp, FileIoError)>> {
        match self {
            Engine::Uring(r) => r.submit(op, user_data),
            Engine::Aio(a) => a.submit(op, user_data),
        }
    }
    fn reap(&mut self, done: &mut dyn FnMut(FileCompletion)) -> usize {
        match self {
            Engine::Uring(r) => r.reap(done),
            Engine::Aio(a) => a.reap(done),
        }
    }
    fn wait(&mut self, done: &mut dyn FnMut(FileCompletion)) -> usize {
        match self {
            Engine::Uring(r) => r.wait(done),
            Engine::Aio(a) => a.wait(done),
        }
    }
}

/// What a request is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Transferring data (read, write, or writing zeroes in steps).
    Data,
    /// One operation without data (fdatasync, fallocate, discard).
    Single,
    /// Finished: completion recorded.
    Done(IoStatus),
}

struct Request {
    tag: u64,
    kind: IoKind,
    /// File offset of the first byte.
    start: u64,
    /// Total bytes.
    len: usize,
    /// Bytes done.
    done: usize,
    /// Write-zeroes done by writing zero buffers (the filesystem lacks `ZERO_RANGE`).
    zero_writes: bool,
    phase: Phase,
}

/// One reactor's view of a [`FileBdev`].
struct FileChannel {
    bdev: Arc<FileBdev>,
    engine: Engine,
    requests: Vec<Option<Request>>,
    free_requests: Vec<usize>,
    /// Operations the engine had no room for, submitted at the next poll.
    waiting: VecDeque<(FileOp, u64)>,
    spare: Vec<AlignedBuf>,
    /// The buffer of the read that just finished, for `submit` to copy out.
    read_buffer: Option<(usize, AlignedBuf)>,
    completions: VecDeque<(u64, IoStatus)>,
}

impl FileChannel {
    fn buffer(&mut self, len: usize) -> Result<AlignedBuf, BdevError> {
        if let Some(i) = self.spare.iter().position(|b| b.len() >= len) {
            let mut buf = self.spare.swap_remove(i);
            // Zero-write buffers are taken from here too; keep them honest.
            buf.as_mut_slice()[..len].fill(0);
            return Ok(buf);
        }
        AlignedBuf::new(len).map_err(|e| backend(e.to_string()))
    }

    fn recycle(&mut self, buf: AlignedBuf) {
        if self.spare.len() < SPARE_BUFFERS {
            self.spare.push(buf);
        }
    }

    fn new_request(&mut self, request: Request) -> usize {
        match self.free_requests.pop() {
            Some(i) => {
                if let Some(slot) = self.requests.get_mut(i) {
                    *slot = Some(request);
                }
                i
            }
            None => {
                self.requests.push(Some(request));
                self.requests.len() - 1
            }
        }
    }

    fn finish(&mut self, index: usize, status: IoStatus) {
        if let Some(Some(req)) = self.requests.get_mut(index) {
            req.phase = Phase::Done(status);
            if req.kind != IoKind::Read {
                self.completions.push_back((req.tag, status));
                self.release(index);
            }
        }
    }

    fn release(&mut self, index: usize) {
        if let Some(slot) = self.requests.get_mut(index) {
            *slot = None;
            self.free_requests.push(index);
        }
    }

    fn push(&mut self, op: FileOp, index: usize) {
        if !self.waiting.is_empty() {
            self.waiting.push_back((op, index as u64));
            return;
        }
        if let Err(failed) = self.engine.submit(op, index as u64) {
            let (op, err) = *failed;
            match err {
                FileIoError::Full => self.waiting.push_back((op, index as u64)),
                other => {
                    tracing::warn!(bdev = %self.bdev.config.name, error = %other, "file I/O submission failed");
                    self.bdev.stats.io_errors.fetch_add(1, Ordering::Relaxed);
                    self.drop_op(op);
                    self.finish(index, IoStatus::Failed);
                }
            }
        }
    }

    fn drop_op(&mut self, op: FileOp) {
        if let FileOp::Read { buf, .. } | FileOp::Write { buf, .. } = op {
            self.recycle(buf);
        }
    }

    fn submit_waiting(&mut self) {
        while let Some((op, user_data)) = self.waiting.pop_front() {
            if let Err(failed) = self.engine.submit(op, user_data) {
                let (op, err) = *failed;
                if matches!(err, FileIoError::Full) {
                    self.waiting.push_front((op, user_data));
                    return;
                }
                tracing::warn!(bdev = %self.bdev.config.name, error = %err, "file I/O submission failed");
                self.bdev.stats.io_errors.fetch_add(1, Ordering::Relaxed);
                self.drop_op(op);
                self.finish(user_data as usize, IoStatus::Failed);
            }
        }
    }

    fn fail_with_errno(&mut self, index: usize, errno: i32) {
        self.bdev.stats.io_errors.fetch_add(1, Ordering::Relaxed);
        let err = std::io::Error::from_raw_os_error(errno);
        tracing::warn!(bdev = %self.bdev.config.name, error = %err, "file I/O failed");
        self.finish(index, IoStatus::Failed);
    }

    /// Advances the request a completion belongs to.
    fn on_completion(&mut self, c: FileCompletion) {
        let Ok(index) = usize::try_from(c.user_data) else {
            return;
        };
        let Some(Some(req)) = self.requests.get(index) else {
            tracing::error!(
                user_data = c.user_data,
                "completion for an unknown file request"
            );
            self.drop_op(c.op);
            return;
        };
        let (phase, kind) = (req.phase, req.kind);
        if phase == Phase::Single {
            let zero_range_unsupported = kind == IoKind::WriteZeroes
                && matches!(c.result, Err(e) if e == libc::EOPNOTSUPP || e == libc::EINVAL);
            match c.result {
                Ok(_) => self.finish(index, IoStatus::Success),
                Err(_) if zero_range_unsupported => {
                    // Some filesystems lack FALLOC_FL_ZERO_RANGE: write zeroes instead.
                    if let Some(Some(req)) = self.requests.get_mut(index) {
                        req.zero_writes = true;
                        req.phase = Phase::Data;
                    }
                    self.next_zero_chunk(index);
                }
                Err(errno) => self.fail_with_errno(index, errno),
            }
            return;
        }
        let (file, offset, buf, range, is_read) = match c.op {
            FileOp::Read {
                file,
                offset,
                buf,
                range,
            } => (file, offset, buf, range, true),
            FileOp::Write {
                file,
                offset,
                buf,
                range,
            } => (file, offset, buf, range, false),
            other => {
                self.drop_op(other);
                self.finish(index, IoStatus::Failed);
                return;
            }
        };
        match c.result {
            Err(libc::EAGAIN) | Err(libc::EINTR) => {
                let op = if is_read {
                    FileOp::Read {
                        file,
                        offset,
                        buf,
                        range,
                    }
                } else {
                    FileOp::Write {
                        file,
                        offset,
                        buf,
                        range,
                    }
                };
                self.push(op, index);
            }
            Err(errno) => {
                self.recycle(buf);
                self.fail_with_errno(index, errno);
            }
            Ok(0) => {
                // No progress: the file ended (shrank underneath) or the device is full.
                self.recycle(buf);
                let errno = if is_read { libc::EIO } else { libc::ENOSPC };
                self.fail_with_errno(index, errno);
            }
            Ok(n) => {
                let n = n.min(range.len());
                let (zero_writes, done, len) = match self.requests.get_mut(index) {
                    Some(Some(req)) => {
                        req.done = req.done.saturating_add(n);
                        (req.zero_writes, req.done, req.len)
                    }
                    _ => return,
                };
                if n < range.len() {
                    self.bdev.stats.short_ios.fetch_add(1, Ordering::Relaxed);
                    let rest = range.start + n..range.end;
                    let offset = offset.saturating_add(n as u64);
                    let op = if is_read {
                        FileOp::Read {
                            file,
                            offset,
                            buf,
                            range: rest,
                        }
                    } else {
                        FileOp::Write {
                            file,
                            offset,
                            buf,
                            range: rest,
                        }
                    };
                    self.push(op, index);
                } else if zero_writes && done < len {
                    self.recycle(buf);
                    self.next_zero_chunk(index);
                } else if is_read {
                    // The caller (inside `submit`) copies the data out of the buffer.
                    if let Some(Some(req)) = self.requests.get_mut(index) {
                        req.phase = Phase::Done(IoStatus::Success);
                    }
                    self.read_buffer = Some((index, buf));
                } else {
                    self.recycle(buf);
                    self.finish(index, IoStatus::Success);
                }
            }
        }
    }

    /// Writes the next chunk of zeroes of a write-zeroes request done by writing.
    fn next_zero_chunk(&mut self, index: usize) {
        let Some(Some(req)) = self.requests.get(index) else {
            return;
        };
        let remaining = req.len.saturating_sub(req.done);
        let offset = req.start.saturating_add(req.done as u64);
        let step = remaining.min(ZERO_CHUNK);
        match self.buffer(step) {
            Ok(buf) => {
                let op = FileOp::Write {
                    file: Arc::clone(&self.bdev.file),
                    offset,
                    buf,
                    range: 0..step,
                };
                self.push(op, index);
            }
            Err(_) => self.fail_with_errno(index, libc::ENOMEM),
        }
    }

    fn reap_into_requests(&mut self, block: bool) -> usize {
        let mut finished = Vec::new();
        let n = if block {
            self.engine.wait(&mut |c| finished.push(c))
        } else {
            self.engine.reap(&mut |c| finished.push(c))
        };
        for c in finished {
            self.on_completion(c);
        }
        n
    }

    /// Starts `io`; a read is also waited for and copied out before this returns.
    fn start(&mut self, io: &BdevIo<'_>, mem: &dyn HostMemoryAccess) -> Result<(), BdevError> {
        let bdev = Arc::clone(&self.bdev);
        let num_blocks = bdev.num_blocks();
        let (start, len) = byte_range(io, num_blocks, bdev.block_size)?;
        let too_big = || BdevError::OutOfRange {
            offset: io.offset_blocks,
            count: io.num_blocks,
            capacity: num_blocks,
        };
        let len_usize = usize::try_from(len).map_err(|_| too_big())?;
        if !bdev.supports(io.kind) {
            self.completions.push_back((io.tag, IoStatus::Unsupported));
            return Ok(());
        }
        let request = |phase| Request {
            tag: io.tag,
            kind: io.kind,
            start,
            len: len_usize,
            done: 0,
            zero_writes: false,
            phase,
        };
        let file = Arc::clone(&bdev.file);
        match io.kind {
            IoKind::Read | IoKind::Write => {
                check_iovs(io, len, num_blocks)?;
                if u32::try_from(len_usize).is_err() {
                    return Err(too_big());
                }
                let mut buf = self.buffer(len_usize)?;
                if io.kind == IoKind::Write {
                    let mut pos = 0usize;
                    for iov in io.iovs {
                        let end = pos.checked_add(iov.len as usize).ok_or_else(too_big)?;
                        let dst = buf.as_mut_slice().get_mut(pos..end).ok_or_else(too_big)?;
                        if let Err(e) = mem.copy_from_host(iov.addr, dst) {
                            self.recycle(buf);
                            return Err(BdevError::Memory(e));
                        }
                        pos = end;
                    }
                }
                bdev.stats.bounced_ios.fetch_add(1, Ordering::Relaxed);
                let index = self.new_request(request(Phase::Data));
                let op = if io.kind == IoKind::Read {
                    FileOp::Read {
                        file,
                        offset: start,
                        buf,
                        range: 0..len_usize,
                    }
                } else {
                    FileOp::Write {
                        file,
                        offset: start,
                        buf,
                        range: 0..len_usize,
                    }
                };
                self.push(op, index);
                if io.kind == IoKind::Read {
                    return self.finish_read(index, io.iovs, mem);
                }
            }
            IoKind::Flush => {
                let index = self.new_request(request(Phase::Single));
                self.push(FileOp::DataSync { file }, index);
            }
            IoKind::Unmap | IoKind::WriteZeroes => {
                if len == 0 {
                    self.completions.push_back((io.tag, IoStatus::Success));
                    return Ok(());
                }
                let index = self.new_request(request(Phase::Single));
                let op = if io.kind == IoKind::Unmap && bdev.block_device {
                    FileOp::BlockDiscard {
                        file,
                        offset: start,
                        len,
                    }
                } else {
                    let mode = if io.kind == IoKind::Unmap {
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                    } else {
                        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                    };
                    FileOp::Fallocate {
                        file,
                        mode,
                        offset: start,
                        len,
                    }
                };
                self.push(op, index);
            }
        }
        Ok(())
    }

    /// Waits for the read in request `index` and copies its data to the caller's buffers.
    fn finish_read(
        &mut self,
        index: usize,
        iovs: &[IoVec],
        mem: &dyn HostMemoryAccess,
    ) -> Result<(), BdevError> {
        loop {
            let phase = match self.requests.get(index) {
                Some(Some(req)) => req.phase,
                _ => return Ok(()),
            };
            if let Phase::Done(status) = phase {
                let tag = match self.requests.get(index) {
                    Some(Some(req)) => req.tag,
                    _ => return Ok(()),
                };
                self.release(index);
                let mut status = status;
                if status == IoStatus::Success {
                    match self.read_buffer.take() {
                        Some((i, buf)) if i == index => {
                            let mut pos = 0usize;
                            for iov in iovs {
                                let end = pos.saturating_add(iov.len as usize);
                                let copied = buf
                                    .as_slice()
                                    .get(pos..end)
                                    .map(|src| mem.copy_to_host(iov.addr, src));
                                if !matches!(copied, Some(Ok(()))) {
                                    status = IoStatus::Failed;
                                    break;
                                }
                                pos = end;
                            }
                            self.recycle(buf);
                        }
                        other => {
                            self.read_buffer = other;
                            status = IoStatus::Failed;
                        }
                    }
                }
                self.completions.push_back((tag, status));
                return Ok(());
            }
            self.submit_waiting();
            self.reap_into_requests(true);
        }
    }
}

impl BdevChannel for FileChannel {
    fn submit(&mut self, io: &BdevIo<'_>) -> Result<(), BdevError> {
        let mem: &dyn HostMemoryAccess = &**io.mem;
        if self.bdev.removed.load(Ordering::Acquire) {
            return Err(BdevError::Removed(self.bdev.config.name.clone()));
        }
        self.start(io, mem)
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, IoStatus)) -> usize {
        self.submit_waiting();
        self.reap_into_requests(false);
        let mut count = 0;
        while let Some((tag, status)) = self.completions.pop_front() {
            done(tag, status);
            count += 1;
        }
        count
    }

    fn in_flight(&self) -> usize {
        self.requests.iter().filter(|r| r.is_some()).count() + self.completions.len()
    }
}
