//! The `nvme` module (SPDK's `bdev_nvme` with `trtype` `pcie`): the lifecycle of attached
//! controllers over JSON-RPC (attach, list, detach) and their housekeeping. A controller brings
//! one bdev per namespace; detaching it deletes them.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{validate_traddr, NvmeBdevConfig, NvmeController};
use crate::bdev::module::{
    bdev_error, decode, registry_error, BdevContext, BdevModule, ModuleEnv, RpcMethod,
};
use crate::bdev::registry::validate_name;
use crate::bdev::{Bdev, BdevError};
use crate::rpc::errno::{EEXIST, EINVAL, ENODEV, ENOTSUP};
use crate::rpc::RpcError;

/// I/O queue pairs asked of an NVMe controller when the call does not say: one per channel, and
/// a target opens one channel per reactor for each controller using the bdev.
const DEFAULT_IO_QUEUES: u16 = 16;
/// How long an NVMe command may be outstanding before the driver aborts it.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// `bdev_nvme_attach_controller` (SPDK's `rpc_bdev_nvme_attach_controller`); only the PCIe
/// transport is served, the fabrics members are accepted for that check only.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Attach {
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
struct GetControllers {
    name: Option<String>,
}

/// `bdev_nvme_detach_controller` (SPDK's `rpc_bdev_nvme_detach_controller`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Detach {
    name: String,
    trtype: Option<String>,
    traddr: Option<String>,
    adrfam: Option<String>,
    trsvcid: Option<String>,
    subnqn: Option<String>,
    hostaddr: Option<String>,
    hostsvcid: Option<String>,
}

/// The `nvme` module: attached controllers and the names of their bdevs.
#[derive(Debug, Default)]
pub struct NvmeModule {
    controllers: Vec<(Arc<NvmeController>, Vec<String>)>,
}

impl NvmeModule {
    fn attach(
        &mut self,
        cx: &mut BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: Attach = decode(params)?;
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
        validate_name(&p.name).map_err(registry_error)?;
        if self.controllers.iter().any(|(c, _)| c.name() == p.name) {
            return Err(RpcError::errno(
                EEXIST,
                format!("NVMe controller {} already exists", p.name),
            ));
        }
        let io_queues = match p.num_io_queues {
            None => DEFAULT_IO_QUEUES,
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
            io_timeout: IO_TIMEOUT,
        })
        .map_err(|e| match e {
            BdevError::InvalidParams(msg) => RpcError::errno(EINVAL, msg),
            other => RpcError::errno(ENODEV, other.to_string()),
        })?;
        for bdev in &bdevs {
            cx.check_new_name(bdev.name(), bdev.uuid())?;
        }
        let mut names: Vec<String> = Vec::new();
        for bdev in bdevs {
            let name = bdev.name().to_string();
            let removed = Arc::clone(&bdev);
            tracing::info!(bdev = %name, traddr = %ctrl.traddr(), nsid = bdev.nsid(),
                num_blocks = bdev.num_blocks(), block_size = bdev.block_size(), "created NVMe bdev");
            if let Err(e) = cx.register(bdev, Box::new(move || removed.mark_removed())) {
                for done in &names {
                    let _ = cx.delete(done);
                }
                ctrl.mark_detached();
                return Err(e);
            }
            names.push(name);
        }
        self.controllers.push((ctrl, names.clone()));
        Ok(json!(names))
    }

    fn get_controllers(
        &mut self,
        _cx: &mut BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: GetControllers = decode(params)?;
        if let Some(name) = &p.name {
            if !self.controllers.iter().any(|(c, _)| c.name() == name) {
                return Err(RpcError::errno(
                    ENODEV,
                    format!("no NVMe controller named {name}"),
                ));
            }
        }
        let list = self
            .controllers
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

    fn detach(
        &mut self,
        cx: &mut BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: Detach = decode(params)?;
        let Some(index) = self
            .controllers
            .iter()
            .position(|(c, _)| c.name() == p.name)
        else {
            return Err(RpcError::errno(
                ENODEV,
                format!("no NVMe controller named {}", p.name),
            ));
        };
        let (ctrl, _) = &self.controllers[index];
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
        self.detach_controller(cx, index)?;
        Ok(Value::Bool(true))
    }

    /// Hot-removes the bdevs of controller `index` from their vhost controllers (their I/O fails
    /// from then on, as in SPDK), deletes them and closes the controller once the last channel
    /// is gone.
    fn detach_controller(
        &mut self,
        cx: &mut BdevContext<'_>,
        index: usize,
    ) -> Result<(), RpcError> {
        let Some((ctrl, names)) = self.controllers.get(index) else {
            return Ok(());
        };
        let (ctrl, names) = (Arc::clone(ctrl), names.clone());
        for name in &names {
            if cx.contains(name) {
                cx.delete(name)?;
            }
        }
        ctrl.mark_detached();
        self.controllers.remove(index);
        tracing::info!(controller = %ctrl.name(), traddr = %ctrl.traddr(), "detached NVMe controller");
        Ok(())
    }
}

impl BdevModule for NvmeModule {
    const NAME: &'static str = "nvme";
    const METHODS: &'static [RpcMethod<Self>] = &[
        RpcMethod {
            name: "bdev_nvme_attach_controller",
            old_name: Some("construct_nvme_bdev"),
            handler: Self::attach,
        },
        RpcMethod {
            name: "bdev_nvme_get_controllers",
            old_name: Some("get_nvme_controllers"),
            handler: Self::get_controllers,
        },
        RpcMethod {
            name: "bdev_nvme_detach_controller",
            old_name: Some("delete_nvme_controller"),
            handler: Self::detach,
        },
    ];

    fn new(_env: &ModuleEnv) -> Self {
        NvmeModule::default()
    }

    /// A controller's one call recreates all of its namespace bdevs ([`BdevModule::module_config`]).
    fn bdev_config(&self, _bdev: &dyn Bdev) -> Option<Value> {
        None
    }

    fn module_config(&self) -> Vec<Value> {
        self.controllers
            .iter()
            .map(|(ctrl, _)| {
                json!({
                    "method": "bdev_nvme_attach_controller",
                    "params": {"name": ctrl.name(), "trtype": "PCIe", "traddr": ctrl.traddr()}
                })
            })
            .collect()
    }

    /// SPDK's hot-remove: detaches every controller the kernel wants back (PCI remove or unbind
    /// through sysfs), which lets the kernel's removal finish. And unmaps guest memory that vhost
    /// devices no longer use.
    fn tick(&mut self, cx: &mut BdevContext<'_>) {
        for (ctrl, _) in &self.controllers {
            ctrl.collect_dma();
        }
        while let Some(index) = self
            .controllers
            .iter()
            .position(|(c, _)| c.controller().removal_requested())
        {
            let name = self.controllers[index].0.name().to_owned();
            tracing::warn!(controller = %name, "NVMe controller removed; detaching it");
            if let Err(err) = self.detach_controller(cx, index) {
                tracing::error!(controller = %name, ?err, "detaching a removed controller");
                // Forget it anyway: a controller the kernel takes away cannot be served.
                if index < self.controllers.len() {
                    self.controllers.remove(index);
                }
            }
        }
    }
}
