//! Memory for exercising bdevs without a vhost-user frontend: tests, examples, benchmarks.
//!
//! Real process memory (so a bdev may hand its addresses to the kernel or an IOMMU, as it does
//! with guest memory), addressed by offset for convenience.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rvhost_platform_linux::{PagePolicy, SharedDmaMemory};

use super::{Bdev, BdevChannel, BdevError, BdevIo, IoKind, IoMemory, IoStatus, IoVec};

/// A zeroed buffer of process memory, usable as the [`IoMemory`] of bdev I/O.
#[derive(Clone)]
pub struct TestMemory {
    shared: SharedDmaMemory,
    io: IoMemory,
}

impl std::fmt::Debug for TestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestMemory")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

impl TestMemory {
    /// `len` zeroed bytes on 4 KiB pages (page aligned).
    ///
    /// # Panics
    /// When the memory cannot be allocated: this is for tests.
    pub fn new(len: usize) -> Self {
        let shared = SharedDmaMemory::allocate_with(len, PagePolicy::SmallOnly)
            .expect("test memory allocation");
        let io: IoMemory = Arc::new(shared.clone());
        TestMemory { shared, io }
    }

    /// Host address of byte `offset`.
    pub fn addr(&self, offset: usize) -> u64 {
        self.shared.va() + offset as u64
    }

    /// An I/O vector over `[offset, offset + len)`.
    pub fn iov(&self, offset: usize, len: u32) -> IoVec {
        IoVec {
            addr: self.addr(offset),
            len,
        }
    }

    /// The memory as bdev I/O takes it.
    pub fn io_memory(&self) -> &IoMemory {
        &self.io
    }

    /// An I/O whose buffers lie in this memory.
    pub fn bdev_io<'a>(
        &'a self,
        kind: IoKind,
        offset_blocks: u64,
        num_blocks: u64,
        iovs: &'a [IoVec],
        tag: u64,
    ) -> BdevIo<'a> {
        BdevIo {
            kind,
            offset_blocks,
            num_blocks,
            iovs,
            tag,
            mem: &self.io,
        }
    }

    /// Copies `bytes` to `offset`.
    ///
    /// # Panics
    /// When the range lies outside the buffer.
    pub fn write(&self, offset: usize, bytes: &[u8]) {
        self.shared
            .write_at(offset, bytes)
            .expect("range inside test memory");
    }

    /// Sets `len` bytes at `offset` to `byte`.
    ///
    /// # Panics
    /// When the range lies outside the buffer.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) {
        self.shared
            .fill_at(offset, len, byte)
            .expect("range inside test memory");
    }

    /// Reads `len` bytes at `offset`.
    ///
    /// # Panics
    /// When the range lies outside the buffer.
    pub fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        self.shared
            .read_at(offset, &mut out)
            .expect("range inside test memory");
        out
    }
}

/// The state of a [`HeldBdev`]: its I/O completes only when the test lets it.
#[derive(Debug, Default)]
pub struct HeldIo {
    /// Tags submitted and not yet completed, oldest first.
    pub pending: Mutex<Vec<u64>>,
    /// Once set, every poll completes everything pending.
    pub release: AtomicBool,
    /// Completions to let through on the next poll (oldest first) while not released.
    pub allow: AtomicU32,
    /// I/Os submitted so far.
    pub submitted: AtomicU32,
}

impl HeldIo {
    /// The pending tags.
    pub fn pending(&self) -> MutexGuard<'_, Vec<u64>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A 64-block bdev (512-byte blocks) whose I/O stays in flight until the test releases it
/// through the shared [`HeldIo`]; reads fill their buffers with `0xab` at submission. For
/// testing what a device does while I/O is outstanding (stops, resets, memory changes).
#[derive(Debug)]
pub struct HeldBdev(pub Arc<HeldIo>);

impl Bdev for HeldBdev {
    fn name(&self) -> &str {
        "Held0"
    }
    fn product_name(&self) -> &str {
        "Held disk"
    }
    fn module_name(&self) -> &'static str {
        "test"
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn num_blocks(&self) -> u64 {
        64
    }
    fn uuid(&self) -> [u8; 16] {
        [0; 16]
    }
    fn supports(&self, _kind: IoKind) -> bool {
        true
    }
    fn open_channel(self: Arc<Self>) -> Result<Box<dyn BdevChannel>, BdevError> {
        Ok(Box::new(HeldChannel(Arc::clone(&self.0))))
    }
}

struct HeldChannel(Arc<HeldIo>);

impl BdevChannel for HeldChannel {
    fn submit(&mut self, io: &BdevIo<'_>) -> Result<(), BdevError> {
        if io.kind == IoKind::Read {
            for iov in io.iovs {
                io.mem
                    .fill_host(iov.addr, iov.len as usize, 0xab)
                    .map_err(BdevError::Memory)?;
            }
        }
        self.0.submitted.fetch_add(1, Ordering::Relaxed);
        self.0.pending().push(io.tag);
        Ok(())
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, IoStatus)) -> usize {
        let allowed = if self.0.release.load(Ordering::Relaxed) {
            usize::MAX
        } else {
            self.0.allow.swap(0, Ordering::Relaxed) as usize
        };
        let tags: Vec<u64> = {
            let mut pending = self.0.pending();
            let n = pending.len().min(allowed);
            pending.drain(..n).collect()
        };
        for &t in &tags {
            done(t, IoStatus::Success);
        }
        tags.len()
    }
    fn in_flight(&self) -> usize {
        self.0.pending().len()
    }
}
