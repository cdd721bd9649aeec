//! `bdev_get_iostat` and `bdev_reset_iostat` (SPDK's parameters and result shapes), over the
//! counters of [`crate::bdev::iostat`].

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::RpcMethods;
use crate::bdev::iostat::{
    BdevIoStats, HistogramFilter, HistogramGeometry, ResetMode, HISTOGRAM_GRANULARITY,
};
use crate::bdev::module::decode;
use crate::bdev::IoKind;
use crate::rpc::errno::{EINVAL, ENODEV};
use crate::rpc::{RpcError, INTERNAL_ERROR};

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
            // SPDK's thread_id is the thread that owns the channel: here the controller whose
            // session polls it, by the id thread_get_stats gives it (0 before the channel's
            // first I/O, or once its session is gone).
            let threads = self.ops.threads_info();
            let thread_of = |task: u64| {
                threads
                    .iter()
                    .find(|t| t.pollers.iter().any(|p| p.id == task))
                    .map_or(0, |t| t.id)
            };
            let channels: Vec<Value> = stats
                .per_channel()
                .into_iter()
                .map(|(owner, totals)| {
                    let mut entry = Map::new();
                    entry.insert("thread_id".into(), json!(owner.map_or(0, thread_of)));
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnableHistogram {
    name: String,
    enable: bool,
    opc: Option<String>,
    granularity: Option<u8>,
    min_nsec: Option<u64>,
    max_nsec: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetHistogram {
    name: String,
}

/// Standard base64 with padding (RFC 4648), as SPDK encodes the histogram.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl RpcMethods {
    pub(super) fn bdev_enable_histogram(
        &mut self,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: EnableHistogram = decode(params)?;
        let (_, stats) = self
            .bdevs
            .iostat(&p.name)
            .ok_or_else(|| not_found(&p.name))?;
        if !p.enable {
            stats.set_histogram(None);
            return Ok(Value::Bool(true));
        }
        // Absent bounds keep every latency (SPDK's spdk_histogram_data_alloc geometry).
        let granularity = p.granularity.map_or(HISTOGRAM_GRANULARITY, u32::from);
        let hz = u128::from(rvhost_platform_linux::tsc::ticks_per_second());
        let to_ticks =
            |nsec: u64| u64::try_from(u128::from(nsec) * hz / 1_000_000_000).unwrap_or(u64::MAX);
        let min_ticks = p.min_nsec.map_or(0, to_ticks);
        let max_ticks = match p.max_nsec {
            None | Some(u64::MAX) => u64::MAX,
            Some(nsec) => to_ticks(nsec),
        };
        let geometry =
            HistogramGeometry::new(granularity, min_ticks, max_ticks).ok_or_else(|| {
                RpcError::errno(
                    EINVAL,
                    format!(
                    "granularity {granularity}, min_nsec {:?}, max_nsec {:?}: granularity is 1 to \
                     {HISTOGRAM_GRANULARITY} (the precision rvhost counts with) and min_nsec \
                     below max_nsec",
                    p.min_nsec, p.max_nsec
                ),
                )
            })?;
        let filter = match p.opc.as_deref() {
            None => HistogramFilter::All,
            Some("read") => HistogramFilter::Kind(IoKind::Read),
            Some("write") => HistogramFilter::Kind(IoKind::Write),
            Some("unmap") => HistogramFilter::Kind(IoKind::Unmap),
            Some("flush") => HistogramFilter::Kind(IoKind::Flush),
            Some("write_zeroes") => HistogramFilter::Kind(IoKind::WriteZeroes),
            Some(other) => {
                return Err(RpcError::errno(
                    EINVAL,
                    format!("opc {other:?}: one of read, write, unmap, flush, write_zeroes"),
                ))
            }
        };
        stats.set_histogram_in(Some(filter), geometry);
        Ok(Value::Bool(true))
    }

    pub(super) fn bdev_get_histogram(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        let p: GetHistogram = decode(params)?;
        let (_, stats) = self
            .bdevs
            .iostat(&p.name)
            .ok_or_else(|| not_found(&p.name))?;
        let (geometry, buckets) = stats.histogram_in_geometry().ok_or_else(|| {
            RpcError::new(
                INTERNAL_ERROR,
                format!("the histogram of bdev {} is not enabled", p.name),
            )
        })?;
        let bytes: Vec<u8> = buckets.iter().flat_map(|b| b.to_le_bytes()).collect();
        Ok(json!({
            "histogram": base64(&bytes),
            "granularity": geometry.granularity,
            "min_range": geometry.min_range,
            "max_range": geometry.max_range,
            "tsc_rate": rvhost_platform_linux::tsc::ticks_per_second(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }
}
