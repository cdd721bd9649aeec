//! The vhost-scsi controller: up to [`MAX_TARGETS`] SCSI targets, each with one LUN (LUN 0)
//! backed by one bdev, exported as a virtio-scsi device.
//!
//! [`ScsiController`] is the control-side half (features, config space, which bdev is behind
//! which target). Every frontend session gets a [`device::ScsiDevice`] on the controller's
//! reactor. Targets may be attached and detached while sessions run: the controller sends the
//! change to every session's device over its reactor's control ring (as every control operation
//! travels) and waits until each has applied it (for a detach: until the target's in-flight I/O
//! completed), and the device posts a hot-plug event to the guest.

mod bdev_lun;
pub mod device;

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rvhost_core::scsi::lun::{LunConfig, LunConfigError};
use rvhost_core::scsi::ScsiLun;
use rvhost_core::virtio::{bit, feature};
use rvhost_core::virtio_scsi::{feature as scsi_feature, ConfigRepr};

use crate::bdev::{Bdev, BdevError, IoKind, IoMemory};
use crate::reactor::ReactorHandle;
use crate::vhost::device::{config_range, DeviceType};
use crate::vhost::DeviceId;
use device::{AttachedTarget, ScsiTransport};

/// Targets per controller (SPDK's `SPDK_VHOST_SCSI_CTRLR_MAX_DEVS`).
pub const MAX_TARGETS: usize = 8;
/// Request queues a frontend may use (`num_queues`); the device has two more (control, event).
pub const MAX_REQUEST_QUEUES: u16 = 16;
/// Largest virtqueue accepted by `SET_VRING_NUM`; also the per-queue request-slot count.
pub const MAX_QUEUE_SIZE: u16 = crate::vhost::device::MAX_QUEUE_SIZE;
/// Sense buffer size in responses. QEMU's vhost-scsi refuses any other value from the driver.
pub const SENSE_SIZE: u32 = 96;
/// CDB size in requests. QEMU's vhost-scsi refuses any other value from the driver.
pub const CDB_SIZE: u32 = 32;
/// Data segments per command announced in the config space.
pub const SEG_MAX: u32 = 126;
/// Most 512-byte sectors per command announced in the config space (4 MiB, the LUN's MAXIMUM
/// TRANSFER LENGTH).
pub const MAX_SECTORS: u32 = 8192;
/// Commands per LUN announced in the config space.
pub const CMD_PER_LUN: u32 = 128;

/// How long a target change may wait for a session to apply it (a detach waits for I/O).
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of target management.
#[derive(Debug, thiserror::Error)]
pub enum ScsiError {
    /// The target number is outside 0..=7.
    #[error("target number {0} is out of range (0-{max})", max = MAX_TARGETS - 1)]
    TargetOutOfRange(i64),
    /// The target is in use.
    #[error("target {0} is already in use")]
    TargetInUse(u8),
    /// Every target is in use.
    #[error("all {MAX_TARGETS} targets are in use")]
    NoFreeTarget,
    /// No such target.
    #[error("target {0} does not exist")]
    NoSuchTarget(u8),
    /// The bdev cannot be a SCSI LUN (block size, capacity).
    #[error("bdev {bdev} cannot be a SCSI LUN: {why}")]
    Lun {
        /// The bdev.
        bdev: String,
        /// Why.
        why: LunConfigError,
    },
    /// A channel to the bdev could not be opened.
    #[error("opening a channel to {bdev}: {source}")]
    Channel {
        /// The bdev.
        bdev: String,
        /// Why.
        source: BdevError,
    },
}

/// A change to a session's targets, applied on its reactor.
pub enum TargetOp {
    /// A new target; answered once it serves requests.
    Attach {
        /// Target number.
        target: u8,
        /// Its LUN and bdev channel.
        attached: Box<AttachedTarget>,
        /// Acknowledged once attached.
        reply: SyncSender<()>,
    },
    /// Removes a target; answered once its in-flight I/O completed.
    Detach {
        /// Target number.
        target: u8,
        /// Acknowledged once drained.
        reply: SyncSender<()>,
    },
    /// The target's bdev changed size: its LUN raises a capacity-changed unit attention and the
    /// device posts a PARAM_CHANGE event; answered once in effect.
    Resize {
        /// Target number.
        target: u8,
        /// The new size in blocks.
        num_blocks: u64,
        /// Acknowledged once applied.
        reply: SyncSender<()>,
    },
}

impl std::fmt::Debug for TargetOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetOp::Attach { target, .. } => write!(f, "Attach({target})"),
            TargetOp::Detach { target, .. } => write!(f, "Detach({target})"),
            TargetOp::Resize {
                target, num_blocks, ..
            } => write!(f, "Resize({target}, {num_blocks})"),
        }
    }
}

/// One attached target as the controller keeps it.
#[derive(Debug, Clone)]
struct TargetSpec {
    bdev: Arc<dyn Bdev>,
    lun: LunConfig,
}

impl TargetSpec {
    fn open(&self) -> Result<AttachedTarget, ScsiError> {
        let lun = ScsiLun::new(self.lun).map_err(|why| ScsiError::Lun {
            bdev: self.bdev.name().to_string(),
            why,
        })?;
        let channel =
            Arc::clone(&self.bdev)
                .open_channel()
                .map_err(|source| ScsiError::Channel {
                    bdev: self.bdev.name().to_string(),
                    source,
                })?;
        Ok(AttachedTarget::new(
            lun,
            channel,
            self.bdev.supports(IoKind::Flush),
            self.bdev.supports(IoKind::WriteZeroes),
        ))
    }
}

/// The LUN a bdev becomes: its geometry and capabilities, INQUIRY product `rvhost <kind>` (kind
/// from the bdev's product name, `Malloc` for `Malloc disk`), serial and NAA identifier from its
/// UUID.
pub fn lun_config(bdev: &dyn Bdev) -> Result<LunConfig, LunConfigError> {
    let kind: String = bdev
        .product_name()
        .split_whitespace()
        .next()
        .unwrap_or(bdev.module_name())
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(9)
        .collect();
    let mut config =
        LunConfig::new(bdev.block_size(), bdev.num_blocks(), bdev.uuid()).with_bdev_kind(&kind)?;
    config.supports_unmap = bdev.supports(IoKind::Unmap);
    config.supports_write_zeroes = bdev.supports(IoKind::WriteZeroes);
    config.supports_flush = bdev.supports(IoKind::Flush);
    // A bdev with something to flush has a volatile cache, and says so (WCE=1).
    config.write_cache = config.supports_flush;
    Ok(config)
}

/// What `vhost_get_controllers` shows of one target, in SPDK's shape.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetInfo {
    /// SPDK's target name (`Target 0`).
    pub target_name: String,
    /// Target number.
    pub id: u8,
    /// Target number as SPDK reports it.
    pub scsi_dev_num: u8,
    /// The LUNs (always one: LUN 0).
    pub luns: Vec<LunInfo>,
}

/// One LUN of a [`TargetInfo`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct LunInfo {
    /// LUN number.
    pub id: u16,
    /// The bdev behind it.
    pub bdev_name: String,
}

/// A connected session: its device and the reactor that polls it.
struct Session {
    device: DeviceId,
    reactor: Arc<ReactorHandle>,
}

impl Session {
    /// Queues `op` on the session's reactor; `false` if that reactor is gone.
    fn send(&self, op: TargetOp) -> bool {
        self.reactor.post(self.device, Box::new(op)).is_ok()
    }
}

struct State {
    targets: Vec<Option<TargetSpec>>,
    sessions: Vec<Session>,
}

/// A vhost-scsi controller's control-side state.
pub struct ScsiController {
    name: String,
    state: Mutex<State>,
}

impl std::fmt::Debug for ScsiController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScsiController")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn wait_all(name: &str, replies: Vec<(DeviceId, Receiver<()>)>) {
    for (device, rx) in replies {
        match rx.recv_timeout(APPLY_TIMEOUT) {
            Ok(()) => {}
            // The session ended meanwhile: nothing left to apply the change to.
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::error!(
                    controller = name,
                    device = device.0,
                    "session did not apply a target change in time"
                );
            }
        }
    }
}

impl ScsiController {
    /// An empty controller.
    pub fn new(name: &str) -> Self {
        ScsiController {
            name: name.to_string(),
            state: Mutex::new(State {
                targets: (0..MAX_TARGETS).map(|_| None).collect(),
                sessions: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches `bdev` as LUN 0 of target `target` (`None`: the first free one) and returns the
    /// target number once every connected session serves it.
    pub fn add_target(&self, target: Option<u8>, bdev: Arc<dyn Bdev>) -> Result<u8, ScsiError> {
        let mut state = self.lock();
        let t = match target {
            Some(t) => {
                let slot = state
                    .targets
                    .get(usize::from(t))
                    .ok_or(ScsiError::TargetOutOfRange(i64::from(t)))?;
                if slot.is_some() {
                    return Err(ScsiError::TargetInUse(t));
                }
                t
            }
            None => {
                let free = state
                    .targets
                    .iter()
                    .position(Option::is_none)
                    .ok_or(ScsiError::NoFreeTarget)?;
                u8::try_from(free).map_err(|_| ScsiError::NoFreeTarget)?
            }
        };
        let lun = lun_config(bdev.as_ref()).map_err(|why| ScsiError::Lun {
            bdev: bdev.name().to_string(),
            why,
        })?;
        let spec = TargetSpec { bdev, lun };
        // Open every session's channel first, so a failure changes nothing.
        let mut opened = Vec::with_capacity(state.sessions.len());
        for _ in &state.sessions {
            opened.push(spec.open()?);
        }
        let mut replies = Vec::new();
        let mut sessions = std::mem::take(&mut state.sessions);
        let mut kept = Vec::with_capacity(sessions.len());
        for (session, attached) in sessions.drain(..).zip(opened) {
            let (tx, rx) = mpsc::sync_channel(1);
            let op = TargetOp::Attach {
                target: t,
                attached: Box::new(attached),
                reply: tx,
            };
            if session.send(op) {
                replies.push((session.device, rx));
                kept.push(session);
            }
        }
        state.sessions = kept;
        if let Some(slot) = state.targets.get_mut(usize::from(t)) {
            *slot = Some(spec.clone());
        }
        wait_all(&self.name, replies);
        tracing::info!(controller = %self.name, target = t, bdev = %spec.bdev.name(), "target attached");
        Ok(t)
    }

    /// Detaches target `target`: new commands to it fail with BAD_TARGET, in-flight ones complete,
    /// and each session posts a REMOVED event. Returns once every session is done with it.
    pub fn remove_target(&self, target: u8) -> Result<(), ScsiError> {
        let mut state = self.lock();
        let removed = state
            .targets
            .get_mut(usize::from(target))
            .ok_or(ScsiError::TargetOutOfRange(i64::from(target)))?
            .take();
        let Some(spec) = removed else {
            return Err(ScsiError::NoSuchTarget(target));
        };
        let replies = Self::send_detach(&mut state, target);
        wait_all(&self.name, replies);
        tracing::info!(controller = %self.name, target, bdev = %spec.bdev.name(), "target detached");
        Ok(())
    }

    fn send_detach(state: &mut State, target: u8) -> Vec<(DeviceId, Receiver<()>)> {
        let mut replies = Vec::new();
        state.sessions.retain(|session| {
            let (tx, rx) = mpsc::sync_channel(1);
            let sent = session.send(TargetOp::Detach { target, reply: tx });
            if sent {
                replies.push((session.device, rx));
            }
            sent
        });
        replies
    }

    /// Detaches every target backed by `bdev_name` (the bdev is being deleted); returns how many.
    pub fn detach_bdev(&self, bdev_name: &str) -> usize {
        let mut state = self.lock();
        let mut count = 0;
        for t in 0..MAX_TARGETS {
            let matches = state
                .targets
                .get(t)
                .and_then(Option::as_ref)
                .is_some_and(|s| s.bdev.name() == bdev_name);
            if !matches {
                continue;
            }
            if let Some(slot) = state.targets.get_mut(t) {
                *slot = None;
            }
            let target = u8::try_from(t).unwrap_or(u8::MAX);
            let replies = Self::send_detach(&mut state, target);
            wait_all(&self.name, replies);
            tracing::info!(controller = %self.name, target, bdev = bdev_name, "target detached with its bdev");
            count += 1;
        }
        count
    }

    /// Every target backed by `bdev_name` now has `num_blocks` blocks: sessions started from
    /// now on see that size, and every connected session's LUN raises a capacity-changed unit
    /// attention and posts a PARAM_CHANGE event. Returns how many targets use the bdev.
    pub fn resize_bdev(&self, bdev_name: &str, num_blocks: u64) -> usize {
        let mut state = self.lock();
        let mut count = 0;
        for t in 0..MAX_TARGETS {
            let Some(spec) = state
                .targets
                .get_mut(t)
                .and_then(Option::as_mut)
                .filter(|s| s.bdev.name() == bdev_name)
            else {
                continue;
            };
            spec.lun.num_blocks = num_blocks;
            let target = u8::try_from(t).unwrap_or(u8::MAX);
            let mut replies = Vec::new();
            state.sessions.retain(|session| {
                let (tx, rx) = mpsc::sync_channel(1);
                let sent = session.send(TargetOp::Resize {
                    target,
                    num_blocks,
                    reply: tx,
                });
                if sent {
                    replies.push((session.device, rx));
                }
                sent
            });
            wait_all(&self.name, replies);
            tracing::info!(controller = %self.name, target, bdev = bdev_name, num_blocks, "target resized");
            count += 1;
        }
        count
    }

    /// Whether any target uses `bdev_name`.
    pub fn uses_bdev(&self, bdev_name: &str) -> bool {
        self.lock()
            .targets
            .iter()
            .flatten()
            .any(|s| s.bdev.name() == bdev_name)
    }

    /// The attached targets, for `vhost_get_controllers`.
    pub fn targets(&self) -> Vec<TargetInfo> {
        self.lock()
            .targets
            .iter()
            .enumerate()
            .filter_map(|(t, spec)| {
                let spec = spec.as_ref()?;
                let id = u8::try_from(t).ok()?;
                Some(TargetInfo {
                    target_name: format!("Target {id}"),
                    id,
                    scsi_dev_num: id,
                    luns: vec![LunInfo {
                        id: 0,
                        bdev_name: spec.bdev.name().to_string(),
                    }],
                })
            })
            .collect()
    }

    /// The config space as this controller reports it.
    pub fn config(&self) -> ConfigRepr {
        ConfigRepr {
            num_queues: u32::from(MAX_REQUEST_QUEUES),
            seg_max: SEG_MAX,
            max_sectors: MAX_SECTORS,
            cmd_per_lun: CMD_PER_LUN,
            event_info_size: rvhost_core::virtio_scsi::EVENT_LEN as u32,
            sense_size: SENSE_SIZE,
            cdb_size: CDB_SIZE,
            max_channel: 0,
            max_target: (MAX_TARGETS - 1) as u16,
            max_lun: 0,
        }
    }
}

impl DeviceType for ScsiController {
    type Handler = ScsiTransport;

    fn features(&self) -> u64 {
        // CHANGE is offered because QEMU's `param_change` property defaults to on and a frontend
        // acknowledging it must not fail the handshake; the device may send PARAM_CHANGE events.
        bit(feature::VIRTIO_F_VERSION_1)
            | bit(feature::VIRTIO_F_RING_INDIRECT_DESC)
            | bit(feature::VIRTIO_F_RING_EVENT_IDX)
            | bit(feature::VIRTIO_F_RING_PACKED)
            | bit(scsi_feature::VIRTIO_SCSI_F_HOTPLUG)
            | bit(scsi_feature::VIRTIO_SCSI_F_CHANGE)
    }

    fn read_config(&self, offset: u32, len: u32) -> Result<Vec<u8>, String> {
        config_range(&self.config().to_bytes(), offset, len)
    }

    fn max_queues(&self) -> u16 {
        MAX_REQUEST_QUEUES + 2
    }

    fn max_queue_size(&self) -> u16 {
        MAX_QUEUE_SIZE
    }

    fn prepare_memory(&self, mem: &IoMemory) {
        let bdevs: Vec<Arc<dyn Bdev>> = self
            .lock()
            .targets
            .iter()
            .flatten()
            .map(|spec| Arc::clone(&spec.bdev))
            .collect();
        // Outside the lock: preparing may take a while (mapping a large guest for DMA).
        for bdev in bdevs {
            bdev.prepare_memory(mem);
        }
    }

    fn new_handler(
        &self,
        id: DeviceId,
        reactor: &Arc<ReactorHandle>,
    ) -> Result<ScsiTransport, String> {
        let mut state = self.lock();
        let mut targets = Vec::with_capacity(MAX_TARGETS);
        for spec in &state.targets {
            targets.push(match spec {
                Some(spec) => Some(spec.open().map_err(|e| e.to_string())?),
                None => None,
            });
        }
        state.sessions.push(Session {
            device: id,
            reactor: Arc::clone(reactor),
        });
        tracing::debug!(controller = %self.name, device = id.0, "new scsi session");
        Ok(ScsiTransport::new(id, targets))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::malloc::{MallocBdev, MemoryBudget};

    fn malloc(name: &str) -> Arc<dyn Bdev> {
        MallocBdev::new(name, 64, 512, [9; 16], &MemoryBudget::new(1 << 20)).unwrap()
    }

    #[test]
    fn features_and_config_space() {
        let c = ScsiController::new("c");
        let f = c.features();
        for bit_no in [
            scsi_feature::VIRTIO_SCSI_F_HOTPLUG,
            scsi_feature::VIRTIO_SCSI_F_CHANGE,
            feature::VIRTIO_F_VERSION_1,
        ] {
            assert_ne!(f & bit(bit_no), 0, "feature {bit_no}");
        }
        // No bidirectional commands, no protection information.
        assert_eq!(f & bit(scsi_feature::VIRTIO_SCSI_F_INOUT), 0);
        assert_eq!(f & bit(scsi_feature::VIRTIO_SCSI_F_T10_PI), 0);
        let all = c.read_config(0, 36).unwrap();
        let config = ConfigRepr::parse(&all).unwrap();
        assert_eq!(config.sense_size, 96);
        assert_eq!(config.cdb_size, 32);
        assert_eq!(config.max_target, 7);
        assert_eq!(config.num_queues, u32::from(MAX_REQUEST_QUEUES));
        assert_eq!(c.read_config(24, 4).unwrap(), 32u32.to_le_bytes());
        assert!(c.read_config(34, 4).is_err(), "past the end");
        assert!(c.read_config(u32::MAX, 4).is_err(), "overflowing offset");
        assert_eq!(c.max_queues(), MAX_REQUEST_QUEUES + 2);
    }

    #[test]
    fn target_numbers_are_checked_and_listed() {
        let c = ScsiController::new("c");
        assert_eq!(c.add_target(Some(5), malloc("A")).unwrap(), 5);
        assert!(matches!(
            c.add_target(Some(5), malloc("B")),
            Err(ScsiError::TargetInUse(5))
        ));
        assert!(matches!(
            c.add_target(Some(8), malloc("B")),
            Err(ScsiError::TargetOutOfRange(8))
        ));
        for expected in [0u8, 1, 2, 3, 4, 6, 7] {
            assert_eq!(c.add_target(None, malloc("B")).unwrap(), expected);
        }
        assert!(matches!(
            c.add_target(None, malloc("C")),
            Err(ScsiError::NoFreeTarget)
        ));
        assert!(c.uses_bdev("A"));
        let listed = c.targets();
        assert_eq!(listed.len(), 8);
        assert_eq!(listed[5].luns[0].bdev_name, "A");
        assert_eq!(listed[5].target_name, "Target 5");
        c.remove_target(5).unwrap();
        assert!(matches!(
            c.remove_target(5),
            Err(ScsiError::NoSuchTarget(5))
        ));
        assert!(!c.uses_bdev("A"));
        assert_eq!(c.detach_bdev("B"), 7);
        assert!(c.targets().is_empty());
    }

    #[test]
    fn lun_identity_derives_from_the_bdev() {
        let bdev = malloc("M");
        let config = lun_config(bdev.as_ref()).unwrap();
        assert_eq!(&config.product, b"rvhost Malloc   ");
        assert_eq!(config.serial.as_bytes(), "09".repeat(16).as_bytes());
        assert!(config.supports_unmap && config.supports_write_zeroes);
        assert_eq!((config.block_size, config.num_blocks), (512, 64));
    }
}
