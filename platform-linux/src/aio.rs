//! Asynchronous file I/O through Linux AIO (`io_setup`/`io_submit`/`io_getevents`), for hosts
//! where io_uring is disabled or blocked by a seccomp profile.
//!
//! Same safe contract as [`crate::uring::Uring`]: operations are submitted by value and handed
//! back with their completion, so buffers stay alive while the kernel uses them. Linux AIO has no
//! `fallocate`, so [`FileOp::Fallocate`] (and `BLKDISCARD`) run synchronously at submission and
//! complete at the next reap.

use std::io;
use std::os::fd::AsRawFd;

use crate::uring::{last_errno, run_block_discard, FileCompletion, FileIoError, FileOp, Slots};

const IOCB_CMD_PREAD: u16 = 0;
const IOCB_CMD_PWRITE: u16 = 1;
const IOCB_CMD_FDSYNC: u16 = 3;
const IOCB_CMD_PREADV: u16 = 7;
const IOCB_CMD_PWRITEV: u16 = 8;

/// `struct iocb` of <linux/aio_abi.h> (little-endian field order of the key/rw_flags pair).
#[repr(C)]
#[derive(Default)]
struct Iocb {
    aio_data: u64,
    aio_key: u32,
    aio_rw_flags: i32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

/// `struct io_event`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

const _: () = assert!(std::mem::size_of::<Iocb>() == 64);
const _: () = assert!(std::mem::size_of::<IoEvent>() == 32);

/// Events fetched per `io_getevents` call.
const EVENT_BATCH: usize = 64;

/// One Linux AIO context, for one thread.
#[derive(Debug)]
pub struct AioContext {
    ctx: libc::c_ulong,
    slots: Slots,
}

impl AioContext {
    /// A context with room for `entries` operations in flight.
    pub fn new(entries: u32) -> Result<Self, FileIoError> {
        let mut ctx: libc::c_ulong = 0;
        // SAFETY: io_setup writes the new context id through the pointer, which points at `ctx`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_io_setup,
                libc::c_long::from(entries as i32),
                &mut ctx as *mut libc::c_ulong,
            )
        };
        if rc < 0 {
            return Err(FileIoError::Setup {
                engine: "Linux AIO",
                source: io::Error::last_os_error(),
            });
        }
        Ok(AioContext {
            ctx,
            slots: Slots::new(entries),
        })
    }

    /// Operations submitted whose completion has not been reaped.
    pub fn in_flight(&self) -> usize {
        self.slots.in_flight() + self.slots.ready.len()
    }

    /// Submits `op` to the kernel at once. On failure the operation is handed back untouched.
    pub fn submit(&mut self, op: FileOp, user_data: u64) -> Result<(), Box<(FileOp, FileIoError)>> {
        let (file, opcode, buf, nbytes, offset) = match &op {
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
                    Err(e) => return Err(Box::new((op, e))),
                };
                let opcode = if matches!(op, FileOp::Read { .. }) {
                    IOCB_CMD_PREAD
                } else {
                    IOCB_CMD_PWRITE
                };
                (file, opcode, ptr as u64, range.len() as u64, *offset)
            }
            FileOp::ReadV { file, offset, bufs } | FileOp::WriteV { file, offset, bufs } => {
                let (iovecs, count) = match bufs.submission() {
                    Ok(s) => s,
                    Err(e) => return Err(Box::new((op, e))),
                };
                let opcode = if matches!(op, FileOp::ReadV { .. }) {
                    IOCB_CMD_PREADV
                } else {
                    IOCB_CMD_PWRITEV
                };
                (file, opcode, iovecs as u64, u64::from(count), *offset)
            }
            FileOp::DataSync { file } => (file, IOCB_CMD_FDSYNC, 0, 0, 0),
            FileOp::Fallocate {
                file,
                mode,
                offset,
                len,
            } => {
                let result = run_fallocate(file, *mode, *offset, *len);
                self.slots.ready.push_back(FileCompletion {
                    user_data,
                    result,
                    op,
                });
                return Ok(());
            }
            FileOp::BlockDiscard { file, offset, len } => {
                let result = run_block_discard(file, *offset, *len);
                self.slots.ready.push_back(FileCompletion {
                    user_data,
                    result,
                    op,
                });
                return Ok(());
            }
        };
        let Ok(offset) = i64::try_from(offset) else {
            return Err(Box::new((
                op,
                FileIoError::Submit(io::Error::from_raw_os_error(libc::EINVAL)),
            )));
        };
        let Some(slot) = self.slots.take_free() else {
            return Err(Box::new((op, FileIoError::Full)));
        };
        let fd = file.as_raw_fd() as u32;
        let iocb = Iocb {
            aio_data: u64::from(slot),
            aio_lio_opcode: opcode,
            aio_fildes: fd,
            aio_buf: buf,
            aio_nbytes: nbytes,
            aio_offset: offset,
            ..Iocb::default()
        };
        self.slots.fill(slot, user_data, op);
        let mut list = [&iocb as *const Iocb];
        loop {
            // SAFETY: `list` points at one valid iocb, which the kernel copies during the call
            // (with the iovec array of a vectored op); the buffer (or the `HostBuffers` owner) it
            // names belongs to the `FileOp` stored in `slot`, which stays there until this slot's
            // event is reaped, and `Drop` waits for all outstanding events.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_io_submit,
                    self.ctx,
                    1 as libc::c_long,
                    list.as_mut_ptr(),
                )
            };
            if rc == 1 {
                return Ok(());
            }
            let errno = if rc < 0 { last_errno() } else { libc::EAGAIN };
            if errno == libc::EINTR {
                continue;
            }
            // Not accepted: the kernel holds no reference to the buffer.
            return match self.slots.complete(u64::from(slot), 0) {
                Some(c) => Err(Box::new((
                    c.op,
                    FileIoError::Submit(io::Error::from_raw_os_error(errno)),
                ))),
                None => Ok(()),
            };
        }
    }

    /// Reports every finished operation through `done` without blocking.
    pub fn reap(&mut self, done: &mut dyn FnMut(FileCompletion)) -> usize {
        self.reap_events(done, 0)
    }

    /// Like [`AioContext::reap`], but blocks until at least one operation has finished (returns
    /// 0 at once when nothing is in flight).
    pub fn wait(&mut self, done: &mut dyn FnMut(FileCompletion)) -> usize {
        if !self.slots.ready.is_empty() {
            return self.reap(done);
        }
        self.reap_events(done, 1)
    }

    fn reap_events(&mut self, done: &mut dyn FnMut(FileCompletion), min_nr: libc::c_long) -> usize {
        let mut count = 0;
        while let Some(c) = self.slots.ready.pop_front() {
            done(c);
            count += 1;
        }
        if self.slots.in_flight() == 0 {
            return count;
        }
        let mut events = [IoEvent::default(); EVENT_BATCH];
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let timeout: *const libc::timespec = if min_nr == 0 { &zero } else { std::ptr::null() };
        loop {
            // SAFETY: `events` has room for EVENT_BATCH events, the count passed; `timeout` is
            // null or points at `zero`, alive for the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.ctx,
                    min_nr,
                    EVENT_BATCH as libc::c_long,
                    events.as_mut_ptr(),
                    timeout,
                )
            };
            if rc < 0 {
                if last_errno() == libc::EINTR {
                    continue;
                }
                tracing::warn!(error = %io::Error::last_os_error(), "io_getevents failed");
                return count;
            }
            let got = usize::try_from(rc).unwrap_or(0).min(EVENT_BATCH);
            for event in &events[..got] {
                if let Some(c) = self.slots.complete(event.data, event.res) {
                    done(c);
                    count += 1;
                }
            }
            if got < EVENT_BATCH || min_nr > 0 {
                return count;
            }
        }
    }
}

fn run_fallocate(file: &std::fs::File, mode: i32, offset: u64, len: u64) -> Result<usize, i32> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(libc::EINVAL);
    };
    // SAFETY: fallocate takes plain integers; the fd is kept open by `file`.
    let rc = unsafe { libc::fallocate64(file.as_raw_fd(), mode, offset, len) };
    if rc < 0 {
        Err(last_errno())
    } else {
        Ok(0)
    }
}

impl Drop for AioContext {
    fn drop(&mut self) {
        // Outstanding reads may still write into slot buffers: wait for them before freeing.
        while self.slots.in_flight() > 0 {
            if self.reap_events(&mut |_| {}, 1) == 0 && self.slots.in_flight() > 0 {
                // io_getevents failed for good; io_destroy below still waits for the requests.
                break;
            }
        }
        // SAFETY: `ctx` came from io_setup and is destroyed once; io_destroy waits for any
        // request still outstanding.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.ctx) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uring::AlignedBuf;
    use std::fs::File;
    use std::sync::Arc;

    #[test]
    fn write_read_fdsync_and_fallocate() {
        let path = std::env::temp_dir().join(format!("rvhost-aio-{}", std::process::id()));
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap(),
        );
        file.set_len(65536).unwrap();
        let mut ctx = AioContext::new(4).unwrap();
        let mut buf = AlignedBuf::new(4096).unwrap();
        buf.as_mut_slice().fill(0x5a);
        ctx.submit(
            FileOp::Write {
                file: Arc::clone(&file),
                offset: 8192,
                buf,
                range: 0..4096,
            },
            1,
        )
        .unwrap();
        ctx.submit(
            FileOp::DataSync {
                file: Arc::clone(&file),
            },
            2,
        )
        .unwrap();
        ctx.submit(
            FileOp::Fallocate {
                file: Arc::clone(&file),
                mode: libc::FALLOC_FL_ZERO_RANGE,
                offset: 8192 + 1024,
                len: 512,
            },
            3,
        )
        .unwrap();
        let mut results = Vec::new();
        while results.len() < 3 {
            ctx.reap(&mut |c| results.push((c.user_data, c.result)));
        }
        results.sort();
        assert_eq!(results, vec![(1, Ok(4096)), (2, Ok(0)), (3, Ok(0))]);
        ctx.submit(
            FileOp::Read {
                file: Arc::clone(&file),
                offset: 8192,
                buf: AlignedBuf::new(4096).unwrap(),
                range: 0..2048,
            },
            4,
        )
        .unwrap();
        let mut back = None;
        while back.is_none() {
            ctx.reap(&mut |c| back = Some(c));
        }
        let c = back.unwrap();
        assert_eq!(c.result, Ok(2048));
        let FileOp::Read { buf, .. } = c.op else {
            panic!("wrong op back")
        };
        let data = &buf.as_slice()[..2048];
        assert!(data[..1024].iter().all(|b| *b == 0x5a));
        assert!(data[1024..1536].iter().all(|b| *b == 0));
        assert!(data[1536..].iter().all(|b| *b == 0x5a));
        drop(File::open(&path).unwrap());
        std::fs::remove_file(path).unwrap();
    }
}
