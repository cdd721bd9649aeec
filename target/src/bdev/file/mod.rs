//! Bdevs backed by a regular file or a kernel block device, driven asynchronously through
//! io_uring ([`super::uring`]) or Linux AIO ([`super::aio`]).
//!
//! Each reactor channel owns its own ring (or AIO context), polled from [`BdevChannel::poll`];
//! `submit` never waits for the file. The file is opened with `O_DIRECT` when the filesystem
//! allows it (tmpfs before Linux 6.6 does not: buffered I/O there, logged). io_uring hands every
//! tmpfs read and write to a kernel worker thread, so a uring channel on tmpfs does its reads and
//! writes inline (`pread`/`pwritev`, a memcpy to or from the page cache) and reports them at the
//! next poll.
//!
//! Reads and writes go straight between the file and the I/O's buffers (vectored, zero copy) when
//! the kernel can take them: always for buffered files, and for `O_DIRECT` when every buffer's
//! address is a multiple of the file's direct-I/O memory alignment and its length a multiple of the
//! offset alignment (`statx` `STATX_DIOALIGN`, else the logical block size). The op holds a clone
//! of the I/O's memory until it completes. Other I/Os go through 4 KiB-aligned bounce buffers; a
//! bounced read is copied out to the I/O's buffers when its completion is polled. Both kinds are
//! counted (`zero_copy_ios`, `bounced_ios` in `bdev_get_bdevs`' `driver_specific`).
//!
//! Short transfers are resumed where they stopped; a transfer that makes no progress (the file
//! shrank underneath) or any error from the file (EIO, ENOSPC, ...) fails that request only, is
//! counted, and the bdev keeps serving.

pub(crate) mod modules;

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rvhost_platform_linux::aio::AioContext;
use rvhost_platform_linux::cpu::CpuSet;
use rvhost_platform_linux::uring::{
    block_device_geometry, direct_io_alignment, is_on_tmpfs, AlignedBuf, DirectIoAlignment,
    FileCompletion, FileIoError, FileOp, HostBuffers, SpareIovecs, Uring, MAX_IOVECS,
};

use super::common::{byte_range, check_block_size, check_iovs, MIN_BLOCK_SIZE};
use super::{
    report_completions, Bdev, BdevChannel, BdevError, BdevIo, IoKind, IoMemory, IoStatus, IoVec,
};

/// Operations each channel's ring (or AIO context) holds at once; more wait in the channel.
const ENGINE_DEPTH: u32 = 256;
/// Bytes of zeroes written per step when the filesystem cannot `FALLOC_FL_ZERO_RANGE`.
const ZERO_CHUNK: usize = 1 << 20;
/// Idle bounce buffers (and iovec arrays) a channel keeps for reuse.
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
    /// io_uring only: the cores its kernel worker threads may run on (`None`: the kernel's
    /// default, the submitting reactor's core). rvhost passes the cores without reactors.
    pub worker_cores: Option<CpuSet>,
}

/// I/O statistics of one file bdev, across all channels.
#[derive(Debug, Default)]
pub struct FileBdevStats {
    /// Reads and writes that went through a bounce buffer.
    pub bounced_ios: AtomicU64,
    /// Reads and writes done straight on the I/O's buffers.
    pub zero_copy_ios: AtomicU64,
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
    /// What a buffer must satisfy to be handed to the kernel as it is.
    dio_align: DirectIoAlignment,
    /// The file is on tmpfs (a uring channel runs its reads and writes inline there).
    on_tmpfs: bool,
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
        check_block_size(block_size)?;
        if block_size < device_block {
            return Err(BdevError::InvalidParams(format!(
                "block_size {block_size} is smaller than the device's logical block size \
                 {device_block}"
            )));
        }
        // A device node's own filesystem (devtmpfs) says nothing about where its data lives.
        let on_tmpfs = !block_device && is_on_tmpfs(&file).unwrap_or(false);
        if config.engine == FileEngine::Uring && on_tmpfs {
            tracing::info!(bdev = %config.name, file = %shown,
                "tmpfs: reads and writes run inline (io_uring would hand each to a kernel \
                 worker thread)");
        }
        // tmpfs takes O_DIRECT (Linux 6.6+) but still copies through its page cache, so any
        // address and length does.
        let dio_align = if o_direct && !on_tmpfs {
            match direct_io_alignment(&file) {
                Ok(Some(align)) => align,
                Ok(None) | Err(_) => DirectIoAlignment {
                    memory: device_block,
                    offset: device_block,
                },
            }
        } else {
            // The page cache takes any address and length.
            DirectIoAlignment {
                memory: 1,
                offset: 1,
            }
        };
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
            dio_align,
            on_tmpfs,
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

    /// The alignment a buffer needs to be read or written without a bounce buffer (1 when the
    /// file is not opened with `O_DIRECT`).
    pub fn direct_io_alignment(&self) -> DirectIoAlignment {
        self.dio_align
    }

    /// Whether the kernel can take `iovs` as they are (zero copy).
    fn takes_as_is(&self, iovs: &[IoVec]) -> bool {
        let (mem, len) = (
            u64::from(self.dio_align.memory.max(1)),
            self.dio_align.offset.max(1),
        );
        !iovs.is_empty()
            && iovs.len() <= MAX_IOVECS
            && iovs
                .iter()
                .all(|v| v.addr % mem == 0 && v.len % len == 0 && v.len > 0)
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
                let mut ring = Uring::new(ENGINE_DEPTH).map_err(setup_error)?;
                if let Some(cores) = &self.config.worker_cores {
                    // Not fatal: the ring works with the kernel's default placement.
                    if let Err(err) = ring.set_worker_cores(cores) {
                        tracing::warn!(bdev = %self.config.name, %cores, %err, "cannot move io_uring workers off the reactor cores");
                    }
                }
                // Measured on this host: ~5k IOPS through io-wq workers vs ~70k inline.
                ring.set_inline_rw(self.on_tmpfs);
                Engine::Uring(Box::new(ring))
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
            spare_iovecs: Vec::new(),
            completions: VecDeque::new(),
            active: 0,
        }))
    }
    fn driver_specific(&self) -> serde_json::Value {
        let stats = &self.stats;
        let mut info = serde_json::json!({
            "filename": self.config.filename.display().to_string(),
            "block_size_override": self.config.block_size.is_some(),
            "o_direct": self.o_direct,
            "block_device": self.block_device,
            "tmpfs": self.on_tmpfs,
            "io_worker_cores": self.config.worker_cores.map(|c| c.to_string()),
            "dio_mem_align": self.dio_align.memory,
            "dio_offset_align": self.dio_align.offset,
            "bounced_ios": stats.bounced_ios.load(Ordering::Relaxed),
            "zero_copy_ios": stats.zero_copy_ios.load(Ordering::Relaxed),
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
}

/// What a request is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Transferring data (read, write, or writing zeroes in steps).
    Data,
    /// One operation without data (fdatasync, fallocate, discard).
    Single,
}

/// Where a bounced read's data goes once the file has filled the bounce buffer.
struct CopyOut {
    /// The I/O's memory, kept mapped until the copy is done.
    mem: IoMemory,
    iovs: Vec<IoVec>,
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
    copy_out: Option<CopyOut>,
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
    spare_iovecs: Vec<SpareIovecs>,
    completions: VecDeque<(u64, IoStatus)>,
    /// Requests in `requests` (the reactor asks every round; counting the slots was measurable).
    active: usize,
}

/// How one read or write op ended, whichever kind of buffer it used.
enum Transfer {
    /// Retry the same op (EAGAIN, EINTR).
    Again,
    /// Failed with this errno.
    Failed(i32),
    /// `n` bytes moved (at most what was asked).
    Moved(usize),
}

fn transfer(result: Result<usize, i32>, asked: usize, is_read: bool) -> Transfer {
    match result {
        Err(libc::EAGAIN) | Err(libc::EINTR) => Transfer::Again,
        Err(errno) => Transfer::Failed(errno),
        // No progress: the file ended (shrank underneath) or the device is full.
        Ok(0) => Transfer::Failed(if is_read { libc::EIO } else { libc::ENOSPC }),
        Ok(n) => Transfer::Moved(n.min(asked)),
    }
}

impl FileChannel {
    fn buffer(&mut self, len: usize) -> Result<AlignedBuf, BdevError> {
        if let Some(i) = self.spare.iter().position(|b| b.len() >= len) {
            let mut buf = self.spare.swap_remove(i);
            // Zero-write buffers are taken from here too; keep them honest.
            if let Some(head) = buf.as_mut_slice().get_mut(..len) {
                head.fill(0);
            }
            return Ok(buf);
        }
        AlignedBuf::new(len).map_err(|e| backend(e.to_string()))
    }

    fn recycle(&mut self, buf: AlignedBuf) {
        if self.spare.len() < SPARE_BUFFERS {
            self.spare.push(buf);
        }
    }

    fn recycle_iovecs(&mut self, bufs: HostBuffers) {
        // Dropping `bufs` here releases its hold on the I/O's memory.
        let spare = bufs.into_spare();
        if self.spare_iovecs.len() < SPARE_BUFFERS {
            self.spare_iovecs.push(spare);
        }
    }

    fn new_request(&mut self, request: Request) -> usize {
        self.active += 1;
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

    /// Records the completion of request `index` and frees its slot (and its memory handle).
    fn finish(&mut self, index: usize, status: IoStatus) {
        if let Some(slot) = self.requests.get_mut(index) {
            if let Some(req) = slot.take() {
                self.completions.push_back((req.tag, status));
                self.free_requests.push(index);
                self.active = self.active.saturating_sub(1);
            }
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
        match op {
            FileOp::Read { buf, .. } | FileOp::Write { buf, .. } => self.recycle(buf),
            FileOp::ReadV { bufs, .. } | FileOp::WriteV { bufs, .. } => self.recycle_iovecs(bufs),
            FileOp::DataSync { .. } | FileOp::Fallocate { .. } | FileOp::BlockDiscard { .. } => {}
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

    /// Adds `n` transferred bytes to request `index`; returns (zero_writes, done, len).
    fn progress(&mut self, index: usize, n: usize) -> Option<(bool, usize, usize)> {
        let req = self.requests.get_mut(index)?.as_mut()?;
        req.done = req.done.saturating_add(n);
        Some((req.zero_writes, req.done, req.len))
    }

    /// Advances the request a completion belongs to.
    fn on_completion(&mut self, c: FileCompletion) {
        let Ok(index) = usize::try_from(c.user_data) else {
            self.drop_op(c.op);
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
        match c.op {
            FileOp::Read {
                file,
                offset,
                buf,
                range,
            } => self.on_bounced(index, c.result, (file, offset, buf, range), true),
            FileOp::Write {
                file,
                offset,
                buf,
                range,
            } => self.on_bounced(index, c.result, (file, offset, buf, range), false),
            FileOp::ReadV { file, offset, bufs } => {
                self.on_vectored(index, c.result, (file, offset, bufs), true)
            }
            FileOp::WriteV { file, offset, bufs } => {
                self.on_vectored(index, c.result, (file, offset, bufs), false)
            }
            other => {
                self.drop_op(other);
                self.finish(index, IoStatus::Failed);
            }
        }
    }

    /// A read or write through a bounce buffer (or a write-zeroes step) finished.
    fn on_bounced(
        &mut self,
        index: usize,
        result: Result<usize, i32>,
        (file, offset, buf, range): (Arc<File>, u64, AlignedBuf, std::ops::Range<usize>),
        is_read: bool,
    ) {
        let rebuild = |offset, buf, range| {
            if is_read {
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
            }
        };
        match transfer(result, range.len(), is_read) {
            Transfer::Again => self.push(rebuild(offset, buf, range), index),
            Transfer::Failed(errno) => {
                self.recycle(buf);
                self.fail_with_errno(index, errno);
            }
            Transfer::Moved(n) => {
                let Some((zero_writes, done, len)) = self.progress(index, n) else {
                    self.recycle(buf);
                    return;
                };
                if n < range.len() {
                    self.bdev.stats.short_ios.fetch_add(1, Ordering::Relaxed);
                    let rest = range.start + n..range.end;
                    self.push(rebuild(offset.saturating_add(n as u64), buf, rest), index);
                } else if zero_writes && done < len {
                    self.recycle(buf);
                    self.next_zero_chunk(index);
                } else if is_read {
                    let status = self.copy_out(index, &buf);
                    self.recycle(buf);
                    self.finish(index, status);
                } else {
                    self.recycle(buf);
                    self.finish(index, IoStatus::Success);
                }
            }
        }
    }

    /// A zero-copy read or write finished; a short one resumes at the first byte not moved.
    fn on_vectored(
        &mut self,
        index: usize,
        result: Result<usize, i32>,
        (file, offset, mut bufs): (Arc<File>, u64, HostBuffers),
        is_read: bool,
    ) {
        let rebuild = |offset, bufs| {
            if is_read {
                FileOp::ReadV { file, offset, bufs }
            } else {
                FileOp::WriteV { file, offset, bufs }
            }
        };
        let asked = bufs.remaining();
        match transfer(result, asked, is_read) {
            Transfer::Again => self.push(rebuild(offset, bufs), index),
            Transfer::Failed(errno) => {
                self.recycle_iovecs(bufs);
                self.fail_with_errno(index, errno);
            }
            Transfer::Moved(n) => {
                if self.progress(index, n).is_none() {
                    self.recycle_iovecs(bufs);
                    return;
                }
                if n < asked {
                    self.bdev.stats.short_ios.fetch_add(1, Ordering::Relaxed);
                    bufs.advance(n);
                    self.push(rebuild(offset.saturating_add(n as u64), bufs), index);
                } else {
                    self.recycle_iovecs(bufs);
                    self.finish(index, IoStatus::Success);
                }
            }
        }
    }

    /// Copies a finished bounced read to the I/O's buffers.
    fn copy_out(&mut self, index: usize, buf: &AlignedBuf) -> IoStatus {
        let Some(Some(req)) = self.requests.get_mut(index) else {
            return IoStatus::Failed;
        };
        let Some(out) = req.copy_out.take() else {
            return IoStatus::Failed;
        };
        let mut pos = 0usize;
        for iov in &out.iovs {
            let end = pos.saturating_add(iov.len as usize);
            let copied = buf
                .as_slice()
                .get(pos..end)
                .map(|src| out.mem.copy_to_host(iov.addr, src));
            if !matches!(copied, Some(Ok(()))) {
                tracing::warn!(bdev = %self.bdev.config.name, addr = iov.addr,
                    "cannot copy a read to its buffer");
                return IoStatus::Failed;
            }
            pos = end;
        }
        IoStatus::Success
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

    fn reap_into_requests(&mut self) -> usize {
        let mut finished = Vec::new();
        let n = self.engine.reap(&mut |c| finished.push(c));
        for c in finished {
            self.on_completion(c);
        }
        n
    }

    /// Starts a read or write: straight on the I/O's buffers when the kernel takes them as they
    /// are, else through a bounce buffer.
    fn start_transfer(
        &mut self,
        io: &BdevIo<'_>,
        request: Request,
        start: u64,
        len: usize,
    ) -> Result<(), BdevError> {
        let bdev = Arc::clone(&self.bdev);
        let file = Arc::clone(&bdev.file);
        let is_read = io.kind == IoKind::Read;
        if bdev.takes_as_is(io.iovs) {
            let spare = self.spare_iovecs.pop().unwrap_or_default();
            let buffers = io.iovs.iter().map(|v| (v.addr, v.len as usize));
            match HostBuffers::new(io.mem, buffers, spare) {
                Some(Ok(bufs)) => {
                    bdev.stats.zero_copy_ios.fetch_add(1, Ordering::Relaxed);
                    let index = self.new_request(request);
                    let op = if is_read {
                        FileOp::ReadV {
                            file,
                            offset: start,
                            bufs,
                        }
                    } else {
                        FileOp::WriteV {
                            file,
                            offset: start,
                            bufs,
                        }
                    };
                    self.push(op, index);
                    return Ok(());
                }
                Some(Err(e)) => return Err(BdevError::Memory(e)),
                // The memory cannot prove its mappings to the kernel side: copy through it.
                None => {}
            }
        }
        let mut buf = self.buffer(len)?;
        if !is_read {
            let mut pos = 0usize;
            for iov in io.iovs {
                let end = pos.saturating_add(iov.len as usize);
                let Some(dst) = buf.as_mut_slice().get_mut(pos..end) else {
                    self.recycle(buf);
                    return Err(BdevError::InvalidParams(
                        "I/O vectors longer than the transfer".into(),
                    ));
                };
                if let Err(e) = io.mem.copy_from_host(iov.addr, dst) {
                    self.recycle(buf);
                    return Err(BdevError::Memory(e));
                }
                pos = end;
            }
        }
        bdev.stats.bounced_ios.fetch_add(1, Ordering::Relaxed);
        let mut request = request;
        if is_read {
            request.copy_out = Some(CopyOut {
                mem: Arc::clone(io.mem),
                iovs: io.iovs.to_vec(),
            });
        }
        let index = self.new_request(request);
        let op = if is_read {
            FileOp::Read {
                file,
                offset: start,
                buf,
                range: 0..len,
            }
        } else {
            FileOp::Write {
                file,
                offset: start,
                buf,
                range: 0..len,
            }
        };
        self.push(op, index);
        Ok(())
    }

    /// Starts `io`; its completion is reported by a later poll.
    fn start(&mut self, io: &BdevIo<'_>) -> Result<(), BdevError> {
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
            copy_out: None,
        };
        let file = Arc::clone(&bdev.file);
        match io.kind {
            IoKind::Read | IoKind::Write => {
                check_iovs(io, len, num_blocks)?;
                if u32::try_from(len_usize).is_err() {
                    return Err(too_big());
                }
                if len == 0 {
                    // Nothing to move; a zero-byte transfer would read as "no progress".
                    self.completions.push_back((io.tag, IoStatus::Success));
                    return Ok(());
                }
                self.start_transfer(io, request(Phase::Data), start, len_usize)?;
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
}

impl BdevChannel for FileChannel {
    fn submit(&mut self, io: &BdevIo<'_>) -> Result<(), BdevError> {
        if self.bdev.removed.load(Ordering::Acquire) {
            return Err(BdevError::Removed(self.bdev.config.name.clone()));
        }
        self.start(io)
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, IoStatus)) -> usize {
        self.submit_waiting();
        self.reap_into_requests();
        report_completions(&mut self.completions, done)
    }

    fn in_flight(&self) -> usize {
        self.active + self.completions.len()
    }
}
