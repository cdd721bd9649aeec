//! The `uring` module (SPDK's `bdev_uring`): bdevs on files or block devices through io_uring
//! ([`super::file`]).

use serde::Deserialize;
use serde_json::Value;

use super::file::modules::{io_worker_cores, FileBdevList};
use super::file::{FileBdevConfig, FileEngine};
use super::module::{
    decode, delete_by_name, parse_uuid, BdevContext, BdevModule, ModuleEnv, RpcMethod,
};
use super::Bdev;
use crate::rpc::RpcError;

/// The `uring` module.
#[derive(Debug)]
pub struct UringModule {
    app_cpumask: u64,
    bdevs: FileBdevList,
}

/// `bdev_uring_create` (SPDK's `rpc_bdev_uring_create`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UringCreate {
    name: String,
    filename: String,
    block_size: Option<u32>,
    uuid: Option<String>,
}

impl UringModule {
    fn create(
        &mut self,
        cx: &mut BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: UringCreate = decode(params)?;
        let uuid = parse_uuid(p.uuid.as_deref())?;
        self.bdevs.create(
            cx,
            FileBdevConfig {
                name: p.name,
                filename: p.filename.into(),
                block_size: p.block_size.filter(|bs| *bs != 0),
                readonly: false,
                fallocate: true,
                uuid,
                engine: FileEngine::Uring,
                direct: true,
                worker_cores: io_worker_cores(self.app_cpumask),
            },
        )
    }

    fn rescan(
        &mut self,
        cx: &mut BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        self.bdevs.rescan(cx, params, Self::NAME)
    }
}

impl BdevModule for UringModule {
    const NAME: &'static str = "uring";
    const METHODS: &'static [RpcMethod<Self>] = &[
        RpcMethod {
            name: "bdev_uring_create",
            old_name: None,
            handler: Self::create,
        },
        RpcMethod {
            name: "bdev_uring_delete",
            old_name: None,
            handler: delete_by_name,
        },
        RpcMethod {
            name: "bdev_uring_rescan",
            old_name: None,
            handler: Self::rescan,
        },
    ];

    fn new(env: &ModuleEnv) -> Self {
        UringModule {
            app_cpumask: env.app_cpumask,
            bdevs: FileBdevList::default(),
        }
    }

    fn bdev_config(&self, bdev: &dyn Bdev) -> Option<Value> {
        self.bdevs.bdev_config(bdev, Self::NAME)
    }
}
