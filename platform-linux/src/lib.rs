//! # rvhost-platform-linux
//!
//! The Linux platform layer of rvhost: everything that needs `unsafe` or system calls, behind safe,
//! checked APIs. The other crates (except the NVMe driver) contain no `unsafe`.
//!
//! ## API at a glance
//!
//! **Guest memory** ([`memory`]): a [`MemoryTable`] is an immutable, `Arc`-shared map of one
//! vhost-user memory table.
//! - `MemoryTable::empty()`, `MemoryTable::from_regions([(RegionSpec, OwnedFd), ..])` for
//!   `SET_MEM_TABLE`; `table.with_region_added(spec, fd)` for `ADD_MEM_REG`;
//!   `table.with_region_removed(&spec)` for `REM_MEM_REG`. Each returns a *new*
//!   `Arc<MemoryTable>`; the old one stays valid (and mapped) until its last holder drops it, so a
//!   reactor swaps tables between polls without stopping anything. At most [`MAX_MEM_SLOTS`] (509)
//!   regions (answer `GET_MAX_MEM_SLOTS` with it).
//! - implements [`rvhost_core::mem::GuestMemory`] (by guest physical address: `translate`,
//!   `read`, `write`, atomic `load_u16`/`store_u16`), so it plugs into the core's `SplitQueue`.
//! - `frontend_va_to_gpa(va)` / `frontend_va_to_host(va, len)`: `SET_VRING_ADDR` ring addresses are
//!   frontend (QEMU) virtual addresses; convert them to GPAs for the core.
//!
//! **Copying by host address** ([`host`]): the object-safe trait [`HostMemory`]
//! (`copy_to_host`, `copy_from_host`, `fill_host`, all range-checked) is what a bdev sees. It is
//! implemented by `MemoryTable` (guest buffers) and [`SharedDmaMemory`] (internal buffers), and
//! by `&T`/`Arc<T>` of those. [`copy_between`] copies between two
//! `HostMemory`s (a RAM bdev's store and a guest buffer) with one `memmove` when both are ours.
//!
//! **DMA memory** ([`dma`], the one DMA allocator): 2 MiB hugepages with a warned 4 KiB fallback
//! ([`PagePolicy`]). [`DmaBuffer`] (exclusive, copy and raw-pointer access only; mapped into a
//! device's IOMMU at IOVA = VA by a [`DmaMapper`] with `allocate_for_device`, unmapped on drop:
//! NVMe queues and bounce buffers) and [`SharedDmaMemory`] (shared between reactors, copy-only:
//! a RAM bdev's backing store).
//!
//! **Sealed file mappings** ([`sealed_file`]): [`SealedFileMapping`], a `MAP_SHARED` mapping of
//! a memfd shared with a frontend, created sealed against resizing or, when handed over, mapped
//! only if sealed against shrinking and long enough; the inflight region and the dirty log below
//! are both one.
//!
//! **Inflight regions** ([`inflight`]): [`InflightMemory::create`] (a sealed memfd for
//! `GET_INFLIGHT_FD`), [`InflightMemory::map`] (a frontend's region for `SET_INFLIGHT_FD`: sealed
//! against shrinking, long enough, page-aligned offset), copies in and out, and single release
//! stores of 1, 2 and 8 bytes for the per-request bookkeeping.
//!
//! **Dirty log** ([`dirty_log`]): [`DirtyLog::map`] maps a frontend's migration log
//! (`SET_LOG_BASE`: sealed memfd, offset and size checked), `check_covers(gpa_end)` refuses one
//! too small for the memory table, `mark(gpa, len)` sets the bits of the 4 KiB pages written
//! with atomic ORs.
//!
//! **Reactor placement** ([`cpu`]): [`CpuSet`] parses SPDK masks (`0x3`, `3`, `[0,1]`,
//! `[0-3,5]`) and prints them SPDK's way (`0x3`); [`allowed_cores`], [`online_cores`],
//! [`pin_current_thread`], and [`pin_reactor`] which also binds the thread's memory to the core's
//! NUMA node via hwloc ([`NumaTopology`], degrading to a warning when hwloc fails).
//!
//! **Control rings** ([`spsc`]): [`spsc::channel(capacity)`](spsc::channel) gives a
//! lock-free single-producer single-consumer ring as a `Producer` (`try_push`) and a `Consumer`
//! (`try_pop`); no allocation after creation.
//!
//! **Eventfds** ([`eventfd`]): [`EventFd::new`], [`EventFd::from_owned_fd`] (for kick/call fds
//! received over vhost-user; checks it is an eventfd and makes it nonblocking), `signal()`,
//! `consume()`, `AsRawFd`/`AsFd`.
//!
//! ## Tests and benchmarks
//!
//! `cargo test -p rvhost-platform-linux` runs the integration tests in `tests/` (memfd-backed memory
//! tables with a proptest model, hugepage and fallback DMA memory, mask parsing and real pinning,
//! a 5-million-item two-thread ring test, eventfds). The ring is also model-checked with loom:
//! `RUSTFLAGS="--cfg loom" cargo test -p rvhost-platform-linux --release --test spsc_loom`.
//! `cargo bench -p rvhost-platform-linux` measures translation, copies and the ring.

pub mod aio;
pub mod cpu;
pub mod dirty_log;
pub mod dma;
pub mod eventfd;
pub mod host;
pub mod inflight;
pub mod listener;
pub mod memory;
pub mod sealed_file;
pub mod spsc;
pub mod tsc;
pub mod uring;
pub mod waker;

pub use cpu::{
    allowed_cores, online_cores, pin_current_thread, pin_reactor, CpuError, CpuMaskError, CpuSet,
    NumaTopology, ReactorPlacement,
};
pub use dirty_log::{DirtyLog, DirtyLogError, LOG_PAGE_SIZE};
pub use dma::{DmaBuffer, DmaError, DmaMapper, PageKind, PagePolicy, SharedDmaMemory};
pub use eventfd::{EventFd, EventFdError};
pub use host::{copy_between, HostMemory};
pub use inflight::{InflightMemory, InflightMemoryError};
pub use listener::{ControlListener, ListenError, ListenerHandle, SocketAccess};
pub use memory::{MemoryTable, MemoryTableError, RegionSpec, MAX_MEM_SLOTS};
pub use rvhost_core::mem::MemError;
pub use sealed_file::{SealedFileError, SealedFileMapping};
