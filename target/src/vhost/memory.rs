//! Guest memory tables as the vhost-user server and the data path use them.
//!
//! The mapping itself is `rvhost_platform_linux`'s: an immutable table per `SET_MEM_TABLE` /
//! `ADD_MEM_REG` / `REM_MEM_REG`, built on the control thread and shared by `Arc` with the
//! reactor. Here it is only adapted to the bdev layer's [`HostMemoryAccess`], so a bdev can copy
//! into guest buffers by host address, or map them for DMA, without knowing it is talking to guest
//! memory.

pub use rvhost_platform_linux::{MemoryTable as GuestMemoryTable, MemoryTableError, RegionSpec};

use crate::bdev::{HostMemoryAccess, HostRange};

impl HostMemoryAccess for GuestMemoryTable {
    fn host_ranges(&self) -> Vec<HostRange> {
        self.regions()
            .map(|(spec, host_base)| HostRange {
                addr: host_base,
                len: spec.memory_size,
            })
            .collect()
    }
}
