//! The vhost-blk controller: a bdev exported as a virtio-blk device.
//!
//! [`BlkController`] is the control-side half (features, config space, which bdev); every
//! frontend session gets a [`device::BlkDevice`] on the controller's reactor, which decodes
//! requests, submits them to a bdev channel and completes them.

pub mod device;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rvhost_core::blk::{feature as blk_feature, VirtioBlkConfig};
use rvhost_core::virtio::{bit, feature};

use crate::bdev::{Bdev, IoMemory};
use crate::reactor::ReactorHandle;
use crate::vhost::device::DeviceType;
use crate::vhost::DeviceId;
use device::{BlkHandler, DeviceGeometry};

/// Most queues a frontend may use (`GET_QUEUE_NUM`, config `num_queues`). QEMU gives a
/// vhost-user-blk device one queue per vCPU by default and refuses to start if the backend offers
/// fewer, so this is generous; a queue costs nothing until the driver starts it.
pub const MAX_QUEUES: u16 = 64;
/// Largest virtqueue accepted by `SET_VRING_NUM`; also the per-queue request-slot count.
pub const MAX_QUEUE_SIZE: u16 = crate::vhost::device::MAX_QUEUE_SIZE;
/// Data segments per request we announce (`seg_max`), as QEMU does for a 128-entry queue. Longer
/// chains (Windows guests ignore `seg_max`) still work up to the queue size.
pub const SEG_MAX: u32 = 126;
/// Largest single segment we announce (`size_max`); larger segments are still accepted.
pub const SIZE_MAX: u32 = 1 << 20;
/// Ranges per DISCARD / WRITE_ZEROES request.
pub const MAX_DISCARD_SEG: u32 = device::MAX_RANGES as u32;
/// Largest DISCARD / WRITE_ZEROES range, in 512-byte sectors (4 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 23;

/// A vhost-blk controller's control-side state.
#[derive(Debug)]
pub struct BlkController {
    name: String,
    geometry: DeviceGeometry,
    /// The size in blocks the config space reports (the bdev's, as of its last resize).
    num_blocks: AtomicU64,
    /// The exported bdev; `None` once hot-detached.
    bdev: Mutex<Option<Arc<dyn Bdev>>>,
}

impl BlkController {
    /// A controller `name` exporting `bdev` (read-only if `readonly`).
    pub fn new(name: &str, bdev: Arc<dyn Bdev>, readonly: bool) -> Self {
        let geometry = DeviceGeometry::of(bdev.as_ref(), readonly);
        BlkController {
            name: name.to_string(),
            num_blocks: AtomicU64::new(geometry.num_blocks),
            geometry,
            bdev: Mutex::new(Some(bdev)),
        }
    }

    fn bdev(&self) -> Option<Arc<dyn Bdev>> {
        self.bdev.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The exported bdev's name, or `None` once it was hot-detached.
    pub fn bdev_name(&self) -> Option<String> {
        self.bdev().map(|b| b.name().to_string())
    }

    /// Whether the controller is read-only.
    pub fn readonly(&self) -> bool {
        self.geometry.readonly
    }

    /// Forgets the bdev: sessions started from now on fail every I/O.
    pub fn detach(&self) {
        *self.bdev.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Records the bdev's new size, for the config space and for sessions started from now on;
    /// the caller tells the running sessions ([`device::BlkOp::Resize`]) and then the frontends.
    pub fn resize(&self, num_blocks: u64) {
        self.num_blocks.store(num_blocks, Ordering::Release);
    }

    /// The size in blocks the config space reports.
    pub fn num_blocks(&self) -> u64 {
        self.num_blocks.load(Ordering::Acquire)
    }

    fn geometry(&self) -> DeviceGeometry {
        DeviceGeometry {
            num_blocks: self.num_blocks(),
            ..self.geometry.clone()
        }
    }

    /// The config space as the driver sees it.
    pub fn config(&self) -> VirtioBlkConfig {
        let g = &self.geometry;
        // Capacity is always in 512-byte sectors, whatever the block size.
        let sectors_per_block = u64::from(g.block_size / 512);
        let mut config = VirtioBlkConfig {
            capacity: self.num_blocks().saturating_mul(sectors_per_block),
            size_max: SIZE_MAX,
            seg_max: SEG_MAX,
            blk_size: g.block_size,
            min_io_size: 1,
            num_queues: MAX_QUEUES,
            ..VirtioBlkConfig::default()
        };
        if g.supports_unmap {
            config.max_discard_sectors = MAX_DISCARD_SECTORS;
            config.max_discard_seg = MAX_DISCARD_SEG;
            config.discard_sector_alignment = g.block_size / 512;
        }
        if g.supports_write_zeroes {
            config.max_write_zeroes_sectors = MAX_DISCARD_SECTORS;
            config.max_write_zeroes_seg = MAX_DISCARD_SEG;
            config.write_zeroes_may_unmap = u8::from(g.supports_unmap);
        }
        config
    }
}

impl DeviceType for BlkController {
    type Handler = BlkHandler;

    fn features(&self) -> u64 {
        let g = &self.geometry;
        let mut features = bit(feature::VIRTIO_F_VERSION_1)
            | bit(feature::VIRTIO_F_RING_INDIRECT_DESC)
            | bit(feature::VIRTIO_F_RING_EVENT_IDX)
            | bit(feature::VIRTIO_F_RING_PACKED)
            | bit(blk_feature::VIRTIO_BLK_F_SIZE_MAX)
            | bit(blk_feature::VIRTIO_BLK_F_SEG_MAX)
            | bit(blk_feature::VIRTIO_BLK_F_BLK_SIZE)
            | bit(blk_feature::VIRTIO_BLK_F_TOPOLOGY)
            | bit(blk_feature::VIRTIO_BLK_F_MQ);
        if g.supports_flush {
            features |= bit(blk_feature::VIRTIO_BLK_F_FLUSH);
        }
        if g.readonly {
            features |= bit(blk_feature::VIRTIO_BLK_F_RO);
        } else {
            if g.supports_unmap {
                features |= bit(blk_feature::VIRTIO_BLK_F_DISCARD);
            }
            if g.supports_write_zeroes {
                features |= bit(blk_feature::VIRTIO_BLK_F_WRITE_ZEROES);
            }
        }
        features
    }

    fn read_config(&self, offset: u32, len: u32) -> Result<Vec<u8>, String> {
        let mut bytes = vec![0u8; usize::try_from(len).map_err(|e| e.to_string())?];
        self.config()
            .read(offset, &mut bytes)
            .map_err(|e| e.to_string())?;
        Ok(bytes)
    }

    fn max_queues(&self) -> u16 {
        MAX_QUEUES
    }

    fn max_queue_size(&self) -> u16 {
        MAX_QUEUE_SIZE
    }

    fn prepare_memory(&self, mem: &IoMemory) {
        if let Some(bdev) = self.bdev() {
            bdev.prepare_memory(mem);
        }
    }

    fn new_handler(
        &self,
        id: DeviceId,
        _reactor: &Arc<ReactorHandle>,
    ) -> Result<BlkHandler, String> {
        let channel = match self.bdev() {
            Some(bdev) => {
                let name = bdev.name().to_string();
                Some(
                    bdev.open_channel()
                        .map_err(|e| format!("opening a channel to {name}: {e}"))?,
                )
            }
            None => None,
        };
        tracing::debug!(controller = %self.name, device = id.0, detached = channel.is_none(), "new blk session");
        Ok(BlkHandler::new(self.geometry(), self.config(), channel))
    }
}
