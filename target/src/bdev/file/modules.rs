//! What the `aio` and `uring` modules (`bdev/aio.rs`, `bdev/uring.rs`) share: creating a file
//! bdev, rescanning it after the file was resized, and its saved configuration.

use std::sync::{Arc, Weak};

use serde_json::{json, Value};

use rvhost_platform_linux::cpu::CpuSet;

use super::{FileBdev, FileBdevConfig};
use crate::bdev::module::{decode, BdevContext, ByName};
use crate::bdev::registry::{uuid_string, RegistryError};
use crate::bdev::{Bdev, BdevError};
use crate::rpc::errno::{EINVAL, ENODEV};
use crate::rpc::RpcError;

/// The file bdevs one module created (the registry holds them as trait objects; rescanning and
/// saving need the file bdev itself).
#[derive(Debug, Default)]
pub(crate) struct FileBdevList {
    bdevs: Vec<Weak<FileBdev>>,
}

/// The cores io_uring's kernel workers should use: those this process may run on that run no
/// reactor (`None` when every core has one: then the workers stay where the kernel puts them).
pub(crate) fn io_worker_cores(app_cpumask: u64) -> Option<CpuSet> {
    let allowed = rvhost_platform_linux::allowed_cores().ok()?;
    let free: CpuSet = allowed
        .iter()
        .filter(|&core| core >= 64 || app_cpumask & (1u64 << core) == 0)
        .collect();
    (!free.is_empty()).then_some(free)
}

impl FileBdevList {
    /// Opens the file bdev `config` describes and registers it as the calling module's.
    pub(crate) fn create(
        &mut self,
        cx: &mut BdevContext<'_>,
        config: FileBdevConfig,
    ) -> Result<Value, RpcError> {
        let name = config.name.clone();
        cx.check_new_name(&name, config.uuid)?;
        let bdev = FileBdev::open(config).map_err(|e| match e {
            BdevError::InvalidParams(msg) => RpcError::errno(EINVAL, msg),
            other => RpcError::errno(EINVAL, other.to_string()),
        })?;
        let removed = Arc::clone(&bdev);
        self.bdevs.push(Arc::downgrade(&bdev));
        tracing::info!(bdev = %name, module = bdev.module_name(), file = %bdev.filename().display(),
            o_direct = bdev.o_direct(), num_blocks = bdev.num_blocks(), block_size = bdev.block_size(),
            "created file bdev");
        cx.register(bdev, Box::new(move || removed.mark_removed()))?;
        Ok(Value::String(name))
    }

    /// Serves `bdev_<module>_rescan`: re-reads the size of the file under one of the module's
    /// bdevs.
    pub(crate) fn rescan(
        &mut self,
        cx: &BdevContext<'_>,
        params: Option<Value>,
        module: &str,
    ) -> Result<Value, RpcError> {
        let p: ByName = decode(params)?;
        let (owner, bdev) = cx.bdevs().get_with_owner(&p.name).ok_or_else(|| {
            crate::bdev::module::registry_error(RegistryError::NotFound(p.name.clone()))
        })?;
        if owner != module {
            return Err(RpcError::errno(
                ENODEV,
                format!("{} is not a {module} bdev", p.name),
            ));
        }
        self.bdevs
            .retain(|b| b.upgrade().is_some_and(|b| !b.is_removed()));
        let Some(file_bdev) = self.find(bdev.name()) else {
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

    /// The live file bdev named `name`.
    fn find(&self, name: &str) -> Option<Arc<FileBdev>> {
        self.bdevs
            .iter()
            .filter_map(Weak::upgrade)
            .find(|b| !b.is_removed() && b.name() == name)
    }

    /// The `bdev_<module>_create` call that recreates `bdev`; `aio` also saves `readonly` and
    /// `fallocate`.
    pub(crate) fn bdev_config(&self, bdev: &dyn Bdev, module: &str) -> Option<Value> {
        let file_bdev = self.find(bdev.name())?;
        let mut params = json!({
            "name": bdev.name(),
            "filename": file_bdev.filename().display().to_string(),
            "uuid": uuid_string(bdev.uuid())
        });
        if file_bdev.block_size_override().is_some() {
            params["block_size"] = bdev.block_size().into();
        }
        if module == "aio" {
            params["readonly"] = file_bdev.readonly().into();
            params["fallocate"] = file_bdev.fallocate().into();
        }
        Some(json!({ "method": format!("bdev_{module}_create"), "params": params }))
    }
}
