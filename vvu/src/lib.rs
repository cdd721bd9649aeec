//! # rvhost-vvu
//!
//! A userspace driver for the virtio-vhost-user PCI device (`docs/virtio-vhost-user.md`): with
//! it, rvhost runs inside a backend VM and receives the vhost-user protocol, the frontend VM's
//! memory and its kick and call notifications through a virtio device instead of a Unix socket.
//!
//! - [`transport`]: the [`VirtioPciTransport`] trait every access goes through;
//! - [`pci`]: virtio-pci capability discovery, every structure checked against its BAR;
//! - [`device`]: initialization and the message tunnel (rxq/txq driven with
//!   `rvhost_core::virtq::DriverQueue`), doorbells, notification vectors, the shared memory window;
//! - [`vfio`]: the transport over VFIO.
//!
//! `unsafe` is confined to creating the DMA memfd, VFIO's descriptor and DMA calls, each with its
//! `// SAFETY:` argument.

pub mod device;
pub mod pci;
pub mod transport;
pub mod vfio;

pub use device::{Doorbells, Interrupts, VvuDevice, VvuError};
pub use transport::{DmaRegion, TransportError, VirtioPciTransport};
