//! `bdev_get_iostat` and `bdev_reset_iostat` (SPDK's parameters and result shapes), over the
//! counters of [`crate::bdev::iostat`].

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::RpcMethods;
use crate::bdev::iostat::{BdevIoStats, ResetMode};
use crate::bdev::module::decode;
use crate::rpc::errno::{EINVAL, ENODEV};
use crate::rpc::RpcError;

/// SPDK's `reset_mode` / `mode` values.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Mode {
    All,
    Maxmin,
    Error,
    None,
}

impl Mode {
    fn reset(self) -> Option<ResetMode> {
        match self {
            Mode::All => Some(ResetMode::All),
            Mode::Maxmin => Some(ResetMode::MaxMin),
            Mode::Error => Some(ResetMode::Errors),
            Mode::None => None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetIostat {
    /// One bdev (SPDK 25.x).
    name: Option<String>,
    /// Several bdevs (SPDK 26.x's client sends `--names` as a list).
    names: Option<Vec<String>>,
    per_channel: Option<bool>,
    reset_mode: Option<Mode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetIostat {
    name: Option<String>,
    mode: Option<Mode>,
}

fn not_found(name: &str) -> RpcError {
    RpcError::errno(ENODEV, format!("no bdev named {name}"))
}

impl RpcMethods {
    /// The bdevs `names` selects (all when absent) with their statistics.
    fn iostat_targets(
        &self,
        names: Option<&[String]>,
    ) -> Result<Vec<(String, std::sync::Arc<BdevIoStats>)>, RpcError> {
        match names {
            Some(names) => names
                .iter()
                .map(|name| {
                    let (bdev, stats) = self.bdevs.iostat(name).ok_or_else(|| not_found(name))?;
                    Ok((bdev.name().to_string(), stats))
                })
                .collect(),
            None => Ok(self
                .bdevs
                .iter_iostat()
                .map(|(bdev, stats)| (bdev.name().to_string(), std::sync::Arc::clone(stats)))
                .collect()),
        }
    }

    pub(super) fn bdev_get_iostat(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: GetIostat = decode(params)?;
        let names: Option<Vec<String>> = match (p.name, p.names) {
            (None, None) => None,
            (Some(name), None) => Some(vec![name]),
            (None, Some(names)) => Some(names),
            (Some(_), Some(_)) => {
                return Err(RpcError::errno(EINVAL, "give name or names, not both"))
            }
        };
        let per_channel = p.per_channel.unwrap_or(false);
        if per_channel && names.as_ref().is_none_or(|n| n.len() != 1) {
            return Err(RpcError::errno(
                EINVAL,
                "per_channel statistics need exactly one bdev name",
            ));
        }
        let targets = self.iostat_targets(names.as_deref())?;
        let reset = p.reset_mode.and_then(Mode::reset);
        let mut result = Map::new();
        result.insert(
            "tick_rate".into(),
            json!(rvhost_platform_linux::tsc::ticks_per_second()),
        );
        result.insert("ticks".into(), json!(rvhost_platform_linux::tsc::ticks()));
        if per_channel {
            let (name, stats) = targets
                .into_iter()
                .next()
                .ok_or_else(|| RpcError::errno(EINVAL, "no bdev named"))?;
            let channels: Vec<Value> = stats
                .per_channel()
                .into_iter()
                .map(|(ordinal, totals)| {
                    let mut entry = Map::new();
                    entry.insert("thread_id".into(), json!(ordinal));
                    totals.json(&mut entry, false);
                    Value::Object(entry)
                })
                .collect();
            if let Some(mode) = reset {
                stats.reset(mode);
            }
            result.insert("name".into(), json!(name));
            result.insert("channels".into(), Value::Array(channels));
        } else {
            let bdevs: Vec<Value> = targets
                .iter()
                .map(|(name, stats)| {
                    let mut entry = Map::new();
                    entry.insert("name".into(), json!(name));
                    stats.snapshot().json(&mut entry, true);
                    if let Some(mode) = reset {
                        stats.reset(mode);
                    }
                    Value::Object(entry)
                })
                .collect();
            result.insert("bdevs".into(), Value::Array(bdevs));
        }
        Ok(Value::Object(result))
    }

    pub(super) fn bdev_reset_iostat(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: ResetIostat = decode(params)?;
        // Absent means all; "none" (which SPDK's client offers) resets nothing.
        let mode = p.mode.unwrap_or(Mode::All).reset();
        let names = p.name.map(|n| vec![n]);
        for (_, stats) in self.iostat_targets(names.as_deref())? {
            if let Some(mode) = mode {
                stats.reset(mode);
            }
        }
        Ok(Value::Bool(true))
    }
}
