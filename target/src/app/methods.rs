//! The JSON-RPC methods, under SPDK's current names and the older names of SPDK's vhost guide.
//!
//! This file serves the framework methods (introspection, version, log level, `save_config`'s
//! `framework_get_config`, kill), the generic bdev methods (`bdev_get_bdevs`, `delete_bdev`) and
//! the vhost methods. Every other bdev method belongs to a bdev module
//! ([`crate::bdev::module::BdevModule`]): the module lists it, this file dispatches to it, and
//! `save_config` asks the module that created each bdev for the call that recreates it.
//!
//! Parameters are decoded strictly, as SPDK's `spdk_json_decode_object` does: a missing required
//! member, a member of the wrong type or an unknown member is `-32602 Invalid parameters`, with a
//! message naming the member. Failures of the operation itself are SPDK's `-errno` codes: `-17`
//! (EEXIST) for a duplicate name, `-19` (ENODEV) for a missing bdev or controller, `-22` (EINVAL)
//! for values SPDK would refuse, `-12` (ENOMEM) when memory runs out.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use rvhost_platform_linux::cpu::CpuSet;

use crate::bdev::malloc::MemoryBudget;
use crate::bdev::module::{
    decode, delete_bdev, registry_error, AnyBdevModule, BdevContext, BdevUsers, ByName, ModuleEnv,
};
use crate::bdev::registry::{uuid_string, RegistryError};
use crate::bdev::{Bdev, BdevRegistry, IoKind};
use crate::ops::{
    BlkControllerSpec, ControllerOps, ControllerTransport, OpsError, ScsiControllerSpec,
    VVU_EMU_TRANSPORT, VVU_TRANSPORT,
};
use crate::rpc::errno::{EBUSY, EEXIST, EINVAL, ENODEV, ENOTSUP, EPERM};
use crate::rpc::jsonrpc::Dispatch;
use crate::rpc::{RpcError, INTERNAL_ERROR, METHOD_NOT_FOUND};

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
        name: "vhost_controller_set_coalescing",
        old_name: Some("set_vhost_controller_coalescing"),
        handler: RpcMethods::vhost_controller_set_coalescing,
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
        name: "thread_get_stats",
        old_name: None,
        handler: RpcMethods::thread_get_stats,
    },
    Method {
        name: "thread_get_pollers",
        old_name: None,
        handler: RpcMethods::thread_get_pollers,
    },
    Method {
        name: "framework_get_scheduler",
        old_name: None,
        handler: RpcMethods::framework_get_scheduler,
    },
    Method {
        name: "rvhost_get_queue_stats",
        old_name: None,
        handler: RpcMethods::rvhost_get_queue_stats,
    },
    Method {
        name: "rvhost_get_metrics",
        old_name: None,
        handler: RpcMethods::rvhost_get_metrics,
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
        name: "bdev_get_iostat",
        old_name: None,
        handler: RpcMethods::bdev_get_iostat,
    },
    Method {
        name: "bdev_reset_iostat",
        old_name: None,
        handler: RpcMethods::bdev_reset_iostat,
    },
    Method {
        name: "bdev_enable_histogram",
        old_name: None,
        handler: RpcMethods::bdev_enable_histogram,
    },
    Method {
        name: "bdev_get_histogram",
        old_name: None,
        handler: RpcMethods::bdev_get_histogram,
    },
    Method {
        name: "bdev_set_qos_limit",
        old_name: Some("set_bdev_qos_limit"),
        handler: RpcMethods::bdev_set_qos_limit,
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
    /// The bdev modules ([`crate::bdev::modules`]), which serve the bdev methods not listed in
    /// [`METHODS`].
    modules: Vec<Box<dyn AnyBdevModule>>,
    ops: Arc<dyn ControllerOps>,
    app_cpumask: u64,
    socket_dir: std::path::PathBuf,
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

fn ops_error(err: OpsError) -> RpcError {
    match err {
        OpsError::Exists(_) => RpcError::errno(EEXIST, err),
        OpsError::NotFound(_) => RpcError::errno(ENODEV, err),
        OpsError::InvalidParams(_) => RpcError::errno(EINVAL, err),
        OpsError::Busy(_) => RpcError::errno(EBUSY, err),
        OpsError::Internal(_) => RpcError::new(INTERNAL_ERROR, err.to_string()),
    }
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
    /// The virtio-vhost-user PCI function (`transport` "vvu").
    traddr: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateScsi {
    ctrlr: String,
    cpumask: Option<String>,
    delay: Option<bool>,
    /// rvhost's: "vvu" or "vvu_emu" (SPDK's method has no transport).
    transport: Option<String>,
    /// The virtio-vhost-user PCI function (`transport` "vvu").
    traddr: Option<String>,
}

/// The transport a `vhost_create_*_controller` call names: `socket_name` (SPDK's, the default)
/// or absent is the Unix socket; "vvu" needs `traddr`, the PCI address of a virtio-vhost-user
/// function bound to vfio-pci; "vvu_emu" is the emulated device on the controller's socket path.
fn controller_transport(
    transport: Option<&str>,
    traddr: Option<&str>,
    socket_name: &str,
) -> Result<ControllerTransport, RpcError> {
    let transport = transport.unwrap_or(socket_name);
    let unexpected_traddr = |t: &str| {
        RpcError::errno(
            EINVAL,
            format!("traddr names a PCI function; transport {t:?} takes none"),
        )
    };
    match (transport, traddr) {
        (VVU_TRANSPORT, Some(traddr)) => {
            crate::bdev::nvme::validate_traddr(traddr)
                .map_err(|e| RpcError::errno(EINVAL, e.to_string()))?;
            Ok(ControllerTransport::Vvu {
                traddr: rvhost_vvu::vfio::normalize_bdf(traddr),
            })
        }
        (VVU_TRANSPORT, None) => Err(RpcError::errno(
            EINVAL,
            "transport \"vvu\" needs traddr, the PCI address of the virtio-vhost-user device",
        )),
        (t, Some(_)) if t == socket_name || t == VVU_EMU_TRANSPORT => Err(unexpected_traddr(t)),
        (VVU_EMU_TRANSPORT, None) => Ok(ControllerTransport::VvuEmu),
        (t, None) if t == socket_name => Ok(ControllerTransport::Socket),
        (other, _) => Err(RpcError::errno(
            EINVAL,
            format!(
                "transport {other:?} is not available; rvhost serves {socket_name:?} (the default), \"{VVU_TRANSPORT}\" and \"{VVU_EMU_TRANSPORT}\""
            ),
        )),
    }
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
struct SetCoalescing {
    ctrlr: String,
    delay_base_us: u32,
    iops_threshold: u32,
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
        let env = ModuleEnv {
            budget,
            app_cpumask,
        };
        RpcMethods {
            bdevs: BdevRegistry::new(),
            modules: crate::bdev::modules(&env),
            ops,
            app_cpumask,
            socket_dir,
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

    /// Every method name: the bdev modules' current names, then the others', then (if
    /// `include_aliases`) the old names in the same order.
    pub fn method_names(&self, include_aliases: bool) -> Vec<&'static str> {
        let all: Vec<(&'static str, Option<&'static str>)> = self
            .modules
            .iter()
            .flat_map(|m| m.method_names())
            .chain(METHODS.iter().map(|m| (m.name, m.old_name)))
            .collect();
        let mut names: Vec<&'static str> = all.iter().map(|(name, _)| *name).collect();
        if include_aliases {
            names.extend(all.iter().filter_map(|(_, old)| *old));
            names.push(OLD_REMOVE_SCSI_DEV);
        }
        names
    }

    /// Registers one more bdev module after the built-in ones ([`crate::bdev::modules`]): its
    /// methods are listed and served, its bdevs saved and its housekeeping ticked like theirs.
    pub fn add_bdev_module(&mut self, module: Box<dyn AnyBdevModule>) {
        self.modules.push(module);
    }

    /// The bdev modules' periodic housekeeping (NVMe hot-remove and DMA unmapping), on the
    /// control thread between requests.
    pub fn tick_bdev_modules(&mut self) {
        let users = OpsUsers(self.ops.as_ref());
        let mut cx = BdevContext::new(&mut self.bdevs, &users);
        for module in &mut self.modules {
            module.tick(&mut cx);
        }
    }

    /// Deletes a bdev of any module, first hot-detaching it from every controller that uses it.
    fn delete_bdev(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: ByName = decode(params)?;
        delete_bdev(&mut self.bdevs, &OpsUsers(self.ops.as_ref()), &p.name, None)?;
        Ok(Value::Bool(true))
    }

    /// Bdev `name` for a controller to export: ENODEV if there is none, EPERM if a bdev stacked
    /// on it claimed it (SPDK refuses to open a bdev a module claimed for writing).
    fn exportable_bdev(&self, name: &str) -> Result<Arc<dyn Bdev>, RpcError> {
        let bdev = self
            .bdevs
            .get(name)
            .ok_or_else(|| RpcError::errno(ENODEV, format!("no bdev named {name}")))?;
        if let Some(by) = self.bdevs.claimed_by(bdev.name()) {
            return Err(RpcError::errno(
                EPERM,
                format!("bdev {} is claimed by bdev {by}", bdev.name()),
            ));
        }
        Ok(bdev)
    }

    fn bdev_json(&self, bdev: &Arc<dyn Bdev>) -> Value {
        let uuid = uuid_string(bdev.uuid());
        let module_claim = self.bdevs.claimed_by(bdev.name()).is_some();
        let claimed = module_claim || self.ops.bdev_in_use(bdev.name());
        let mut info = json!({
            "name": bdev.name(),
            "aliases": [uuid],
            "product_name": bdev.product_name(),
            "block_size": bdev.block_size(),
            "num_blocks": bdev.num_blocks(),
            "uuid": uuid,
            "assigned_rate_limits": self.bdev_rate_limits(bdev.name()),
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
                // A bdev stacked on this one claims it as SPDK's module claim does; vhost-blk
                // opens its bdev for writing, which SPDK reports as the other claim.
                let claim_type = if module_claim {
                    "exclusive_write"
                } else {
                    "read_many_write_one"
                };
                map.insert("claim_type".into(), Value::String(claim_type.into()));
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
        let transport = controller_transport(
            p.transport.as_deref(),
            p.traddr.as_deref(),
            "vhost_user_blk",
        )?;
        let cpumask = match p.cpumask.as_deref() {
            None => None,
            Some(text) => Some(self.parse_controller_cpumask(text)?),
        };
        if p.packed_ring == Some(true) {
            tracing::warn!(ctrlr = %p.ctrlr, "packed virtqueues are not supported; offering split virtqueues only");
        }
        let bdev = self.exportable_bdev(&p.dev_name)?;
        let readonly = p.readonly.unwrap_or(false);
        let spec = BlkControllerSpec {
            name: p.ctrlr.clone(),
            bdev: Arc::clone(&bdev),
            cpumask,
            readonly,
        };
        self.ops
            .create_blk_controller_on(spec, transport.clone())
            .map_err(ops_error)?;
        let socket = self.socket_dir.join(&p.ctrlr);
        match &transport {
            ControllerTransport::Vvu { traddr } => tracing::info!(
                ctrlr = %p.ctrlr, bdev = %bdev.name(), readonly, traddr = %traddr,
                "vhost-blk controller ready on the virtio-vhost-user device; attach it to the \
                 frontend VM with -device vhost-user-blk-pci on the backend VM's \
                 virtio-vhost-user-pci chardev socket"
            ),
            _ => tracing::info!(
                ctrlr = %p.ctrlr, bdev = %bdev.name(), readonly,
                "vhost-blk controller ready; attach it to QEMU with: {}",
                qemu_blk_args(&socket, &p.ctrlr)
            ),
        }
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
        let transport = controller_transport(
            p.transport.as_deref(),
            p.traddr.as_deref(),
            "vhost_user_scsi",
        )?;
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
            .create_scsi_controller_on(
                ScsiControllerSpec {
                    name: p.ctrlr.clone(),
                    cpumask,
                },
                transport,
            )
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
        let bdev = self.exportable_bdev(&p.bdev_name)?;
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

    fn vhost_controller_set_coalescing(
        &mut self,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: SetCoalescing = decode(params)?;
        self.ops
            .set_coalescing(&p.ctrlr, p.delay_base_us, p.iops_threshold)
            .map_err(ops_error)?;
        Ok(Value::Bool(true))
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
        Ok(json!(self.method_names(p.include_aliases.unwrap_or(false))))
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
                // Each bdev's call (from the module that created it) in creation order, then
                // the modules' own calls (an NVMe controller recreates all its namespaces).
                let mut calls: Vec<Value> = Vec::new();
                for (owner, bdev) in self.bdevs.iter_with_owner() {
                    match self.modules.iter().find(|m| m.name() == owner) {
                        Some(module) => calls.extend(module.bdev_config(bdev.as_ref())),
                        None => tracing::warn!(bdev = %bdev.name(), module = owner,
                            "bdev module has no saved configuration"),
                    }
                }
                calls.extend(self.modules.iter().flat_map(|m| m.module_config()));
                calls.extend(self.qos_config_calls());
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
                        let mut create = json!({
                            "method": "vhost_create_blk_controller",
                            "params": {"ctrlr": c.ctrlr, "dev_name": bdev, "cpumask": c.cpumask, "readonly": readonly}
                        });
                        transport_params(c, &mut create["params"]);
                        Some(std::iter::once(create).chain(coalescing_call(c)))
                    })
                    .flatten()
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
                    let mut create = json!({
                        "method": "vhost_create_scsi_controller",
                        "params": {"ctrlr": c.ctrlr, "cpumask": c.cpumask}
                    });
                    transport_params(c, &mut create["params"]);
                    calls.push(create);
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
                    calls.extend(coalescing_call(c));
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

impl Dispatch for RpcMethods {
    fn call(&mut self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        // SPDK's vhost guide also called target removal `remove_vhost_scsi_dev`.
        let method = if method == OLD_REMOVE_SCSI_DEV {
            "remove_vhost_scsi_target"
        } else {
            method
        };
        let outcome = if let Some((index, name)) = self
            .modules
            .iter()
            .enumerate()
            .find_map(|(i, m)| Some((i, m.find_method(method)?)))
        {
            if name != method {
                tracing::warn!("RPC method {method} is deprecated; use {name}");
            }
            let users = OpsUsers(self.ops.as_ref());
            let mut cx = BdevContext::new(&mut self.bdevs, &users);
            self.modules[index].call(name, &mut cx, params)
        } else {
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
            (entry.handler)(self, params)
        };
        if let Err(err) = &outcome {
            tracing::debug!(method, code = err.code, "RPC failed: {}", err.message);
        }
        outcome
    }
}

/// The `save_config` call that restores a controller's interrupt coalescing, after the calls
/// that create it (as SPDK writes it: only when coalescing is on).
fn coalescing_call(c: &crate::ops::ControllerInfo) -> Option<Value> {
    (c.delay_base_us != 0).then(|| {
        json!({
            "method": "vhost_controller_set_coalescing",
            "params": {"ctrlr": c.ctrlr, "delay_base_us": c.delay_base_us, "iops_threshold": c.iops_threshold}
        })
    })
}

/// The vhost controllers as users of bdevs (for deleting a bdev in use).
struct OpsUsers<'a>(&'a dyn ControllerOps);

impl BdevUsers for OpsUsers<'_> {
    fn bdev_in_use(&self, name: &str) -> bool {
        self.0.bdev_in_use(name)
    }
    fn detach_bdev(&self, name: &str) {
        self.0.detach_bdev(name);
    }
    fn bdev_resized(&self, name: &str, num_blocks: u64) {
        self.0.bdev_resized(name, num_blocks);
    }
}

/// The QEMU command-line arguments that attach vhost-user-blk controller `name` on `socket`.
///
/// QEMU must share the guest's memory with the target, hence the memfd backend with `share=on`
/// bound to the guest's NUMA node. Upstream QEMU's `vhost-user-blk-pci` takes the block size and
/// capacity from the target (GET_CONFIG), so unlike SPDK's old QEMU fork it needs no
/// `logical_block_size`/`size`; its queue count defaults to one per vCPU.
/// Adds a virtio-vhost-user controller's `transport` and `traddr` (as `vhost_get_controllers`
/// lists them) to the parameters that recreate it.
fn transport_params(c: &crate::ops::ControllerInfo, params: &mut Value) {
    for key in ["transport", "traddr"] {
        if let (Some(value), Value::Object(map)) = (c.backend_specific.get(key), &mut *params) {
            map.insert(key.into(), value.clone());
        }
    }
}

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

mod iostat;
mod metrics;
mod qos;
mod queues;
mod threads;

#[cfg(test)]
pub(crate) mod tests;
