//! The metrics endpoint (`--metrics`) of the real `rvhost` binary: scraped over HTTP after known
//! I/O from the in-process vhost-user-blk frontend, its text is parsed by Python's
//! `prometheus_client` (a real Prometheus text-format parser) and its counters match
//! `bdev_get_iostat` through SPDK's client; the histogram holds every I/O, the rate limit's
//! held-back I/Os and the reactor's time are there; other paths and methods are refused.

mod rpc_common;
mod vhost_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use rpc_common::Target;
use vhost_support::*;

/// The address the target logged for its endpoint.
fn metrics_address(target: &Target) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = target.log();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("metrics endpoint listening"))
        {
            let address = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("address="))
                .unwrap_or_else(|| panic!("no address in {line}"));
            return address.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no metrics endpoint in the log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET path` over HTTP/1.0; returns the status line and the body.
fn get(address: &str, method: &str, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(address).expect("connecting to the metrics endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(stream, "{method} {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .expect("reading the reply");
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// Every sample of the exposition text, as `prometheus_client`'s parser reads it:
/// `[name, {labels}, value]`.
fn parse(text: &str) -> Vec<Value> {
    let mut python = Command::new("python3")
        .args([
            "-c",
            "import json, sys\n\
             from prometheus_client.parser import text_string_to_metric_families\n\
             out = []\n\
             for family in text_string_to_metric_families(sys.stdin.read()):\n\
             \x20   for s in family.samples:\n\
             \x20       out.append([s.name, s.labels, s.value])\n\
             print(json.dumps(out))\n",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/setup.sh installs prometheus-client)");
    python
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = python.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The value of sample `name` whose labels include `labels`.
fn sample(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|s| s[0] == name && labels.iter().all(|(k, v)| s[1][*k] == *v))
        .and_then(|s| s[2].as_f64())
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}

/// Writes and reads the scrape test sends (one at a time), more than the rate limit banks.
const WRITES: u64 = 600;
const READS: u64 = 20;

#[test]
fn a_scrape_parses_and_matches_bdev_get_iostat() {
    let target = Target::start("metrics", &["--no-default", "--metrics", "127.0.0.1:0"]);
    let address = metrics_address(&target);
    target.spdk_ok(&["bdev_malloc_create", "-b", "Met0", "1", "512"]);
    target.spdk_ok(&["vhost_create_blk_controller", "vhost.m", "Met0"]);
    target.spdk_ok(&["bdev_enable_histogram", "Met0", "--histogram"]);
    // A limit the frontend's requests outrun, so some wait: 1000 I/Os per second with at most
    // 100 ms of it banked (`BURST_TIMESLICES`), so WRITES + READS requests cannot finish in less
    // than (WRITES + READS - 101) ms, and some wait unless each takes over 0.8 ms (0.3 ms here).
    target.spdk_ok(&["bdev_set_qos_limit", "Met0", "--rw-ios-per-sec", "1000"]);
    let mut driver = Driver::ready(&target.dir.join("vhost.m"), VIRTIO_F_VERSION_1);
    let started = Instant::now();
    for i in 0..WRITES {
        assert_eq!(
            driver.write_blocks(0, (i % 32) * 8, &pattern(3, 4096)),
            S_OK
        );
    }
    for i in 0..READS {
        assert_eq!(driver.read_blocks(0, i * 8, 1024).0, S_OK);
    }
    let took = started.elapsed();
    let floor = Duration::from_millis(WRITES + READS - 101);
    assert!(
        took >= floor,
        "{took:?} for {} I/Os at 1000/s",
        WRITES + READS
    );

    let (status, body) = get(&address, "GET", "/metrics");
    assert!(status.contains(" 200 "), "{status}\n{body}");
    let samples = parse(&body);
    let stat = target.spdk_json(&["bdev_get_iostat", "--names", "Met0"]);
    let tick_rate = stat["tick_rate"].as_f64().unwrap();
    let bdev = &stat["bdevs"][0];
    let m = |name: &str, kind: &str| sample(&samples, name, &[("bdev", "Met0"), ("kind", kind)]);
    for kind in ["read", "write", "unmap"] {
        assert_eq!(
            m("rvhost_bdev_ops_total", kind),
            bdev[format!("num_{kind}_ops")].as_f64().unwrap(),
            "{kind}: {stat}"
        );
        let bytes_key = match kind {
            "read" => "bytes_read",
            "write" => "bytes_written",
            _ => "bytes_unmapped",
        };
        assert_eq!(
            m("rvhost_bdev_bytes_total", kind),
            bdev[bytes_key].as_f64().unwrap(),
            "{kind}: {stat}"
        );
        let latency = bdev[format!("{kind}_latency_ticks")].as_f64().unwrap() / tick_rate;
        assert!(
            (m("rvhost_bdev_latency_seconds_total", kind) - latency).abs() <= latency * 1e-9,
            "{kind}: {stat}"
        );
    }
    assert_eq!(m("rvhost_bdev_ops_total", "write"), WRITES as f64);
    assert_eq!(m("rvhost_bdev_ops_total", "read"), READS as f64);
    assert_eq!(m("rvhost_bdev_bytes_total", "read"), READS as f64 * 1024.0);
    assert_eq!(
        sample(&samples, "rvhost_bdev_io_errors_total", &[("bdev", "Met0")]),
        0.0
    );
    // The histogram holds them all, cumulatively.
    assert_eq!(
        sample(
            &samples,
            "rvhost_bdev_latency_seconds_bucket",
            &[("bdev", "Met0"), ("le", "+Inf")]
        ),
        (WRITES + READS) as f64
    );
    assert_eq!(
        sample(
            &samples,
            "rvhost_bdev_latency_seconds_count",
            &[("bdev", "Met0")]
        ),
        (WRITES + READS) as f64
    );
    let buckets: Vec<f64> = samples
        .iter()
        .filter(|s| s[0] == "rvhost_bdev_latency_seconds_bucket" && s[1]["bdev"] == "Met0")
        .map(|s| s[2].as_f64().unwrap())
        .collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    // Rate limits and what they held back.
    assert_eq!(
        sample(
            &samples,
            "rvhost_bdev_qos_limit",
            &[("bdev", "Met0"), ("limit", "rw_ios_per_sec")]
        ),
        1000.0
    );
    assert!(
        sample(
            &samples,
            "rvhost_bdev_qos_queued_total",
            &[("bdev", "Met0")]
        ) > 0.0,
        "{} requests in {took:?}: some must have waited",
        WRITES + READS
    );
    // The reactor and the controller's session.
    let busy = sample(
        &samples,
        "rvhost_reactor_busy_seconds_total",
        &[("lcore", "0")],
    );
    let idle = sample(
        &samples,
        "rvhost_reactor_idle_seconds_total",
        &[("lcore", "0")],
    );
    assert!(busy >= 0.0 && idle > 0.0, "{busy} {idle}");
    assert_eq!(
        sample(
            &samples,
            "rvhost_controller_sessions",
            &[("controller", "vhost.m")]
        ),
        1.0
    );
    assert!(
        sample(
            &samples,
            "rvhost_session_polls_total",
            &[("controller", "vhost.m")]
        ) >= 0.0
    );
    // The same text through the RPC.
    let text = target.ok("rvhost_get_metrics", serde_json::json!({}));
    assert!(text.as_str().unwrap().contains(&format!(
        "rvhost_bdev_ops_total{{bdev=\"Met0\",kind=\"write\"}} {WRITES}"
    )));

    let (status, _) = get(&address, "GET", "/other");
    assert!(status.contains(" 404 "), "{status}");
    let (status, _) = get(&address, "POST", "/metrics");
    assert!(status.contains(" 405 "), "{status}");
    drop(driver);
}

#[test]
fn a_bad_address_is_refused_at_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_rvhost"))
        .args(["--metrics", "localhost:9477", "--help"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("neither HOST:PORT"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
