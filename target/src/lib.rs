//! The rvhost target: vhost-user controllers served by poll-mode reactors, backed by bdevs and
//! configured over SPDK-compatible JSON-RPC.
//!
//! Layering follows SPDK: a [`bdev`] knows nothing of virtio, a controller knows nothing of the
//! bdev's backend, and the JSON-RPC layer talks to controllers only through [`ops::ControllerOps`].

pub mod app;
pub mod bdev;
pub mod blk;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod ops;
pub mod reactor;
pub mod rpc;
pub mod scsi;
pub mod vhost;
