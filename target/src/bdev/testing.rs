//! Memory for exercising bdevs without a vhost-user frontend: tests, examples, benchmarks.
//!
//! Real process memory (so a bdev may hand its addresses to the kernel or an IOMMU, as it does
//! with guest memory), addressed by offset for convenience.

use std::sync::Arc;

use rvhost_platform_linux::{PagePolicy, SharedDmaMemory};

use super::{BdevIo, IoKind, IoMemory, IoVec};

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
