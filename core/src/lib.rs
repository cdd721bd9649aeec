//! # rvhost-core
//!
//! Everything a virtio guest can write reaches rvhost through the parsers in this crate: the split
//! virtqueue (descriptor chains), virtio-blk requests, virtio-scsi requests and the SCSI CDBs they
//! carry. The crate is `#![no_std]`, never allocates and contains no `unsafe`, so the same code runs
//! in the Linux target, on bare metal, or inside a guest as a virtio-vhost-user backend.
//!
//! Rules every module follows:
//! - guest memory is only touched through [`mem::GuestMemory`]; no Rust reference into guest
//!   memory is ever held, because the guest may change it at any time;
//! - every header is copied out exactly once into a local before it is validated and used;
//! - all arithmetic on guest-controlled values is checked, and every failure is a typed error.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

pub mod blk;
pub mod mem;
pub mod scsi;
pub mod virtio;
pub mod virtio_scsi;
pub mod virtq;
