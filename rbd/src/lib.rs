//! Ceph RBD for rvhost: our own bindings to librados and librbd (there is no maintained Rust
//! librbd crate) and the safe API rvhost's `rbd` bdev uses.
//!
//! - [`Cluster`]: a connection to a Ceph cluster (`rados_t`), configured from a file, a keyring
//!   and `key=value` options, connected with bounded time-outs.
//! - [`Pool`]: an I/O context on one pool; [`Image`]: an open image, shared by threads (librbd's
//!   handles are thread-safe), closed when the last reference goes.
//! - [`Image::submit`]: asynchronous vectored reads and writes straight into caller-owned memory
//!   ([`HostBuffers`], which keep that memory mapped and the `iovec` array alive until the
//!   operation completes, as librbd requires), flush, discard and write-zeroes. librbd completes
//!   them on its own threads; the completion callback moves the finished operation onto the
//!   submitter's [`CompletionQueue`], a lock-free multi-producer queue
//!   (`std::sync::mpsc`, a linked list of blocks with atomic indices: no lock on either side), which
//!   the submitter drains without blocking ([`CompletionQueue::poll`]). Operation records are
//!   reused, so steady-state I/O allocates nothing here.
//! - [`Image::use_event_socket`]: librbd's event-socket mode instead of the callback, for a handle
//!   one thread owns: completions wait on librbd's own queue of the image and are taken by
//!   [`Image::poll_events`].
//!
//! Every `unsafe` block of the crate is here or in [`sys`], each with its reason.

pub mod sys;

use std::ffi::{c_int, c_void, CString};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::{Arc, OnceLock};

use rvhost_platform_linux::waker::{self, Waker};
use rvhost_platform_linux::EventFd;

pub use rvhost_platform_linux::uring::HostBuffers;

/// Errors from librados and librbd, with the failing call and its errno.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    /// A call returned a negative errno.
    #[error("{call}: {}", std::io::Error::from_raw_os_error(*errno))]
    Call {
        /// What was called (with its argument, where that helps).
        call: String,
        /// The positive errno.
        errno: i32,
    },
    /// A string argument contained a NUL byte.
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    /// An argument does not fit the C type librbd takes.
    #[error("{0}")]
    TooLarge(&'static str),
}

impl RbdError {
    /// The positive errno of a failed call (EINVAL for arguments refused before any call).
    pub fn errno(&self) -> i32 {
        match self {
            RbdError::Call { errno, .. } => *errno,
            RbdError::Nul(_) | RbdError::TooLarge(_) => libc::EINVAL,
        }
    }
}

fn check(ret: c_int, call: impl FnOnce() -> String) -> Result<(), RbdError> {
    if ret < 0 {
        Err(RbdError::Call {
            call: call(),
            errno: -ret,
        })
    } else {
        Ok(())
    }
}

fn cstring(s: &str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Nul(s.to_owned()))
}

/// How to reach a cluster, as SPDK's `bdev_rbd_register_cluster` and `bdev_rbd_create` take it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The Ceph user without `client.` (`admin` when `None`).
    pub user_id: Option<String>,
    /// A `ceph.conf`.
    pub config_file: Option<PathBuf>,
    /// A keyring holding the user's key.
    pub key_file: Option<PathBuf>,
    /// `key=value` options for `rados_conf_set` (`mon_host`, `key`), applied after the file.
    pub options: Vec<(String, String)>,
}

/// A connected cluster handle (`rados_t`), shut down when dropped.
#[derive(Debug)]
pub struct Cluster {
    raw: sys::rados_t,
}

// SAFETY: librados cluster handles may be used from any thread, concurrently (librados.h: "the
// handle is thread-safe"); the pointer is only passed to librados.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// Creates a handle for `config`, applies `defaults` (before the configuration, so a user's
    /// file or options override them: time-outs) and connects. Blocks for at most the
    /// configured `client_mount_timeout`.
    ///
    /// As SPDK does: with a `config_file`, it is read; with neither a file nor options, the
    /// default search path (`/etc/ceph/ceph.conf`, ...) is; options are then set; a `key_file`
    /// becomes the `keyring` option.
    pub fn connect(
        config: &ClusterConfig,
        defaults: &[(&str, &str)],
    ) -> Result<Arc<Cluster>, RbdError> {
        let id = config.user_id.as_deref().map(cstring).transpose()?;
        let mut raw: sys::rados_t = ptr::null_mut();
        // SAFETY: `raw` is a valid out pointer; `id` is NUL-terminated or null (= "admin") and
        // only read during the call.
        let ret =
            unsafe { sys::rados_create(&mut raw, id.as_ref().map_or(ptr::null(), |s| s.as_ptr())) };
        check(ret, || "rados_create".to_owned())?;
        // From here the handle is shut down on every path by Drop.
        let cluster = Cluster { raw };
        for (key, value) in defaults {
            cluster.set(key, value)?;
        }
        match &config.config_file {
            Some(path) => cluster.read_file(Some(&path.to_string_lossy()))?,
            None if config.options.is_empty() => cluster.read_file(None)?,
            None => {}
        }
        for (key, value) in &config.options {
            cluster.set(key, value)?;
        }
        if let Some(key_file) = &config.key_file {
            cluster.set("keyring", &key_file.to_string_lossy())?;
        }
        // SAFETY: `cluster.raw` is a configured, not yet connected handle.
        let ret = unsafe { sys::rados_connect(cluster.raw) };
        check(ret, || "rados_connect".to_owned())?;
        Ok(Arc::new(cluster))
    }

    fn set(&self, key: &str, value: &str) -> Result<(), RbdError> {
        let (k, v) = (cstring(key)?, cstring(value)?);
        // SAFETY: valid handle; both strings are NUL-terminated and only read during the call.
        let ret = unsafe { sys::rados_conf_set(self.raw, k.as_ptr(), v.as_ptr()) };
        check(ret, || format!("rados_conf_set({key})"))
    }

    fn read_file(&self, path: Option<&str>) -> Result<(), RbdError> {
        let path_c = path.map(cstring).transpose()?;
        // SAFETY: valid handle; the path is NUL-terminated or null (the default search path).
        let ret = unsafe {
            sys::rados_conf_read_file(
                self.raw,
                path_c.as_ref().map_or(ptr::null(), |s| s.as_ptr()),
            )
        };
        check(ret, || {
            format!(
                "rados_conf_read_file({})",
                path.unwrap_or("default search path")
            )
        })
    }

    /// An I/O context on pool `name` (ENOENT if there is no such pool).
    pub fn pool(self: &Arc<Self>, name: &str) -> Result<Arc<Pool>, RbdError> {
        let name_c = cstring(name)?;
        let mut raw: sys::rados_ioctx_t = ptr::null_mut();
        // SAFETY: connected handle; NUL-terminated name; valid out pointer.
        let ret = unsafe { sys::rados_ioctx_create(self.raw, name_c.as_ptr(), &mut raw) };
        check(ret, || format!("rados_ioctx_create({name})"))?;
        Ok(Arc::new(Pool {
            raw,
            _cluster: Arc::clone(self),
        }))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create and nothing uses it any more: every Pool
        // holds an Arc of this Cluster.
        unsafe { sys::rados_shutdown(self.raw) }
    }
}

/// An I/O context on one pool (`rados_ioctx_t`), destroyed when dropped.
#[derive(Debug)]
pub struct Pool {
    raw: sys::rados_ioctx_t,
    _cluster: Arc<Cluster>,
}

// SAFETY: librados I/O contexts are thread-safe; the pointer is only passed to librados/librbd.
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: the context came from rados_ioctx_create; every Image holds an Arc of this Pool,
        // so none uses it any more, and the cluster (held by `_cluster`) is still connected.
        unsafe { sys::rados_ioctx_destroy(self.raw) }
    }
}

/// An open image (`rbd_image_t`), closed when dropped (which waits for its in-flight
/// operations, so their buffers are released only after librbd is done with them).
#[derive(Debug)]
pub struct Image {
    raw: sys::rbd_image_t,
    name: String,
    read_only: bool,
    /// Completions go to librbd's per-image queue and the eventfd given to
    /// [`Image::use_event_socket`] instead of to a callback.
    event_socket: AtomicBool,
    pool: Arc<Pool>,
}

// SAFETY: librbd image handles are thread-safe (concurrent aio submission from several threads is
// how QEMU and SPDK use them); the pointer is only passed to librbd.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Image {
    /// Opens image `name` of `pool` for reading and writing (ENOENT if there is none).
    pub fn open(pool: &Arc<Pool>, name: &str) -> Result<Image, RbdError> {
        Self::open_as(pool, name, false)
    }

    /// Opens image `name` of `pool` for reading only (`rbd_open_read_only`: writes fail with
    /// EROFS, and the image's exclusive lock is never taken, so any number of readers may
    /// share it with one writer).
    pub fn open_read_only(pool: &Arc<Pool>, name: &str) -> Result<Image, RbdError> {
        Self::open_as(pool, name, true)
    }

    fn open_as(pool: &Arc<Pool>, name: &str, read_only: bool) -> Result<Image, RbdError> {
        let name_c = cstring(name)?;
        let mut raw: sys::rbd_image_t = ptr::null_mut();
        let ret = if read_only {
            // SAFETY: valid I/O context; NUL-terminated name; valid out pointer; no snapshot.
            unsafe { sys::rbd_open_read_only(pool.raw, name_c.as_ptr(), &mut raw, ptr::null()) }
        } else {
            // SAFETY: as above.
            unsafe { sys::rbd_open(pool.raw, name_c.as_ptr(), &mut raw, ptr::null()) }
        };
        check(ret, || {
            if read_only {
                format!("rbd_open_read_only({name})")
            } else {
                format!("rbd_open({name})")
            }
        })?;
        Ok(Image {
            raw,
            name: name.to_owned(),
            read_only,
            event_socket: AtomicBool::new(false),
            pool: Arc::clone(pool),
        })
    }

    /// Another handle of the same image, opened the same way (read-only or not). Two writable
    /// handles take turns at the image's exclusive lock.
    pub fn reopen(&self) -> Result<Image, RbdError> {
        Self::open_as(&self.pool, &self.name, self.read_only)
    }

    /// librbd's event-socket mode (`rbd_set_image_notification`): from now on, operations
    /// started on this handle complete onto librbd's own queue of the image (lock-free) and
    /// write 1 to `fd`; [`Image::poll_events`] takes them. Only for a handle that one thread
    /// submits on and polls: every completion of the handle lands on that one queue.
    pub fn use_event_socket(&self, fd: &EventFd) -> Result<(), RbdError> {
        // SAFETY: open image; the descriptor outlives the handle (the caller's waker, kept alive
        // by the queue that polls this image).
        let ret = unsafe {
            sys::rbd_set_image_notification(self.raw, fd.as_raw_fd(), sys::EVENT_TYPE_EVENTFD)
        };
        check(ret, || format!("rbd_set_image_notification({})", self.name))?;
        self.event_socket.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether [`Image::use_event_socket`] is in effect.
    pub fn event_socket(&self) -> bool {
        self.event_socket.load(Ordering::Acquire)
    }

    /// Event-socket mode: reports every operation of this handle that librbd has completed
    /// (`rbd_poll_io_events`), without waiting; returns how many. Their records go back to
    /// `queue`, the one they were submitted with.
    pub fn poll_events(
        &self,
        queue: &mut CompletionQueue,
        mut done: impl FnMut(Completion),
    ) -> usize {
        const BATCH: usize = 32;
        let mut total = 0;
        loop {
            let mut comps: [sys::rbd_completion_t; BATCH] = [ptr::null_mut(); BATCH];
            // SAFETY: open image in event-socket mode; `comps` has room for BATCH pointers.
            let n =
                unsafe { sys::rbd_poll_io_events(self.raw, comps.as_mut_ptr(), BATCH as c_int) };
            let n = usize::try_from(n).unwrap_or(0).min(BATCH);
            for &c in &comps[..n] {
                // SAFETY: `c` is a completion librbd finished and handed over once; its argument
                // is the Box<Record> leaked by `submit` (event-socket completions have no
                // callback, so nothing else reclaims it).
                let mut record = unsafe { Box::from_raw(sys::rbd_aio_get_arg(c).cast::<Record>()) };
                // SAFETY: as above; the completion is released once, here.
                record.result = unsafe { sys::rbd_aio_get_return_value(c) };
                // SAFETY: as above.
                unsafe { sys::rbd_aio_release(c) };
                let completion = Completion {
                    token: record.token,
                    result: record.result,
                    op: record.op.take(),
                };
                queue.free.push(record);
                done(completion);
            }
            total += n;
            if n < BATCH {
                break;
            }
        }
        if total > 0 && queue.wake.get().is_some() {
            waker::arrived(total);
        }
        total
    }

    /// The image's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The image's size in bytes.
    pub fn size(&self) -> Result<u64, RbdError> {
        let mut size = 0u64;
        // SAFETY: open image; valid out pointer.
        let ret = unsafe { sys::rbd_get_size(self.raw, &mut size) };
        check(ret, || format!("rbd_get_size({})", self.name))?;
        Ok(size)
    }

    /// Resizes the image to `bytes` (synchronous: waits for the cluster).
    pub fn resize(&self, bytes: u64) -> Result<(), RbdError> {
        // SAFETY: open image.
        let ret = unsafe { sys::rbd_resize(self.raw, bytes) };
        check(ret, || format!("rbd_resize({}, {bytes})", self.name))
    }

    /// Starts `op`; its completion, with `token`, arrives on `queue` ([`CompletionQueue::poll`]).
    /// On an error nothing was started and the operation is handed back.
    pub fn submit(
        &self,
        queue: &mut CompletionQueue,
        token: u64,
        op: AioOp,
    ) -> Result<(), (AioOp, RbdError)> {
        // What librbd is given, taken from `op` before the record owns it (pointers into the
        // HostBuffers' vector, which moves with `op` but whose heap array does not move).
        let args = match &op {
            AioOp::Read { offset, bufs } | AioOp::Write { offset, bufs } => {
                let iovs = bufs.pending_iovecs();
                match c_int::try_from(iovs.len()) {
                    Ok(count) => Args::Vectored(iovs.as_ptr(), count, *offset),
                    Err(_) => return Err((op, RbdError::TooLarge("too many buffers"))),
                }
            }
            AioOp::Flush => Args::Flush,
            AioOp::Discard { offset, len } => Args::Range(*offset, *len),
            AioOp::WriteZeroes { offset, len } => match usize::try_from(*len) {
                Ok(_) => Args::Range(*offset, *len),
                Err(_) => return Err((op, RbdError::TooLarge("write-zeroes length"))),
            },
        };
        let call = op.call_name();
        let is_read = matches!(op, AioOp::Read { .. });
        queue.take_thread_waker();
        let mut record = queue.record();
        record.token = token;
        record.result = 0;
        record.op = Some(op);
        // From here librbd owns the record (through `raw`) once an operation starts; on every
        // failure below it is taken back with Box::from_raw before returning.
        let raw = Box::into_raw(record);
        let mut completion: sys::rbd_completion_t = ptr::null_mut();
        // In event-socket mode the completion goes to the image's queue instead of a callback.
        let callback: sys::rbd_callback_t = if self.event_socket() {
            None
        } else {
            Some(on_complete)
        };
        // SAFETY: `raw` is a live heap record that stays where it is until `on_complete`,
        // `poll_events` (event-socket mode) or the failure path below reclaims it; valid out
        // pointer.
        let ret = unsafe {
            sys::rbd_aio_create_completion(raw.cast::<c_void>(), callback, &mut completion)
        };
        let started = if ret < 0 {
            ret
        } else {
            match args {
                // SAFETY: open image; the iovec array and the buffers belong to the record's
                // HostBuffers, which librbd's completion hands back only after librbd is done
                // with them; the buffers lie in memory those HostBuffers keep mapped (checked
                // when they were built).
                Args::Vectored(iov, count, offset) => unsafe {
                    if is_read {
                        sys::rbd_aio_readv(self.raw, iov, count, offset, completion)
                    } else {
                        sys::rbd_aio_writev(self.raw, iov, count, offset, completion)
                    }
                },
                // SAFETY: open image; fresh completion.
                Args::Flush => unsafe { sys::rbd_aio_flush(self.raw, completion) },
                Args::Range(offset, len) if call == "rbd_aio_discard" => {
                    // SAFETY: open image; fresh completion.
                    unsafe { sys::rbd_aio_discard(self.raw, offset, len, completion) }
                }
                // SAFETY: open image; fresh completion; no flags. `len` fits usize (checked).
                Args::Range(offset, len) => unsafe {
                    sys::rbd_aio_write_zeroes(self.raw, offset, len as usize, completion, 0, 0)
                },
            }
        };
        if started >= 0 {
            if queue.wake.get().is_some() {
                waker::expect(1);
            }
            return Ok(());
        }
        if ret >= 0 {
            // SAFETY: the completion was given to no operation, so its callback never runs; it is
            // released here, once.
            unsafe { sys::rbd_aio_release(completion) };
        }
        // SAFETY: no operation started, so `on_complete` never runs for `raw`: this is its only
        // owner, reclaimed once.
        let mut record = unsafe { Box::from_raw(raw) };
        let op = record.op.take();
        queue.free.push(record);
        let err = RbdError::Call {
            call: format!("{call}({})", self.name),
            errno: -started,
        };
        match op {
            Some(op) => Err((op, err)),
            None => Err((AioOp::Flush, err)),
        }
    }
}

/// The arguments of one librbd call, taken from an [`AioOp`].
#[derive(Clone, Copy)]
enum Args {
    Vectored(*const libc::iovec, c_int, u64),
    Flush,
    Range(u64, u64),
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: the image came from rbd_open and is closed once; rbd_close waits for in-flight
        // operations, whose completions then reach their (possibly dropped) queues.
        let ret = unsafe { sys::rbd_close(self.raw) };
        if ret < 0 {
            eprintln!("rbd_close({}) failed: errno {}", self.name, -ret);
        }
    }
}

/// An asynchronous operation on an image, by byte offsets.
#[derive(Debug)]
pub enum AioOp {
    /// Read into the buffers at `offset`; completes with the byte count read.
    Read {
        /// Byte offset in the image.
        offset: u64,
        /// Destination.
        bufs: HostBuffers,
    },
    /// Write the buffers at `offset`; completes with 0.
    Write {
        /// Byte offset in the image.
        offset: u64,
        /// Source.
        bufs: HostBuffers,
    },
    /// Make every completed write durable.
    Flush,
    /// Deallocate `len` bytes at `offset`.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Make `len` bytes at `offset` read back as zeros.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
}

impl AioOp {
    fn call_name(&self) -> &'static str {
        match self {
            AioOp::Read { .. } => "rbd_aio_readv",
            AioOp::Write { .. } => "rbd_aio_writev",
            AioOp::Flush => "rbd_aio_flush",
            AioOp::Discard { .. } => "rbd_aio_discard",
            AioOp::WriteZeroes { .. } => "rbd_aio_write_zeroes",
        }
    }
}

/// One operation from submission to completion; its address is the completion's argument.
struct Record {
    token: u64,
    result: isize,
    op: Option<AioOp>,
    done: Sender<Box<Record>>,
    /// The submitting thread's waker, woken once the record is on its queue.
    wake: Arc<OnceLock<Arc<Waker>>>,
}

/// Runs on a librbd thread when an operation completes: takes the record back and moves it to
/// its queue (lock-free; a queue dropped in the meantime just drops it).
unsafe extern "C" fn on_complete(completion: sys::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the Box<Record> leaked by `Image::submit` for this completion, and
    // librbd calls this callback exactly once per completion.
    let mut record = unsafe { Box::from_raw(arg.cast::<Record>()) };
    // SAFETY: `completion` is the finished completion this callback is for; released once here.
    record.result = unsafe { sys::rbd_aio_get_return_value(completion) };
    // SAFETY: as above; nothing uses the completion afterwards.
    unsafe { sys::rbd_aio_release(completion) };
    let done = record.done.clone();
    let wake = Arc::clone(&record.wake);
    if done.send(record).is_ok() {
        if let Some(waker) = wake.get() {
            // Writes its eventfd only if the submitter announced that it sleeps.
            waker.wake();
        }
    }
}

/// A finished operation.
#[derive(Debug)]
pub struct Completion {
    /// The token given to [`Image::submit`].
    pub token: u64,
    /// librbd's result: a negative errno, or 0 / the byte count read.
    pub result: isize,
    /// The operation, with its buffers (to reuse their vector, or drop).
    pub op: Option<AioOp>,
}

/// Where one submitter's completions arrive (one per reactor channel): librbd's threads push,
/// the owner polls; neither side takes a lock.
#[derive(Debug)]
pub struct CompletionQueue {
    done_tx: Sender<Box<Record>>,
    done_rx: Receiver<Box<Record>>,
    /// The waker of the thread that submits (a reactor's), once known: completions wake it.
    wake: Arc<OnceLock<Arc<Waker>>>,
    /// Records to reuse (boxed: librbd holds each by its address while in flight).
    #[allow(clippy::vec_box)]
    free: Vec<Box<Record>>,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("token", &self.token)
            .field("result", &self.result)
            .finish_non_exhaustive()
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        if let Some(waker) = self.wake.get() {
            waker.remove_source();
        }
    }
}

impl CompletionQueue {
    /// A queue with `capacity` operation records made ahead.
    pub fn new(capacity: usize) -> Self {
        let (done_tx, done_rx) = channel();
        let mut queue = CompletionQueue {
            done_tx,
            done_rx,
            wake: Arc::new(OnceLock::new()),
            free: Vec::with_capacity(capacity),
        };
        for _ in 0..capacity {
            let record = queue.new_record();
            queue.free.push(record);
        }
        queue
    }

    fn new_record(&self) -> Box<Record> {
        Box::new(Record {
            token: 0,
            result: 0,
            op: None,
            done: self.done_tx.clone(),
            wake: Arc::clone(&self.wake),
        })
    }

    /// Takes the submitting thread's waker ([`waker::current`]) the first time the queue is
    /// used on a thread that has one (a channel is opened on a control thread and used on its
    /// reactor).
    fn take_thread_waker(&mut self) {
        if self.wake.get().is_none() {
            if let Some(waker) = waker::current() {
                waker.add_source();
                let _ = self.wake.set(waker);
            }
        }
    }

    /// The submitting thread's waker (taken as [`Image::submit`] does), for
    /// [`Image::use_event_socket`].
    pub fn thread_waker(&mut self) -> Option<Arc<Waker>> {
        self.take_thread_waker();
        self.wake.get().cloned()
    }

    fn record(&mut self) -> Box<Record> {
        match self.free.pop() {
            Some(record) => record,
            None => self.new_record(),
        }
    }

    /// Reports every completion that has arrived, without waiting; returns how many.
    pub fn poll(&mut self, mut done: impl FnMut(Completion)) -> usize {
        let mut count = 0;
        loop {
            match self.done_rx.try_recv() {
                Ok(mut record) => {
                    let completion = Completion {
                        token: record.token,
                        result: record.result,
                        op: record.op.take(),
                    };
                    self.free.push(record);
                    done(completion);
                    count += 1;
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => {
                    if count > 0 && self.wake.get().is_some() {
                        waker::arrived(count);
                    }
                    return count;
                }
            }
        }
    }
}
