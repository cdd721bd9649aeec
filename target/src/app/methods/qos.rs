//! `bdev_set_qos_limit` (SPDK's parameters, adjustments and errors), the `assigned_rate_limits`
//! of `bdev_get_bdevs` and the calls `save_config` keeps, over [`crate::bdev::qos`].

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::RpcMethods;
use crate::bdev::module::decode;
use crate::bdev::qos::{adjust_limit, LimitKind, RateLimits, LIMIT_KINDS};
use crate::rpc::errno::{EINVAL, ENODEV};
use crate::rpc::RpcError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetQosLimit {
    name: String,
    rw_ios_per_sec: Option<u64>,
    rw_mbytes_per_sec: Option<u64>,
    r_mbytes_per_sec: Option<u64>,
    w_mbytes_per_sec: Option<u64>,
}

impl SetQosLimit {
    fn get(&self, kind: LimitKind) -> Option<u64> {
        match kind {
            LimitKind::RwIos => self.rw_ios_per_sec,
            LimitKind::RwBytes => self.rw_mbytes_per_sec,
            LimitKind::ReadBytes => self.r_mbytes_per_sec,
            LimitKind::WriteBytes => self.w_mbytes_per_sec,
        }
    }
}

/// `assigned_rate_limits` as SPDK's `bdev_get_bdevs` writes it.
pub(super) fn assigned_rate_limits(limits: RateLimits) -> Value {
    let mut out = Map::new();
    for kind in LIMIT_KINDS {
        out.insert(kind.rpc_name().into(), json!(limits.get(kind)));
    }
    Value::Object(out)
}

impl RpcMethods {
    pub(super) fn bdev_set_qos_limit(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: SetQosLimit = decode(params)?;
        let (bdev, stats) = self
            .bdevs
            .iostat(&p.name)
            .ok_or_else(|| RpcError::errno(ENODEV, format!("no bdev named {}", p.name)))?;
        if LIMIT_KINDS.iter().all(|&kind| p.get(kind).is_none()) {
            return Err(RpcError::errno(EINVAL, "No rate limits specified"));
        }
        let changes = LIMIT_KINDS.map(|kind| {
            p.get(kind).map(|value| {
                let (adjusted, changed) = adjust_limit(kind, value);
                if changed {
                    // SPDK logs the same adjustments and goes on with the adjusted value.
                    tracing::warn!(
                        bdev = %bdev.name(), limit = kind.rpc_name(), requested = value, adjusted,
                        "rate limit adjusted (I/O limits are multiples of 1000, byte limits fit 64 bits)"
                    );
                }
                adjusted
            })
        });
        stats.qos().set_limits(changes);
        tracing::info!(bdev = %bdev.name(), limits = %assigned_rate_limits(stats.qos().limits()), "rate limits set");
        Ok(Value::Bool(true))
    }

    /// The bdev's `assigned_rate_limits` (all 0 for a bdev without limits).
    pub(super) fn bdev_rate_limits(&self, name: &str) -> Value {
        let limits = self
            .bdevs
            .iostat(name)
            .map(|(_, stats)| stats.qos().limits())
            .unwrap_or_default();
        assigned_rate_limits(limits)
    }

    /// The `bdev_set_qos_limit` calls that restore every bdev's limits, after the calls that
    /// create the bdevs (where SPDK's `save_config` writes them), naming only the limits set.
    pub(super) fn qos_config_calls(&self) -> Vec<Value> {
        self.bdevs
            .iter_iostat()
            .filter_map(|(bdev, stats)| {
                let limits = stats.qos().limits();
                if !limits.any() {
                    return None;
                }
                let mut params = Map::new();
                params.insert("name".into(), json!(bdev.name()));
                for kind in LIMIT_KINDS {
                    if limits.get(kind) > 0 {
                        params.insert(kind.rpc_name().into(), json!(limits.get(kind)));
                    }
                }
                Some(json!({"method": "bdev_set_qos_limit", "params": params}))
            })
            .collect()
    }
}
