//! The Ceph RBD bdev (SPDK's `rbd` module): a bdev on an image of a Ceph cluster, through librbd
//! (`rvhost-rbd`, our own bindings).
//!
//! Control plane, with SPDK's methods, parameters and result shapes: `bdev_rbd_register_cluster`
//! connects a named cluster handle that bdevs may share; `bdev_rbd_create` (old name
//! `construct_rbd_bdev`) opens an image through a registered cluster (`cluster_name`) or through
//! a connection of its own (`user_id` + `config`, or the default `/etc/ceph` files);
//! `bdev_rbd_resize` grows the image (in MiB; shrinking is refused, as SPDK does);
//! `bdev_rbd_delete` (`delete_rbd_bdev`) closes it. Connecting and opening block the RPC thread,
//! bounded by the time-outs in [`DEFAULT_OPTIONS`] (a configuration may override them).
//! `save_config` writes the clusters first and then the bdevs (with their `cluster_name`, which
//! SPDK leaves out), so `-c` recreates both.
//!
//! Data path: one image handle per bdev, shared by every reactor (librbd handles are
//! thread-safe; several handles of one image in one process would fight over its exclusive
//! lock). Each reactor's channel submits asynchronous vectored reads and writes straight on the
//! guest's buffers (zero copy; the `iovec` array lives in the operation record until librbd
//! completes it), flush, discard and write-zeroes, and never waits: librbd completes on its own
//! threads, which move each finished operation onto the channel's lock-free queue, drained by the
//! channel's poll. A cluster that stops answering fails I/O with IOERR after
//! `rados_osd_op_timeout`. The alternatives the design was measured against (bench/README.md,
//! "Ceph RBD"), librbd's event-socket mode on a handle per channel and a plain handle per
//! channel, stay behind `RVHOST_RBD_MODE` for benchmarks: neither measured faster, and several
//! writable handles of one image take turns at its exclusive lock.
//!
//! `read_only` opens the image with `rbd_open_read_only` (no exclusive lock; writes, discards
//! and write-zeroes are refused by the bdev, as SPDK reports them unsupported). A cluster's
//! `core_mask` restricts the threads librados and librbd start for it: SPDK sets its calling
//! thread's affinity around connecting; rvhost connects, and opens the cluster's images, on a
//! short-lived thread restricted to the mask, whose affinity every thread they start inherits.
//!
//! Where rvhost differs from SPDK: SPDK also reports discard as supported on a read-only bdev
//! (librbd then fails it); the image size is re-read every tick, so a resize by another client
//! (`rbd resize`) shows up in `bdev_get_bdevs` and reaches the guests too, as a resize through
//! `bdev_rbd_resize` does ([`BdevContext::announce_resize`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rvhost_platform_linux::cpu::set_current_thread_affinity;
use rvhost_platform_linux::uring::{HostBuffers, SpareIovecs};
use rvhost_platform_linux::CpuSet;
pub use rvhost_rbd::ClusterConfig;
use rvhost_rbd::{AioOp, Cluster, CompletionQueue, Image, RbdError};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::common::{byte_range, check_block_size, check_iovs};
use super::module::{decode, parse_uuid, BdevContext, BdevModule, ByName, ModuleEnv, RpcMethod};
use super::registry::uuid_string;
use super::{Bdev, BdevChannel, BdevError, BdevIo, IoKind, IoStatus};
use crate::rpc::errno::{EBUSY, EEXIST, EINVAL, ENODEV, ENOENT};
use crate::rpc::RpcError;

/// Options set on every cluster connection before its configuration (which may override them):
/// connecting and monitor calls give up after 10 s, I/O to OSDs after 30 s (then it fails with
/// IOERR instead of hanging).
pub const DEFAULT_OPTIONS: &[(&str, &str)] = &[
    ("client_mount_timeout", "10"),
    ("rados_mon_op_timeout", "10"),
    ("rados_osd_op_timeout", "30"),
];

/// Operation records a channel makes ahead (a virtqueue holds at most 1024 requests).
const CHANNEL_CAPACITY: usize = 256;

/// How channels reach librbd, from `RVHOST_RBD_MODE` (a benchmark knob, read when a bdev is
/// opened): `shared` (default) submits on the bdev's image handle and completes through a
/// callback onto the channel's queue; `handle` opens a handle per channel, same completions;
/// `events` opens a handle per channel in librbd's event-socket mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChannelMode {
    Shared,
    Handle,
    Events,
}

impl ChannelMode {
    fn from_env() -> Self {
        match std::env::var("RVHOST_RBD_MODE").as_deref() {
            Ok("handle") => ChannelMode::Handle,
            Ok("events") => ChannelMode::Events,
            _ => ChannelMode::Shared,
        }
    }
}

/// A librados/librbd failure as a JSON-RPC error: the negative errno and its text, as SPDK.
fn rbd_error(err: &RbdError) -> RpcError {
    RpcError::new(-err.errno(), err.to_string())
}

/// Runs `f` on a thread of its own restricted to `cores` (when given), so that every thread
/// librados or librbd starts from it inherits that affinity (a cluster's `core_mask`).
fn with_affinity<T: Send>(
    cores: Option<&CpuSet>,
    f: impl FnOnce() -> Result<T, RpcError> + Send,
) -> Result<T, RpcError> {
    let Some(cores) = cores else { return f() };
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("rbd-affinity".into())
            .spawn_scoped(scope, move || {
                set_current_thread_affinity(cores).map_err(|e| {
                    RpcError::errno(EINVAL, format!("core_mask: cannot run on those cores: {e}"))
                })?;
                f()
            })
            .map_err(|e| RpcError::errno(EINVAL, format!("cannot start a thread: {e}")))?;
        worker.join().unwrap_or_else(|_| {
            Err(RpcError::new(
                crate::rpc::INTERNAL_ERROR,
                "connecting to the cluster panicked",
            ))
        })
    })
}

/// Key/value configuration (`config`, `config_param`) in the order given.
type Options = Vec<(String, String)>;

fn options_json(options: &Options) -> Value {
    Value::Object(
        options
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect::<Map<String, Value>>(),
    )
}

fn parse_options(map: Option<Map<String, Value>>, what: &str) -> Result<Option<Options>, RpcError> {
    let Some(map) = map else { return Ok(None) };
    let mut options = Vec::with_capacity(map.len());
    for (k, v) in map {
        match v {
            Value::String(s) => options.push((k, s)),
            other => {
                return Err(RpcError::invalid_params(format!(
                    "{what}.{k} must be a string, not {other}"
                )))
            }
        }
    }
    Ok(Some(options))
}

/// A cluster registered by `bdev_rbd_register_cluster`.
#[derive(Debug)]
struct RegisteredCluster {
    name: String,
    user_id: Option<String>,
    config_param: Option<Options>,
    config_file: Option<String>,
    key_file: Option<String>,
    /// `core_mask` as given, and the cores it selects.
    core_mask: Option<(String, CpuSet)>,
    handle: Arc<Cluster>,
}

impl RegisteredCluster {
    /// Its fields as SPDK reports them (without the name).
    fn fields(&self, out: &mut Map<String, Value>) {
        if let Some(u) = &self.user_id {
            out.insert("user_id".into(), u.clone().into());
        }
        if let Some(c) = &self.config_param {
            out.insert("config_param".into(), options_json(c));
        }
        if let Some(f) = &self.config_file {
            out.insert("config_file".into(), f.clone().into());
        }
        if let Some(f) = &self.key_file {
            out.insert("key_file".into(), f.clone().into());
        }
        if let Some((mask, _)) = &self.core_mask {
            out.insert("core_mask".into(), mask.clone().into());
        }
    }

    fn info(&self) -> Value {
        let mut out = Map::new();
        out.insert("cluster_name".into(), self.name.clone().into());
        self.fields(&mut out);
        Value::Object(out)
    }
}

/// How a bdev reached its cluster, for `driver_specific` and `save_config`.
#[derive(Debug, Clone)]
struct Origin {
    pool_name: String,
    rbd_name: String,
    user_id: Option<String>,
    config: Option<Options>,
    cluster_name: Option<String>,
    /// The registered cluster's fields (`driver_specific` shows them, as SPDK does).
    cluster_fields: Option<Map<String, Value>>,
    /// Opened with `rbd_open_read_only`.
    read_only: bool,
}

/// An rbd bdev.
#[derive(Debug)]
pub struct RbdBdev {
    name: String,
    uuid: [u8; 16],
    block_size: u32,
    num_blocks: AtomicU64,
    image: Arc<Image>,
    origin: Origin,
    removed: AtomicBool,
    mode: ChannelMode,
}

impl RbdBdev {
    /// Opens image `origin.rbd_name` of pool `origin.pool_name` on `cluster` as bdev `name` of
    /// `block_size` blocks (`block_size` checked by the caller): ENOENT for a missing pool or
    /// image, EINVAL for an image smaller than one block.
    fn open(
        name: &str,
        uuid: [u8; 16],
        cluster: &Arc<Cluster>,
        origin: Origin,
        block_size: u32,
    ) -> Result<Arc<RbdBdev>, RpcError> {
        let pool = cluster.pool(&origin.pool_name).map_err(|e| rbd_error(&e))?;
        let image = if origin.read_only {
            Image::open_read_only(&pool, &origin.rbd_name)
        } else {
            Image::open(&pool, &origin.rbd_name)
        }
        .map_err(|e| rbd_error(&e))?;
        let size = image.size().map_err(|e| rbd_error(&e))?;
        let num_blocks = size / u64::from(block_size);
        if num_blocks == 0 {
            return Err(RpcError::errno(
                EINVAL,
                format!(
                    "image {}/{} ({size} bytes) is smaller than one block of {block_size}",
                    origin.pool_name, origin.rbd_name
                ),
            ));
        }
        Ok(Arc::new(RbdBdev {
            name: name.to_owned(),
            uuid,
            block_size,
            num_blocks: AtomicU64::new(num_blocks),
            image: Arc::new(image),
            origin,
            removed: AtomicBool::new(false),
            mode: ChannelMode::from_env(),
        }))
    }

    /// Opens `pool_name/rbd_name` through a connection of its own made from `config` (what
    /// `bdev_rbd_create` with `config` does, without registering the bdev): for tests that
    /// export it directly.
    pub fn open_with_config(
        name: &str,
        uuid: [u8; 16],
        config: &ClusterConfig,
        pool_name: &str,
        rbd_name: &str,
        block_size: u32,
    ) -> Result<Arc<RbdBdev>, RpcError> {
        check_block_size(block_size).map_err(super::module::bdev_error)?;
        let cluster = Cluster::connect(config, DEFAULT_OPTIONS).map_err(|e| rbd_error(&e))?;
        let origin = Origin {
            pool_name: pool_name.to_owned(),
            rbd_name: rbd_name.to_owned(),
            user_id: config.user_id.clone(),
            config: Some(config.options.clone()),
            cluster_name: None,
            cluster_fields: None,
            read_only: false,
        };
        RbdBdev::open(name, uuid, &cluster, origin, block_size)
    }

    fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Re-reads the image's size; returns the new block count if it changed.
    fn refresh_size(&self) -> Result<Option<u64>, RbdError> {
        let blocks = self.image.size()? / u64::from(self.block_size);
        let old = self.num_blocks.swap(blocks, Ordering::AcqRel);
        Ok((old != blocks).then_some(blocks))
    }

    fn create_params(&self) -> Value {
        let o = &self.origin;
        let mut p = Map::new();
        p.insert("name".into(), self.name.clone().into());
        p.insert("pool_name".into(), o.pool_name.clone().into());
        p.insert("rbd_name".into(), o.rbd_name.clone().into());
        p.insert("block_size".into(), self.block_size.into());
        if let Some(u) = &o.user_id {
            p.insert("user_id".into(), u.clone().into());
        }
        if let Some(c) = &o.config {
            p.insert("config".into(), options_json(c));
        }
        if let Some(c) = &o.cluster_name {
            p.insert("cluster_name".into(), c.clone().into());
        }
        p.insert("uuid".into(), uuid_string(self.uuid).into());
        if o.read_only {
            p.insert("read_only".into(), true.into());
        }
        Value::Object(p)
    }
}

impl Drop for RbdBdev {
    /// The last reference (registry, channels) is gone: the image closes with it (releasing its
    /// exclusive lock, so the next client's first write does not wait for the lock to expire).
    fn drop(&mut self) {
        tracing::info!(bdev = %self.name, image = %self.image.name(), "closing rbd image");
    }
}

impl Bdev for RbdBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        "Ceph Rbd Disk"
    }
    fn module_name(&self) -> &'static str {
        RbdModule::NAME
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks.load(Ordering::Acquire)
    }
    fn uuid(&self) -> [u8; 16] {
        self.uuid
    }
    fn supports(&self, kind: IoKind) -> bool {
        match kind {
            IoKind::Read | IoKind::Flush => true,
            IoKind::Write | IoKind::Unmap | IoKind::WriteZeroes => !self.origin.read_only,
        }
    }
    fn open_channel(self: Arc<Self>) -> Result<Box<dyn BdevChannel>, BdevError> {
        if self.is_removed() {
            return Err(BdevError::Removed(self.name.clone()));
        }
        let image = match self.mode {
            ChannelMode::Shared => Arc::clone(&self.image),
            ChannelMode::Handle | ChannelMode::Events => Arc::new(
                self.image
                    .reopen()
                    .map_err(|e| BdevError::Backend(e.to_string()))?,
            ),
        };
        Ok(Box::new(RbdChannel {
            events: self.mode == ChannelMode::Events,
            bdev: self,
            image,
            queue: CompletionQueue::new(CHANNEL_CAPACITY),
            in_flight: 0,
            spare_iovecs: Vec::new(),
        }))
    }
    fn driver_specific(&self) -> Value {
        let o = &self.origin;
        let mut rbd = Map::new();
        rbd.insert("pool_name".into(), o.pool_name.clone().into());
        rbd.insert("rbd_name".into(), o.rbd_name.clone().into());
        if let Some(fields) = &o.cluster_fields {
            rbd.extend(fields.clone());
        } else {
            if let Some(u) = &o.user_id {
                rbd.insert("user_id".into(), u.clone().into());
            }
            if let Some(c) = &o.config {
                rbd.insert("config".into(), options_json(c));
            }
        }
        json!({ "rbd": rbd })
    }
}

/// One reactor's I/O on an [`RbdBdev`].
struct RbdChannel {
    bdev: Arc<RbdBdev>,
    /// The handle it submits on (closed before `queue`, whose waker an event-socket handle
    /// writes to).
    image: Arc<Image>,
    /// Put `image` in event-socket mode at the first submission (on the reactor's thread,
    /// whose waker it then signals).
    events: bool,
    queue: CompletionQueue,
    in_flight: usize,
    spare_iovecs: Vec<SpareIovecs>,
}

impl Drop for RbdChannel {
    /// An event-socket handle's completions are only ever reported by polling it: take the
    /// ones still in flight (they end within `rados_osd_op_timeout`), so their records and
    /// buffers are released before the handle closes.
    fn drop(&mut self) {
        if !self.image.event_socket() {
            return;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while self.in_flight > 0 && std::time::Instant::now() < deadline {
            let n = self.image.poll_events(&mut self.queue, |_| {});
            self.in_flight = self.in_flight.saturating_sub(n);
            if n == 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}

impl RbdChannel {
    fn recycle(spare: &mut Vec<SpareIovecs>, op: Option<AioOp>) {
        if let Some(AioOp::Read { bufs, .. } | AioOp::Write { bufs, .. }) = op {
            spare.push(bufs.into_spare());
        }
    }
}

impl BdevChannel for RbdChannel {
    fn submit(&mut self, io: &BdevIo<'_>) -> Result<(), BdevError> {
        let bdev = &*self.bdev;
        if bdev.is_removed() {
            return Err(BdevError::Removed(bdev.name.clone()));
        }
        if bdev.origin.read_only && !matches!(io.kind, IoKind::Read | IoKind::Flush) {
            return Err(BdevError::Backend(format!(
                "rbd bdev {} is read-only",
                bdev.name
            )));
        }
        let num_blocks = bdev.num_blocks();
        let op = match io.kind {
            IoKind::Read | IoKind::Write => {
                let (offset, len) = byte_range(io, num_blocks, bdev.block_size)?;
                check_iovs(io, len, num_blocks)?;
                let spare = self.spare_iovecs.pop().unwrap_or_default();
                let buffers = io.iovs.iter().map(|v| (v.addr, v.len as usize));
                let bufs = match HostBuffers::new(io.mem, buffers, spare) {
                    Some(Ok(bufs)) => bufs,
                    Some(Err(e)) => return Err(BdevError::Memory(e)),
                    None => {
                        return Err(BdevError::Backend(
                            "the I/O's memory cannot be handed to librbd (unproven mapping or \
                             too many buffers)"
                                .into(),
                        ))
                    }
                };
                if io.kind == IoKind::Read {
                    AioOp::Read { offset, bufs }
                } else {
                    AioOp::Write { offset, bufs }
                }
            }
            IoKind::Flush => AioOp::Flush,
            IoKind::Unmap => {
                let (offset, len) = byte_range(io, num_blocks, bdev.block_size)?;
                AioOp::Discard { offset, len }
            }
            IoKind::WriteZeroes => {
                let (offset, len) = byte_range(io, num_blocks, bdev.block_size)?;
                AioOp::WriteZeroes { offset, len }
            }
        };
        if self.events && !self.image.event_socket() {
            if let Some(waker) = self.queue.thread_waker() {
                if let Err(err) = self.image.use_event_socket(waker.event_fd()) {
                    tracing::warn!(bdev = %bdev.name, %err, "staying with completion callbacks");
                }
            }
            self.events = false;
        }
        match self.image.submit(&mut self.queue, io.tag, op) {
            Ok(()) => {
                self.in_flight += 1;
                Ok(())
            }
            Err((op, err)) => {
                Self::recycle(&mut self.spare_iovecs, Some(op));
                Err(BdevError::Backend(err.to_string()))
            }
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, IoStatus)) -> usize {
        if self.in_flight == 0 {
            return 0;
        }
        let spare = &mut self.spare_iovecs;
        let bdev = &*self.bdev;
        let complete = |c: rvhost_rbd::Completion| {
            let status = if c.result < 0 {
                tracing::warn!(bdev = %bdev.name, tag = c.token, "rbd I/O failed: {}",
                    std::io::Error::from_raw_os_error(i32::try_from(-c.result).unwrap_or(libc::EIO)));
                IoStatus::Failed
            } else {
                IoStatus::Success
            };
            Self::recycle(spare, c.op);
            done(c.token, status);
        };
        let n = if self.image.event_socket() {
            self.image.poll_events(&mut self.queue, complete)
        } else {
            self.queue.poll(complete)
        };
        self.in_flight = self.in_flight.saturating_sub(n);
        n
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

/// The `rbd` module: registered clusters and the bdevs on their images.
#[derive(Debug, Default)]
pub struct RbdModule {
    clusters: Vec<RegisteredCluster>,
    /// Every rbd bdev, in creation order (removed ones are dropped at the next call or tick).
    bdevs: Vec<Arc<RbdBdev>>,
}

/// `bdev_rbd_register_cluster`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterCluster {
    name: String,
    user_id: Option<String>,
    config_param: Option<Map<String, Value>>,
    config_file: Option<String>,
    key_file: Option<String>,
    core_mask: Option<String>,
}

/// `bdev_rbd_get_clusters_info`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClustersInfo {
    name: Option<String>,
}

/// `bdev_rbd_create`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RbdCreate {
    name: Option<String>,
    user_id: Option<String>,
    pool_name: String,
    rbd_name: String,
    block_size: u32,
    config: Option<Map<String, Value>>,
    cluster_name: Option<String>,
    uuid: Option<String>,
    read_only: Option<bool>,
}

/// `bdev_rbd_resize`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RbdResize {
    name: String,
    /// MiB (SPDK's client sends a number; its documentation shows a string).
    new_size: Value,
}

impl RbdModule {
    fn forget_removed(&mut self) {
        self.bdevs.retain(|b| !b.is_removed());
    }

    fn register_cluster(
        &mut self,
        _cx: &mut BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: RegisterCluster = decode(params)?;
        let core_mask = match p.core_mask {
            None => None,
            Some(mask) => {
                let cores = CpuSet::parse(&mask)
                    .map_err(|e| RpcError::errno(EINVAL, format!("core_mask {mask:?}: {e}")))?;
                if cores.is_empty() {
                    return Err(RpcError::errno(
                        EINVAL,
                        format!("core_mask {mask:?} selects no core"),
                    ));
                }
                Some((mask, cores))
            }
        };
        if self.clusters.iter().any(|c| c.name == p.name) {
            return Err(RpcError::errno(
                EEXIST,
                format!("cluster {} is already registered", p.name),
            ));
        }
        let config_param = parse_options(p.config_param, "config_param")?;
        let config = ClusterConfig {
            user_id: p.user_id.clone(),
            config_file: p.config_file.clone().map(Into::into),
            key_file: p.key_file.clone().map(Into::into),
            options: config_param.clone().unwrap_or_default(),
        };
        let handle = with_affinity(core_mask.as_ref().map(|(_, c)| c), || {
            Cluster::connect(&config, DEFAULT_OPTIONS).map_err(|e| rbd_error(&e))
        })?;
        tracing::info!(cluster = %p.name, "registered rbd cluster");
        self.clusters.push(RegisteredCluster {
            name: p.name.clone(),
            user_id: p.user_id,
            config_param,
            config_file: p.config_file,
            key_file: p.key_file,
            core_mask,
            handle,
        });
        Ok(Value::String(p.name))
    }

    fn unregister_cluster(
        &mut self,
        _cx: &mut BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: ByName = decode(params)?;
        self.forget_removed();
        let Some(index) = self.clusters.iter().position(|c| c.name == p.name) else {
            return Err(RpcError::errno(
                ENOENT,
                format!("no rbd cluster named {}", p.name),
            ));
        };
        if let Some(user) = self
            .bdevs
            .iter()
            .find(|b| b.origin.cluster_name.as_deref() == Some(p.name.as_str()))
        {
            return Err(RpcError::errno(
                EBUSY,
                format!("cluster {} is used by rbd bdev {}", p.name, user.name),
            ));
        }
        self.clusters.remove(index);
        tracing::info!(cluster = %p.name, "unregistered rbd cluster");
        Ok(Value::Bool(true))
    }

    fn clusters_info(
        &mut self,
        _cx: &mut BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: ClustersInfo = decode(params)?;
        if self.clusters.is_empty() {
            return Err(RpcError::errno(ENOENT, "no rbd cluster is registered"));
        }
        match p.name {
            Some(name) => self
                .clusters
                .iter()
                .find(|c| c.name == name)
                .map(RegisteredCluster::info)
                .ok_or_else(|| RpcError::errno(ENOENT, format!("no rbd cluster named {name}"))),
            None => Ok(Value::Array(
                self.clusters.iter().map(RegisteredCluster::info).collect(),
            )),
        }
    }

    /// The first free `CephN` name, as SPDK names rbd bdevs created without a name.
    fn next_name(cx: &BdevContext<'_>) -> String {
        (0u64..)
            .map(|n| format!("Ceph{n}"))
            .find(|n| !cx.contains(n))
            .unwrap_or_else(|| "Ceph".to_owned())
    }

    fn create(
        &mut self,
        cx: &mut BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: RbdCreate = decode(params)?;
        check_block_size(p.block_size).map_err(super::module::bdev_error)?;
        let uuid = parse_uuid(p.uuid.as_deref())?;
        let name = p.name.clone().unwrap_or_else(|| Self::next_name(cx));
        cx.check_new_name(&name, uuid)?;
        self.forget_removed();
        let config = parse_options(p.config, "config")?;
        // Everything below that fails drops what it opened: nothing is left half-created.
        let (cluster, cluster_fields, cores) = match &p.cluster_name {
            Some(cluster_name) => {
                let Some(c) = self.clusters.iter().find(|c| &c.name == cluster_name) else {
                    return Err(RpcError::errno(
                        ENOENT,
                        format!("no rbd cluster named {cluster_name} (bdev_rbd_register_cluster)"),
                    ));
                };
                let mut fields = Map::new();
                c.fields(&mut fields);
                let cores = c.core_mask.as_ref().map(|(_, cores)| *cores);
                (Arc::clone(&c.handle), Some(fields), cores)
            }
            None => {
                let cc = ClusterConfig {
                    user_id: p.user_id.clone(),
                    config_file: None,
                    key_file: None,
                    options: config.clone().unwrap_or_default(),
                };
                (
                    Cluster::connect(&cc, DEFAULT_OPTIONS).map_err(|e| rbd_error(&e))?,
                    None,
                    None,
                )
            }
        };
        let origin = Origin {
            pool_name: p.pool_name.clone(),
            rbd_name: p.rbd_name.clone(),
            user_id: p.user_id,
            config,
            cluster_name: p.cluster_name,
            cluster_fields,
            read_only: p.read_only.unwrap_or(false),
        };
        // The image's own threads start where the cluster's do.
        let bdev = with_affinity(cores.as_ref(), || {
            RbdBdev::open(&name, uuid, &cluster, origin, p.block_size)
        })?;
        let num_blocks = bdev.num_blocks();
        let removed = Arc::clone(&bdev);
        cx.register(
            Arc::clone(&bdev) as Arc<dyn Bdev>,
            Box::new(move || removed.removed.store(true, Ordering::Release)),
        )?;
        tracing::info!(bdev = %name, pool = %p.pool_name, image = %p.rbd_name, num_blocks,
            block_size = p.block_size, "created rbd bdev");
        self.bdevs.push(bdev);
        Ok(Value::String(name))
    }

    fn delete(
        &mut self,
        cx: &mut BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: ByName = decode(params)?;
        cx.delete(&p.name)?;
        self.forget_removed();
        Ok(Value::Bool(true))
    }

    fn resize(
        &mut self,
        cx: &mut BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: RbdResize = decode(params)?;
        let mib = match &p.new_size {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse::<u64>().ok(),
            _ => None,
        }
        .ok_or_else(|| {
            RpcError::invalid_params(format!("new_size {} is not a size in MiB", p.new_size))
        })?;
        self.forget_removed();
        let Some(bdev) = self.bdevs.iter().find(|b| b.name == p.name) else {
            return Err(RpcError::errno(
                ENODEV,
                format!("no rbd bdev named {}", p.name),
            ));
        };
        let bytes = mib
            .checked_mul(1 << 20)
            .ok_or_else(|| RpcError::errno(EINVAL, format!("new_size {mib} MiB is too large")))?;
        let current = bdev.num_blocks() * u64::from(bdev.block_size);
        if bytes < current {
            return Err(RpcError::errno(
                EINVAL,
                format!(
                    "new_size {mib} MiB is smaller than the current {current} bytes; rbd bdevs \
                     only grow"
                ),
            ));
        }
        bdev.image.resize(bytes).map_err(|e| rbd_error(&e))?;
        let blocks = bytes / u64::from(bdev.block_size);
        bdev.num_blocks.store(blocks, Ordering::Release);
        tracing::info!(bdev = %bdev.name, num_blocks = blocks, "resized rbd bdev");
        if blocks * u64::from(bdev.block_size) != current {
            cx.announce_resize(&bdev.name, blocks);
        }
        Ok(Value::Bool(true))
    }
}

impl BdevModule for RbdModule {
    const NAME: &'static str = "rbd";
    const METHODS: &'static [RpcMethod<Self>] = &[
        RpcMethod {
            name: "bdev_rbd_register_cluster",
            old_name: None,
            handler: Self::register_cluster,
        },
        RpcMethod {
            name: "bdev_rbd_unregister_cluster",
            old_name: None,
            handler: Self::unregister_cluster,
        },
        RpcMethod {
            name: "bdev_rbd_get_clusters_info",
            old_name: None,
            handler: Self::clusters_info,
        },
        RpcMethod {
            name: "bdev_rbd_create",
            old_name: Some("construct_rbd_bdev"),
            handler: Self::create,
        },
        RpcMethod {
            name: "bdev_rbd_delete",
            old_name: Some("delete_rbd_bdev"),
            handler: Self::delete,
        },
        RpcMethod {
            name: "bdev_rbd_resize",
            old_name: None,
            handler: Self::resize,
        },
    ];

    fn new(_env: &ModuleEnv) -> Self {
        RbdModule::default()
    }

    /// Saved by [`BdevModule::module_config`]: clusters must be registered first.
    fn bdev_config(&self, _bdev: &dyn Bdev) -> Option<Value> {
        None
    }

    fn module_config(&self) -> Vec<Value> {
        let clusters = self.clusters.iter().map(|c| {
            let mut params = Map::new();
            params.insert("name".into(), c.name.clone().into());
            c.fields(&mut params);
            json!({"method": "bdev_rbd_register_cluster", "params": params})
        });
        let bdevs = self
            .bdevs
            .iter()
            .filter(|b| !b.is_removed())
            .map(|b| json!({"method": "bdev_rbd_create", "params": b.create_params()}));
        clusters.chain(bdevs).collect()
    }

    /// Picks up size changes made by other clients of the images.
    fn tick(&mut self, cx: &mut BdevContext<'_>) {
        self.forget_removed();
        for bdev in &self.bdevs {
            match bdev.refresh_size() {
                Ok(Some(blocks)) => {
                    tracing::info!(bdev = %bdev.name, num_blocks = blocks, "rbd image size changed");
                    cx.announce_resize(&bdev.name, blocks);
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(bdev = %bdev.name, "cannot read the image size: {e}"),
            }
        }
    }
}
