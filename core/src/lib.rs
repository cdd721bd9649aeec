//! # rvhost-core
//!
//! Everything a virtio guest can write reaches rvhost through the parsers in this crate: the split
//! and packed virtqueues (descriptor chains), virtio-blk requests, virtio-scsi requests and the
//! SCSI CDBs they carry. The crate is `#![no_std]`, never allocates and contains no `unsafe`, so the same code runs
//! in the Linux target, on bare metal, or inside a guest as a virtio-vhost-user backend.
//!
//! Rules every module follows:
//! - guest memory is only touched through [`mem::GuestMemory`]; no Rust reference into guest
//!   memory is ever held, because the guest may change it at any time;
//! - every header is copied out exactly once into a local before it is validated and used;
//! - all arithmetic on guest-controlled values is checked, and every failure is a typed error;
//! - wire structures are read and written through [`wire`] (one truncation error, one set of
//!   accessors that never panic), and scattered guest buffers are walked only through
//!   [`segments`].
#![no_std]
#![forbid(unsafe_code)]
// No index or slice operation that could panic on a guest-sized buffer: use `get` or `wire`.
#![cfg_attr(not(test), deny(clippy::indexing_slicing))]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

pub mod blk;
pub mod inflight;
pub mod mem;
pub mod scsi;
pub mod segments;
pub mod virtio;
pub mod virtio_scsi;
pub mod virtq;
pub mod wire;
