//! A user-space VFIO NVMe driver: admin and I/O queue pairs, polled completions, zero-copy PRP/SGL
//! from caller (later: guest) memory.
//!
//! Layout, in the spirit of ixy.rs: [`cmd`] (queue entries and commands), [`regs`] (BAR0
//! registers), [`identify`] (Identify data), [`prp`] (data pointers), [`queue`] (rings, phase,
//! doorbells, commands in flight), [`dma`] (hugepage DMA memory), [`vfio`] (the device through a
//! VFIO container, BAR0 mapping, IOMMU mappings), [`controller`] (bring-up, admin commands, reset)
//! and [`io`] (per-reactor I/O queue pairs).
//!
//! All `unsafe` in this crate sits in `queue`, `dma` and `vfio`, each block with a `SAFETY:`
//! comment.

pub mod cmd;
pub mod identify;
pub mod prp;
pub mod queue;
pub mod regs;
