//! A trivial in-process "device" for measuring the initiator alone: it completes every request
//! at once with success, touching only the rings and the status byte, so what limits the rate
//! is the initiator (and the cache-line traffic any real target also causes).

use std::sync::atomic::{AtomicBool, Ordering};

use rvhost_core::virtio::ring::{
    RING_ARRAY_OFFSET, RING_FLAGS_OFFSET, RING_IDX_OFFSET, VIRTQ_USED_F_NO_NOTIFY,
};

use crate::device::{RequestFormat, DESCS_PER_REQUEST};
use crate::shm::{QueueLayout, META_IN_OFFSET};
use crate::vring::Shared;
use crate::PerfError;

/// The responder: serves every queue in `layouts` from one thread.
#[derive(Debug)]
pub struct Responder<'m> {
    mem: Shared<'m>,
    layouts: Vec<QueueLayout>,
    format: RequestFormat,
}

impl<'m> Responder<'m> {
    /// A responder for these queues.
    pub fn new(mem: Shared<'m>, layouts: Vec<QueueLayout>, format: RequestFormat) -> Self {
        Responder {
            mem,
            layouts,
            format,
        }
    }

    /// Polls until `stop`, pinned to `cpu` if given.
    pub fn serve(&self, cpu: Option<usize>, stop: &AtomicBool) -> Result<(), PerfError> {
        if let Some(cpu) = cpu {
            rvhost_platform_linux::cpu::pin_current_thread(cpu)
                .map_err(|source| PerfError::Pin { cpu, source })?;
        }
        let mut last_avail = vec![0u16; self.layouts.len()];
        let mut used_idx = vec![0u16; self.layouts.len()];
        for l in &self.layouts {
            // It polls, so it never wants kicks.
            self.mem
                .u16_at(l.used + RING_FLAGS_OFFSET as usize)?
                .store(VIRTQ_USED_F_NO_NOTIFY.to_le(), Ordering::Relaxed);
        }
        let mut spins = 0u32;
        loop {
            // Checking the stop flag every poll would add a shared load per round; every 1024th
            // is plenty.
            spins = spins.wrapping_add(1);
            if spins % 1024 == 0 && stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            for (qi, l) in self.layouts.iter().enumerate() {
                let avail = u16::from_le(
                    self.mem
                        .u16_at(l.avail + RING_IDX_OFFSET as usize)?
                        .load(Ordering::Acquire),
                );
                let mut seen = last_avail[qi];
                if avail == seen {
                    continue;
                }
                let mut used = used_idx[qi];
                while seen != avail {
                    let pos = usize::from(seen & (l.size - 1));
                    let head = u16::from_le(
                        self.mem
                            .u16_at(l.avail + RING_ARRAY_OFFSET as usize + 2 * pos)?
                            .load(Ordering::Relaxed),
                    );
                    let slot = usize::from(head / DESCS_PER_REQUEST);
                    let status = l.meta_at(slot) + META_IN_OFFSET;
                    match self.format {
                        RequestFormat::Blk => self.mem.u8_at(status)?.store(0, Ordering::Relaxed),
                        RequestFormat::Scsi => {
                            self.mem.u8_at(status + 10)?.store(0, Ordering::Relaxed);
                            self.mem.u8_at(status + 11)?.store(0, Ordering::Relaxed);
                        }
                    }
                    let upos = usize::from(used & (l.size - 1));
                    let at = l.used + RING_ARRAY_OFFSET as usize + 8 * upos;
                    self.mem
                        .u32_at(at)?
                        .store(u32::from(head).to_le(), Ordering::Relaxed);
                    self.mem.u32_at(at + 4)?.store(1, Ordering::Relaxed);
                    used = used.wrapping_add(1);
                    seen = seen.wrapping_add(1);
                }
                self.mem
                    .u16_at(l.used + RING_IDX_OFFSET as usize)?
                    .store(used.to_le(), Ordering::Release);
                last_avail[qi] = seen;
                used_idx[qi] = used;
            }
        }
    }
}
