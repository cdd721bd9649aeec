//! One request served by several bdev I/Os: the tracker of the children still outstanding and of
//! how they ended.
//!
//! A SCSI UNMAP with several block ranges, a WRITE SAME longer than one bdev write, a virtio-blk
//! discard with several segments, an NVMe command split at the controller's transfer limit: each
//! is one parent request that fans out into N bdev I/Os and completes when the last of them does,
//! with the status of the first that failed. [`Fanout`] is that bookkeeping and nothing else; it
//! is a plain `Copy` value kept in the parent's request slot (no allocation, no lock, no
//! reference to the children: every child carries the parent's tag, and the channel's completion
//! for that tag is handed back to the parent's tracker).
//!
//! ```text
//! let mut fanout = Fanout::new();
//! for child in children {
//!     if !fanout.issued(channel.submit(&child)) {
//!         break;                        // refused: issue no more, wait for those already out
//!     }
//! }
//! if fanout.is_done() {                 // nothing outstanding (none needed, or the first refused)
//!     complete(fanout.status());
//! }
//! // ... for every channel completion carrying the parent's tag:
//! if let Some(status) = fanout.completed(io_status) {
//!     complete(status);                 // the last child: Success, or the first failure
//! }
//! ```
//!
//! - [`Fanout::new`]: no child outstanding, status `Success`.
//! - [`Fanout::issued`]: records one submission's result; `true` if it was accepted (one more
//!   child outstanding), `false` if refused (status becomes `Failed` unless a failure was already
//!   recorded; the caller submits no further children).
//! - [`Fanout::completed`]: one child ended; returns `Some(aggregate status)` when it was the last
//!   one outstanding, `None` while others are.
//! - [`Fanout::fail`]: records a failure found by the parent itself (not from a child).
//! - [`Fanout::outstanding`], [`Fanout::is_done`], [`Fanout::status`]: the state.
//!
//! Aggregation: the first status other than `Success` wins, whichever child (or refusal) brought
//! it; later ones are ignored. A completion for a parent with nothing outstanding is ignored
//! (returns `None`) rather than wrapping the count.

use super::IoStatus;

/// A parent request with its outstanding child I/Os and their aggregate status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    outstanding: u32,
    status: IoStatus,
}

impl Default for Fanout {
    fn default() -> Self {
        Fanout::new()
    }
}

impl Fanout {
    /// A parent with no child issued yet.
    pub const fn new() -> Self {
        Fanout {
            outstanding: 0,
            status: IoStatus::Success,
        }
    }

    /// Records the result of submitting one child. `true`: accepted, one more child outstanding.
    /// `false`: refused; the parent is failed and the caller issues no further children.
    pub fn issued<E>(&mut self, submitted: Result<(), E>) -> bool {
        match submitted {
            Ok(()) => {
                self.outstanding = self.outstanding.saturating_add(1);
                true
            }
            Err(_) => {
                self.fail(IoStatus::Failed);
                false
            }
        }
    }

    /// Records a failure of the parent that no child reported (the first failure wins).
    pub fn fail(&mut self, status: IoStatus) {
        if self.status == IoStatus::Success {
            self.status = status;
        }
    }

    /// One child ended with `status`. Returns the parent's aggregate status once no child is
    /// outstanding any more, `None` while some are (or if none was).
    pub fn completed(&mut self, status: IoStatus) -> Option<IoStatus> {
        if self.outstanding == 0 {
            return None;
        }
        self.fail(status);
        self.outstanding -= 1;
        (self.outstanding == 0).then_some(self.status)
    }

    /// Children issued and not yet completed.
    pub fn outstanding(&self) -> u32 {
        self.outstanding
    }

    /// No child is outstanding: the parent completes with [`Fanout::status`].
    pub fn is_done(&self) -> bool {
        self.outstanding == 0
    }

    /// The aggregate status so far: `Success`, or the first failure recorded.
    pub fn status(&self) -> IoStatus {
        self.status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completes_with_the_last_child_and_the_first_failure() {
        let mut f = Fanout::new();
        for _ in 0..3 {
            assert!(f.issued::<()>(Ok(())));
        }
        assert_eq!(f.outstanding(), 3);
        assert_eq!(f.completed(IoStatus::Success), None);
        assert_eq!(f.completed(IoStatus::Unsupported), None);
        assert_eq!(f.completed(IoStatus::Failed), Some(IoStatus::Unsupported));
        assert!(f.is_done());
        // A stray completion does not wrap the count.
        assert_eq!(f.completed(IoStatus::Success), None);
        assert_eq!(f.outstanding(), 0);
    }

    #[test]
    fn all_successful_children_give_success() {
        let mut f = Fanout::new();
        assert!(f.issued::<()>(Ok(())));
        assert!(f.issued::<()>(Ok(())));
        assert_eq!(f.completed(IoStatus::Success), None);
        assert_eq!(f.completed(IoStatus::Success), Some(IoStatus::Success));
    }

    #[test]
    fn a_refused_first_child_leaves_nothing_outstanding_and_fails() {
        let mut f = Fanout::new();
        assert!(!f.issued(Err("queue full")));
        assert!(f.is_done());
        assert_eq!(f.status(), IoStatus::Failed);
    }

    #[test]
    fn a_refusal_after_some_children_fails_the_parent_once_they_complete() {
        let mut f = Fanout::new();
        assert!(f.issued::<()>(Ok(())));
        assert!(!f.issued(Err(())));
        assert!(!f.is_done());
        assert_eq!(f.completed(IoStatus::Success), Some(IoStatus::Failed));
    }

    #[test]
    fn no_children_is_done_at_once_with_success() {
        let f = Fanout::new();
        assert!(f.is_done());
        assert_eq!(f.status(), IoStatus::Success);
    }

    #[test]
    fn the_first_recorded_failure_wins_over_later_ones() {
        let mut f = Fanout::new();
        f.fail(IoStatus::Unsupported);
        f.fail(IoStatus::Failed);
        assert!(f.issued::<()>(Ok(())));
        assert_eq!(f.completed(IoStatus::Failed), Some(IoStatus::Unsupported));
    }
}
