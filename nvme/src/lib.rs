//! A user-space VFIO NVMe driver: admin and I/O queue pairs, polled completions, zero-copy PRP/SGL
//! from caller (later: guest) memory.
//!
//! Layout, in the spirit of ixy.rs: [`cmd`] (queue entries and commands), [`regs`] (BAR0
//! registers), [`identify`] (Identify data), [`prp`] (data pointers), [`queue`] (rings, phase,
//! doorbells, commands in flight), [`vfio`] (the device through a VFIO container, BAR0, IOMMU
//! mappings), [`controller`] (bring-up, admin commands, reset) and [`io`] (per-reactor I/O queue
//! pairs, timeouts, failure handling). DMA memory (queues, the admin buffer, bounce buffers) comes
//! from `rvhost-platform-linux`'s allocator as [`DmaBuffer`]s mapped for the device at IOVA = VA
//! by the VFIO container, its [`DmaMapper`].
//!
//! `unsafe` sits in `queue`, `vfio`, `controller` and `io` (raw DMA memory and registers), each
//! block with a `SAFETY:` comment.

pub mod cmd;
pub mod controller;
pub mod identify;
pub mod io;
pub mod pattern;
pub mod prp;
pub mod queue;
pub mod regs;
pub mod vfio;

pub use controller::{
    Controller, ControllerConfig, ControllerState, HostDmaMapping, NvmeError, SglPolicy,
};
pub use identify::{ControllerInfo, NamespaceInfo};
pub use io::{IoError, IoQueuePair};
pub use prp::DmaSegment;
pub use rvhost_platform_linux::dma::{DmaBuffer, DmaError, DmaMapper};
