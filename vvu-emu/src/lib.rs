//! # rvhost-vvu-emu
//!
//! An emulated virtio-vhost-user PCI device, for tests: what the backend VM's QEMU provides in a
//! real deployment (`docs/virtio-vhost-user.md`).
//!
//! On one side it is a vhost-user backend listening on a Unix socket, which an unmodified QEMU
//! frontend (or any vhost-user frontend) connects to. On the other it is a virtio-pci (modern)
//! function that rvhost's driver reaches through [`rvhost_vvu::VirtioPciTransport`]
//! ([`EmuTransport`]) or through the VFIO transport's backend trait ([`EmuVfio`]): configuration
//! space with the virtio capabilities, BAR 0 (common configuration, notify, ISR, device
//! configuration), BAR 2 (doorbells, notifications, the shared memory window), MSI-X vectors as
//! eventfds, and the rxq and txq, served with core's device side of the split virtqueue.
//!
//! It does what the specification's device does: every vhost-user message read from the socket is
//! delivered, as bytes, into an rxq buffer; every txq buffer is written to the socket; the fds that
//! come with `SET_MEM_TABLE`, `SET_VRING_KICK`/`CALL`/`ERR` stay with the device, which maps the
//! memory into the shared memory window, turns kicks into MSI-X interrupts and doorbell writes
//! into call notifications.

mod device;
mod layout;
mod socket;

pub use device::{EmuConfig, EmuDevice, EmuTransport, EmuVfio, Fault};
pub use layout::*;
