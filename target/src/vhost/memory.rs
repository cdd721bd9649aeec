//! Guest memory tables as the vhost-user server and the data path use them.
//!
//! The mapping itself is `rvhost_platform_linux`'s: an immutable table per `SET_MEM_TABLE` /
//! `ADD_MEM_REG` / `REM_MEM_REG`, built on the control thread and shared by `Arc` with the
//! reactor. Here it is only adapted to the bdev layer's [`HostMemoryAccess`], so a bdev can copy
//! into guest buffers by host address without knowing it is talking to guest memory.

use rvhost_core::mem::MemError;
use rvhost_platform_linux::HostMemory;

pub use rvhost_platform_linux::{MemoryTable as GuestMemoryTable, MemoryTableError, RegionSpec};

use crate::bdev::HostMemoryAccess;

impl HostMemoryAccess for GuestMemoryTable {
    fn copy_to_host(&self, addr: u64, src: &[u8]) -> Result<(), MemError> {
        HostMemory::copy_to_host(self, addr, src)
    }

    fn copy_from_host(&self, addr: u64, dst: &mut [u8]) -> Result<(), MemError> {
        HostMemory::copy_from_host(self, addr, dst)
    }

    fn fill_host(&self, addr: u64, len: usize, byte: u8) -> Result<(), MemError> {
        HostMemory::fill_host(self, addr, len, byte)
    }
}
