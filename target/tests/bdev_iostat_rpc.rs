//! `bdev_get_iostat` and `bdev_reset_iostat` of the real `rvhost` binary through SPDK's own
//! client: a known number of reads, writes, unmaps (and flushes, which SPDK does not count) sent
//! by the in-process vhost-user-blk frontend are reported exactly, per bdev and per channel;
//! resets clear what their mode names; counts survive the session that made them; bad requests
//! get SPDK's errors.

mod rpc_common;
mod vhost_support;

use serde_json::{json, Value};

use rpc_common::Target;
use vhost_support::*;

const BLOCK: u64 = 512;

fn stat(target: &Target, args: &[&str]) -> Value {
    let mut all = vec!["bdev_get_iostat"];
    all.extend_from_slice(args);
    target.spdk_json(&all)
}

/// Bdev Stat0's entry of a `bdev_get_iostat -b NAME` reply.
fn stat0(target: &Target) -> Value {
    let reply = stat(target, &["--names", "Stat0"]);
    assert!(reply["tick_rate"].as_u64().unwrap() > 0, "{reply}");
    assert!(reply["ticks"].as_u64().unwrap() > 0, "{reply}");
    let bdevs = reply["bdevs"].as_array().expect("bdevs");
    assert_eq!(bdevs.len(), 1, "{reply}");
    assert_eq!(bdevs[0]["name"], "Stat0");
    bdevs[0].clone()
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// Checks ops and bytes of every kind, and that latencies are consistent with them.
fn assert_counts(
    v: &Value,
    reads: u64,
    read_bytes: u64,
    writes: u64,
    write_bytes: u64,
    unmaps: u64,
    unmap_bytes: u64,
) {
    assert_eq!(u(v, "num_read_ops"), reads, "{v}");
    assert_eq!(u(v, "bytes_read"), read_bytes, "{v}");
    assert_eq!(u(v, "num_write_ops"), writes, "{v}");
    assert_eq!(u(v, "bytes_written"), write_bytes, "{v}");
    assert_eq!(u(v, "num_unmap_ops"), unmaps, "{v}");
    assert_eq!(u(v, "bytes_unmapped"), unmap_bytes, "{v}");
    assert_eq!(u(v, "num_copy_ops"), 0, "{v}");
    assert_eq!(u(v, "bytes_copied"), 0, "{v}");
    for (kind, ops) in [("read", reads), ("write", writes), ("unmap", unmaps)] {
        let sum = u(v, &format!("{kind}_latency_ticks"));
        let max = u(v, &format!("max_{kind}_latency_ticks"));
        let min = u(v, &format!("min_{kind}_latency_ticks"));
        if ops == 0 {
            assert_eq!((sum, max, min), (0, 0, 0), "{kind}: {v}");
        } else {
            assert!(min > 0 && min <= max && max <= sum, "{kind}: {v}");
            assert!(sum <= max * ops && sum >= min * ops, "{kind}: {v}");
        }
    }
}

fn discard(driver: &mut Driver, sector: u64, sectors: u32) -> u8 {
    let mut segment = [0u8; 16];
    segment[0..8].copy_from_slice(&sector.to_le_bytes());
    segment[8..12].copy_from_slice(&sectors.to_le_bytes());
    driver.request(0, T_DISCARD, 0, Some((&segment, false))).0
}

#[test]
fn iostat_counts_what_the_frontend_sent() {
    let target = Target::start("iostat", &[]);
    target.spdk_ok(&["bdev_malloc_create", "-b", "Stat0", "1", "512"]);
    target.spdk_ok(&["bdev_null_create", "Null0", "1", "512"]);
    target.spdk_ok(&["vhost_create_blk_controller", "vhost.stat", "Stat0"]);

    // Before any I/O: every bdev listed, all zero, no errors.
    let all = stat(&target, &[]);
    let names: Vec<&str> = all["bdevs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    // The target's start-up configuration has its own Malloc0.
    assert_eq!(names, ["Malloc0", "Stat0", "Null0"], "{all}");
    assert_counts(&stat0(&target), 0, 0, 0, 0, 0, 0);
    assert_eq!(stat0(&target)["io_error"], json!({}));

    let mut driver = Driver::ready(
        &target.dir.join("vhost.stat"),
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_DISCARD,
    );
    // 5 writes of 4 KiB, 3 reads of 2 KiB, 2 unmaps of 16 sectors, 2 flushes (not counted).
    for i in 0..5u64 {
        assert_eq!(driver.write_blocks(0, i * 8, &pattern(i as u8, 4096)), S_OK);
    }
    for i in 0..3u64 {
        let (status, back) = driver.read_blocks(0, i * 8, 2048);
        assert_eq!(status, S_OK);
        assert_eq!(back, pattern(i as u8, 4096)[..2048]);
    }
    for i in 0..2u64 {
        assert_eq!(discard(&mut driver, 100 + i * 16, 16), S_OK);
        assert_eq!(driver.request(0, T_FLUSH, 0, None).0, S_OK);
    }
    let expect = |v: &Value| assert_counts(v, 3, 3 * 2048, 5, 5 * 4096, 2, 2 * 16 * BLOCK);
    expect(&stat0(&target));
    let all = stat(&target, &[]);
    expect(&all["bdevs"][1]);
    assert_counts(&all["bdevs"][2], 0, 0, 0, 0, 0, 0);

    // Per channel: the session's one channel holds it all.
    let per = stat(&target, &["--names", "Stat0", "-c"]);
    assert_eq!(per["name"], "Stat0", "{per}");
    let channels = per["channels"].as_array().expect("channels");
    assert_eq!(channels.len(), 1, "{per}");
    // Its thread is the controller's, as thread_get_stats names it.
    let threads = target.spdk_json(&["thread_get_stats"]);
    let controller = threads["threads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "vhost.stat")
        .unwrap_or_else(|| panic!("{threads}"));
    assert_eq!(
        channels[0]["thread_id"], controller["id"],
        "{per}\n{threads}"
    );
    assert!(u(&channels[0], "thread_id") > 0, "{per}");
    expect(&channels[0]);

    // maxmin: the sums stay, min and max start over; the next read sets both.
    target.spdk_ok(&["bdev_reset_iostat", "-b", "Stat0", "-m", "maxmin"]);
    let v = stat0(&target);
    assert_eq!(u(&v, "num_write_ops"), 5);
    assert!(u(&v, "write_latency_ticks") > 0);
    assert_eq!(u(&v, "max_write_latency_ticks"), 0, "{v}");
    assert_eq!(u(&v, "min_write_latency_ticks"), 0, "{v}");
    let (status, _) = driver.read_blocks(0, 0, 512);
    assert_eq!(status, S_OK);
    let v = stat0(&target);
    assert_eq!(u(&v, "num_read_ops"), 4);
    assert_eq!(u(&v, "bytes_read"), 3 * 2048 + 512);
    assert_eq!(
        u(&v, "max_read_latency_ticks"),
        u(&v, "min_read_latency_ticks"),
        "{v}"
    );
    assert!(u(&v, "max_read_latency_ticks") > 0, "{v}");

    // get with --reset-mode all reports, then clears.
    let before = stat(&target, &["--names", "Stat0", "--reset-mode", "all"]);
    assert_eq!(u(&before["bdevs"][0], "num_read_ops"), 4);
    assert_counts(&stat0(&target), 0, 0, 0, 0, 0, 0);

    // Counting goes on after a reset, and what a closed session counted stays.
    assert_eq!(driver.write_blocks(0, 0, &pattern(9, 1024)), S_OK);
    drop(driver);
    let mut driver = Driver::ready(&target.dir.join("vhost.stat"), VIRTIO_F_VERSION_1);
    assert_eq!(driver.write_blocks(0, 8, &pattern(9, 1024)), S_OK);
    let v = stat0(&target);
    assert_eq!(
        (u(&v, "num_write_ops"), u(&v, "bytes_written")),
        (2, 2048),
        "{v}"
    );

    // A reset of every bdev (no name, no mode: all).
    target.spdk_ok(&["bdev_reset_iostat"]);
    assert_counts(&stat0(&target), 0, 0, 0, 0, 0, 0);
    drop(driver);

    // Errors as SPDK gives them.
    assert_eq!(
        target.err_code("bdev_get_iostat", json!({"name": "Nope"})),
        -19
    );
    assert_eq!(
        target.err_code("bdev_reset_iostat", json!({"name": "Nope"})),
        -19
    );
    assert_eq!(
        target.err_code("bdev_get_iostat", json!({"per_channel": true})),
        -22
    );
    assert_eq!(
        target.err_code("bdev_reset_iostat", json!({"mode": "most"})),
        -32602
    );
    assert_eq!(
        target.err_code("bdev_get_iostat", json!({"bogus": 1})),
        -32602
    );
}

/// Standard base64 (RFC 4648) back to bytes.
fn unbase64(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut out = Vec::new();
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|&a| a == c)
            .expect("base64 character") as u32;
        bits = (bits << 6) | v;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
        }
    }
    out
}

/// The buckets of a `bdev_get_histogram` reply, checked against SPDK's layout.
fn buckets(reply: &Value) -> Vec<u64> {
    let granularity = u(reply, "granularity");
    let ranges = u(reply, "max_range") - u(reply, "min_range") + 1;
    assert!(u(reply, "tsc_rate") > 0, "{reply}");
    let bytes = unbase64(reply["histogram"].as_str().expect("histogram"));
    assert_eq!(bytes.len() as u64, (ranges << granularity) * 8, "{reply}");
    bytes
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn histogram_counts_every_completion_in_spdks_encoding() {
    let target = Target::start("histogram", &[]);
    target.spdk_ok(&["bdev_malloc_create", "-b", "Stat0", "1", "512"]);
    target.spdk_ok(&["vhost_create_blk_controller", "vhost.stat", "Stat0"]);
    // Not enabled: SPDK's internal error.
    assert_eq!(
        target.err_code("bdev_get_histogram", json!({"name": "Stat0"})),
        -32603
    );

    let mut driver = Driver::ready(&target.dir.join("vhost.stat"), VIRTIO_F_VERSION_1);
    // I/O before the histogram is enabled is not in it.
    assert_eq!(driver.write_blocks(0, 0, &pattern(1, 4096)), S_OK);
    target.spdk_ok(&["bdev_enable_histogram", "Stat0", "--histogram"]);
    for i in 0..6u64 {
        assert_eq!(driver.write_blocks(0, i * 8, &pattern(2, 4096)), S_OK);
    }
    for i in 0..4u64 {
        assert_eq!(driver.read_blocks(0, i * 8, 4096).0, S_OK);
    }
    assert_eq!(driver.request(0, T_FLUSH, 0, None).0, S_OK);
    let all = buckets(&target.spdk_json(&["bdev_get_histogram", "Stat0"]));
    assert_eq!(all.iter().sum::<u64>(), 11, "6 writes, 4 reads, 1 flush");

    // Only reads, afresh.
    target.spdk_ok(&[
        "bdev_enable_histogram",
        "Stat0",
        "--histogram",
        "-o",
        "read",
    ]);
    for _ in 0..3 {
        assert_eq!(driver.read_blocks(0, 0, 512).0, S_OK);
    }
    assert_eq!(driver.write_blocks(0, 0, &pattern(3, 512)), S_OK);
    let reads = buckets(&target.spdk_json(&["bdev_get_histogram", "Stat0"]));
    assert_eq!(reads.iter().sum::<u64>(), 3);
    // The buckets hold the latencies iostat saw: none below the shortest read's bucket start.
    let stat = target.spdk_json(&["bdev_get_iostat", "--names", "Stat0"]);
    assert!(u(&stat["bdevs"][0], "min_read_latency_ticks") > 0);

    // Off: an error again; a bad opc or geometry is refused.
    target.spdk_ok(&["bdev_enable_histogram", "Stat0", "--no-histogram"]);
    assert_eq!(
        target.err_code("bdev_get_histogram", json!({"name": "Stat0"})),
        -32603
    );
    assert_eq!(
        target.err_code(
            "bdev_enable_histogram",
            json!({"name": "Stat0", "enable": true, "opc": "nope"})
        ),
        -22
    );
    for bad in [
        json!({"name": "Stat0", "enable": true, "granularity": 8}),
        json!({"name": "Stat0", "enable": true, "granularity": 0}),
        json!({"name": "Stat0", "enable": true, "min_nsec": 5000, "max_nsec": 5000}),
    ] {
        assert_eq!(
            target.err_code("bdev_enable_histogram", bad.clone()),
            -22,
            "{bad}"
        );
    }
    assert_eq!(
        target.err_code(
            "bdev_enable_histogram",
            json!({"name": "Stat0", "enable": true, "granularity": 300})
        ),
        -32602
    );

    // Another geometry (SPDK's client options): 2^3 buckets per range, latencies from 1 us to
    // 1 ms; faster ones count in the first bucket, slower ones in the last.
    target.spdk_ok(&[
        "bdev_enable_histogram",
        "Stat0",
        "--histogram",
        "--granularity",
        "3",
        "--min-nsec",
        "1000",
        "--max-nsec",
        "1000000",
    ]);
    for _ in 0..5 {
        assert_eq!(driver.read_blocks(0, 0, 512).0, S_OK);
    }
    let reply = target.spdk_json(&["bdev_get_histogram", "Stat0"]);
    assert_eq!(u(&reply, "granularity"), 3, "{reply}");
    let tick_rate = u(&reply, "tsc_rate");
    let range = |ticks: u64| (64 - 3u64).saturating_sub(u64::from(ticks.leading_zeros()));
    assert_eq!(
        u(&reply, "min_range"),
        range(tick_rate / 1_000_000),
        "{reply}"
    );
    assert_eq!(
        u(&reply, "max_range"),
        range(tick_rate / 1000 - 1),
        "{reply}"
    );
    assert_eq!(buckets(&reply).iter().sum::<u64>(), 5, "{reply}");
    target.spdk_ok(&["bdev_enable_histogram", "Stat0", "--no-histogram"]);
    assert_eq!(
        target.err_code(
            "bdev_enable_histogram",
            json!({"name": "Nope", "enable": true})
        ),
        -19
    );
    drop(driver);
}
