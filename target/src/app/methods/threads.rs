//! `thread_get_stats` and `thread_get_pollers` in SPDK's shapes, so that SPDK's `spdk_top` reads
//! rvhost. SPDK's vhost runs each controller on an SPDK thread its reactor polls, and each
//! connected session as a `vdev_worker` poller on it; rvhost's reactors poll the sessions
//! directly, so a controller is reported as the thread (with the id `framework_get_reactors`
//! lists under `lw_threads`) and each session's device as its poller. A thread's busy and idle
//! ticks are its pollers' (the time spent in their polls that found work, and in those that did
//! not), as SPDK counts a thread's own polls, and those of the sessions that ended: an SPDK
//! thread's counts do not drop when a poller goes, and neither do a controller's.

use serde_json::{json, Value};

use super::{no_params, RpcMethods};
use crate::ops::ThreadInfo;
use crate::rpc::RpcError;

/// The name SPDK's vhost gives a session's poller.
const SESSION_POLLER: &str = "vdev_worker";

fn tick_rate() -> u64 {
    rvhost_platform_linux::tsc::ticks_per_second()
}

fn thread_stats(thread: &ThreadInfo) -> Value {
    let busy = thread
        .pollers
        .iter()
        .fold(thread.ended_busy_ticks, |sum, p| {
            sum.wrapping_add(p.busy_ticks)
        });
    let idle = thread
        .pollers
        .iter()
        .fold(thread.ended_idle_ticks, |sum, p| {
            sum.wrapping_add(p.idle_ticks)
        });
    json!({
        "name": thread.name,
        "id": thread.id,
        "cpumask": format!("{:x}", thread.cpumask),
        "busy": busy,
        "idle": idle,
        "active_pollers_count": thread.pollers.len(),
        "timed_pollers_count": 0,
        "paused_pollers_count": 0,
    })
}

fn thread_pollers(thread: &ThreadInfo) -> Value {
    let active: Vec<Value> = thread
        .pollers
        .iter()
        .map(|p| {
            json!({
                "name": SESSION_POLLER,
                "id": p.id,
                "state": "running",
                "run_count": p.runs,
                "busy_count": p.busy_runs,
            })
        })
        .collect();
    json!({
        "name": thread.name,
        "id": thread.id,
        "active_pollers": active,
        "timed_pollers": [],
        "paused_pollers": [],
    })
}

impl RpcMethods {
    pub(super) fn thread_get_stats(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        no_params("thread_get_stats", params)?;
        let threads: Vec<Value> = self.ops.threads_info().iter().map(thread_stats).collect();
        Ok(json!({"tick_rate": tick_rate(), "threads": threads}))
    }

    pub(super) fn thread_get_pollers(&mut self, params: Option<Value>) -> Result<Value, RpcError> {
        no_params("thread_get_pollers", params)?;
        let threads: Vec<Value> = self.ops.threads_info().iter().map(thread_pollers).collect();
        Ok(json!({"tick_rate": tick_rate(), "threads": threads}))
    }
}

impl RpcMethods {
    /// SPDK's static scheduler is what rvhost does: a controller stays on the reactor it was
    /// placed on (least loaded in its cpumask) and nothing moves threads between cores.
    pub(super) fn framework_get_scheduler(
        &mut self,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        no_params("framework_get_scheduler", params)?;
        let first_core = self.app_cpumask.trailing_zeros();
        Ok(json!({
            "scheduler_name": "static",
            "scheduler_period": 0,
            "isolated_core_mask": "",
            "scheduling_core": first_core,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::PollerInfo;

    #[test]
    fn a_controller_is_a_thread_and_its_sessions_are_pollers() {
        let thread = ThreadInfo {
            name: "vhost.0".into(),
            id: 3,
            cpumask: 0x2,
            pollers: vec![
                PollerInfo {
                    id: 7,
                    runs: 100,
                    busy_runs: 10,
                    busy_ticks: 5000,
                    idle_ticks: 900,
                },
                PollerInfo {
                    id: 9,
                    runs: 50,
                    busy_runs: 0,
                    busy_ticks: 0,
                    idle_ticks: 100,
                },
            ],
            ended_busy_ticks: 40,
            ended_idle_ticks: 7,
        };
        assert_eq!(
            thread_stats(&thread),
            json!({"name": "vhost.0", "id": 3, "cpumask": "2", "busy": 5040, "idle": 1007,
                   "active_pollers_count": 2, "timed_pollers_count": 0, "paused_pollers_count": 0})
        );
        let pollers = thread_pollers(&thread);
        assert_eq!(
            pollers["active_pollers"][0],
            json!({"name": "vdev_worker", "id": 7, "state": "running", "run_count": 100, "busy_count": 10})
        );
        assert_eq!(pollers["active_pollers"].as_array().unwrap().len(), 2);
        assert_eq!(pollers["timed_pollers"], json!([]));
        assert_eq!(pollers["paused_pollers"], json!([]));
    }
}
