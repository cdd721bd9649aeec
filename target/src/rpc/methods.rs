//! The JSON-RPC methods, under SPDK's current names and the older names of SPDK's vhost guide.
//!
//! Parameters are decoded strictly, as SPDK's `spdk_json_decode_object` does: a missing required
//! member, a member of the wrong type or an unknown member is `-32602 Invalid parameters`, with a
//! message naming the member. Failures of the operation itself are SPDK's `-errno` codes: `-17`
//! (EEXIST) for a duplicate name, `-19` (ENODEV) for a missing bdev or controller, `-22` (EINVAL)
//! for values SPDK would refuse, `-12` (ENOMEM) when memory runs out.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use rvhost_platform_linux::cpu::CpuSet;

use super::errno::{EBUSY, EEXIST, EINVAL, ENODEV, ENOMEM, ENOTSUP};
use super::jsonrpc::Dispatch;
use super::{RpcError, INTERNAL_ERROR, METHOD_NOT_FOUND};
use crate::bdev::file::{FileBdev, FileBdevConfig, FileEngine};
use crate::bdev::malloc::{MallocBdev, MemoryBudget};
use crate::bdev::null::NullBdev;
use crate::bdev::nvme::{validate_traddr, NvmeBdevConfig, NvmeController};
use crate::bdev::registry::{uuid_string, RegistryError};
use crate::bdev::{Bdev, BdevError, BdevRegistry, IoKind};
use crate::ops::{BlkControllerSpec, ControllerOps, OpsError, ScsiControllerSpec};

/// A signal `spdk_kill_instance` asked for, acted on once its reply has been sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillRequest {
    /// SIGINT, SIGTERM, SIGQUIT, SIGHUP: shut down cleanly.
    Shutdown(&'static str),
    /// SIGKILL: die at once, as SPDK does (controllers are not torn down; their sockets stay).
    Kill,
}

type Handler = fn(&mut RpcMethods, Option<Value>) -> Result<Value, RpcError>;

struct Method {
    name: &'static str,
    /// The name SPDK's vhost guide (and SPDK before v19.10) used.
    old_name: Option<&'static str>,
    handler: Handler,
}

const METHODS: &[Method] = &[
    Method {
        name: "bdev_malloc_create",
        old_name: Some("construct_malloc_bdev"),
        handler: RpcMethods::bdev_malloc_create,
    },
    Method {
        name: "bdev_malloc_delete",
        old_name: Some("delete_malloc_bdev"),
        handler: RpcMethods::bdev_malloc_delete,
    },
    Method {
        name: "bdev_null_create",
        old_name: Some("construct_null_bdev"),
        handler: RpcMethods::bdev_null_create,
    },
    Method {
        name: "bdev_null_delete",
        old_name: Some("delete_null_bdev"),
        handler: RpcMethods::bdev_null_delete,
    },
    Method {
        name: "bdev_aio_create",
        old_name: Some("construct_aio_bdev"),
        handler: RpcMethods::bdev_aio_create,
    },
    Method {
        name: "bdev_aio_delete",
        old_name: Some("delete_aio_bdev"),
        handler: RpcMethods::bdev_aio_delete,
    },
    Method {
        name: "bdev_aio_rescan",
        old_name: None,
        handler: RpcMethods::bdev_aio_rescan,
    },
    Method {
        name: "bdev_nvme_attach_controller",
        old_name: Some("construct_nvme_bdev"),
        handler: RpcMethods::bdev_nvme_attach_controller,
    },
    Method {
        name: "bdev_nvme_get_controllers",
        old_name: Some("get_nvme_controllers"),
        handler: RpcMethods::bdev_nvme_get_controllers,
    },
    Method {
        name: "bdev_nvme_detach_controller",
        old_name: Some("delete_nvme_controller"),
        handler: RpcMethods::bdev_nvme_detach_controller,
    },
    Method {
        name: "bdev_uring_create",
        old_name: None,
        handler: RpcMethods::bdev_uring_create,
    },
    Method {
        name: "bdev_uring_delete",
        old_name: None,
        handler: RpcMethods::bdev_uring_delete,
    },
    Method {
        name: "bdev_uring_rescan",
        old_name: None,
        handler: RpcMethods::bdev_uring_rescan,
    },
    Method {
        name: "bdev_get_bdevs",
        old_name: Some("get_bdevs"),
        handler: RpcMethods::bdev_get_bdevs,
    },
    Method {
        name: "delete_bdev",
        old_name: None,
        handler: RpcMethods::delete_bdev,
    },
    Method {
        name: "vhost_create_blk_controller",
        old_name: Some("construct_vhost_blk_controller"),
        handler: RpcMethods::vhost_create_blk_controller,
    },
    Method {
        name: "vhost_create_scsi_controller",
        old_name: Some("construct_vhost_scsi_controller"),
        handler: RpcMethods::vhost_create_scsi_controller,
    },
    Method {
        name: "vhost_start_scsi_controller",
        old_name: None,
        handler: RpcMethods::vhost_start_scsi_controller,
    },
    Method {
        name: "vhost_scsi_controller_add_target",
        old_name: Some("add_vhost_scsi_lun"),
        handler: RpcMethods::vhost_scsi_controller_add_target,
    },
    Method {
        name: "vhost_scsi_controller_remove_target",
        old_name: Some("remove_vhost_scsi_target"),
        handler: RpcMethods::vhost_scsi_controller_remove_target,
    },
    Method {
        name: "vhost_get_controllers",
        old_name: Some("get_vhost_controllers"),
        handler: RpcMethods::vhost_get_controllers,
    },
    Method {
        name: "vhost_delete_controller",
        old_name: Some("remove_vhost_controller"),
        handler: RpcMethods::vhost_delete_controller,
    },
    Method {
        name: "rpc_get_methods",
        old_name: Some("get_rpc_methods"),
        handler: RpcMethods::rpc_get_methods,
    },
    Method {
        name: "spdk_get_version",
        old_name: Some("get_spdk_version"),
        handler: RpcMethods::spdk_get_version,
    },
    Method {
        name: "framework_get_reactors",
        old_name: None,
        handler: RpcMethods::framework_get_reactors,
    },
    Method {
        name: "spdk_kill_instance",
        old_name: Some("kill_instance"),
        handler: RpcMethods::spdk_kill_instance,
    },
    Method {
        name: "framework_get_subsystems",
        old_name: Some("get_subsystems"),
        handler: RpcMethods::framework_get_subsystems,
    },
    Method {
        name: "framework_get_config",
        old_name: Some("get_subsystem_config"),
        handler: RpcMethods::framework_get_config,
    },
    Method {
        name: "framework_wait_init",
        old_name: Some("wait_subsystem_init"),
        handler: RpcMethods::framework_wait_init,
    },
    Method {
        name: "log_set_level",
        old_name: Some("set_log_level"),
        handler: RpcMethods::log_set_level,
    },
    Method {
        name: "log_get_level",
        old_name: Some("get_log_level"),
        handler: RpcMethods::log_get_level,
    },
    Method {
        name: "log_set_print_level",
        old_name: Some("set_log_print_level"),
        handler: RpcMethods::log_set_level,
    },
    Method {
        name: "log_get_print_level",
        old_name: Some("get_log_print_level"),
        handler: RpcMethods::log_get_level,
    },
    Method {
        name: "bdev_wait_for_examine",
        old_name: None,
        handler: RpcMethods::bdev_wait_for_examine,
    },
];

/// The oldest name of `vhost_scsi_controller_remove_target` (SPDK's vhost guide).
const OLD_REMOVE_SCSI_DEV: &str = "remove_vhost_scsi_dev";

/// The subsystems `framework_get_config` can save, in the order they must be restored.
const SUBSYSTEMS: &[(&str, &[&str])] = &[
    ("bdev", &[]),
    ("vhost_blk", &["bdev"]),
    ("vhost_scsi", &["bdev"]),
];

/// The control plane's state and its methods. Lives on the control thread; every method runs
/// there, one at a time.
pub struct RpcMethods {
    bdevs: BdevRegistry,
    ops: Arc<dyn ControllerOps>,
    budget: Arc<MemoryBudget>,
    app_cpumask: u64,
    socket_dir: std::path::PathBuf,
    /// SPDK names unnamed RAM bdevs `Malloc0`, `Malloc1`, ... from a counter that never goes back.
    next_malloc: u32,
    /// File bdevs (also in `bdevs`), for `bdev_aio_rescan`/`bdev_uring_rescan`.
    file_bdevs: Vec<std::sync::Weak<FileBdev>>,
    /// Attached NVMe controllers and the names of their bdevs.
    nvme_controllers: Vec<(Arc<NvmeController>, Vec<String>)>,
    kill: Option<KillRequest>,
    log: Option<LogControl>,
    /// The level last set through `log_set_level`/`log_set_print_level`, as SPDK names it.
    log_level: String,
}

/// Changes the process's log filter to a `tracing` directive (`info`, `debug`, ...). The binary
/// passes its subscriber's reload handle; without one the log RPCs report ENOTSUP.
pub type LogControl = Box<dyn Fn(&str) -> Result<(), String> + Send>;

/// SPDK's log level names and the `tracing` level each maps to. rvhost logs to stderr only, so
/// SPDK's two settings (stored and printed messages) are one here.
const LOG_LEVELS: &[(&str, &str)] = &[
    ("ERROR", "error"),
    ("WARNING", "warn"),
    ("NOTICE", "info"),
    ("INFO", "info"),
    ("DEBUG", "debug"),
];

impl std::fmt::Debug for RpcMethods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcMethods")
            .field("bdevs", &self.bdevs)
            .field("app_cpumask", &format_args!("{:#x}", self.app_cpumask))
            .finish_non_exhaustive()
    }
}

/// Decodes `params` (absent means `{}`) into `T`, refusing positional (array) parameters.
fn decode<T: DeserializeOwned>(params: Option<Value>) -> Result<T, RpcError> {
    let params = match params {
        None => Value::Object(Default::default()),
        Some(Value::Array(_)) => {
            return Err(RpcError::invalid_params(
                "parameters must be passed by name (a JSON object), not as an array",
            ))
        }
        Some(params) => params,
    };
    serde_json::from_value(params).map_err(RpcError::invalid_params)
}

/// For methods that take no parameters: absent, `{}` or `[]` are accepted, anything else is not.
fn no_params(method: &str, params: Option<Value>) -> Result<(), RpcError> {
    match params {
        None => Ok(()),
        Some(Value::Object(o)) if o.is_empty() => Ok(()),
        Some(Value::Array(a)) if a.is_empty() => Ok(()),
        Some(_) => Err(RpcError::invalid_params(format!(
            "{method} takes no parameters"
        ))),
    }
}

fn bdev_error(err: BdevError) -> RpcError {
    match err {
        BdevError::InvalidParams(msg) => RpcError::errno(EINVAL, msg),
        BdevError::Backend(msg) => RpcError::errno(ENOMEM, msg),
        other => RpcError::new(INTERNAL_ERROR, other.to_string()),
    }
}

fn registry_error(err: RegistryError) -> RpcError {
    match err {
        RegistryError::Exists(_) => RpcError::errno(EEXIST, err),
        RegistryError::NotFound(_) => RpcError::errno(ENODEV, err),
        RegistryError::InvalidName { .. } => RpcError::errno(EINVAL, err),
    }
}

fn ops_error(err: OpsError) -> RpcError {
    match err {
        OpsError::Exists(_) => RpcError::errno(EEXIST, err),
        OpsError::NotFound(_) => RpcError::errno(ENODEV, err),
        OpsError::InvalidParams(_) => RpcError::errno(EINVAL, err),
        OpsError::Busy(_) => RpcError::errno(EBUSY, err),
        OpsError::Internal(_) => RpcError::new(INTERNAL_ERROR, err.to_string()),
    }
}

fn parse_uuid(text: Option<&str>) -> Result<[u8; 16], RpcError> {
    match text {
        None => Ok(*uuid::Uuid::new_v4().as_bytes()),
        Some(text) => uuid::Uuid::parse_str(text)
            .map(|u| *u.as_bytes())
            .map_err(|e| RpcError::errno(EINVAL, format!("uuid {text:?} is not a UUID: {e}"))),
    }
}

/// Refuses SPDK features rvhost does not have (metadata, protection information) when a request
/// asks for them; their "off" values are accepted so SPDK's client defaults work.
fn refuse_metadata(md_size: Option<u32>, dif_type: Option<i32>) -> Result<(), RpcError> {
    if md_size.is_some_and(|m| m != 0) {
        return Err(RpcError::errno(
            EINVAL,
            "separate or interleaved metadata (md_size) is not supported",
        ));
    }
    if dif_type.is_some_and(|d| d != 0) {
        return Err(RpcError::errno(
            EINVAL,
            "protection information (dif_type) is not supported",
        ));
    }
    Ok(())
}

fn check_physical_block_size(physical: Option<u32>, block_size: u32) -> Result<(), RpcError> {
    match physical {
        Some(p) if p != 0 && p != block_size => Err(RpcError::errno(
            EINVAL,
            format!("physical_block_size {p} differs from block_size {block_size}; rvhost exports one block size"),
        )),
        _ => Ok(()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MallocCreate {
    name: Option<String>,
    uuid: Option<String>,
    num_blocks: u64,
    block_size: u32,
    physical_block_size: Option<u32>,
    /// A splitting hint for SPDK's bdev layer; rvhost does not split I/O, so it changes nothing.
    #[allow(dead_code)]
    optimal_io_boundary: Option<u32>,
    md_size: Option<u32>,
    md_interleave: Option<bool>,
    dif_type: Option<i32>,
    dif_is_head_of_md: Option<bool>,
    dif_pi_format: Option<i32>,
    /// Memory is not NUMA-placed yet; every node is accepted.
    #[allow(dead_code)]
    numa_id: Option<i32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NullCreate {
    name: String,
    uuid: Option<String>,
    num_blocks: u64,
    block_size: u32,
    physical_block_size: Option<u32>,
    md_size: Option<u32>,
    dif_type: Option<i32>,
    dif_is_head_of_md: Option<bool>,
    dif_pi_format: Option<i32>,
    // Alignment and granularity hints SPDK's null bdev only reports; rvhost has nothing to
    // report them through, and they cannot change what a null device does.
    #[allow(dead_code)]
    preferred_write_alignment: Option<u32>,
    #[allow(dead_code)]
    preferred_write_granularity: Option<u32>,
    #[allow(dead_code)]
    optimal_write_size: Option<u32>,
    #[allow(dead_code)]
    preferred_unmap_alignment: Option<u32>,
    #[allow(dead_code)]
    preferred_unmap_granularity: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ByName {
    name: String,
}

/// `bdev_aio_create` (SPDK's `rpc_bdev_aio_create`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AioCreate {
    name: String,
    filename: String,
    block_size: Option<u32>,
    readonly: Option<bool>,
    fallocate: Option<bool>,
    uuid: Option<String>,
    nowait: Option<bool>,
}

/// `bdev_nvme_attach_controller` (SPDK's `rpc_bdev_nvme_attach_controller`); only the PCIe
/// transport is served, the fabrics members are accepted for that check only.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NvmeAttach {
    name: String,
    trtype: String,
    traddr: String,
    adrfam: Option<String>,
    trsvcid: Option<String>,
    subnqn: Option<String>,
    hostnqn: Option<String>,
    num_io_queues: Option<u32>,
    /// SPDK's client always sends these flags.
    prchk_reftag: Option<bool>,
    prchk_guard: Option<bool>,
    hdgst: Option<bool>,
    ddgst: Option<bool>,
    /// Namespaces of other command sets are skipped either way (no passthrough here).
    #[allow(dead_code)]
    allow_unrecognized_csi: Option<bool>,
    /// A fabrics Connect attribute; nothing to do for PCIe.
    #[allow(dead_code)]
    disable_sq_flow_control: Option<bool>,
}

/// `bdev_nvme_get_controllers` (SPDK's `rpc_bdev_nvme_get_controllers`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NvmeGetControllers {
    name: Option<String>,
}

/// `bdev_nvme_detach_controller` (SPDK's `rpc_bdev_nvme_detach_controller`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NvmeDetach {
    name: String,
    trtype: Option<String>,
    traddr: Option<String>,
    adrfam: Option<String>,
    trsvcid: Option<String>,
    subnqn: Option<String>,
    hostaddr: Option<String>,
    hostsvcid: Option<String>,
}

/// I/O queue pairs asked of an NVMe controller when the call does not say: one per channel, and
/// a target opens one channel per reactor for each controller using the bdev.
const DEFAULT_NVME_IO_QUEUES: u16 = 16;
/// How long an NVMe command may be outstanding before the driver aborts it.
const NVME_IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `bdev_uring_create` (SPDK's `rpc_bdev_uring_create`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UringCreate {
    name: String,
    filename: String,
    block_size: Option<u32>,
    uuid: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetBdevs {
    name: Option<String>,
    /// Milliseconds SPDK waits for the bdev to appear. Bdevs appear only through this control
    /// thread, so one that is missing now cannot appear while this request is served.
    #[allow(dead_code)]
    timeout: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBlk {
    ctrlr: String,
    dev_name: String,
    cpumask: Option<String>,
    readonly: Option<bool>,
    packed_ring: Option<bool>,
    transport: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateScsi {
    ctrlr: String,
    cpumask: Option<String>,
    delay: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddScsiTarget {
    ctrlr: String,
    scsi_target_num: i64,
    bdev_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveScsiTarget {
    ctrlr: String,
    scsi_target_num: i64,
}

/// A SCSI target number as SPDK takes it: 0-7, or (when `any_allowed`) -1 for the first free.
fn scsi_target_num(n: i64, any_allowed: bool) -> Result<Option<u8>, RpcError> {
    if any_allowed && n == -1 {
        return Ok(None);
    }
    match u8::try_from(n) {
        Ok(t) if usize::from(t) < crate::scsi::MAX_TARGETS => Ok(Some(t)),
        _ => Err(RpcError::errno(
            EINVAL,
            format!(
                "scsi_target_num {n} is out of range (0-{}{})",
                crate::scsi::MAX_TARGETS - 1,
                if any_allowed {
                    ", or -1 for the first free"
                } else {
                    ""
                }
            ),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OptionalName {
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ByCtrlr {
    ctrlr: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetMethods {
    current: Option<bool>,
    include_aliases: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetConfig {
    name: String,
    /// SPDK may group independent calls into batch arrays; rvhost always writes them one by one,
    /// which every SPDK version loads.
    #[allow(dead_code)]
    with_batches: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogLevel {
    level: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Kill {
    sig_name: String,
}

impl RpcMethods {
    /// The control plane over `ops`, with RAM bdevs limited to `budget`, for an application
    /// running reactors on `app_cpumask` and putting controller sockets in `socket_dir`.
    pub fn new(
        ops: Arc<dyn ControllerOps>,
        budget: Arc<MemoryBudget>,
        app_cpumask: u64,
        socket_dir: std::path::PathBuf,
    ) -> Self {
        RpcMethods {
            bdevs: BdevRegistry::new(),
            ops,
            budget,
            app_cpumask,
            socket_dir,
            next_malloc: 0,
            file_bdevs: Vec::new(),
            nvme_controllers: Vec::new(),
            kill: None,
            log: None,
            log_level: "INFO".to_owned(),
        }
    }

    /// Lets the log RPCs change the log filter; `current` is the level in force (a `tracing`
    /// level or filter, as given to `-L`).
    pub fn set_log_control(&mut self, control: LogControl, current: &str) {
        self.log = Some(control);
        self.log_level = LOG_LEVELS
            .iter()
            .find(|(_, directive)| directive.eq_ignore_ascii_case(current))
            .map(|(name, _)| (*name).to_owned())
            .unwrap_or_else(|| current.to_owned());
    }

    /// The bdevs.
    pub fn bdevs(&self) -> &BdevRegistry {
        &self.bdevs
    }

    /// The data plane.
    pub fn ops(&self) -> &Arc<dyn ControllerOps> {
        &self.ops
    }

    /// Takes the pending `spdk_kill_instance` request, if any.
    pub fn take_kill_request(&mut self) -> Option<KillRequest> {
        self.kill.take()
    }

    /// Every method name: current names, then (if `include_aliases`) the old ones.
    pub fn method_names(include_aliases: bool) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = METHODS.iter().map(|m| m.name).collect();
        if include_aliases {
            names.extend(METHODS.iter().filter_map(|m| m.old_name));
            names.push(OLD_REMOVE_SCSI_DEV);
        }
        names
    }

    fn bdev_malloc_create(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: MallocCreate = decode(params)?;
        refuse_metadata(p.md_size, p.dif_type)?;
        if p.md_interleave == Some(true)
            || p.dif_is_head_of_md == Some(true)
            || p.dif_pi_format.is_some_and(|f| f != 0)
        {
            return Err(RpcError::errno(
                EINVAL,
                "metadata and protection information are not supported",
            ));
        }
        check_physical_block_size(p.physical_block_size, p.block_size)?;
        let name = match p.name {
            Some(name) => name,
            None => self.unused_malloc_name(),
        };
        let uuid = parse_uuid(p.uuid.as_deref())?;
        self.check_new_name(&name, uuid)?;
        let bdev = MallocBdev::new(&name, p.num_blocks, p.block_size, uuid, &self.budget)
            .map_err(bdev_error)?;
        let removed = Arc::clone(&bdev);
        self.bdevs
            .insert(bdev, Box::new(move || removed.mark_removed()))
            .map_err(registry_error)?;
        tracing::info!(bdev = %name, num_blocks = p.num_blocks, block_size = p.block_size, "created RAM bdev");
        Ok(Value::String(name))
    }

    fn unused_malloc_name(&mut self) -> String {
        loop {
            let name = format!("Malloc{}", self.next_malloc);
            self.next_malloc = self.next_malloc.wrapping_add(1);
            if !self.bdevs.contains(&name) {
                return name;
            }
        }
    }

    /// Duplicates are found before any memory is allocated.
    fn check_new_name(&self, name: &str, uuid: [u8; 16]) -> Result<(), RpcError> {
        crate::bdev::registry::validate_name(name).map_err(registry_error)?;
        if self.bdevs.contains(name) {
            return Err(registry_error(RegistryError::Exists(name.to_owned())));
        }
        let alias = uuid_string(uuid);
        if self.bdevs.contains(&alias) {
            return Err(registry_error(RegistryError::Exists(alias)));
        }
        Ok(())
    }

    fn bdev_null_create(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: NullCreate = decode(params)?;
        refuse_metadata(p.md_size, p.dif_type)?;
        if p.dif_is_head_of_md == Some(true) || p.dif_pi_format.is_some_and(|f| f != 0) {
            return Err(RpcError::errno(
                EINVAL,
                "protection information is not supported",
            ));
        }
        check_physical_block_size(p.physical_block_size, p.block_size)?;
        let uuid = parse_uuid(p.uuid.as_deref())?;
        self.check_new_name(&p.name, uuid)?;
        let bdev = NullBdev::new(&p.name, p.num_blocks, p.block_size, uuid).map_err(bdev_error)?;
        let removed = Arc::clone(&bdev);
        self.bdevs
            .insert(bdev, Box::new(move || removed.mark_removed()))
            .map_err(registry_error)?;
        tracing::info!(bdev = %p.name, num_blocks = p.num_blocks, block_size = p.block_size, "created null bdev");
        Ok(Value::String(p.name))
    }

    /// Deletes a bdev, first hot-detaching it from every controller that uses it (their later
    /// I/O to it fails), as SPDK's hot-remove does.
    fn delete(&mut self, name: &str, module: Option<&str>) -> Result<Value, RpcError> {
        let bdev = self
            .bdevs
            .get(name)
            .ok_or_else(|| registry_error(RegistryError::NotFound(name.to_owned())))?;
        if let Some(module) = module {
            if bdev.module_name() != module {
                return Err(RpcError::errno(
                    ENODEV,
                    format!(
                        "{name} is a {} bdev, not a {module} bdev",
                        bdev.module_name()
                    ),
                ));
            }
        }
        let real_name = bdev.name().to_owned();
        if self.ops.bdev_in_use(&real_name) {
            tracing::info!(bdev = %real_name, "hot-detaching bdev from its controllers before deleting it");
            self.ops.detach_bdev(&real_name);
        }
        self.bdevs.remove(&real_name).map_err(registry_error)?;
        tracing::info!(bdev = %real_name, "deleted bdev");
        Ok(Value::Bool(true))
    }

    fn bdev_malloc_delete(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: ByName = decode(params)?;
        self.delete(&p.name, Some("malloc"))
    }

    fn bdev_null_delete(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: ByName = decode(params)?;
        self.delete(&p.name, Some("null"))
    }

    /// The cores io_uring's kernel workers should use: those this process may run on that run
    /// no reactor (`None` when every core has one: then the workers stay where the kernel puts
    /// them).
    fn io_worker_cores(&self) -> Option<CpuSet> {
        let allowed = rvhost_platform_linux::allowed_cores().ok()?;
        let free: CpuSet = allowed
            .iter()
            .filter(|&core| core >= 64 || self.app_cpumask & (1u64 << core) == 0)
            .collect();
        (!free.is_empty()).then_some(free)
    }

    fn create_file_bdev(&mut self, config: FileBdevConfig) -> Result<Value, RpcError> {
        let name = config.name.clone();
        self.check_new_name(&name, config.uuid)?;
        let bdev = FileBdev::open(config).map_err(|e| match e {
            BdevError::InvalidParams(msg) => RpcError::errno(EINVAL, msg),
            other => RpcError::errno(EINVAL, other.to_string()),
        })?;
        let removed = Arc::clone(&bdev);
        self.file_bdevs.push(Arc::downgrade(&bdev));
        tracing::info!(bdev = %name, module = bdev.module_name(), file = %bdev.filename().display(),
            o_direct = bdev.o_direct(), num_blocks = bdev.num_blocks(), block_size = bdev.block_size(),
            "created file bdev");
        self.bdevs
            .insert(bdev, Box::new(move || removed.mark_removed()))
            .map_err(registry_error)?;
        Ok(Value::String(name))
    }

    fn bdev_aio_create(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: AioCreate = decode(params)?;
        if p.nowait == Some(true) {
            return Err(RpcError::errno(ENOTSUP, "RWF_NOWAIT is not supported"));
        }
        let uuid = parse_uuid(p.uuid.as_deref())?;
        self.create_file_bdev(FileBdevConfig {
            name: p.name,
            filename: p.filename.into(),
            block_size: p.block_size.filter(|bs| *bs != 0),
            readonly: p.readonly.unwrap_or(false),
            fallocate: p.fallocate.unwrap_or(false),
            uuid,
            engine: FileEngine::Aio,
            direct: true,
            worker_cores: self.io_worker_cores(),
        })
    }

    fn bdev_uring_create(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: UringCreate = decode(params)?;
        let uuid = parse_uuid(p.uuid.as_deref())?;
        self.create_file_bdev(FileBdevConfig {
            name: p.name,
            filename: p.filename.into(),
            block_size: p.block_size.filter(|bs| *bs != 0),
            readonly: false,
            fallocate: true,
            uuid,
            engine: FileEngine::Uring,
            direct: true,
            worker_cores: self.io_worker_cores(),
        })
    }

    fn bdev_nvme_attach_controller(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: NvmeAttach = decode(params)?;
        if !p.trtype.eq_ignore_ascii_case("pcie") {
            let known = ["tcp", "rdma", "fc", "vfiouser"];
            let code = if known.iter().any(|t| p.trtype.eq_ignore_ascii_case(t)) {
                ENOTSUP
            } else {
                EINVAL
            };
            return Err(RpcError::errno(
                code,
                format!("trtype {:?}: only PCIe controllers are supported", p.trtype),
            ));
        }
        if p.adrfam.is_some() || p.trsvcid.is_some() || p.subnqn.is_some() || p.hostnqn.is_some() {
            return Err(RpcError::errno(
                EINVAL,
                "adrfam, trsvcid, subnqn and hostnqn apply to fabrics, not to PCIe",
            ));
        }
        if p.prchk_reftag == Some(true) || p.prchk_guard == Some(true) {
            return Err(RpcError::errno(
                ENOTSUP,
                "protection information checks are not supported",
            ));
        }
        if p.hdgst == Some(true) || p.ddgst == Some(true) {
            return Err(RpcError::errno(
                EINVAL,
                "header and data digests apply to NVMe/TCP, not to PCIe",
            ));
        }
        validate_traddr(&p.traddr).map_err(bdev_error)?;
        crate::bdev::registry::validate_name(&p.name).map_err(registry_error)?;
        if self
            .nvme_controllers
            .iter()
            .any(|(c, _)| c.name() == p.name)
        {
            return Err(RpcError::errno(
                EEXIST,
                format!("NVMe controller {} already exists", p.name),
            ));
        }
        let io_queues = match p.num_io_queues {
            None => DEFAULT_NVME_IO_QUEUES,
            Some(n) => u16::try_from(n)
                .ok()
                .filter(|n| (1..=1024).contains(n))
                .ok_or_else(|| {
                    RpcError::errno(EINVAL, format!("num_io_queues {n} is not from 1 to 1024"))
                })?,
        };
        let (ctrl, bdevs) = NvmeController::attach(NvmeBdevConfig {
            name: p.name.clone(),
            traddr: p.traddr.clone(),
            io_queues,
            io_timeout: NVME_IO_TIMEOUT,
        })
        .map_err(|e| match e {
            BdevError::InvalidParams(msg) => RpcError::errno(EINVAL, msg),
            other => RpcError::errno(ENODEV, other.to_string()),
        })?;
        for bdev in &bdevs {
            self.check_new_name(bdev.name(), bdev.uuid())?;
        }
        let mut names: Vec<String> = Vec::new();
        for bdev in bdevs {
            let name = bdev.name().to_string();
            let removed = Arc::clone(&bdev);
            tracing::info!(bdev = %name, traddr = %ctrl.traddr(), nsid = bdev.nsid(),
                num_blocks = bdev.num_blocks(), block_size = bdev.block_size(), "created NVMe bdev");
            if let Err(e) = self
                .bdevs
                .insert(bdev, Box::new(move || removed.mark_removed()))
            {
                for done in &names {
                    let _ = self.bdevs.remove(done);
                }
                ctrl.mark_detached();
                return Err(registry_error(e));
            }
            names.push(name);
        }
        self.nvme_controllers.push((ctrl, names.clone()));
        Ok(json!(names))
    }

    fn bdev_nvme_get_controllers(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: NvmeGetControllers = decode(params)?;
        if let Some(name) = &p.name {
            if !self.nvme_controllers.iter().any(|(c, _)| c.name() == name) {
                return Err(RpcError::errno(
                    ENODEV,
                    format!("no NVMe controller named {name}"),
                ));
            }
        }
        let list = self
            .nvme_controllers
            .iter()
            .filter(|(c, _)| p.name.as_deref().is_none_or(|n| n == c.name()))
            .map(|(c, bdevs)| {
                let state = match c.controller().state() {
                    rvhost_nvme::ControllerState::Running => "enabled",
                    rvhost_nvme::ControllerState::Resetting => "resetting",
                    rvhost_nvme::ControllerState::Failed => "failed",
                };
                json!({
                    "name": c.name(),
                    "ctrlrs": [{
                        "state": state,
                        "trid": {"trtype": "PCIe", "traddr": c.traddr()},
                        "cntlid": c.controller().info().controller_id,
                    }],
                    "bdevs": bdevs,
                })
            })
            .collect();
        Ok(Value::Array(list))
    }

    fn bdev_nvme_detach_controller(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: NvmeDetach = decode(params)?;
        let Some(index) = self
            .nvme_controllers
            .iter()
            .position(|(c, _)| c.name() == p.name)
        else {
            return Err(RpcError::errno(
                ENODEV,
                format!("no NVMe controller named {}", p.name),
            ));
        };
        let (ctrl, _) = &self.nvme_controllers[index];
        let fabrics = [&p.adrfam, &p.trsvcid, &p.subnqn, &p.hostaddr, &p.hostsvcid];
        if fabrics.iter().any(|m| m.is_some())
            || p.trtype
                .as_deref()
                .is_some_and(|t| !t.eq_ignore_ascii_case("pcie"))
            || p.traddr.as_deref().is_some_and(|a| {
                rvhost_nvme::vfio::normalize_bdf(a)
                    != rvhost_nvme::vfio::normalize_bdf(ctrl.traddr())
            })
        {
            return Err(RpcError::errno(
                ENODEV,
                format!("NVMe controller {} has no such path", p.name),
            ));
        }
        self.detach_nvme_controller(index)?;
        Ok(Value::Bool(true))
    }

    /// Hot-removes the bdevs of controller `index` from their vhost controllers (their I/O fails
    /// from then on, as in SPDK), deletes them and closes the controller once the last channel
    /// is gone.
    fn detach_nvme_controller(&mut self, index: usize) -> Result<(), RpcError> {
        let Some((ctrl, names)) = self.nvme_controllers.get(index) else {
            return Ok(());
        };
        let (ctrl, names) = (Arc::clone(ctrl), names.clone());
        for name in &names {
            if self.bdevs.contains(name) {
                self.delete(name, Some("nvme"))?;
            }
        }
        ctrl.mark_detached();
        self.nvme_controllers.remove(index);
        tracing::info!(controller = %ctrl.name(), traddr = %ctrl.traddr(), "detached NVMe controller");
        Ok(())
    }

    /// Periodic NVMe housekeeping on the RPC thread. SPDK's hot-remove: detaches every NVMe
    /// controller the kernel wants back (PCI remove or unbind through sysfs), which lets the
    /// kernel's removal finish. And unmaps guest memory that vhost devices no longer use.
    pub fn poll_nvme_controllers(&mut self) {
        for (ctrl, _) in &self.nvme_controllers {
            ctrl.collect_dma();
        }
        while let Some(index) = self
            .nvme_controllers
            .iter()
            .position(|(c, _)| c.controller().removal_requested())
        {
            let name = self.nvme_controllers[index].0.name().to_owned();
            tracing::warn!(controller = %name, "NVMe controller removed; detaching it");
            if let Err(err) = self.detach_nvme_controller(index) {
                tracing::error!(controller = %name, ?err, "detaching a removed controller");
                // Forget it anyway: a controller the kernel takes away cannot be served.
                if index < self.nvme_controllers.len() {
                    self.nvme_controllers.remove(index);
                }
            }
        }
    }

    fn bdev_aio_delete(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: ByName = decode(params)?;
        self.delete(&p.name, Some("aio"))
    }

    fn bdev_uring_delete(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: ByName = decode(params)?;
        self.delete(&p.name, Some("uring"))
    }

    fn rescan_file_bdev(&mut self, params: Option<Value>, module: &str) -> Result<Value, RpcError> {
        let p: ByName = decode(params)?;
        let bdev = self
            .bdevs
            .get(&p.name)
            .ok_or_else(|| registry_error(RegistryError::NotFound(p.name.clone())))?;
        if bdev.module_name() != module {
            return Err(RpcError::errno(
                ENODEV,
                format!("{} is not a {module} bdev", p.name),
            ));
        }
        // The registry holds trait objects; rescanning needs the file bdev itself.
        self.file_bdevs
            .retain(|b| b.upgrade().is_some_and(|b| !b.is_removed()));
        let Some(file_bdev) = self
            .file_bdevs
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .find(|b| b.name() == bdev.name())
        else {
            return Err(RpcError::errno(
                ENODEV,
                format!("no file bdev named {}", p.name),
            ));
        };
        file_bdev
            .rescan()
            .map_err(|e| RpcError::errno(EINVAL, e.to_string()))?;
        Ok(Value::Bool(true))
    }

    fn bdev_aio_rescan(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        self.rescan_file_bdev(params, "aio")
    }

    fn bdev_uring_rescan(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        self.rescan_file_bdev(params, "uring")
    }

    fn delete_bdev(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: ByName = decode(params)?;
        self.delete(&p.name, None)
    }

    fn bdev_json(&self, bdev: &Arc<dyn Bdev>) -> Value {
        let uuid = uuid_string(bdev.uuid());
        let claimed = self.ops.bdev_in_use(bdev.name());
        let mut info = json!({
            "name": bdev.name(),
            "aliases": [uuid],
            "product_name": bdev.product_name(),
            "block_size": bdev.block_size(),
            "num_blocks": bdev.num_blocks(),
            "uuid": uuid,
            "assigned_rate_limits": {
                "rw_ios_per_sec": 0,
                "rw_mbytes_per_sec": 0,
                "r_mbytes_per_sec": 0,
                "w_mbytes_per_sec": 0
            },
            "claimed": claimed,
            "zoned": false,
            "supported_io_types": {
                "read": bdev.supports(IoKind::Read),
                "write": bdev.supports(IoKind::Write),
                "unmap": bdev.supports(IoKind::Unmap),
                "flush": bdev.supports(IoKind::Flush),
                "reset": false,
                "nvme_admin": false,
                "nvme_io": false,
                "nvme_io_md": false,
                "write_zeroes": bdev.supports(IoKind::WriteZeroes),
                "zcopy": false,
                "get_zone_info": false,
                "zone_management": false,
                "zone_append": false,
                "compare": false,
                "compare_and_write": false,
                "abort": false,
                "seek_hole": false,
                "seek_data": false,
                "copy": false,
                "nvme_iov_md": false
            },
            "driver_specific": bdev.driver_specific()
        });
        if claimed {
            if let Value::Object(map) = &mut info {
                // vhost-blk opens its bdev for writing, which SPDK reports as this claim.
                map.insert(
                    "claim_type".into(),
                    Value::String("read_many_write_one".into()),
                );
            }
        }
        info
    }

    fn bdev_get_bdevs(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: GetBdevs = decode(params)?;
        let list: Vec<Value> = match p.name {
            Some(name) => {
                let bdev = self
                    .bdevs
                    .get(&name)
                    .ok_or_else(|| registry_error(RegistryError::NotFound(name)))?;
                vec![self.bdev_json(&bdev)]
            }
            None => self.bdevs.iter().map(|b| self.bdev_json(b)).collect(),
        };
        Ok(Value::Array(list))
    }

    fn vhost_create_blk_controller(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: CreateBlk = decode(params)?;
        if let Some(transport) = p.transport.as_deref() {
            if transport != "vhost_user_blk" {
                return Err(RpcError::errno(
                    EINVAL,
                    format!("transport {transport:?} is not available; rvhost serves \"vhost_user_blk\""),
                ));
            }
        }
        let cpumask = match p.cpumask.as_deref() {
            None => None,
            Some(text) => Some(self.parse_controller_cpumask(text)?),
        };
        if p.packed_ring == Some(true) {
            tracing::warn!(ctrlr = %p.ctrlr, "packed virtqueues are not supported; offering split virtqueues only");
        }
        let bdev = self
            .bdevs
            .get(&p.dev_name)
            .ok_or_else(|| RpcError::errno(ENODEV, format!("no bdev named {}", p.dev_name)))?;
        let readonly = p.readonly.unwrap_or(false);
        let spec = BlkControllerSpec {
            name: p.ctrlr.clone(),
            bdev: Arc::clone(&bdev),
            cpumask,
            readonly,
        };
        self.ops.create_blk_controller(spec).map_err(ops_error)?;
        let socket = self.socket_dir.join(&p.ctrlr);
        tracing::info!(
            ctrlr = %p.ctrlr, bdev = %bdev.name(), readonly,
            "vhost-blk controller ready; attach it to QEMU with: {}",
            qemu_blk_args(&socket, &p.ctrlr)
        );
        Ok(Value::Bool(true))
    }

    fn parse_controller_cpumask(&self, text: &str) -> Result<u64, RpcError> {
        let set = CpuSet::parse(text)
            .map_err(|e| RpcError::errno(EINVAL, format!("cpumask {text:?}: {e}")))?;
        let mask = set.to_u64().ok_or_else(|| {
            RpcError::errno(EINVAL, format!("cpumask {text:?} names a core above 63"))
        })?;
        if mask == 0 {
            return Err(RpcError::errno(
                EINVAL,
                format!("cpumask {text:?} selects no core"),
            ));
        }
        if mask & !self.app_cpumask != 0 {
            return Err(RpcError::errno(
                EINVAL,
                format!(
                    "cpumask {mask:#x} is not a subset of the application's cpumask {:#x} (-m)",
                    self.app_cpumask
                ),
            ));
        }
        Ok(mask)
    }

    fn vhost_create_scsi_controller(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: CreateScsi = decode(params)?;
        let cpumask = match p.cpumask.as_deref() {
            None => None,
            Some(text) => Some(self.parse_controller_cpumask(text)?),
        };
        if p.delay == Some(true) {
            // SPDK delays listening so targets exist before a frontend connects; rvhost
            // hot-plugs targets into connected guests, so listening at once is equivalent.
            tracing::info!(ctrlr = %p.ctrlr, "delay requested; the controller listens at once and hot-plugs targets added later");
        }
        self.ops
            .create_scsi_controller(ScsiControllerSpec {
                name: p.ctrlr.clone(),
                cpumask,
            })
            .map_err(ops_error)?;
        tracing::info!(ctrlr = %p.ctrlr, socket = %self.socket_dir.join(&p.ctrlr).display(), "vhost-scsi controller ready; attach it to QEMU with -device vhost-user-scsi-pci");
        Ok(Value::Bool(true))
    }

    fn vhost_start_scsi_controller(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: ByCtrlr = decode(params)?;
        // Controllers listen from creation (see `delay` above): starting one that exists is a
        // no-op, one that does not is ENODEV.
        self.ops.controllers(Some(&p.ctrlr)).map_err(ops_error)?;
        Ok(Value::Bool(true))
    }

    fn vhost_scsi_controller_add_target(
        &mut self,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: AddScsiTarget = decode(params)?;
        let target = scsi_target_num(p.scsi_target_num, true)?;
        let bdev = self
            .bdevs
            .get(&p.bdev_name)
            .ok_or_else(|| RpcError::errno(ENODEV, format!("no bdev named {}", p.bdev_name)))?;
        let t = self
            .ops
            .scsi_add_target(&p.ctrlr, target, bdev)
            .map_err(ops_error)?;
        tracing::info!(ctrlr = %p.ctrlr, target = t, bdev = %p.bdev_name, "defined SCSI target 'Target {t}'");
        Ok(json!(t))
    }

    fn vhost_scsi_controller_remove_target(
        &mut self,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: RemoveScsiTarget = decode(params)?;
        let Some(target) = scsi_target_num(p.scsi_target_num, false)? else {
            return Err(RpcError::errno(
                EINVAL,
                "scsi_target_num -1 names no target",
            ));
        };
        self.ops
            .scsi_remove_target(&p.ctrlr, target)
            .map_err(ops_error)?;
        Ok(Value::Bool(true))
    }

    fn vhost_get_controllers(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: OptionalName = decode(params)?;
        let list = self.ops.controllers(p.name.as_deref()).map_err(ops_error)?;
        serde_json::to_value(list).map_err(|e| RpcError::new(INTERNAL_ERROR, e.to_string()))
    }

    fn vhost_delete_controller(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: ByCtrlr = decode(params)?;
        self.ops.delete_controller(&p.ctrlr).map_err(ops_error)?;
        tracing::info!(ctrlr = %p.ctrlr, "deleted vhost controller");
        Ok(Value::Bool(true))
    }

    fn rpc_get_methods(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: GetMethods = decode(params)?;
        // Every method is callable at run time (rvhost has no pre-init state), so `current`
        // changes nothing.
        let _ = p.current;
        Ok(json!(Self::method_names(
            p.include_aliases.unwrap_or(false)
        )))
    }

    fn spdk_get_version(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        no_params("spdk_get_version", params)?;
        let version = env!("CARGO_PKG_VERSION");
        let mut parts = version.split(['.', '-']);
        let mut number = || {
            parts
                .next()
                .and_then(|p| p.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (major, minor, patch) = (number(), number(), number());
        let suffix = version
            .split_once('-')
            .map(|(_, s)| format!("-{s}"))
            .unwrap_or_default();
        Ok(json!({
            "version": format!("rvhost v{version}"),
            "fields": { "major": major, "minor": minor, "patch": patch, "suffix": suffix }
        }))
    }

    fn framework_get_reactors(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        no_params("framework_get_reactors", params)?;
        Ok(self.ops.reactors_info())
    }

    fn spdk_kill_instance(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: Kill = decode(params)?;
        let request = match p.sig_name.as_str() {
            "SIGINT" => KillRequest::Shutdown("SIGINT"),
            "SIGTERM" => KillRequest::Shutdown("SIGTERM"),
            "SIGQUIT" => KillRequest::Shutdown("SIGQUIT"),
            "SIGHUP" => KillRequest::Shutdown("SIGHUP"),
            "SIGKILL" => KillRequest::Kill,
            other => {
                return Err(RpcError::errno(
                    EINVAL,
                    format!("sig_name {other:?}: rvhost handles SIGINT, SIGTERM, SIGQUIT, SIGHUP and SIGKILL"),
                ))
            }
        };
        tracing::info!(signal = %p.sig_name, "spdk_kill_instance");
        self.kill = Some(request);
        Ok(Value::Bool(true))
    }
}

impl RpcMethods {
    fn framework_get_subsystems(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        no_params("framework_get_subsystems", params)?;
        let list: Vec<Value> = SUBSYSTEMS
            .iter()
            .map(|(name, depends_on)| json!({"subsystem": name, "depends_on": depends_on}))
            .collect();
        Ok(Value::Array(list))
    }

    /// The calls that recreate a subsystem's current state, as `save_config` stores them and
    /// `-c/--json` or `load_config` replays them.
    fn framework_get_config(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: GetConfig = decode(params)?;
        match p.name.as_str() {
            "bdev" => {
                let mut calls: Vec<Value> = self
                    .bdevs
                    .iter()
                    .filter(|b| b.module_name() != "nvme")
                    .filter_map(|b| bdev_config(b.as_ref()))
                    .collect();
                // One call per controller recreates all of its namespace bdevs.
                calls.extend(self.nvme_controllers.iter().map(|(ctrl, _)| {
                    json!({
                        "method": "bdev_nvme_attach_controller",
                        "params": {"name": ctrl.name(), "trtype": "PCIe", "traddr": ctrl.traddr()}
                    })
                }));
                Ok(Value::Array(calls))
            }
            "vhost_blk" => {
                let controllers = self.ops.controllers(None).map_err(ops_error)?;
                let calls = controllers
                    .iter()
                    .filter_map(|c| {
                        let block = c.backend_specific.get("block")?;
                        // A controller whose bdev was hot-removed cannot be recreated as it is.
                        let bdev = block.get("bdev")?.as_str()?;
                        let readonly = block.get("readonly").and_then(Value::as_bool).unwrap_or(false);
                        Some(json!({
                            "method": "vhost_create_blk_controller",
                            "params": {"ctrlr": c.ctrlr, "dev_name": bdev, "cpumask": c.cpumask, "readonly": readonly}
                        }))
                    })
                    .collect();
                Ok(Value::Array(calls))
            }
            "vhost_scsi" => {
                let controllers = self.ops.controllers(None).map_err(ops_error)?;
                let mut calls = Vec::new();
                for c in &controllers {
                    let Some(targets) = c.backend_specific.get("scsi").and_then(Value::as_array)
                    else {
                        continue;
                    };
                    calls.push(json!({
                        "method": "vhost_create_scsi_controller",
                        "params": {"ctrlr": c.ctrlr, "cpumask": c.cpumask}
                    }));
                    for target in targets {
                        let num = target.get("scsi_dev_num").and_then(Value::as_u64);
                        let bdev = target
                            .get("luns")
                            .and_then(|luns| luns.get(0))
                            .and_then(|lun| lun.get("bdev_name"))
                            .and_then(Value::as_str);
                        if let (Some(num), Some(bdev)) = (num, bdev) {
                            calls.push(json!({
                                "method": "vhost_scsi_controller_add_target",
                                "params": {"ctrlr": c.ctrlr, "scsi_target_num": num, "bdev_name": bdev}
                            }));
                        }
                    }
                }
                Ok(Value::Array(calls))
            }
            other => Err(RpcError::invalid_params(format!(
                "subsystem {other:?} not found (rvhost has: {})",
                SUBSYSTEMS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
}

impl RpcMethods {
    fn log_set_level(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: LogLevel = decode(params)?;
        let Some((name, directive)) = LOG_LEVELS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(&p.level))
        else {
            return Err(RpcError::invalid_params(format!(
                "level {:?} is not one of ERROR, WARNING, NOTICE, INFO, DEBUG",
                p.level
            )));
        };
        let Some(log) = &self.log else {
            return Err(RpcError::errno(
                ENOTSUP,
                "this process cannot change its log level",
            ));
        };
        log(directive).map_err(|e| RpcError::new(INTERNAL_ERROR, e))?;
        tracing::info!(level = %name, "log level changed");
        self.log_level = (*name).to_owned();
        Ok(Value::Bool(true))
    }

    fn log_get_level(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        no_params("log_get_level", params)?;
        Ok(Value::String(self.log_level.clone()))
    }

    /// Subsystems are initialised before the RPC server starts (rvhost has no `--wait-for-rpc`
    /// state), so initialisation is always complete when this is served.
    fn framework_wait_init(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        no_params("framework_wait_init", params)?;
        Ok(Value::Bool(true))
    }

    /// SPDK waits here for bdev modules to finish examining new bdevs (partition tables, logical
    /// volumes). rvhost's bdevs are usable as soon as they are created, so there is never an
    /// examination in progress; SPDK's saved configurations contain this call.
    fn bdev_wait_for_examine(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        no_params("bdev_wait_for_examine", params)?;
        Ok(Value::Bool(true))
    }
}

/// The call that recreates `bdev`, for the modules this file knows.
fn bdev_config(bdev: &dyn Bdev) -> Option<Value> {
    if let module @ ("aio" | "uring") = bdev.module_name() {
        let info = bdev.driver_specific();
        let info = info.get(module)?;
        let mut params = json!({
            "name": bdev.name(),
            "filename": info.get("filename")?,
            "uuid": uuid_string(bdev.uuid())
        });
        if info.get("block_size_override") == Some(&Value::Bool(true)) {
            params["block_size"] = bdev.block_size().into();
        }
        if module == "aio" {
            params["readonly"] = info.get("readonly")?.clone();
            params["fallocate"] = info.get("fallocate")?.clone();
        }
        return Some(json!({ "method": format!("bdev_{module}_create"), "params": params }));
    }
    let method = match bdev.module_name() {
        "malloc" => "bdev_malloc_create",
        "null" => "bdev_null_create",
        other => {
            tracing::warn!(bdev = %bdev.name(), module = other, "bdev module has no saved configuration");
            return None;
        }
    };
    Some(json!({
        "method": method,
        "params": {
            "name": bdev.name(),
            "num_blocks": bdev.num_blocks(),
            "block_size": bdev.block_size(),
            "uuid": uuid_string(bdev.uuid())
        }
    }))
}

impl Dispatch for RpcMethods {
    fn call(&mut self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        // SPDK's vhost guide also called target removal `remove_vhost_scsi_dev`.
        let method = if method == OLD_REMOVE_SCSI_DEV {
            "remove_vhost_scsi_target"
        } else {
            method
        };
        let Some(entry) = METHODS
            .iter()
            .find(|m| m.name == method || m.old_name == Some(method))
        else {
            return Err(RpcError::new(
                METHOD_NOT_FOUND,
                format!("Method not found: {method}"),
            ));
        };
        if entry.name != method {
            tracing::warn!("RPC method {method} is deprecated; use {}", entry.name);
        }
        let outcome = (entry.handler)(self, params);
        if let Err(err) = &outcome {
            tracing::debug!(method, code = err.code, "RPC failed: {}", err.message);
        }
        outcome
    }
}

/// The QEMU command-line arguments that attach vhost-user-blk controller `name` on `socket`.
///
/// QEMU must share the guest's memory with the target, hence the memfd backend with `share=on`
/// bound to the guest's NUMA node. Upstream QEMU's `vhost-user-blk-pci` takes the block size and
/// capacity from the target (GET_CONFIG), so unlike SPDK's old QEMU fork it needs no
/// `logical_block_size`/`size`; its queue count defaults to one per vCPU.
pub fn qemu_blk_args(socket: &std::path::Path, name: &str) -> String {
    let id: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!(
        "-m 1G -object memory-backend-memfd,id=mem0,size=1G,share=on -numa node,memdev=mem0 \
         -chardev socket,id=char_{id},path={} -device vhost-user-blk-pci,id=blk_{id},chardev=char_{id}",
        socket.display()
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ops::ControllerInfo;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// A controller as the fake records it: bdev name, cpumask, read-only.
    pub(crate) type FakeController = (String, Option<u64>, bool);

    /// Records what the control plane asks of the data plane.
    #[derive(Default)]
    pub(crate) struct FakeOps {
        pub controllers: Mutex<BTreeMap<String, FakeController>>,
        pub detached: Mutex<Vec<String>>,
    }

    impl ControllerOps for FakeOps {
        fn create_blk_controller(&self, spec: BlkControllerSpec) -> Result<(), OpsError> {
            let mut map = self.controllers.lock().unwrap();
            if map.contains_key(&spec.name) {
                return Err(OpsError::Exists(spec.name));
            }
            if spec.name.contains('/') {
                return Err(OpsError::InvalidParams(format!("bad name {}", spec.name)));
            }
            map.insert(
                spec.name.clone(),
                (spec.bdev.name().to_owned(), spec.cpumask, spec.readonly),
            );
            Ok(())
        }
        fn delete_controller(&self, name: &str) -> Result<(), OpsError> {
            self.controllers
                .lock()
                .unwrap()
                .remove(name)
                .map(|_| ())
                .ok_or_else(|| OpsError::NotFound(name.into()))
        }
        fn controllers(&self, name: Option<&str>) -> Result<Vec<ControllerInfo>, OpsError> {
            let map = self.controllers.lock().unwrap();
            let info = |(ctrlr, (bdev, mask, ro)): (&String, &FakeController)| ControllerInfo {
                ctrlr: ctrlr.clone(),
                cpumask: format!("{:#x}", mask.unwrap_or(1)),
                delay_base_us: 0,
                iops_threshold: 0,
                socket: format!("/tmp/{ctrlr}").into(),
                sessions: 0,
                backend_specific: json!({"block": {"readonly": ro, "bdev": bdev}}),
            };
            match name {
                Some(n) => map
                    .get_key_value(n)
                    .map(|kv| vec![info(kv)])
                    .ok_or_else(|| OpsError::NotFound(n.into())),
                None => Ok(map.iter().map(info).collect()),
            }
        }
        fn bdev_in_use(&self, bdev_name: &str) -> bool {
            self.controllers
                .lock()
                .unwrap()
                .values()
                .any(|(b, _, _)| b == bdev_name)
        }
        fn detach_bdev(&self, bdev_name: &str) {
            self.detached.lock().unwrap().push(bdev_name.to_owned());
        }
        fn reactors_info(&self) -> Value {
            json!({"tick_rate": 1, "reactors": [{"lcore": 0}]})
        }
    }

    fn methods() -> (RpcMethods, Arc<FakeOps>) {
        let ops = Arc::new(FakeOps::default());
        let m = RpcMethods::new(ops.clone(), MemoryBudget::new(64 << 20), 0x3, "/tmp".into());
        (m, ops)
    }

    fn call(m: &mut RpcMethods, method: &str, params: Value) -> Result<Value, RpcError> {
        m.call(method, Some(params))
    }

    #[test]
    fn malloc_create_list_delete() {
        let (mut m, _) = methods();
        let r = call(
            &mut m,
            "bdev_malloc_create",
            json!({"num_blocks": 2048, "block_size": 512, "name": "Malloc0"}),
        );
        assert_eq!(r, Ok(json!("Malloc0")));
        // Unnamed bdevs get SPDK's names, skipping taken ones.
        let r = call(
            &mut m,
            "construct_malloc_bdev",
            json!({"num_blocks": 8, "block_size": 4096}),
        );
        assert_eq!(r, Ok(json!("Malloc1")));
        let uuid = "0f0e0d0c-0b0a-0908-0706-050403020100";
        call(
            &mut m,
            "bdev_malloc_create",
            json!({"num_blocks": 8, "block_size": 512, "name": "M2", "uuid": uuid}),
        )
        .unwrap();
        let all = call(&mut m, "bdev_get_bdevs", json!({})).unwrap();
        let names: Vec<_> = all
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["name"].clone())
            .collect();
        assert_eq!(names, [json!("Malloc0"), json!("Malloc1"), json!("M2")]);
        let one = m.call("get_bdevs", Some(json!({"name": uuid}))).unwrap();
        let b = &one[0];
        assert_eq!(b["name"], "M2");
        assert_eq!(b["uuid"], uuid);
        assert_eq!(b["aliases"], json!([uuid]));
        assert_eq!(b["product_name"], "Malloc disk");
        assert_eq!(b["block_size"], 512);
        assert_eq!(b["num_blocks"], 8);
        assert_eq!(b["claimed"], false);
        assert_eq!(b["supported_io_types"]["unmap"], true);
        assert_eq!(b["supported_io_types"]["write_zeroes"], true);
        assert_eq!(b["assigned_rate_limits"]["rw_ios_per_sec"], 0);
        assert_eq!(
            call(&mut m, "bdev_malloc_delete", json!({"name": "Malloc1"})),
            Ok(json!(true))
        );
        let err = call(&mut m, "bdev_malloc_delete", json!({"name": "Malloc1"})).unwrap_err();
        assert_eq!(err.code, -19);
        assert_eq!(
            call(&mut m, "bdev_get_bdevs", json!({"name": "Malloc1"}))
                .unwrap_err()
                .code,
            -19
        );
    }

    #[test]
    fn duplicate_and_invalid_bdevs_get_spdk_codes() {
        let (mut m, _) = methods();
        call(
            &mut m,
            "bdev_malloc_create",
            json!({"num_blocks": 8, "block_size": 512, "name": "A"}),
        )
        .unwrap();
        let dup = call(
            &mut m,
            "bdev_null_create",
            json!({"num_blocks": 8, "block_size": 512, "name": "A"}),
        )
        .unwrap_err();
        assert_eq!(dup.code, -17);
        assert!(dup.message.starts_with("File exists"), "{}", dup.message);
        for (params, code) in [
            (
                json!({"num_blocks": 8, "block_size": 500, "name": "B"}),
                -22,
            ),
            (
                json!({"num_blocks": 0, "block_size": 512, "name": "B"}),
                -22,
            ),
            (
                json!({"num_blocks": 8, "block_size": 512, "name": "B", "md_size": 8}),
                -22,
            ),
            (
                json!({"num_blocks": 8, "block_size": 512, "name": "B", "uuid": "nope"}),
                -22,
            ),
            (json!({"num_blocks": 8, "block_size": 512, "name": ""}), -22),
            (
                json!({"num_blocks": 1u64 << 40, "block_size": 512, "name": "B"}),
                -12,
            ),
            (json!({"block_size": 512, "name": "B"}), -32602),
            (
                json!({"num_blocks": "8", "block_size": 512, "name": "B"}),
                -32602,
            ),
            (
                json!({"num_blocks": -1, "block_size": 512, "name": "B"}),
                -32602,
            ),
            (
                json!({"num_blocks": 8, "block_size": 512, "name": "B", "bogus": 1}),
                -32602,
            ),
        ] {
            let err = call(&mut m, "bdev_malloc_create", params.clone()).unwrap_err();
            assert_eq!(err.code, code, "{params}: {}", err.message);
        }
        let missing = call(&mut m, "bdev_malloc_create", json!({"block_size": 512})).unwrap_err();
        assert!(
            missing.message.contains("num_blocks"),
            "{}",
            missing.message
        );
        let positional = m
            .call("bdev_malloc_create", Some(json!([8, 512])))
            .unwrap_err();
        assert_eq!(positional.code, -32602);
        assert_eq!(m.call("bdev_malloc_create", None).unwrap_err().code, -32602);
        // A null bdev is not deleted through the malloc method, as in SPDK.
        call(
            &mut m,
            "bdev_null_create",
            json!({"num_blocks": 8, "block_size": 512, "name": "N"}),
        )
        .unwrap();
        assert_eq!(
            call(&mut m, "bdev_malloc_delete", json!({"name": "N"}))
                .unwrap_err()
                .code,
            -19
        );
        assert_eq!(
            call(&mut m, "delete_null_bdev", json!({"name": "N"})),
            Ok(json!(true))
        );
        assert_eq!(m.bdevs().len(), 1);
    }

    #[test]
    fn controllers_go_through_the_data_plane() {
        let (mut m, ops) = methods();
        call(
            &mut m,
            "bdev_malloc_create",
            json!({"num_blocks": 8, "block_size": 512, "name": "Malloc0"}),
        )
        .unwrap();
        let create = |m: &mut RpcMethods, p: Value| call(m, "vhost_create_blk_controller", p);
        assert_eq!(
            create(&mut m, json!({"ctrlr": "vhost.0", "dev_name": "Malloc0"})),
            Ok(json!(true))
        );
        assert_eq!(
            m.call("construct_vhost_blk_controller", Some(json!({"ctrlr": "vhost.1", "dev_name": "Malloc0", "cpumask": "0x2", "readonly": true}))),
            Ok(json!(true))
        );
        assert_eq!(
            ops.controllers.lock().unwrap()["vhost.1"],
            ("Malloc0".to_owned(), Some(2), true)
        );
        assert_eq!(ops.controllers.lock().unwrap()["vhost.0"].1, None);
        for (params, code) in [
            (json!({"ctrlr": "vhost.0", "dev_name": "Malloc0"}), -17),
            (json!({"ctrlr": "vhost.2", "dev_name": "Nope"}), -19),
            (
                json!({"ctrlr": "vhost.2", "dev_name": "Malloc0", "cpumask": "0x4"}),
                -22,
            ),
            (
                json!({"ctrlr": "vhost.2", "dev_name": "Malloc0", "cpumask": "zz"}),
                -22,
            ),
            (
                json!({"ctrlr": "vhost.2", "dev_name": "Malloc0", "cpumask": "0x0"}),
                -22,
            ),
            (
                json!({"ctrlr": "vhost.2", "dev_name": "Malloc0", "transport": "vfio"}),
                -22,
            ),
            (json!({"ctrlr": "a/b", "dev_name": "Malloc0"}), -22),
            (json!({"ctrlr": "vhost.2"}), -32602),
            (
                json!({"ctrlr": "vhost.2", "dev_name": "Malloc0", "readonly": "yes"}),
                -32602,
            ),
        ] {
            let err = create(&mut m, params.clone()).unwrap_err();
            assert_eq!(err.code, code, "{params}: {}", err.message);
        }
        let listed = call(&mut m, "vhost_get_controllers", json!({})).unwrap();
        assert_eq!(listed.as_array().unwrap().len(), 2);
        assert_eq!(listed[1]["backend_specific"]["block"]["readonly"], true);
        let one = call(&mut m, "get_vhost_controllers", json!({"name": "vhost.0"})).unwrap();
        assert_eq!(one[0]["ctrlr"], "vhost.0");
        assert_eq!(
            call(&mut m, "vhost_get_controllers", json!({"name": "x"}))
                .unwrap_err()
                .code,
            -19
        );
        // Deleting a bdev in use detaches it first.
        let b = call(&mut m, "bdev_get_bdevs", json!({"name": "Malloc0"})).unwrap();
        assert_eq!(b[0]["claimed"], true);
        assert_eq!(
            call(&mut m, "delete_bdev", json!({"name": "Malloc0"})),
            Ok(json!(true))
        );
        assert_eq!(*ops.detached.lock().unwrap(), ["Malloc0"]);
        assert_eq!(
            call(
                &mut m,
                "vhost_delete_controller",
                json!({"ctrlr": "vhost.0"})
            ),
            Ok(json!(true))
        );
        assert_eq!(
            call(
                &mut m,
                "remove_vhost_controller",
                json!({"ctrlr": "vhost.0"})
            )
            .unwrap_err()
            .code,
            -19
        );
    }

    #[test]
    fn saved_config_recreates_bdevs_and_controllers() {
        let (mut m, _) = methods();
        call(
            &mut m,
            "bdev_malloc_create",
            json!({"num_blocks": 16, "block_size": 4096, "name": "M"}),
        )
        .unwrap();
        call(
            &mut m,
            "bdev_null_create",
            json!({"num_blocks": 8, "block_size": 512, "name": "N"}),
        )
        .unwrap();
        call(
            &mut m,
            "vhost_create_blk_controller",
            json!({"ctrlr": "v", "dev_name": "N", "readonly": true}),
        )
        .unwrap();
        let subsystems = m.call("framework_get_subsystems", None).unwrap();
        assert_eq!(
            subsystems[1],
            json!({"subsystem": "vhost_blk", "depends_on": ["bdev"]})
        );
        let bdev = call(
            &mut m,
            "framework_get_config",
            json!({"name": "bdev", "with_batches": false}),
        )
        .unwrap();
        let m_uuid = m.bdevs().get("M").unwrap().uuid();
        assert_eq!(
            bdev[0],
            json!({"method": "bdev_malloc_create", "params": {"name": "M", "num_blocks": 16, "block_size": 4096, "uuid": uuid_string(m_uuid)}})
        );
        assert_eq!(bdev[1]["method"], "bdev_null_create");
        let vhost = call(&mut m, "framework_get_config", json!({"name": "vhost_blk"})).unwrap();
        assert_eq!(
            vhost,
            json!([{"method": "vhost_create_blk_controller", "params": {"ctrlr": "v", "dev_name": "N", "cpumask": "0x1", "readonly": true}}])
        );
        assert_eq!(
            call(&mut m, "framework_get_config", json!({"name": "nvmf"}))
                .unwrap_err()
                .code,
            -32602
        );

        // Replaying the saved calls on a fresh target recreates the same state.
        let (mut fresh, fresh_ops) = methods();
        for entry in bdev
            .as_array()
            .unwrap()
            .iter()
            .chain(vhost.as_array().unwrap())
        {
            fresh
                .call(
                    entry["method"].as_str().unwrap(),
                    Some(entry["params"].clone()),
                )
                .unwrap();
        }
        assert_eq!(fresh.bdevs().get("M").unwrap().uuid(), m_uuid);
        assert_eq!(
            fresh_ops.controllers.lock().unwrap()["v"],
            ("N".to_owned(), Some(1), true)
        );
    }

    #[test]
    fn introspection_and_kill() {
        let (mut m, _) = methods();
        let names = m.call("rpc_get_methods", None).unwrap();
        assert!(names
            .as_array()
            .unwrap()
            .contains(&json!("bdev_malloc_create")));
        assert!(!names
            .as_array()
            .unwrap()
            .contains(&json!("construct_malloc_bdev")));
        let all = call(
            &mut m,
            "get_rpc_methods",
            json!({"include_aliases": true, "current": true}),
        )
        .unwrap();
        assert!(all
            .as_array()
            .unwrap()
            .contains(&json!("construct_malloc_bdev")));
        let v = m.call("spdk_get_version", None).unwrap();
        assert_eq!(
            v["version"],
            format!("rvhost v{}", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(v["fields"]["major"], 0);
        assert_eq!(v["fields"]["minor"], 1);
        assert_eq!(v["fields"]["suffix"], "");
        assert_eq!(
            call(&mut m, "spdk_get_version", json!({"x": 1}))
                .unwrap_err()
                .code,
            -32602
        );
        assert_eq!(
            m.call("framework_get_reactors", None).unwrap()["reactors"][0]["lcore"],
            0
        );
        assert_eq!(m.call("nope", None).unwrap_err().code, -32601);
        assert_eq!(m.call("framework_wait_init", None), Ok(json!(true)));
        let level = json!({"level": "DEBUG"});
        assert_eq!(
            call(&mut m, "log_set_level", level.clone())
                .unwrap_err()
                .code,
            -95
        );
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        m.set_log_control(
            Box::new(move |d| {
                record.lock().unwrap().push(d.to_owned());
                Ok(())
            }),
            "warn",
        );
        assert_eq!(m.call("log_get_print_level", None), Ok(json!("WARNING")));
        assert_eq!(call(&mut m, "log_set_print_level", level), Ok(json!(true)));
        assert_eq!(
            call(&mut m, "log_set_level", json!({"level": "notice"})),
            Ok(json!(true))
        );
        assert_eq!(m.call("log_get_level", None), Ok(json!("NOTICE")));
        assert_eq!(*seen.lock().unwrap(), ["debug", "info"]);
        let bad = call(&mut m, "log_set_level", json!({"level": "LOUD"})).unwrap_err();
        assert_eq!(bad.code, -32602);
        assert_eq!(
            m.call("bdev_wait_for_examine", Some(json!({}))),
            Ok(json!(true))
        );
        assert_eq!(
            call(&mut m, "bdev_wait_for_examine", json!({"x": 1}))
                .unwrap_err()
                .code,
            -32602
        );
        assert_eq!(
            call(&mut m, "spdk_kill_instance", json!({"sig_name": "SIGUSR2"}))
                .unwrap_err()
                .code,
            -22
        );
        assert_eq!(m.take_kill_request(), None);
        assert_eq!(
            call(&mut m, "spdk_kill_instance", json!({"sig_name": "SIGTERM"})),
            Ok(json!(true))
        );
        assert_eq!(
            m.take_kill_request(),
            Some(KillRequest::Shutdown("SIGTERM"))
        );
        assert_eq!(m.take_kill_request(), None);
    }
}
