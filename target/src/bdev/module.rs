//! Bdev modules (SPDK's `spdk_bdev_module`): each kind of bdev (`malloc`, `null`, `aio`, `nvme`,
//! `uring`) is one [`BdevModule`], which creates and deletes its bdevs through the JSON-RPC methods
//! it registers (under SPDK's current and old names), writes the `save_config` calls that
//! recreate them, and may do periodic housekeeping on the control thread.
//!
//! The control plane (`app::methods`) knows modules only through this trait: it lists their
//! methods, dispatches calls to them, asks the module that created each bdev for its saved call,
//! and ticks them. Adding a module takes its own file and one line in [`super::modules`] (see
//! there).
//!
//! A module reaches the bdev list only through a [`BdevContext`], which registers new bdevs as
//! the module's own, so a module deletes only bdevs it created (SPDK refuses
//! `bdev_malloc_delete` of a null bdev the same way).

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::malloc::MemoryBudget;
use super::registry::{uuid_string, validate_name, OnRemove, RegistryError};
use super::{Bdev, BdevError, BdevRegistry};
use crate::rpc::errno::{EEXIST, EINVAL, ENODEV, ENOMEM, EPERM};
use crate::rpc::{RpcError, INTERNAL_ERROR};

/// What every module may need from the application, given when the modules are created.
#[derive(Debug, Clone)]
pub struct ModuleEnv {
    /// The memory all RAM bdevs together may use (`-s/--mem-size`).
    pub budget: Arc<MemoryBudget>,
    /// The cores the application runs reactors on (`-m`).
    pub app_cpumask: u64,
}

/// A module's handler for one RPC method: decodes `params` and serves the call.
pub type Handler<M> = fn(&mut M, &mut BdevContext<'_>, Option<Value>) -> Result<Value, RpcError>;

/// One JSON-RPC method a module serves.
#[derive(Debug)]
pub struct RpcMethod<M> {
    /// SPDK's current name (`bdev_malloc_create`).
    pub name: &'static str,
    /// The name SPDK used before v19.10 and its vhost guide still uses (`construct_malloc_bdev`).
    pub old_name: Option<&'static str>,
    /// What serves it.
    pub handler: Handler<M>,
}

/// A kind of bdev, with its RPC methods, its saved configuration and its housekeeping.
pub trait BdevModule: Send + Sized + 'static {
    /// The module's name, as SPDK names it (`malloc`); the bdevs it creates report it as their
    /// [`Bdev::module_name`].
    const NAME: &'static str;
    /// The RPC methods the module serves, in the order `rpc_get_methods` lists them.
    const METHODS: &'static [RpcMethod<Self>];

    /// The module, before any call.
    fn new(env: &ModuleEnv) -> Self;

    /// The `save_config` call that recreates `bdev`, one of this module's bdevs (listed in the
    /// order the bdevs were created); `None` when [`BdevModule::module_config`] recreates it.
    fn bdev_config(&self, bdev: &dyn Bdev) -> Option<Value>;

    /// `save_config` calls for the module's own state (controllers that bring their bdevs with
    /// them), saved after every bdev's call.
    fn module_config(&self) -> Vec<Value> {
        Vec::new()
    }

    /// Periodic housekeeping on the control thread, at least every 100 ms (the control loop's
    /// `app::SHUTDOWN_POLL`).
    fn tick(&mut self, _cx: &mut BdevContext<'_>) {}
}

/// The module as the RPC layer holds it (a [`BdevModule`] without its associated items).
pub trait AnyBdevModule: Send {
    /// [`BdevModule::NAME`].
    fn name(&self) -> &'static str;
    /// The current and old names of every method, in order.
    fn method_names(&self) -> Vec<(&'static str, Option<&'static str>)>;
    /// The current name of `method` (given by its current or old name), if the module serves it.
    fn find_method(&self, method: &str) -> Option<&'static str>;
    /// Serves `method` (a current name [`AnyBdevModule::find_method`] returned).
    fn call(
        &mut self,
        method: &str,
        cx: &mut BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError>;
    /// [`BdevModule::bdev_config`].
    fn bdev_config(&self, bdev: &dyn Bdev) -> Option<Value>;
    /// [`BdevModule::module_config`].
    fn module_config(&self) -> Vec<Value>;
    /// [`BdevModule::tick`].
    fn tick(&mut self, cx: &mut BdevContext<'_>);
}

impl<M: BdevModule> AnyBdevModule for M {
    fn name(&self) -> &'static str {
        M::NAME
    }

    fn method_names(&self) -> Vec<(&'static str, Option<&'static str>)> {
        M::METHODS.iter().map(|m| (m.name, m.old_name)).collect()
    }

    fn find_method(&self, method: &str) -> Option<&'static str> {
        M::METHODS
            .iter()
            .find(|m| m.name == method || m.old_name == Some(method))
            .map(|m| m.name)
    }

    fn call(
        &mut self,
        method: &str,
        cx: &mut BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let Some(entry) = M::METHODS.iter().find(|m| m.name == method) else {
            return Err(RpcError::new(
                crate::rpc::METHOD_NOT_FOUND,
                format!("Method not found: {method}"),
            ));
        };
        cx.module = M::NAME;
        (entry.handler)(self, cx, params)
    }

    fn bdev_config(&self, bdev: &dyn Bdev) -> Option<Value> {
        BdevModule::bdev_config(self, bdev)
    }

    fn module_config(&self) -> Vec<Value> {
        BdevModule::module_config(self)
    }

    fn tick(&mut self, cx: &mut BdevContext<'_>) {
        cx.module = M::NAME;
        BdevModule::tick(self, cx);
    }
}

/// Who uses bdevs: the vhost controllers, which must let go of a bdev before it is deleted.
pub trait BdevUsers {
    /// Whether a controller uses bdev `name`.
    fn bdev_in_use(&self, name: &str) -> bool;
    /// Hot-detaches bdev `name` from every controller using it (their later I/O to it fails).
    fn detach_bdev(&self, name: &str);
    /// Bdev `name` now has `num_blocks` blocks: every controller using it checks I/O against
    /// the new size and tells its frontends (blk: a config-change notification; scsi: a
    /// capacity-changed unit attention and event). Returns once in effect.
    fn bdev_resized(&self, _name: &str, _num_blocks: u64) {}
}

/// What a module call may do to the bdev list.
pub struct BdevContext<'a> {
    bdevs: &'a mut BdevRegistry,
    users: &'a dyn BdevUsers,
    /// The module being served.
    module: &'static str,
}

impl std::fmt::Debug for BdevContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BdevContext")
            .field("bdevs", &self.bdevs)
            .field("module", &self.module)
            .finish_non_exhaustive()
    }
}

impl<'a> BdevContext<'a> {
    /// The context of a call into a module (the module is set when the call is dispatched).
    pub fn new(bdevs: &'a mut BdevRegistry, users: &'a dyn BdevUsers) -> Self {
        BdevContext {
            bdevs,
            users,
            module: "",
        }
    }

    /// Every bdev.
    pub fn bdevs(&self) -> &BdevRegistry {
        self.bdevs
    }

    /// Whether `name` (a bdev name or UUID alias) is taken.
    pub fn contains(&self, name: &str) -> bool {
        self.bdevs.contains(name)
    }

    /// Refuses a name (or UUID alias) that is invalid or taken, before anything is allocated for
    /// the new bdev: EINVAL or EEXIST.
    pub fn check_new_name(&self, name: &str, uuid: [u8; 16]) -> Result<(), RpcError> {
        validate_name(name).map_err(registry_error)?;
        if self.bdevs.contains(name) {
            return Err(registry_error(RegistryError::Exists(name.to_owned())));
        }
        let alias = uuid_string(uuid);
        if self.bdevs.contains(&alias) {
            return Err(registry_error(RegistryError::Exists(alias)));
        }
        Ok(())
    }

    /// Adds `bdev` as one of the calling module's; `on_remove` runs when it is deleted.
    pub fn register(&mut self, bdev: Arc<dyn Bdev>, on_remove: OnRemove) -> Result<(), RpcError> {
        self.bdevs
            .insert_for(self.module, bdev, on_remove)
            .map_err(registry_error)
    }

    /// Claims bdev `name` for bdev `by`, which the calling module stacks on it
    /// ([`BdevRegistry::claim`]): ENODEV if it does not exist, EPERM if another bdev claimed it.
    /// The claim lasts until `by` is deleted or the claim is [released](Self::release).
    pub fn claim(&mut self, name: &str, by: &str) -> Result<Arc<dyn Bdev>, RpcError> {
        self.bdevs.claim(name, by).map_err(registry_error)
    }

    /// Releases the claim on bdev `name` (a bdev stacked on it could not be registered).
    pub fn release(&mut self, name: &str) {
        self.bdevs.release(name);
    }

    /// Announces that bdev `name` (one of the calling module's) changed size to `num_blocks`
    /// blocks: the controllers using it tell their guests ([`BdevUsers::bdev_resized`]).
    pub fn announce_resize(&self, name: &str, num_blocks: u64) {
        tracing::info!(bdev = name, num_blocks, "bdev resized; telling its users");
        self.users.bdev_resized(name, num_blocks);
    }

    /// Deletes bdev `name` (a name or UUID alias), which must be one of the calling module's
    /// (ENODEV otherwise), first hot-detaching it from every controller that uses it.
    pub fn delete(&mut self, name: &str) -> Result<(), RpcError> {
        delete_bdev(self.bdevs, self.users, name, Some(self.module))
    }
}

/// Deletes bdev `name` (a name or UUID alias), first hot-detaching it from every controller that
/// uses it (their later I/O to it fails), as SPDK's hot-remove does. With `module`, only a bdev
/// that module created is deleted (ENODEV otherwise).
pub fn delete_bdev(
    bdevs: &mut BdevRegistry,
    users: &dyn BdevUsers,
    name: &str,
    module: Option<&str>,
) -> Result<(), RpcError> {
    let (owner, bdev) = bdevs
        .get_with_owner(name)
        .ok_or_else(|| registry_error(RegistryError::NotFound(name.to_owned())))?;
    if let Some(module) = module {
        if owner != module {
            return Err(RpcError::errno(
                ENODEV,
                format!("{name} is a {owner} bdev, not a {module} bdev"),
            ));
        }
    }
    let real_name = bdev.name().to_owned();
    if users.bdev_in_use(&real_name) {
        tracing::info!(bdev = %real_name, "hot-detaching bdev from its controllers before deleting it");
        users.detach_bdev(&real_name);
    }
    bdevs.remove(&real_name).map_err(registry_error)?;
    tracing::info!(bdev = %real_name, "deleted bdev");
    Ok(())
}

/// Decodes `params` (absent means `{}`) into `T` strictly, as SPDK's `spdk_json_decode_object`
/// does (the `T` denies unknown members), refusing positional (array) parameters: -32602.
pub fn decode<T: DeserializeOwned>(params: Option<Value>) -> Result<T, RpcError> {
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

/// A bdev error as SPDK reports it: EINVAL for bad parameters, ENOMEM for backend failures.
pub fn bdev_error(err: BdevError) -> RpcError {
    match err {
        BdevError::InvalidParams(msg) => RpcError::errno(EINVAL, msg),
        BdevError::Backend(msg) => RpcError::errno(ENOMEM, msg),
        other => RpcError::new(INTERNAL_ERROR, other.to_string()),
    }
}

/// A registry error as SPDK reports it: EEXIST, ENODEV, EINVAL or EPERM.
pub fn registry_error(err: RegistryError) -> RpcError {
    match err {
        RegistryError::Exists(_) => RpcError::errno(EEXIST, err),
        RegistryError::NotFound(_) => RpcError::errno(ENODEV, err),
        RegistryError::InvalidName { .. } => RpcError::errno(EINVAL, err),
        RegistryError::Claimed { .. } => RpcError::errno(EPERM, err),
    }
}

/// The UUID given as `text`, or a random one when none is given: EINVAL if it is not a UUID.
pub fn parse_uuid(text: Option<&str>) -> Result<[u8; 16], RpcError> {
    match text {
        None => Ok(*uuid::Uuid::new_v4().as_bytes()),
        Some(text) => uuid::Uuid::parse_str(text)
            .map(|u| *u.as_bytes())
            .map_err(|e| RpcError::errno(EINVAL, format!("uuid {text:?} is not a UUID: {e}"))),
    }
}

/// Refuses SPDK features rvhost does not have (metadata, protection information) when a request
/// asks for them; their "off" values are accepted so SPDK's client defaults work.
pub fn refuse_metadata(md_size: Option<u32>, dif_type: Option<i32>) -> Result<(), RpcError> {
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

/// Refuses a physical block size other than the logical one (rvhost exports one block size).
pub fn check_physical_block_size(physical: Option<u32>, block_size: u32) -> Result<(), RpcError> {
    match physical {
        Some(p) if p != 0 && p != block_size => Err(RpcError::errno(
            EINVAL,
            format!("physical_block_size {p} differs from block_size {block_size}; rvhost exports one block size"),
        )),
        _ => Ok(()),
    }
}

/// The `save_config` call `method` that recreates a bdev from its name, size, block size and
/// UUID (the RAM and null modules).
pub fn geometry_config(method: &str, bdev: &dyn Bdev) -> Value {
    serde_json::json!({
        "method": method,
        "params": {
            "name": bdev.name(),
            "num_blocks": bdev.num_blocks(),
            "block_size": bdev.block_size(),
            "uuid": uuid_string(bdev.uuid())
        }
    })
}

/// The delete method of a module whose bdevs need nothing beyond being unregistered
/// (`{"name": ...}` -> `true`); a module can only delete bdevs it created.
pub fn delete_by_name<M>(
    _module: &mut M,
    cx: &mut BdevContext<'_>,
    params: Option<Value>,
) -> Result<Value, RpcError> {
    let p: ByName = decode(params)?;
    cx.delete(&p.name)?;
    Ok(Value::Bool(true))
}

/// Parameters `{"name": ...}` (the delete methods).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ByName {
    /// The bdev (or controller) name.
    pub name: String,
}
