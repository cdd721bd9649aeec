//! `rvhost_get_metrics`: the target's counters in Prometheus' text exposition format (0.0.4), as
//! the metrics endpoint ([`crate::app::metrics`]) serves them: per bdev the counters of
//! `bdev_get_iostat`, its latency histogram while enabled, its rate limits and the I/Os they
//! held back; per reactor busy and idle time; per controller its sessions and their polls; per
//! queue (`rvhost_get_queue_stats`) its requests, bytes, requests in flight and latency
//! percentiles.

use std::fmt::Write;

use serde_json::Value;

use super::queues::{latency_at, PERCENTILES};
use super::{no_params, RpcMethods};
use crate::bdev::iostat::{KindTotals, HISTOGRAM_GRANULARITY};
use crate::bdev::qos::LIMIT_KINDS;
use crate::rpc::RpcError;

/// A label value with `\`, `"` and newlines escaped as the format requires.
fn label(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// The exposition text, one metric family after another.
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{key}=\"{}\"", label(val));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }
}

/// Ticks as seconds.
fn seconds(ticks: u64, tick_rate: u64) -> f64 {
    ticks as f64 / tick_rate.max(1) as f64
}

/// The longest latency bucket bound written out before `+Inf`, in seconds.
const LONGEST_BUCKET_SECONDS: f64 = 1000.0;

impl RpcMethods {
    pub(super) fn rvhost_get_metrics(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        no_params("rvhost_get_metrics", params)?;
        Ok(Value::String(self.metrics_text()))
    }

    /// The exposition text.
    pub(super) fn metrics_text(&self) -> String {
        let tick_rate = rvhost_platform_linux::tsc::ticks_per_second();
        let mut out = Exposition {
            text: String::new(),
        };
        let bdevs: Vec<_> = self
            .bdevs
            .iter_iostat()
            .map(|(bdev, stats)| (bdev.name().to_owned(), std::sync::Arc::clone(stats)))
            .collect();
        let totals: Vec<_> = bdevs
            .iter()
            .map(|(name, stats)| (name.as_str(), stats.snapshot()))
            .collect();
        let kinds = |t: &crate::bdev::iostat::Totals| -> [(&'static str, KindTotals); 3] {
            [("read", t.read), ("write", t.write), ("unmap", t.unmap)]
        };

        out.family(
            "rvhost_bdev_ops_total",
            "counter",
            "Completed I/Os per bdev and kind (bdev_get_iostat's num_*_ops).",
        );
        for (name, t) in &totals {
            for (kind, k) in kinds(t) {
                out.sample(
                    "rvhost_bdev_ops_total",
                    &[("bdev", name), ("kind", kind)],
                    k.ops,
                );
            }
        }
        out.family(
            "rvhost_bdev_bytes_total",
            "counter",
            "Bytes read, written and unmapped per bdev (bdev_get_iostat's bytes_*).",
        );
        for (name, t) in &totals {
            for (kind, k) in kinds(t) {
                out.sample(
                    "rvhost_bdev_bytes_total",
                    &[("bdev", name), ("kind", kind)],
                    k.bytes,
                );
            }
        }
        out.family(
            "rvhost_bdev_latency_seconds_total",
            "counter",
            "Sum of the completed I/Os' latencies per bdev and kind (bdev_get_iostat's *_latency_ticks over tick_rate).",
        );
        for (name, t) in &totals {
            for (kind, k) in kinds(t) {
                out.sample(
                    "rvhost_bdev_latency_seconds_total",
                    &[("bdev", name), ("kind", kind)],
                    seconds(k.latency_ticks, tick_rate),
                );
            }
        }
        out.family(
            "rvhost_bdev_io_errors_total",
            "counter",
            "I/Os the bdev failed.",
        );
        for (name, t) in &totals {
            out.sample("rvhost_bdev_io_errors_total", &[("bdev", name)], t.failed);
        }

        out.family(
            "rvhost_bdev_qos_limit",
            "gauge",
            "Rate limits set by bdev_set_qos_limit (I/Os or MiB per second; 0: none).",
        );
        for (name, stats) in &bdevs {
            let limits = stats.qos().limits();
            for kind in LIMIT_KINDS {
                out.sample(
                    "rvhost_bdev_qos_limit",
                    &[("bdev", name), ("limit", kind.rpc_name())],
                    limits.get(kind),
                );
            }
        }
        out.family(
            "rvhost_bdev_qos_queued_total",
            "counter",
            "I/Os that waited because a rate limit's quota was used up.",
        );
        for (name, stats) in &bdevs {
            out.sample(
                "rvhost_bdev_qos_queued_total",
                &[("bdev", name)],
                stats.qos().queued_total(),
            );
        }

        // SPDK's buckets grouped by power of two: range r holds latencies below 2^(r+7) ticks.
        out.family(
            "rvhost_bdev_latency_seconds",
            "histogram",
            "Latency histogram of bdevs whose histogram is enabled (bdev_enable_histogram), by power of two.",
        );
        for (name, stats) in &bdevs {
            let Some(buckets) = stats.histogram() else {
                continue;
            };
            let per_range = 1usize << HISTOGRAM_GRANULARITY;
            let mut cumulative = 0u64;
            for (range, counts) in buckets.chunks(per_range).enumerate() {
                cumulative = counts
                    .iter()
                    .fold(cumulative, |sum, c| sum.wrapping_add(*c));
                let bound = 2f64.powi(range as i32 + 7) / tick_rate.max(1) as f64;
                if bound > LONGEST_BUCKET_SECONDS {
                    break;
                }
                out.sample(
                    "rvhost_bdev_latency_seconds_bucket",
                    &[("bdev", name), ("le", &format!("{bound:e}"))],
                    cumulative,
                );
            }
            let count = buckets.iter().fold(0u64, |sum, c| sum.wrapping_add(*c));
            out.sample(
                "rvhost_bdev_latency_seconds_bucket",
                &[("bdev", name), ("le", "+Inf")],
                count,
            );
            out.sample(
                "rvhost_bdev_latency_seconds_count",
                &[("bdev", name)],
                count,
            );
        }

        let reactors = self.ops.reactors_info();
        let reactors = reactors["reactors"].as_array().cloned().unwrap_or_default();
        for (family, key, help) in [
            (
                "rvhost_reactor_busy_seconds_total",
                "busy",
                "Time reactors spent in rounds that found work.",
            ),
            (
                "rvhost_reactor_idle_seconds_total",
                "idle",
                "Time reactors spent in rounds that found none, sleeps included.",
            ),
        ] {
            out.family(family, "counter", help);
            for reactor in &reactors {
                let lcore = reactor["lcore"].as_u64().unwrap_or(0).to_string();
                let ticks = reactor[key].as_u64().unwrap_or(0);
                out.sample(family, &[("lcore", &lcore)], seconds(ticks, tick_rate));
            }
        }

        let threads = self.ops.threads_info();
        out.family(
            "rvhost_controller_sessions",
            "gauge",
            "Frontends connected to each controller.",
        );
        for thread in &threads {
            out.sample(
                "rvhost_controller_sessions",
                &[("controller", &thread.name)],
                thread.pollers.len(),
            );
        }
        out.family(
            "rvhost_session_polls_total",
            "counter",
            "Polls of each session's queues by its reactor.",
        );
        for thread in &threads {
            for poller in &thread.pollers {
                let session = poller.id.to_string();
                out.sample(
                    "rvhost_session_polls_total",
                    &[("controller", &thread.name), ("session", &session)],
                    poller.runs,
                );
            }
        }
        out.family(
            "rvhost_session_busy_polls_total",
            "counter",
            "Polls of each session that found work.",
        );
        for thread in &threads {
            for poller in &thread.pollers {
                let session = poller.id.to_string();
                out.sample(
                    "rvhost_session_busy_polls_total",
                    &[("controller", &thread.name), ("session", &session)],
                    poller.busy_runs,
                );
            }
        }
        out.family(
            "rvhost_session_busy_seconds_total",
            "counter",
            "Time spent in each session's polls that found work.",
        );
        for thread in &threads {
            for poller in &thread.pollers {
                let session = poller.id.to_string();
                out.sample(
                    "rvhost_session_busy_seconds_total",
                    &[("controller", &thread.name), ("session", &session)],
                    seconds(poller.busy_ticks, tick_rate),
                );
            }
        }
        self.queue_metrics(&mut out, tick_rate);
        out.text
    }

    /// The per-queue series (`rvhost_get_queue_stats`'s counters), labelled by controller,
    /// session and queue.
    fn queue_metrics(&self, out: &mut Exposition, tick_rate: u64) {
        let controllers = match self.ops.queue_stats(None) {
            Ok(controllers) => controllers,
            Err(err) => {
                tracing::warn!(%err, "per-queue statistics left out of the metrics");
                Vec::new()
            }
        };
        let mut queues = Vec::new();
        for c in &controllers {
            for s in &c.sessions {
                for q in &s.queues {
                    let labels = [c.ctrlr.clone(), s.session.to_string(), q.queue.to_string()];
                    queues.push((labels, q));
                }
            }
        }
        let sample = |out: &mut Exposition,
                      name: &str,
                      labels: &[String; 3],
                      extra: Option<(&str, &str)>,
                      value: &dyn std::fmt::Display| {
            let mut all = vec![
                ("controller", labels[0].as_str()),
                ("session", labels[1].as_str()),
                ("queue", labels[2].as_str()),
            ];
            all.extend(extra);
            out.sample(name, &all, value);
        };

        out.family(
            "rvhost_queue_requests_total",
            "counter",
            "Requests each queue completed since it started.",
        );
        for (labels, q) in &queues {
            sample(
                out,
                "rvhost_queue_requests_total",
                labels,
                None,
                &q.requests,
            );
        }
        out.family(
            "rvhost_queue_bytes_total",
            "counter",
            "Payload bytes of each queue's completed requests, read and written by the guest.",
        );
        for (labels, q) in &queues {
            for (kind, bytes) in [("read", q.bytes_read), ("write", q.bytes_written)] {
                let name = "rvhost_queue_bytes_total";
                sample(out, name, labels, Some(("kind", kind)), &bytes);
            }
        }
        out.family(
            "rvhost_queue_in_flight",
            "gauge",
            "Requests each queue started and has not completed.",
        );
        for (labels, q) in &queues {
            sample(out, "rvhost_queue_in_flight", labels, None, &q.in_flight);
        }
        out.family(
            "rvhost_queue_late_notifications_total",
            "counter",
            "Used-buffer notifications each queue sent late, to a driver that re-armed behind its used ring without one (its memory barriers failed; 0 on a sound frontend).",
        );
        for (labels, q) in &queues {
            let name = "rvhost_queue_late_notifications_total";
            sample(out, name, labels, None, &q.late_notifications);
        }
        out.family(
            "rvhost_queue_latency_seconds",
            "summary",
            "Latency of each queue's requests (from the poll that took one to the poll that returned it), from an HdrHistogram since the queue started.",
        );
        for (labels, q) in &queues {
            for (quantile, _) in PERCENTILES {
                let value = seconds(latency_at(q, quantile), tick_rate);
                let quantile = quantile.to_string();
                let extra = Some(("quantile", quantile.as_str()));
                sample(out, "rvhost_queue_latency_seconds", labels, extra, &value);
            }
            let sum = seconds(q.latency_ticks, tick_rate);
            sample(out, "rvhost_queue_latency_seconds_sum", labels, None, &sum);
            sample(
                out,
                "rvhost_queue_latency_seconds_count",
                labels,
                None,
                &q.requests,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label("a\nb"), r"a\nb");
        let mut out = Exposition {
            text: String::new(),
        };
        out.sample("m", &[("bdev", "x\"y"), ("kind", "read")], 3);
        assert_eq!(out.text, "m{bdev=\"x\\\"y\",kind=\"read\"} 3\n");
    }
}
