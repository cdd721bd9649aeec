//! The null bdev (SPDK's `null` module): completes reads and writes at once without moving any
//! data, for measuring the rest of the stack.
//!
//! As in SPDK, a read leaves the caller's buffers as they were (they are not zeroed), writes and
//! write-zeroes are discarded, and flush and unmap are not supported. `bdev_null_resize` grows
//! one (in MiB, never shrinking it, as SPDK) and tells the controllers using it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::common::{byte_range, check_block_size, check_iovs};
use super::module::{
    bdev_error, check_physical_block_size, decode, delete_by_name, geometry_config, parse_uuid,
    refuse_metadata, BdevContext, BdevModule, ModuleEnv, RpcMethod,
};
use super::{report_completions, Bdev, BdevChannel, BdevError, BdevIo, IoKind, IoStatus};
use crate::rpc::errno::{EINVAL, ENODEV};
use crate::rpc::RpcError;

/// Completions a channel can hold before its queue has to grow.
const COMPLETION_CAPACITY: usize = 1024;

/// A null bdev.
#[derive(Debug)]
pub struct NullBdev {
    name: String,
    block_size: u32,
    num_blocks: AtomicU64,
    uuid: [u8; 16],
    removed: AtomicBool,
}

impl NullBdev {
    /// Creates a null bdev of `num_blocks` blocks of `block_size` bytes.
    pub fn new(
        name: &str,
        num_blocks: u64,
        block_size: u32,
        uuid: [u8; 16],
    ) -> Result<Arc<Self>, BdevError> {
        check_block_size(block_size)?;
        if num_blocks == 0 {
            return Err(BdevError::InvalidParams(
                "num_blocks must be greater than 0".into(),
            ));
        }
        if num_blocks.checked_mul(u64::from(block_size)).is_none() {
            return Err(BdevError::InvalidParams(format!(
                "{num_blocks} blocks of {block_size} bytes overflow a 64-bit size"
            )));
        }
        Ok(Arc::new(NullBdev {
            name: name.to_owned(),
            block_size,
            num_blocks: AtomicU64::new(num_blocks),
            uuid,
            removed: AtomicBool::new(false),
        }))
    }

    /// Refuses new I/O from now on (the bdev is being deleted).
    pub fn mark_removed(&self) {
        self.removed.store(true, Ordering::Release);
    }
}

impl Bdev for NullBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        "Null disk"
    }
    fn module_name(&self) -> &'static str {
        "null"
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks.load(Ordering::Acquire)
    }
    fn uuid(&self) -> [u8; 16] {
        self.uuid
    }
    fn supports(&self, kind: IoKind) -> bool {
        matches!(kind, IoKind::Read | IoKind::Write | IoKind::WriteZeroes)
    }
    fn open_channel(self: Arc<Self>) -> Result<Box<dyn BdevChannel>, BdevError> {
        if self.removed.load(Ordering::Acquire) {
            return Err(BdevError::Removed(self.name.clone()));
        }
        Ok(Box::new(NullChannel {
            bdev: self,
            completions: VecDeque::with_capacity(COMPLETION_CAPACITY),
        }))
    }
}

struct NullChannel {
    bdev: Arc<NullBdev>,
    completions: VecDeque<(u64, IoStatus)>,
}

impl BdevChannel for NullChannel {
    fn submit(&mut self, io: &BdevIo<'_>) -> Result<(), BdevError> {
        let bdev = &*self.bdev;
        if bdev.removed.load(Ordering::Acquire) {
            return Err(BdevError::Removed(bdev.name.clone()));
        }
        let num_blocks = bdev.num_blocks();
        let (_, len) = byte_range(io, num_blocks, bdev.block_size)?;
        if matches!(io.kind, IoKind::Read | IoKind::Write) {
            check_iovs(io, len, num_blocks)?;
        }
        let status = if bdev.supports(io.kind) {
            IoStatus::Success
        } else {
            IoStatus::Unsupported
        };
        self.completions.push_back((io.tag, status));
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, IoStatus)) -> usize {
        report_completions(&mut self.completions, done)
    }

    fn in_flight(&self) -> usize {
        self.completions.len()
    }
}

/// The `null` module: null bdevs created, resized and deleted over JSON-RPC.
#[derive(Debug, Default)]
pub struct NullModule {
    /// Every null bdev created (deleted ones are dropped at the next call).
    bdevs: Vec<Arc<NullBdev>>,
}

/// `bdev_null_resize`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NullResize {
    name: String,
    /// MiB.
    new_size: u64,
}

/// `bdev_null_create` (SPDK's `rpc_bdev_null_create`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NullCreate {
    name: String,
    uuid: Option<String>,
    num_blocks: u64,
    block_size: u32,
    physical_block_size: Option<u32>,
    md_size: Option<u32>,
    dif_type: Option<i32>,
    dif_is_head_of_md: Option<bool>,
    dif_pi_format: Option<i32>,
    // Alignment and granularity hints SPDK's null bdev only reports; rvhost has nothing to
    // report them through, and they cannot change what a null device does.
    #[allow(dead_code)]
    preferred_write_alignment: Option<u32>,
    #[allow(dead_code)]
    preferred_write_granularity: Option<u32>,
    #[allow(dead_code)]
    optimal_write_size: Option<u32>,
    #[allow(dead_code)]
    preferred_unmap_alignment: Option<u32>,
    #[allow(dead_code)]
    preferred_unmap_granularity: Option<u32>,
}

impl NullModule {
    fn create(
        &mut self,
        cx: &mut BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: NullCreate = decode(params)?;
        refuse_metadata(p.md_size, p.dif_type)?;
        if p.dif_is_head_of_md == Some(true) || p.dif_pi_format.is_some_and(|f| f != 0) {
            return Err(RpcError::errno(
                EINVAL,
                "protection information is not supported",
            ));
        }
        check_physical_block_size(p.physical_block_size, p.block_size)?;
        let uuid = parse_uuid(p.uuid.as_deref())?;
        cx.check_new_name(&p.name, uuid)?;
        let bdev = NullBdev::new(&p.name, p.num_blocks, p.block_size, uuid).map_err(bdev_error)?;
        let removed = Arc::clone(&bdev);
        cx.register(
            Arc::clone(&bdev) as Arc<dyn Bdev>,
            Box::new(move || removed.mark_removed()),
        )?;
        self.bdevs.retain(|b| !b.removed.load(Ordering::Acquire));
        self.bdevs.push(bdev);
        tracing::info!(bdev = %p.name, num_blocks = p.num_blocks, block_size = p.block_size, "created null bdev");
        Ok(Value::String(p.name))
    }
}

impl NullModule {
    /// SPDK's `bdev_null_resize`: grows the bdev to `new_size` MiB (EINVAL for a smaller size)
    /// and tells the controllers using it.
    fn resize(
        &mut self,
        cx: &mut BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: NullResize = decode(params)?;
        self.bdevs.retain(|b| !b.removed.load(Ordering::Acquire));
        let Some(bdev) = self.bdevs.iter().find(|b| b.name == p.name) else {
            return Err(RpcError::errno(
                ENODEV,
                format!("no null bdev named {}", p.name),
            ));
        };
        let block_size = u64::from(bdev.block_size);
        let current = bdev.num_blocks();
        let blocks = p
            .new_size
            .checked_mul(1 << 20)
            .map(|bytes| bytes / block_size)
            .ok_or_else(|| {
                RpcError::errno(EINVAL, format!("new_size {} MiB is too large", p.new_size))
            })?;
        if p.new_size < current.saturating_mul(block_size) >> 20 {
            return Err(RpcError::errno(
                EINVAL,
                "the new bdev size must not be smaller than the current one",
            ));
        }
        bdev.num_blocks.store(blocks, Ordering::Release);
        if blocks != current {
            cx.announce_resize(&bdev.name, blocks);
        }
        Ok(Value::Bool(true))
    }
}

impl BdevModule for NullModule {
    const NAME: &'static str = "null";
    const METHODS: &'static [RpcMethod<Self>] = &[
        RpcMethod {
            name: "bdev_null_create",
            old_name: Some("construct_null_bdev"),
            handler: Self::create,
        },
        RpcMethod {
            name: "bdev_null_delete",
            old_name: Some("delete_null_bdev"),
            handler: delete_by_name,
        },
        RpcMethod {
            name: "bdev_null_resize",
            old_name: None,
            handler: Self::resize,
        },
    ];

    fn new(_env: &ModuleEnv) -> Self {
        NullModule::default()
    }

    fn bdev_config(&self, bdev: &dyn Bdev) -> Option<Value> {
        Some(geometry_config("bdev_null_create", bdev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::testing::TestMemory;
    use crate::bdev::IoVec;

    #[test]
    fn completes_without_touching_buffers() {
        let bdev = NullBdev::new("Null0", 1024, 4096, [9; 16]).unwrap();
        let mut ch = Arc::clone(&bdev).open_channel().unwrap();
        let mem = TestMemory::new(8192);
        mem.fill(0, 8192, 0x5a);
        let iov = [mem.iov(0, 8192)];
        for (tag, kind) in [
            (1, IoKind::Read),
            (2, IoKind::Write),
            (3, IoKind::WriteZeroes),
        ] {
            let iovs: &[IoVec] = if kind == IoKind::WriteZeroes {
                &[]
            } else {
                &iov
            };
            ch.submit(&mem.bdev_io(kind, 10, 2, iovs, tag)).unwrap();
        }
        for (tag, kind) in [(4, IoKind::Flush), (5, IoKind::Unmap)] {
            ch.submit(&mem.bdev_io(kind, 0, 1, &[], tag)).unwrap();
        }
        let mut seen = Vec::new();
        assert_eq!(ch.poll(&mut |tag, status| seen.push((tag, status))), 5);
        assert_eq!(
            seen,
            vec![
                (1, IoStatus::Success),
                (2, IoStatus::Success),
                (3, IoStatus::Success),
                (4, IoStatus::Unsupported),
                (5, IoStatus::Unsupported),
            ]
        );
        assert!(mem.read(0, 8192).iter().all(|b| *b == 0x5a));
    }

    #[test]
    fn checks_ranges_and_removal() {
        let bdev = NullBdev::new("Null0", 16, 512, [9; 16]).unwrap();
        let mut ch = Arc::clone(&bdev).open_channel().unwrap();
        let mem = TestMemory::new(512);
        let iov = [mem.iov(0, 512)];
        let past_end = mem.bdev_io(IoKind::Read, 16, 1, &iov, 1);
        assert!(matches!(
            ch.submit(&past_end),
            Err(BdevError::OutOfRange { .. })
        ));
        let short = mem.bdev_io(IoKind::Read, 0, 2, &iov, 2);
        assert!(matches!(
            ch.submit(&short),
            Err(BdevError::OutOfRange { .. })
        ));
        bdev.mark_removed();
        let ok = mem.bdev_io(IoKind::Read, 0, 1, &iov, 3);
        assert!(matches!(ch.submit(&ok), Err(BdevError::Removed(_))));
        assert!(NullBdev::new("n", 0, 512, [0; 16]).is_err());
        assert!(NullBdev::new("n", 1, 520, [0; 16]).is_err());
    }
}
