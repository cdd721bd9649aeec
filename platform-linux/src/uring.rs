//! Asynchronous file I/O through io_uring, behind a safe API that owns every buffer in flight.
//!
//! The kernel reads and writes a buffer of a submitted operation until its completion arrives, so
//! no safe caller may hold (or free) it meanwhile. [`Uring::submit`] therefore takes the whole
//! [`FileOp`] by value — buffer and `Arc<File>` included — keeps it in a slot, and hands it back in
//! the [`FileCompletion`]. Dropping a [`Uring`] waits for everything still in flight before the
//! slots are freed.
//!
//! Zero copy: [`HostBuffers`] names buffers in memory the engine does not own (a guest's memory
//! table). Each buffer is proven to lie inside a mapping of its [`HostMemory`] owner
//! ([`HostMemory::checked_range`]), and the op holds a clone of the owner's `Arc` until its
//! completion is reaped, so the mapping cannot go away while the kernel reads or writes it.
//!
//! The types shared with the Linux AIO engine ([`crate::aio`]) live here too: [`AlignedBuf`]
//! (4 KiB-aligned, usable for `O_DIRECT`), [`HostBuffers`], [`FileOp`], [`FileCompletion`],
//! [`FileIoError`], and the block-device queries and `BLKDISCARD`.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::cpu::CpuSet;
use io_uring::{opcode, types, IoUring};
use rvhost_core::mem::MemError;

use crate::host::HostMemory;

/// Alignment of [`AlignedBuf`]: enough for `O_DIRECT` on any logical block size up to 4 KiB.
pub const BUFFER_ALIGN: usize = 4096;

/// Errors of the file I/O engines.
#[derive(Debug, thiserror::Error)]
pub enum FileIoError {
    /// Creating the ring or AIO context failed (io_uring disabled, seccomp, limits).
    #[error("cannot set up {engine}: {source}")]
    Setup {
        /// `io_uring` or `Linux AIO`.
        engine: &'static str,
        /// The system call's error.
        source: io::Error,
    },
    /// Every slot is in use; retry after reaping completions.
    #[error("the submission queue is full")]
    Full,
    /// A read/write range does not lie inside its buffer or is too long for one request.
    #[error("I/O range {start}..{end} does not fit a buffer of {buf_len} bytes")]
    BadRange {
        /// Range start.
        start: usize,
        /// Range end.
        end: usize,
        /// Buffer length.
        buf_len: usize,
    },
    /// The kernel refused the submission.
    #[error("submission failed: {0}")]
    Submit(io::Error),
    /// An aligned buffer could not be allocated.
    #[error("cannot allocate an aligned buffer of {0} bytes")]
    Alloc(usize),
}

/// A zeroed heap buffer aligned to [`BUFFER_ALIGN`], its length a multiple of it.
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively (like a `Box<[u8]>`); nothing else refers
// to it, so moving it to another thread is sound.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of at least `min_len` bytes (rounded up to [`BUFFER_ALIGN`], at least one unit).
    pub fn new(min_len: usize) -> Result<Self, FileIoError> {
        let len = min_len
            .max(1)
            .checked_next_multiple_of(BUFFER_ALIGN)
            .ok_or(FileIoError::Alloc(min_len))?;
        let layout =
            Layout::from_size_align(len, BUFFER_ALIGN).map_err(|_| FileIoError::Alloc(len))?;
        // SAFETY: `layout` has a non-zero size (len >= BUFFER_ALIGN).
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(FileIoError::Alloc(len))?;
        Ok(AlignedBuf { ptr, len })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (a buffer has at least [`BUFFER_ALIGN`] bytes).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points at `len` initialised (zeroed at allocation) bytes owned by `self`;
        // the shared borrow of `self` prevents mutation through `as_mut_slice` meanwhile, and the
        // kernel only touches the buffer while a `FileOp` owning it is in an engine.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, with exclusivity from `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub(crate) fn checked_ptr(&self, range: &Range<usize>) -> Result<*mut u8, FileIoError> {
        let bad = || FileIoError::BadRange {
            start: range.start,
            end: range.end,
            buf_len: self.len,
        };
        if range.start > range.end || range.end > self.len {
            return Err(bad());
        }
        // The range lies inside the allocation, checked above.
        Ok(self.ptr.as_ptr().wrapping_add(range.start))
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Ok(layout) = Layout::from_size_align(self.len, BUFFER_ALIGN) {
            // SAFETY: allocated in `new` with exactly this layout, freed once.
            unsafe { dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

/// Most buffers one vectored operation may name (`IOV_MAX`; the kernel refuses more).
pub const MAX_IOVECS: usize = 1024;

/// An empty iovec array whose allocation is reused by the next [`HostBuffers`] (no allocation per
/// I/O once a channel has warmed up).
#[derive(Debug, Default)]
pub struct SpareIovecs(Vec<libc::iovec>);

// SAFETY: the vector is always empty (cleared when made from a `HostBuffers`), so it holds no
// pointer at all, only an allocation.
unsafe impl Send for SpareIovecs {}

/// Buffers by host address inside memory owned elsewhere (guest memory), for a vectored read or
/// write straight into them. Holds the owner alive for as long as it exists.
pub struct HostBuffers {
    /// Keeps the memory every `iovecs` entry points into mapped.
    _owner: Box<dyn std::any::Any + Send + Sync>,
    iovecs: Vec<libc::iovec>,
    /// The first entry not yet fully transferred (a short transfer resumes there).
    first: usize,
}

// SAFETY: the raw pointers in `iovecs` point into memory kept mapped by `_owner` (which is Send +
// Sync); they are only handed to the kernel, never dereferenced by this crate, so moving the
// value to another thread cannot create a data race in Rust code.
unsafe impl Send for HostBuffers {}

impl std::fmt::Debug for HostBuffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuffers")
            .field("count", &self.iovecs.len())
            .field("first", &self.first)
            .field("remaining", &self.remaining())
            .finish_non_exhaustive()
    }
}

impl HostBuffers {
    /// Checks that every `(host address, length)` in `buffers` lies inside a mapping of `owner`
    /// and keeps a clone of `owner`. `None` when `owner` cannot prove its mappings (a
    /// [`HostMemory`] from outside this crate, which must be copied through instead) or there are
    /// more than [`MAX_IOVECS`] buffers. `spare` is a vector to reuse (see
    /// [`HostBuffers::into_spare`]).
    pub fn new<M>(
        owner: &Arc<M>,
        buffers: impl IntoIterator<Item = (u64, usize)>,
        spare: SpareIovecs,
    ) -> Option<Result<Self, MemError>>
    where
        M: HostMemory + ?Sized + 'static,
    {
        let mut spare = spare.0;
        spare.clear();
        for (addr, len) in buffers {
            if spare.len() >= MAX_IOVECS {
                return None;
            }
            // A host address is the pointer itself; the owner has just proven the range mapped.
            match owner.checked_range(addr, len)? {
                Ok(_) => spare.push(libc::iovec {
                    iov_base: addr as usize as *mut libc::c_void,
                    iov_len: len,
                }),
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(HostBuffers {
            _owner: Box::new(Arc::clone(owner)),
            iovecs: spare,
            first: 0,
        }))
    }

    /// Bytes not yet transferred.
    pub fn remaining(&self) -> usize {
        self.pending().iter().map(|v| v.iov_len).sum()
    }

    /// Number of buffers still to transfer.
    pub fn count(&self) -> usize {
        self.pending().len()
    }

    /// Marks `n` more bytes as transferred (after a short read or write), so the next
    /// submission resumes right after them.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(v) = self.iovecs.get_mut(self.first) else {
                return;
            };
            if n < v.iov_len {
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
                v.iov_len -= n;
                return;
            }
            n -= v.iov_len;
            self.first += 1;
        }
    }

    /// Gives up the owner and returns the vector for reuse.
    pub fn into_spare(self) -> SpareIovecs {
        let mut v = self.iovecs;
        v.clear();
        SpareIovecs(v)
    }

    /// The buffers not yet transferred, as `iovec`s for a library that reads or writes them
    /// asynchronously (librbd); they stay valid while `self` lives.
    pub fn pending_iovecs(&self) -> &[libc::iovec] {
        self.pending()
    }

    fn pending(&self) -> &[libc::iovec] {
        self.iovecs.get(self.first..).unwrap_or_default()
    }

    /// The entries to submit and their count, for the engines.
    pub(crate) fn submission(&self) -> Result<(*const libc::iovec, u32), FileIoError> {
        let pending = self.pending();
        let count = u32::try_from(pending.len()).map_err(|_| FileIoError::BadRange {
            start: self.first,
            end: self.iovecs.len(),
            buf_len: self.iovecs.len(),
        })?;
        if count == 0 {
            return Err(FileIoError::BadRange {
                start: self.first,
                end: self.iovecs.len(),
                buf_len: self.iovecs.len(),
            });
        }
        Ok((pending.as_ptr(), count))
    }
}

/// One file operation. Each variant owns what the kernel needs until the operation completes.
#[derive(Debug)]
pub enum FileOp {
    /// Read `buf[range]` from the file at `offset`.
    Read {
        /// The file.
        file: Arc<File>,
        /// Byte offset in the file.
        offset: u64,
        /// Destination.
        buf: AlignedBuf,
        /// The part of `buf` to fill.
        range: Range<usize>,
    },
    /// Write `buf[range]` to the file at `offset`.
    Write {
        /// The file.
        file: Arc<File>,
        /// Byte offset in the file.
        offset: u64,
        /// Source.
        buf: AlignedBuf,
        /// The part of `buf` to write.
        range: Range<usize>,
    },
    /// Read into memory owned elsewhere (zero copy), resuming at the first untransferred byte.
    ReadV {
        /// The file.
        file: Arc<File>,
        /// Byte offset in the file of the first untransferred byte.
        offset: u64,
        /// Destination buffers, with their owner.
        bufs: HostBuffers,
    },
    /// Write from memory owned elsewhere (zero copy), resuming at the first untransferred byte.
    WriteV {
        /// The file.
        file: Arc<File>,
        /// Byte offset in the file of the first untransferred byte.
        offset: u64,
        /// Source buffers, with their owner.
        bufs: HostBuffers,
    },
    /// `fdatasync`.
    DataSync {
        /// The file.
        file: Arc<File>,
    },
    /// `fallocate(mode, offset, len)` (`FALLOC_FL_PUNCH_HOLE`, `FALLOC_FL_ZERO_RANGE`, ...).
    Fallocate {
        /// The file.
        file: Arc<File>,
        /// `FALLOC_FL_*` flags.
        mode: i32,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `BLKDISCARD` on a block device. Neither engine has an asynchronous form of it on every
    /// supported kernel, so it runs synchronously at submission and completes at the next reap.
    BlockDiscard {
        /// The block device.
        file: Arc<File>,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// A finished [`FileOp`].
#[derive(Debug)]
pub struct FileCompletion {
    /// As given to `submit`.
    pub user_data: u64,
    /// Bytes transferred (0 for sync/fallocate), or the positive `errno`.
    pub result: Result<usize, i32>,
    /// The operation, handed back with its buffer.
    pub op: FileOp,
}

/// Runs `BLKDISCARD` now; the result as a completion would carry it.
pub(crate) fn run_block_discard(file: &File, offset: u64, len: u64) -> Result<usize, i32> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD reads two u64s (start, length) from the pointer, which points at `range`,
    // alive for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARD, range.as_ptr()) };
    if rc < 0 {
        Err(last_errno())
    } else {
        Ok(0)
    }
}

pub(crate) fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

// ioctl numbers from <linux/fs.h>: BLKSSZGET = _IO(0x12, 104), BLKGETSIZE64 = _IOR(0x12, 114,
// size_t), BLKDISCARD = _IO(0x12, 119).
const BLKSSZGET: libc::Ioctl = 0x1268;
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;
const BLKDISCARD: libc::Ioctl = 0x1277;

/// Size in bytes and logical block size of a block device.
pub fn block_device_geometry(file: &File) -> io::Result<(u64, u32)> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut block: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at `block`.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut block as *mut libc::c_int) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let block = u32::try_from(block)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "negative block size"))?;
    Ok((size, block))
}

/// The offset of the first hole at or after `offset` (`lseek(SEEK_HOLE)`); the file size when
/// there is none before the end.
pub fn next_hole(file: &File, offset: u64) -> io::Result<u64> {
    let offset = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek takes plain integers; the fd is kept open by `file`. The file position it
    // moves is not used by this crate's positioned I/O.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), offset, libc::SEEK_HOLE) };
    u64::try_from(rc).map_err(|_| io::Error::last_os_error())
}

/// Whether `file` lives on tmpfs/shmem, where io_uring hands every read and write to a kernel
/// worker thread (the filesystem cannot do them without blocking) instead of doing them inline.
pub fn is_on_tmpfs(file: &File) -> io::Result<bool> {
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs through the pointer, which points at `fs`.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fs.f_type == libc::TMPFS_MAGIC)
}

/// Alignment `O_DIRECT` needs for a file, as `statx(STATX_DIOALIGN)` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectIoAlignment {
    /// Every buffer address must be a multiple of this.
    pub memory: u32,
    /// File offsets and every buffer length must be multiples of this.
    pub offset: u32,
}

/// The file's direct-I/O alignment; `None` when the kernel or filesystem does not report it
/// (before Linux 6.1, or a filesystem without `O_DIRECT`).
pub fn direct_io_alignment(file: &File) -> io::Result<Option<DirectIoAlignment>> {
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is an empty C string and AT_EMPTY_PATH makes statx use the fd, which
    // `file` keeps open; statx writes one struct through the pointer, which points at `stx`.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOSYS) {
            return Ok(None);
        }
        return Err(err);
    }
    if stx.stx_mask & libc::STATX_DIOALIGN == 0
        || stx.stx_dio_mem_align == 0
        || stx.stx_dio_offset_align == 0
    {
        return Ok(None);
    }
    Ok(Some(DirectIoAlignment {
        memory: stx.stx_dio_mem_align,
        offset: stx.stx_dio_offset_align,
    }))
}

/// Slots and the ready queue, shared by both engines.
#[derive(Debug)]
pub(crate) struct Slots {
    slots: Vec<Option<(u64, FileOp)>>,
    free: Vec<u32>,
    /// Operations already finished synchronously, reported at the next reap.
    pub(crate) ready: VecDeque<FileCompletion>,
}

impl Slots {
    pub(crate) fn new(capacity: u32) -> Self {
        Slots {
            slots: (0..capacity).map(|_| None).collect(),
            free: (0..capacity).rev().collect(),
            ready: VecDeque::new(),
        }
    }
    pub(crate) fn take_free(&mut self) -> Option<u32> {
        self.free.pop()
    }
    pub(crate) fn give_back(&mut self, slot: u32) {
        self.free.push(slot);
    }
    pub(crate) fn fill(&mut self, slot: u32, user_data: u64, op: FileOp) {
        if let Some(entry) = self.slots.get_mut(slot as usize) {
            *entry = Some((user_data, op));
        }
    }
    pub(crate) fn complete(&mut self, slot: u64, result: i64) -> Option<FileCompletion> {
        let index = u32::try_from(slot).ok()?;
        let (user_data, op) = self.slots.get_mut(index as usize)?.take()?;
        self.free.push(index);
        let result = if result < 0 {
            Err(i32::try_from(result.unsigned_abs()).unwrap_or(libc::EIO))
        } else {
            Ok(usize::try_from(result).unwrap_or(usize::MAX))
        };
        Some(FileCompletion {
            user_data,
            result,
            op,
        })
    }
    pub(crate) fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

/// One io_uring instance, for one thread (a reactor's bdev channel).
pub struct Uring {
    ring: IoUring,
    slots: Slots,
    /// SQEs pushed but not yet handed to the kernel.
    unsubmitted: usize,
    /// Reads and writes run at submission instead of through the ring (see
    /// [`Uring::set_inline_rw`]).
    inline_rw: bool,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("in_flight", &self.in_flight())
            .field("unsubmitted", &self.unsubmitted)
            .finish()
    }
}

impl Uring {
    /// A ring with room for `entries` operations in flight (a power of two, at most 4096).
    pub fn new(entries: u32) -> Result<Self, FileIoError> {
        // A polling reactor should not be interrupted for every completion: with COOP_TASKRUN
        // the kernel queues completion work without an IPI and raises IORING_SQ_TASKRUN
        // (TASKRUN_FLAG) instead, and the next reap enters the kernel once to run it all.
        // Kernels before 5.19 refuse the flags: plain setup there.
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(entries)
            .or_else(|_| IoUring::new(entries))
            .map_err(|source| FileIoError::Setup {
                engine: "io_uring",
                source,
            })?;
        // The completion queue is twice the submission queue, and no more than `entries`
        // operations are ever in flight, so completions cannot overflow.
        Ok(Uring {
            ring,
            slots: Slots::new(entries),
            unsubmitted: 0,
            inline_rw: false,
        })
    }

    /// Runs reads and writes synchronously at submission (reported at the next reap) instead of
    /// through the ring. For files whose I/O io_uring cannot start without blocking (tmpfs, whose
    /// reads and writes it hands to an io-wq worker thread every time): there the data is a
    /// memcpy to or from the page cache, much cheaper than the hand-off and the worker's wake-up.
    pub fn set_inline_rw(&mut self, inline: bool) {
        self.inline_rw = inline;
    }

    /// Lets io_uring's kernel worker threads (io-wq: operations that cannot complete without
    /// blocking, such as writes into the holes of a sparse file) run only on `cores`. By default
    /// they inherit the submitting thread's affinity, i.e. the reactor's own core, where they
    /// wait behind a busy-polling reactor for their share of the CPU.
    pub fn set_worker_cores(&self, cores: &CpuSet) -> Result<(), FileIoError> {
        let set = cores.to_libc();
        self.ring
            .submitter()
            .register_iowq_aff(&set)
            .map_err(|source| FileIoError::Setup {
                engine: "io_uring worker affinity",
                source,
            })
    }

    /// Operations submitted whose completion has not been reaped.
    pub fn in_flight(&self) -> usize {
        self.slots.in_flight() + self.slots.ready.len()
    }

    /// Queues `op`; it reaches the kernel at the next [`Uring::reap`] (batched) or when the queue
    /// fills. On failure the operation is handed back untouched.
    pub fn submit(&mut self, op: FileOp, user_data: u64) -> Result<(), Box<(FileOp, FileIoError)>> {
        if self.inline_rw {
            match run_rw_now(&op) {
                Some(Ok(result)) => {
                    self.slots.ready.push_back(FileCompletion {
                        user_data,
                        result,
                        op,
                    });
                    return Ok(());
                }
                Some(Err(e)) => return Err(Box::new((op, e))),
                None => {}
            }
        }
        if let FileOp::BlockDiscard { file, offset, len } = &op {
            let result = run_block_discard(file, *offset, *len);
            self.slots.ready.push_back(FileCompletion {
                user_data,
                result,
                op,
            });
            return Ok(());
        }
        let Some(slot) = self.slots.take_free() else {
            return Err(Box::new((op, FileIoError::Full)));
        };
        let entry = match build_sqe(&op, slot) {
            Ok(entry) => entry,
            Err(e) => {
                self.slots.give_back(slot);
                return Err(Box::new((op, e)));
            }
        };
        self.slots.fill(slot, user_data, op);
        loop {
            // SAFETY: the SQE's buffer (or iovec array) pointer and fd belong to the `FileOp` now
            // stored in `slot`, which stays there (keeping the buffer allocated, or the owner of
            // the `HostBuffers` memory alive, and the file open) until this slot's completion is
            // reaped, and `Drop` waits for all in-flight completions.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            if let Err(e) = self.ring.submit() {
                // Nothing was pushed for this slot, so the kernel never saw its buffer.
                let op = self.slots.complete(u64::from(slot), 0).map(|c| c.op);
                return match op {
                    Some(op) => Err(Box::new((op, FileIoError::Submit(e)))),
                    None => Ok(()),
                };
            }
            self.unsubmitted = 0;
        }
    }

    /// Hands queued operations to the kernel and reports every finished one through `done`.
    pub fn reap(&mut self, done: &mut dyn FnMut(FileCompletion)) -> usize {
        let mut count = 0;
        while let Some(c) = self.slots.ready.pop_front() {
            done(c);
            count += 1;
        }
        // IORING_SQ_TASKRUN: completions are waiting for this thread to enter the kernel.
        if self.unsubmitted > 0 || self.ring.submission().taskrun() {
            match self.ring.submit() {
                Ok(_) => self.unsubmitted = 0,
                // EBUSY/EAGAIN: completions must be reaped first; the next reap retries.
                Err(e) => tracing::debug!(error = %e, "io_uring submit deferred"),
            }
        }
        let finished: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (slot, result) in finished {
            if let Some(c) = self.slots.complete(slot, i64::from(result)) {
                done(c);
                count += 1;
            }
        }
        count
    }
}

impl Uring {
    /// Like [`Uring::reap`], but blocks until at least one operation has finished (returns 0
    /// at once when nothing is in flight).
    pub fn wait(&mut self, done: &mut dyn FnMut(FileCompletion)) -> usize {
        if !self.slots.ready.is_empty() || self.slots.in_flight() == 0 {
            return self.reap(done);
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {
                    self.unsubmitted = 0;
                    break;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring wait failed");
                    break;
                }
            }
        }
        self.reap(done)
    }
}

/// Runs a read or write now with `pread`/`pwrite`/`preadv`/`pwritev`; `None` for other ops.
fn run_rw_now(op: &FileOp) -> Option<Result<Result<usize, i32>, FileIoError>> {
    let rc = match op {
        FileOp::Read {
            file,
            offset,
            buf,
            range,
        }
        | FileOp::Write {
            file,
            offset,
            buf,
            range,
        } => {
            let ptr = match buf.checked_ptr(range) {
                Ok(ptr) => ptr,
                Err(e) => return Some(Err(e)),
            };
            let Ok(offset) = libc::off_t::try_from(*offset) else {
                return Some(Ok(Err(libc::EINVAL)));
            };
            if matches!(op, FileOp::Read { .. }) {
                // SAFETY: `ptr` points at `range.len()` bytes inside `buf`, which `op` owns and
                // nothing else borrows during the call; the fd is kept open by `file`.
                unsafe { libc::pread(file.as_raw_fd(), ptr.cast(), range.len(), offset) }
            } else {
                // SAFETY: as above; the kernel only reads the buffer.
                unsafe { libc::pwrite(file.as_raw_fd(), ptr.cast(), range.len(), offset) }
            }
        }
        FileOp::ReadV { file, offset, bufs } | FileOp::WriteV { file, offset, bufs } => {
            let (iovecs, count) = match bufs.submission() {
                Ok(s) => s,
                Err(e) => return Some(Err(e)),
            };
            let (Ok(offset), Ok(count)) = (libc::off_t::try_from(*offset), i32::try_from(count))
            else {
                return Some(Ok(Err(libc::EINVAL)));
            };
            if matches!(op, FileOp::ReadV { .. }) {
                // SAFETY: `iovecs` holds `count` entries, each proven by the `HostBuffers` owner
                // to lie in memory it keeps mapped, and `bufs` (holding the owner) outlives the
                // call; the fd is kept open by `file`.
                unsafe { libc::preadv(file.as_raw_fd(), iovecs, count, offset) }
            } else {
                // SAFETY: as above; the kernel only reads the buffers.
                unsafe { libc::pwritev(file.as_raw_fd(), iovecs, count, offset) }
            }
        }
        FileOp::DataSync { .. } | FileOp::Fallocate { .. } | FileOp::BlockDiscard { .. } => {
            return None
        }
    };
    Some(Ok(if rc < 0 {
        Err(last_errno())
    } else {
        Ok(usize::try_from(rc).unwrap_or(0))
    }))
}

fn build_sqe(op: &FileOp, slot: u32) -> Result<io_uring::squeue::Entry, FileIoError> {
    let entry = match op {
        FileOp::Read {
            file,
            offset,
            buf,
            range,
        }
        | FileOp::Write {
            file,
            offset,
            buf,
            range,
        } => {
            let ptr = buf.checked_ptr(range)?;
            let len = u32::try_from(range.len()).map_err(|_| FileIoError::BadRange {
                start: range.start,
                end: range.end,
                buf_len: buf.len(),
            })?;
            let fd = types::Fd(file.as_raw_fd());
            if matches!(op, FileOp::Read { .. }) {
                opcode::Read::new(fd, ptr, len).offset(*offset).build()
            } else {
                opcode::Write::new(fd, ptr, len).offset(*offset).build()
            }
        }
        FileOp::ReadV { file, offset, bufs } | FileOp::WriteV { file, offset, bufs } => {
            let (iovecs, count) = bufs.submission()?;
            let fd = types::Fd(file.as_raw_fd());
            if matches!(op, FileOp::ReadV { .. }) {
                opcode::Readv::new(fd, iovecs, count)
                    .offset(*offset)
                    .build()
            } else {
                opcode::Writev::new(fd, iovecs, count)
                    .offset(*offset)
                    .build()
            }
        }
        FileOp::DataSync { file } => opcode::Fsync::new(types::Fd(file.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        FileOp::Fallocate {
            file,
            mode,
            offset,
            len,
        } => opcode::Fallocate::new(types::Fd(file.as_raw_fd()), *len)
            .offset(*offset)
            .mode(*mode)
            .build(),
        FileOp::BlockDiscard { .. } => {
            return Err(FileIoError::Submit(io::Error::from_raw_os_error(
                libc::EINVAL,
            )))
        }
    };
    Ok(entry.user_data(u64::from(slot)))
}

impl Drop for Uring {
    fn drop(&mut self) {
        // The kernel may still write into buffers owned by the slots: wait for every completion
        // before the slots (and buffers) are freed.
        while self.slots.in_flight() > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                tracing::error!(error = %e, in_flight = self.slots.in_flight(),
                    "cannot wait for io_uring completions; leaking their buffers");
                std::mem::forget(std::mem::replace(&mut self.slots, Slots::new(0)));
                return;
            }
            self.reap(&mut |_| {});
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

    fn temp_file(name: &str) -> (std::path::PathBuf, Arc<File>) {
        temp_file_in(&std::env::temp_dir(), name)
    }

    fn temp_file_in(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, Arc<File>) {
        let path = dir.join(format!("rvhost-uring-{}-{name}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(1 << 20).unwrap();
        (path, Arc::new(file))
    }

    fn wait_one(ring: &mut Uring) -> FileCompletion {
        loop {
            let mut got = None;
            ring.reap(&mut |c| got = Some(c));
            if let Some(c) = got {
                return c;
            }
            std::thread::yield_now();
        }
    }

    /// The affinities of the io-wq worker threads serving rings of the calling thread: the
    /// kernel names them `iou-wrk-<submitter's tid>` (tests on other threads have their own).
    fn worker_affinities() -> Vec<String> {
        let me = std::fs::read_link("/proc/thread-self").unwrap();
        let tid = me.file_name().unwrap().to_string_lossy().into_owned();
        let name = format!("iou-wrk-{tid}");
        let mut out = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim_end() != name {
                continue;
            }
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            if let Some(line) = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")) {
                out.push(line["Cpus_allowed_list:".len()..].trim().to_owned());
            }
        }
        out
    }

    /// tmpfs reads and writes always go through io-wq workers; after `set_worker_cores` those
    /// run on the given cores only.
    #[test]
    fn worker_threads_run_on_the_cores_they_are_given() {
        let (path, file) = temp_file_in(std::path::Path::new("/dev/shm"), "iowq");
        let allowed = crate::allowed_cores().unwrap();
        let core = allowed.iter().last().unwrap();
        let only: CpuSet = [core].into_iter().collect();
        let mut ring = Uring::new(8).unwrap();
        ring.set_worker_cores(&only).unwrap();
        for i in 0..32u64 {
            let mut buf = AlignedBuf::new(4096).unwrap();
            buf.as_mut_slice().fill(i as u8);
            ring.submit(
                FileOp::Write {
                    file: Arc::clone(&file),
                    offset: i * 4096,
                    buf,
                    range: 0..4096,
                },
                i,
            )
            .unwrap();
            assert_eq!(wait_one(&mut ring).result, Ok(4096));
        }
        // Idle workers linger for seconds, so they can be inspected now.
        let workers = worker_affinities();
        let _ = std::fs::remove_file(&path);
        assert!(
            !workers.is_empty(),
            "tmpfs writes went through no io-wq worker"
        );
        for affinity in workers {
            assert_eq!(
                affinity,
                core.to_string(),
                "a worker runs outside its cores"
            );
        }
    }

    /// A vectored read straight into memory the ring does not own, cut short by the end of the
    /// file inside the second buffer, resumes inside that buffer after `advance`.
    #[test]
    fn short_vectored_read_resumes_across_buffers() {
        use crate::{PagePolicy, SharedDmaMemory};
        use std::os::unix::fs::FileExt;
        let (path, file) = temp_file("readv");
        let data: Vec<u8> = (0..16384u32).map(|i| (i * 7 + 1) as u8).collect();
        file.write_all_at(&data, 0).unwrap();
        file.set_len(6000).unwrap();
        let mem = Arc::new(SharedDmaMemory::allocate_with(1 << 16, PagePolicy::SmallOnly).unwrap());
        let va = mem.va();
        let parts = [
            (va + 0x1000, 4096),
            (va + 0x4000, 8192),
            (va + 0xa000, 4096),
        ];
        let bufs = HostBuffers::new(&mem, parts, SpareIovecs::default())
            .unwrap()
            .unwrap();
        assert_eq!(bufs.remaining(), 16384);
        let mut ring = Uring::new(8).unwrap();
        let op = FileOp::ReadV {
            file: Arc::clone(&file),
            offset: 0,
            bufs,
        };
        ring.submit(op, 1).unwrap();
        let c = wait_one(&mut ring);
        assert_eq!(c.result, Ok(6000));
        let FileOp::ReadV { mut bufs, .. } = c.op else {
            panic!("wrong op back")
        };
        bufs.advance(6000);
        assert_eq!((bufs.remaining(), bufs.count()), (16384 - 6000, 2));
        file.write_all_at(&data, 0).unwrap();
        ring.submit(
            FileOp::ReadV {
                file: Arc::clone(&file),
                offset: 6000,
                bufs,
            },
            2,
        )
        .unwrap();
        let c = wait_one(&mut ring);
        assert_eq!(c.result, Ok(16384 - 6000));
        let mut got = vec![0u8; 4096];
        mem.read_at(0x1000, &mut got).unwrap();
        assert_eq!(got, data[..4096]);
        let mut got = vec![0u8; 8192];
        mem.read_at(0x4000, &mut got).unwrap();
        assert_eq!(got, data[4096..12288]);
        let mut got = vec![0u8; 4096];
        mem.read_at(0xa000, &mut got).unwrap();
        assert_eq!(got, data[12288..]);
        // A buffer outside the memory is refused before anything reaches the kernel.
        let outside = HostBuffers::new(&mem, [(va + (1 << 16), 512)], SpareIovecs::default());
        assert!(matches!(outside, Some(Err(_))));
        std::fs::remove_file(path).unwrap();
    }

    /// Inline reads and writes (the tmpfs mode) finish at submission and are reported, with the
    /// same results as through the ring, at the next reap.
    #[test]
    fn inline_reads_and_writes_complete_at_reap() {
        let (path, file) = temp_file("inline");
        let mut ring = Uring::new(8).unwrap();
        ring.set_inline_rw(true);
        let mut buf = AlignedBuf::new(4096).unwrap();
        buf.as_mut_slice().fill(0x3c);
        ring.submit(
            FileOp::Write {
                file: Arc::clone(&file),
                offset: 8192,
                buf,
                range: 0..4096,
            },
            1,
        )
        .unwrap();
        assert_eq!(ring.in_flight(), 1);
        let c = wait_one(&mut ring);
        assert_eq!((c.user_data, c.result), (1, Ok(4096)));
        ring.submit(
            FileOp::Read {
                file: Arc::clone(&file),
                offset: 8192 + 4000,
                buf: AlignedBuf::new(4096).unwrap(),
                range: 0..4096,
            },
            2,
        )
        .unwrap();
        let c = wait_one(&mut ring);
        assert_eq!((c.user_data, c.result), (2, Ok(4096)));
        let FileOp::Read { buf, .. } = c.op else {
            panic!("wrong op back")
        };
        assert!(buf.as_slice()[..96].iter().all(|b| *b == 0x3c));
        assert!(buf.as_slice()[96..].iter().all(|b| *b == 0));
        // Other ops still go through the ring.
        ring.submit(FileOp::DataSync { file }, 3).unwrap();
        assert_eq!(wait_one(&mut ring).result, Ok(0));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn write_read_sync_round_trip() {
        let (path, file) = temp_file("rt");
        let mut ring = Uring::new(8).unwrap();
        let mut buf = AlignedBuf::new(8192).unwrap();
        for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
            *b = (i % 253) as u8;
        }
        ring.submit(
            FileOp::Write {
                file: Arc::clone(&file),
                offset: 4096,
                buf,
                range: 0..8192,
            },
            7,
        )
        .unwrap();
        let c = wait_one(&mut ring);
        assert_eq!((c.user_data, c.result), (7, Ok(8192)));
        ring.submit(
            FileOp::DataSync {
                file: Arc::clone(&file),
            },
            8,
        )
        .unwrap();
        assert_eq!(wait_one(&mut ring).result, Ok(0));
        let mut on_disk = vec![0u8; 8192];
        let mut f = File::open(&path).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.read_exact(&mut on_disk).unwrap();
        assert!(on_disk
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i % 253) as u8));
        let buf = AlignedBuf::new(4096).unwrap();
        ring.submit(
            FileOp::Read {
                file: Arc::clone(&file),
                offset: 4096 + 100,
                buf,
                range: 10..110,
            },
            9,
        )
        .unwrap();
        let c = wait_one(&mut ring);
        assert_eq!(c.result, Ok(100));
        let FileOp::Read { buf, .. } = c.op else {
            panic!("wrong op back")
        };
        assert_eq!(&buf.as_slice()[10..110], &on_disk[100..200]);
        assert_eq!(ring.in_flight(), 0);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn tmpfs_is_told_apart() {
        let shm = std::path::Path::new("/dev/shm");
        let on_shm = shm.join(format!("rvhost-uring-tmpfs-{}", std::process::id()));
        let file = File::create(&on_shm).unwrap();
        assert!(is_on_tmpfs(&file).unwrap());
        std::fs::remove_file(&on_shm).unwrap();
        let exe = File::open(std::env::current_exe().unwrap()).unwrap();
        assert!(
            !is_on_tmpfs(&exe).unwrap(),
            "the build directory is on tmpfs?"
        );
    }

    #[test]
    fn bad_range_and_full_ring_hand_the_op_back() {
        let (path, file) = temp_file("full");
        let mut ring = Uring::new(2).unwrap();
        let op = |buf| FileOp::Read {
            file: Arc::clone(&file),
            offset: 0,
            buf,
            range: 0..4097,
        };
        let err = ring
            .submit(op(AlignedBuf::new(4096).unwrap()), 1)
            .unwrap_err();
        assert!(matches!(err.1, FileIoError::BadRange { .. }));
        assert_eq!(ring.in_flight(), 0);
        for i in 0..2 {
            ring.submit(
                FileOp::DataSync {
                    file: Arc::clone(&file),
                },
                i,
            )
            .unwrap();
        }
        let err = ring
            .submit(
                FileOp::DataSync {
                    file: Arc::clone(&file),
                },
                3,
            )
            .unwrap_err();
        assert!(matches!(err.1, FileIoError::Full));
        drop(ring); // waits for both syncs
        std::fs::remove_file(path).unwrap();
    }
}
