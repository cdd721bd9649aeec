//! A device's part in its reactor's kick wait (`reactor::KICK_SPIN_ROUNDS`): turning the
//! driver's kicks on for every running queue, with their eventfds to wait on, and off again
//! after. Its own module, off the poll path: the wait is cold code, and kept apart it leaves how
//! the poll loop's code is compiled alone.

use std::os::fd::AsRawFd;

use rvhost_platform_linux::waker;

use super::super::memory::GuestMemoryTable;
use super::vqueue::{ShellRing, VirtQueue};
use crate::reactor::BlockReadiness;

/// Turns kicks on for each queue that takes requests and appends its kick eventfd to `fds`;
/// `Work` if a queue already has requests (or heads to resubmit), `Refused` if one has no kick
/// eventfd.
#[inline(never)]
pub(super) fn prepare<V: ShellRing, R, Q>(
    queues: &mut [Option<VirtQueue<V, R, Q>>],
    mem: &GuestMemoryTable,
    fds: &mut Vec<libc::pollfd>,
) -> BlockReadiness {
    for q in queues.iter_mut().flatten() {
        if !q.accepts_requests() {
            continue;
        }
        if q.has_resubmit() {
            return BlockReadiness::Work;
        }
        let Some(kick) = &q.kick else {
            return BlockReadiness::Refused;
        };
        // Kicks on, then the ring re-checked: a request the driver added before it could see
        // them is found here, one added after is kicked. A ring that cannot be written is found
        // broken by the next poll.
        match q.vq.enable_kicks(mem) {
            Ok(false) => fds.push(waker::readable(kick.event_fd().as_raw_fd())),
            Ok(true) | Err(_) => return BlockReadiness::Work,
        }
    }
    BlockReadiness::Ready
}

/// Ends [`prepare`]: `fds` are the descriptors it appended, in its order, with what the wait
/// found. Resets the kicked queues' eventfds (so the next wait does not end at once) and turns
/// every queue's kicks off again (a queue it did not reach has them off: a comparison).
#[inline(never)]
pub(super) fn end<V: ShellRing, R, Q>(
    queues: &mut [Option<VirtQueue<V, R, Q>>],
    mem: &GuestMemoryTable,
    fds: &[libc::pollfd],
) {
    let mut fds = fds.iter();
    for q in queues.iter_mut().flatten() {
        if !q.accepts_requests() {
            continue;
        }
        if let Some(kick) = &q.kick {
            if fds.next().is_some_and(|fd| fd.revents != 0) {
                let _ = kick.event_fd().consume();
            }
        }
        if let Err(err) = q.vq.disable_kicks(mem) {
            tracing::debug!(%err, "turning kicks off after a wait");
        }
    }
}
