//! `rvhost_get_queue_stats`: per controller, session and queue, the requests completed, their
//! payload bytes, the requests in flight and latency percentiles (p50, p99, p99.9 and the
//! maximum) from each queue's HdrHistogram, so an operator can find one hot queue. SPDK has no
//! per-queue view; the method is rvhost's own. The metrics endpoint serves the same series.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{decode, ops_error, RpcMethods};
use crate::ops::QueueReport;
use crate::rpc::RpcError;

/// The percentiles reported, with the names they are reported under.
pub(super) const PERCENTILES: [(f64, &str); 3] = [(0.5, "p50"), (0.99, "p99"), (0.999, "p99.9")];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueStatsParams {
    ctrlr: Option<String>,
}

/// `ticks` of the time-stamp counter in nanoseconds.
pub(super) fn ticks_to_ns(ticks: u64, tick_rate: u64) -> u64 {
    let ns = u128::from(ticks) * 1_000_000_000 / u128::from(tick_rate.max(1));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// A queue's latency at `quantile`, in ticks (0 before its first completion).
pub(super) fn latency_at(queue: &QueueReport, quantile: f64) -> u64 {
    if queue.latency.is_empty() {
        return 0;
    }
    queue.latency.value_at_quantile(quantile)
}

fn queue_json(queue: &QueueReport, tick_rate: u64) -> Value {
    let mut latency = serde_json::Map::new();
    for (quantile, name) in PERCENTILES {
        latency.insert(
            name.into(),
            json!(ticks_to_ns(latency_at(queue, quantile), tick_rate)),
        );
    }
    let max = if queue.latency.is_empty() {
        0
    } else {
        queue.latency.max()
    };
    latency.insert("max".into(), json!(ticks_to_ns(max, tick_rate)));
    json!({
        "queue": queue.queue,
        "requests": queue.requests,
        "in_flight": queue.in_flight,
        "late_notifications": queue.late_notifications,
        "bytes_read": queue.bytes_read,
        "bytes_written": queue.bytes_written,
        "latency_ticks": queue.latency_ticks,
        "latency_ns": latency,
    })
}

impl RpcMethods {
    pub(super) fn rvhost_get_queue_stats(
        &mut self,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: QueueStatsParams = decode(params)?;
        let tick_rate = rvhost_platform_linux::tsc::ticks_per_second();
        let controllers = self
            .ops
            .queue_stats(p.ctrlr.as_deref())
            .map_err(ops_error)?;
        let controllers: Vec<Value> = controllers
            .iter()
            .map(|c| {
                let sessions: Vec<Value> = c
                    .sessions
                    .iter()
                    .map(|s| {
                        let queues: Vec<Value> =
                            s.queues.iter().map(|q| queue_json(q, tick_rate)).collect();
                        json!({"session": s.session, "queues": queues})
                    })
                    .collect();
                json!({"ctrlr": c.ctrlr, "sessions": sessions})
            })
            .collect();
        Ok(json!({"tick_rate": tick_rate, "controllers": controllers}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(latencies: &[u64]) -> QueueReport {
        let mut latency = hdrhistogram::Histogram::new_with_bounds(1, 1 << 38, 2).unwrap();
        for &l in latencies {
            latency.record(l).unwrap();
        }
        QueueReport {
            queue: 1,
            requests: latencies.len() as u64,
            in_flight: 2,
            bytes_read: 4096,
            bytes_written: 512,
            latency_ticks: latencies.iter().sum(),
            latency,
            late_notifications: 3,
        }
    }

    #[test]
    fn percentiles_come_from_the_histogram_in_nanoseconds() {
        // 1000 requests: 995 at 1000 ticks, 4 at 100,000, one at 10,000,000; 1 GHz ticks.
        let mut latencies = vec![1000; 995];
        latencies.extend([100_000; 4]);
        latencies.push(10_000_000);
        let json = queue_json(&report(&latencies), 1_000_000_000);
        let ns = |key: &str| json["latency_ns"][key].as_u64().unwrap();
        // Two significant digits: within 1 %.
        assert!((1000..=1010).contains(&ns("p50")), "{json}");
        assert!((1000..=1010).contains(&ns("p99")), "{json}");
        assert!((100_000..=101_000).contains(&ns("p99.9")), "{json}");
        assert!((10_000_000..=10_100_000).contains(&ns("max")), "{json}");
        assert_eq!(json["requests"], 1000);
        assert_eq!(json["in_flight"], 2);
        assert_eq!(json["late_notifications"], 3);
        assert_eq!(json["bytes_read"], 4096);
        assert_eq!(json["bytes_written"], 512);
    }

    #[test]
    fn a_queue_without_completions_reports_zero_latencies() {
        let json = queue_json(&report(&[]), 3_000_000_000);
        assert_eq!(
            json["latency_ns"],
            json!({"p50": 0, "p99": 0, "p99.9": 0, "max": 0})
        );
    }

    #[test]
    fn ticks_convert_to_nanoseconds() {
        assert_eq!(ticks_to_ns(3_000, 3_000_000_000), 1_000);
        assert_eq!(ticks_to_ns(u64::MAX, 1), u64::MAX);
        assert_eq!(ticks_to_ns(5, 0), 5_000_000_000);
    }
}
