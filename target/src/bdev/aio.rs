//! The `aio` module (SPDK's `bdev_aio`): bdevs on files or block devices through Linux AIO
//! ([`super::file`]).

use serde::Deserialize;
use serde_json::Value;

use super::file::modules::{io_worker_cores, FileBdevList};
use super::file::{FileBdevConfig, FileEngine};
use super::module::{
    decode, delete_by_name, parse_uuid, BdevContext, BdevModule, ModuleEnv, RpcMethod,
};
use super::Bdev;
use crate::rpc::errno::ENOTSUP;
use crate::rpc::RpcError;

/// The `aio` module.
#[derive(Debug)]
pub struct AioModule {
    app_cpumask: u64,
    bdevs: FileBdevList,
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

impl AioModule {
    fn create(
        &mut self,
        cx: &mut BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: AioCreate = decode(params)?;
        if p.nowait == Some(true) {
            return Err(RpcError::errno(ENOTSUP, "RWF_NOWAIT is not supported"));
        }
        let uuid = parse_uuid(p.uuid.as_deref())?;
        self.bdevs.create(
            cx,
            FileBdevConfig {
                name: p.name,
                filename: p.filename.into(),
                block_size: p.block_size.filter(|bs| *bs != 0),
                readonly: p.readonly.unwrap_or(false),
                fallocate: p.fallocate.unwrap_or(false),
                uuid,
                engine: FileEngine::Aio,
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

impl BdevModule for AioModule {
    const NAME: &'static str = "aio";
    const METHODS: &'static [RpcMethod<Self>] = &[
        RpcMethod {
            name: "bdev_aio_create",
            old_name: Some("construct_aio_bdev"),
            handler: Self::create,
        },
        RpcMethod {
            name: "bdev_aio_delete",
            old_name: Some("delete_aio_bdev"),
            handler: delete_by_name,
        },
        RpcMethod {
            name: "bdev_aio_rescan",
            old_name: None,
            handler: Self::rescan,
        },
    ];

    fn new(env: &ModuleEnv) -> Self {
        AioModule {
            app_cpumask: env.app_cpumask,
            bdevs: FileBdevList::default(),
        }
    }

    fn bdev_config(&self, bdev: &dyn Bdev) -> Option<Value> {
        self.bdevs.bdev_config(bdev, Self::NAME)
    }
}
