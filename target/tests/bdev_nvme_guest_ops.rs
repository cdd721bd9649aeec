//! Runs *inside* the NVMe guest of `NVME_GUEST_MODE=bdev scripts/nvme-guest-test.sh` (hence
//! `#[ignore]` on the host): a virtio-blk driver over vhost-user (`vhost_support`) sends requests
//! to `rvhost`, which serves `Nvme0n1` on the emulated NVMe controller. Covered: the reported
//! capacity and block size; a 256 KiB write (one zero-copy command; two bounce slots where the
//! memory cannot be mapped) and its read-back; FLUSH; WRITE ZEROES over part of that data;
//! DISCARD (DSM deallocate); and a read past the end, which must fail. The host then checks the
//! final bytes in the raw image (`scripts/check-perf-image.py --ops`). The second test here covers
//! zero-copy accounting and the controller's lifecycle (RPC detach, attach, PCI removal).

mod vhost_support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use std::os::unix::io::AsRawFd;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostUserMemoryRegionInfo;
use vhost_support::*;

/// Sectors of the guest's 32 MiB drive.
const CAPACITY_SECTORS: u64 = 32 * 2048;
/// The region written: the last MiB of the drive (after the rvhost-perf runs, so it wins).
const REGION_SECTOR: u64 = 31 * 2048;
const REGION_BYTES: usize = 256 * 1024;
/// Zeroed part: 64 KiB, 64 KiB into the region.
const ZERO_SECTOR: u64 = REGION_SECTOR + 128;
const ZERO_SECTORS: u32 = 128;
/// Discarded part: 512 KiB from 31.5 MiB.
const DISCARD_SECTOR: u64 = 31 * 2048 + 1024;
const DISCARD_SECTORS: u32 = 1024;
/// The lifecycle test's data: 64 KiB at 30 MiB, written before a detach and read after the
/// attach (outside the ops test's last MiB, which the host checks byte for byte).
const LIFECYCLE_SECTOR: u64 = 30 * 2048;
const LIFECYCLE_BYTES: usize = 64 * 1024;

/// Each 512-byte sector starts with its own sector number, so misplaced data is caught; the
/// rest is a byte pattern (the same formula is in `scripts/check-perf-image.py`).
fn region_pattern(first_sector: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    for (i, sector) in data.chunks_mut(512).enumerate() {
        let number = first_sector + i as u64;
        sector[..8].copy_from_slice(&number.to_le_bytes());
        for (j, byte) in sector.iter_mut().enumerate().skip(8) {
            *byte = (number as u8).wrapping_mul(7) ^ (j as u8).wrapping_mul(31) ^ 0x5a;
        }
    }
    data
}

fn segment(sector: u64, sectors: u32) -> [u8; 16] {
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&sectors.to_le_bytes());
    seg
}

#[test]
#[ignore = "runs in the NVMe guest: NVME_GUEST_MODE=bdev scripts/nvme-guest-test.sh"]
fn nvme_bdev_ops_in_the_guest() {
    let socket = PathBuf::from(
        std::env::var_os("RVHOST_NVME_GUEST_SOCKET").expect("RVHOST_NVME_GUEST_SOCKET is set"),
    );
    let wanted = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
    let mut driver = Driver::ready(&socket, wanted);
    assert_eq!(
        driver.features & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES),
        VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES,
        "QEMU's NVMe controller supports DSM and WRITE ZEROES, so the bdev offers both"
    );
    let config = driver.config();
    let capacity = u64::from_le_bytes(config[0..8].try_into().unwrap());
    let blk_size = u32::from_le_bytes(config[20..24].try_into().unwrap());
    assert_eq!(capacity, CAPACITY_SECTORS);
    assert_eq!(blk_size, 512);

    let data = region_pattern(REGION_SECTOR, REGION_BYTES);
    assert_eq!(driver.write_blocks(0, REGION_SECTOR, &data), S_OK);
    let (status, back) = driver.read_blocks(0, REGION_SECTOR, REGION_BYTES);
    assert_eq!(status, S_OK);
    assert!(back == data, "256 KiB read-back differs");

    assert_eq!(driver.request(0, T_FLUSH, 0, None).0, S_OK);

    let zero = segment(ZERO_SECTOR, ZERO_SECTORS);
    assert_eq!(
        driver.request(0, T_WRITE_ZEROES, 0, Some((&zero, false))).0,
        S_OK
    );
    let (status, back) = driver.read_blocks(0, REGION_SECTOR, REGION_BYTES);
    assert_eq!(status, S_OK);
    let zero_from = ((ZERO_SECTOR - REGION_SECTOR) * 512) as usize;
    let zero_to = zero_from + ZERO_SECTORS as usize * 512;
    assert!(
        back[..zero_from] == data[..zero_from],
        "data before the zeroes"
    );
    assert!(back[zero_from..zero_to].iter().all(|b| *b == 0), "zeroes");
    assert!(back[zero_to..] == data[zero_to..], "data after the zeroes");

    let discard = segment(DISCARD_SECTOR, DISCARD_SECTORS);
    assert_eq!(
        driver.request(0, T_DISCARD, 0, Some((&discard, false))).0,
        S_OK
    );
    assert_eq!(driver.request(0, T_FLUSH, 0, None).0, S_OK);

    // Past the end: refused, and the device keeps working.
    let (status, _) = driver.read_blocks(0, CAPACITY_SECTORS, 4096);
    assert_eq!(status, S_IOERR);
    let (status, back) = driver.read_blocks(0, REGION_SECTOR, 4096);
    assert_eq!(status, S_OK);
    assert!(back == data[..4096], "read after the refused request");
    eprintln!("NVME-BDEV-OPS PASS");
}

/// A minimal JSON-RPC 2.0 client in SPDK's wire format (SPDK's Python client is not available in
/// the guest's initramfs): one request per connection, the reply read until it parses.
fn rpc(socket: &Path, method: &str, params: Value) -> Value {
    let mut stream = UnixStream::connect(socket).expect("connect to the RPC socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("RPC read timeout");
    let request = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": 1});
    stream
        .write_all(request.to_string().as_bytes())
        .expect("send the RPC request");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).expect("read the RPC reply");
        assert!(n > 0, "{method}: connection closed before a reply");
        buf.extend_from_slice(&chunk[..n]);
        if let Ok(reply) = serde_json::from_slice::<Value>(&buf) {
            eprintln!("rpc {method} {params} -> {reply}");
            return reply;
        }
    }
}

fn rpc_ok(socket: &Path, method: &str, params: Value) -> Value {
    let reply = rpc(socket, method, params.clone());
    match reply.get("result") {
        Some(result) => result.clone(),
        None => panic!("{method} {params} failed: {reply}"),
    }
}

fn bdev_names(socket: &Path) -> Vec<String> {
    rpc_ok(socket, "bdev_get_bdevs", json!({}))
        .as_array()
        .expect("bdev_get_bdevs returns a list")
        .iter()
        .filter_map(|b| b["name"].as_str().map(str::to_owned))
        .collect()
}

/// `driver_specific.nvme[0]` of bdev `name` (its controller's counters).
fn nvme_stats(socket: &Path, name: &str) -> Value {
    let bdevs = rpc_ok(socket, "bdev_get_bdevs", json!({"name": name}));
    bdevs[0]["driver_specific"]["nvme"][0].clone()
}

fn counter(stats: &Value, key: &str) -> u64 {
    stats[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {key} in {stats}"))
}

/// Waits until the controller holds no guest memory mapped for DMA (no session uses the bdev).
fn wait_all_unmapped(socket: &Path) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = nvme_stats(socket, "Nvme0n1");
        if counter(&stats, "dma_mapped_bytes") == 0 {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "guest memory of closed sessions stays mapped: {stats}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until exactly `bytes` of guest memory are mapped for DMA (older tables unmapped).
fn wait_mapped(socket: &Path, bytes: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = nvme_stats(socket, "Nvme0n1");
        if counter(&stats, "dma_mapped_bytes") == bytes {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "expected {bytes} bytes mapped: {stats}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `rvhost-perf` random reads on `socket` for `seconds` in the background. Reads only: a
/// write cut off by a removal may leave a torn block, which the host's image check would
/// rightly flag as corruption.
fn start_perf(perf: &Path, socket: &Path, seconds: u32) -> Child {
    Command::new(perf)
        .arg("--socket")
        .arg(socket)
        .args([
            "--type", "blk", "--rw", "randread", "--cpu", "1", "--qd", "16",
        ])
        .args(["--time", &seconds.to_string(), "--seed", "11"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start rvhost-perf")
}

/// Waits for a background `rvhost-perf`: it must end by itself (no request may hang in rvhost)
/// and must have seen failed I/O. Returns its report.
fn perf_must_end_with_errors(mut child: Child, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll rvhost-perf") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("rvhost-perf still running {limit:?} after its start: a request hangs");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut report = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut report);
    }
    eprintln!("{report}");
    assert!(
        !status.success(),
        "rvhost-perf saw no failed I/O although the bdev went away: {report}"
    );
    let io_errors = report
        .split("errors: io=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no error count in the rvhost-perf report: {report}"));
    assert!(io_errors > 0, "failed I/O is reported as such: {report}");
    report
}

/// Writes `data` at `sector` on `driver` and reads it back.
fn write_and_check(driver: &mut Driver, sector: u64, data: &[u8], what: &str) {
    assert_eq!(driver.write_blocks(0, sector, data), S_OK, "{what}: write");
    let (status, back) = driver.read_blocks(0, sector, data.len());
    assert_eq!(status, S_OK, "{what}: read");
    assert!(back == data, "{what}: read-back differs");
}

/// The NVMe bdev's lifecycle under a serving vhost-blk controller, in the guest after the ops
/// test: SPDK semantics for `bdev_nvme_detach_controller` while `vhost.0` exports `Nvme0n1` and
/// `rvhost-perf` drives it (the bdev is hot-removed, I/O fails with IOERR, nothing hangs, other
/// devices and RPC keep working), then attach again and serve again (the data written before is
/// still there), then a real PCI removal of the controller (`echo 1 > .../remove`) under load:
/// rvhost sees the kernel's VFIO device request, fails the I/O, detaches the controller and
/// releases the device so that the removal completes.
#[test]
#[ignore = "runs in the NVMe guest: NVME_GUEST_MODE=bdev scripts/nvme-guest-test.sh"]
fn nvme_bdev_detach_reattach_and_removal_in_the_guest() {
    let env = |name: &str| {
        PathBuf::from(std::env::var_os(name).unwrap_or_else(|| panic!("{name} is set")))
    };
    let socket = env("RVHOST_NVME_GUEST_SOCKET");
    let rpc_socket = env("RVHOST_NVME_GUEST_RPC");
    let perf = env("RVHOST_NVME_GUEST_PERF");
    let bdf = std::env::var("RVHOST_NVME_GUEST_BDF").expect("RVHOST_NVME_GUEST_BDF is set");
    let dir = socket.parent().expect("socket directory").to_path_buf();
    let wanted = VIRTIO_F_VERSION_1;

    // Another device on the same reactor, which must not notice what happens to the NVMe one.
    rpc_ok(
        &rpc_socket,
        "bdev_malloc_create",
        json!({"name": "Malloc0", "num_blocks": 8192, "block_size": 512}),
    );
    rpc_ok(
        &rpc_socket,
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.1", "dev_name": "Malloc0"}),
    );
    let mut other = Driver::ready(&dir.join("vhost.1"), wanted);
    write_and_check(&mut other, 0, &pattern(1, 8192), "Malloc0 before");

    // ---- zero copy ----
    // rvhost-perf (4 KiB and 128 KiB, verified) and the ops test ran before this test, with
    // page-aligned buffers in memory the bdev could map: their I/O went straight to the device.
    let before = wait_all_unmapped(&rpc_socket);
    eprintln!("NVMe counters after the perf and ops runs: {before}");
    assert!(
        counter(&before, "zero_copy_ios") > 0,
        "no zero-copy I/O: {before}"
    );
    assert_eq!(counter(&before, "dma_map_failures"), 0, "{before}");
    assert_eq!(counter(&before, "bounced_unmapped_ios"), 0, "{before}");
    let kept = region_pattern(LIFECYCLE_SECTOR, LIFECYCLE_BYTES);
    let mut nvme = Driver::ready(&socket, wanted);
    let connected = nvme_stats(&rpc_socket, "Nvme0n1");
    assert!(
        counter(&connected, "dma_mapped_bytes") >= MEM_SIZE,
        "the memory table is mapped for DMA when it arrives, before any I/O: {connected}"
    );
    write_and_check(
        &mut nvme,
        LIFECYCLE_SECTOR,
        &kept,
        "Nvme0n1 before the detach",
    );
    let during = nvme_stats(&rpc_socket, "Nvme0n1");
    assert_eq!(
        counter(&during, "zero_copy_ios"),
        counter(&before, "zero_copy_ios") + 2,
        "this session's 64 KiB write and read went zero copy: {during}"
    );
    assert_eq!(
        counter(&during, "bounced_ios"),
        counter(&before, "bounced_ios"),
        "{during}"
    );
    assert!(
        counter(&during, "dma_mapped_bytes") >= MEM_SIZE,
        "this session's memory is mapped while it is connected: {during}"
    );
    // The session's memory is unmapped once it has gone (and mapped again when it is back).
    drop(nvme);
    wait_all_unmapped(&rpc_socket);
    let mut nvme = Driver::ready(&socket, wanted);
    let (status, back) = nvme.read_blocks(0, LIFECYCLE_SECTOR, LIFECYCLE_BYTES);
    assert_eq!(status, S_OK);
    assert!(back == kept, "read-back in a new session");
    assert!(counter(&nvme_stats(&rpc_socket, "Nvme0n1"), "dma_mapped_bytes") >= MEM_SIZE);
    // Memory hot-plug: the table after ADD_MEM_REG shares the first region's mapping with the
    // table before it (the IOMMU would refuse to map it twice) and maps only the new region.
    // The new region ends 512 bytes into a page: only its whole pages can be mapped.
    let extra = GuestRam::new((1 << 20) + 4096);
    let extra_gpa = 1u64 << 32;
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: extra_gpa,
        memory_size: (1 << 20) + 512,
        userspace_addr: FRONTEND_VA + (1 << 36),
        mmap_offset: 0,
        mmap_handle: extra.file.as_raw_fd(),
    };
    nvme.frontend.add_mem_region(&region).expect("ADD_MEM_REG");
    let zero_copy = counter(&nvme_stats(&rpc_socket, "Nvme0n1"), "zero_copy_ios");
    let (status, back) = nvme.read_blocks(0, LIFECYCLE_SECTOR, 4096);
    assert_eq!(status, S_OK);
    assert!(back == kept[..4096], "read after ADD_MEM_REG");
    let stats = wait_mapped(&rpc_socket, MEM_SIZE + (1 << 20));
    assert_eq!(counter(&stats, "zero_copy_ios"), zero_copy + 1, "{stats}");
    assert_eq!(counter(&stats, "dma_map_failures"), 0, "{stats}");
    // A buffer in that partial page is not mapped: the WRITE is copied into a bounce buffer and
    // the READ is copied out of one when it completes.
    let tail_gpa = extra_gpa + (1 << 20);
    let tail_data = pattern(9, 512);
    extra.write(1 << 20, &tail_data);
    let tail_sector = LIFECYCLE_SECTOR + (LIFECYCLE_BYTES / 512) as u64;
    let (hdr, status_addr) = (nvme.queues[0].header_addr(), nvme.queues[0].status_addr());
    for (req_type, device_writes) in [(T_OUT, false), (T_IN, true)] {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&req_type.to_le_bytes());
        header[8..16].copy_from_slice(&tail_sector.to_le_bytes());
        nvme.ram.write(hdr, &header);
        nvme.ram.write(status_addr, &[0xff]);
        if device_writes {
            extra.write(1 << 20, &[0xa5; 512]);
        }
        let data_flags = F_NEXT | if device_writes { F_WRITE } else { 0 };
        let chain = [
            Desc {
                addr: hdr,
                len: 16,
                flags: F_NEXT,
                next: 1,
            },
            Desc {
                addr: tail_gpa,
                len: 512,
                flags: data_flags,
                next: 2,
            },
            Desc {
                addr: status_addr,
                len: 1,
                flags: F_WRITE,
                next: 0,
            },
        ];
        nvme.post(0, &chain);
        nvme.wait_used(0);
        assert_eq!(nvme.ram.read(status_addr, 1)[0], S_OK, "request {req_type}");
    }
    assert!(
        extra.read(1 << 20, 512) == tail_data,
        "bounced read-back of the partial page"
    );
    let stats = nvme_stats(&rpc_socket, "Nvme0n1");
    assert_eq!(
        counter(&stats, "bounced_unmapped_ios"),
        counter(&before, "bounced_unmapped_ios") + 2,
        "{stats}"
    );
    assert_eq!(
        counter(&stats, "bounced_bytes"),
        counter(&before, "bounced_bytes") + 1024,
        "{stats}"
    );
    // A new table with the same memory mapped afresh: the old mappings go once it is unused.
    nvme.set_mem_table();
    let (status, back) = nvme.read_blocks(0, LIFECYCLE_SECTOR, 4096);
    assert_eq!(status, S_OK);
    assert!(back == kept[..4096], "read after SET_MEM_TABLE");
    let stats = wait_mapped(&rpc_socket, MEM_SIZE);
    assert_eq!(counter(&stats, "zero_copy_ios"), zero_copy + 2, "{stats}");
    assert_eq!(
        counter(&stats, "bounced_ios"),
        counter(&before, "bounced_ios") + 2
    );

    // ---- detach over RPC under load ----
    let load = start_perf(&perf, &socket, 8);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        rpc_ok(
            &rpc_socket,
            "bdev_nvme_detach_controller",
            json!({"name": "Nvme0"})
        ),
        json!(true)
    );
    perf_must_end_with_errors(load, Duration::from_secs(120));
    assert!(!bdev_names(&rpc_socket).contains(&"Nvme0n1".to_owned()));
    assert_eq!(
        rpc_ok(&rpc_socket, "bdev_nvme_get_controllers", json!({})),
        json!([])
    );
    let (status, _) = nvme.read_blocks(0, LIFECYCLE_SECTOR, 4096);
    assert_eq!(status, S_IOERR, "a hot-removed bdev fails I/O");
    write_and_check(
        &mut other,
        16,
        &pattern(2, 4096),
        "Malloc0 after the detach",
    );
    drop(nvme);

    // ---- attach again and serve again ----
    assert_eq!(
        rpc_ok(
            &rpc_socket,
            "bdev_nvme_attach_controller",
            json!({"name": "Nvme0", "trtype": "pcie", "traddr": bdf}),
        ),
        json!(["Nvme0n1"])
    );
    rpc_ok(
        &rpc_socket,
        "vhost_delete_controller",
        json!({"ctrlr": "vhost.0"}),
    );
    rpc_ok(
        &rpc_socket,
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.0", "dev_name": "Nvme0n1"}),
    );
    let mut nvme = Driver::ready(&socket, wanted);
    let (status, back) = nvme.read_blocks(0, LIFECYCLE_SECTOR, LIFECYCLE_BYTES);
    assert_eq!(status, S_OK);
    assert!(
        back == kept,
        "data written before the detach is there after the attach"
    );
    write_and_check(
        &mut nvme,
        LIFECYCLE_SECTOR,
        &kept,
        "Nvme0n1 after the attach",
    );
    drop(nvme);

    // ---- the PCI function removed under load ----
    let load = start_perf(&perf, &socket, 8);
    std::thread::sleep(Duration::from_secs(3));
    let remove_path = format!("/sys/bus/pci/devices/{bdf}/remove");
    let (removed_tx, removed_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Blocks until the VFIO user (rvhost) has let go of the device.
        let _ = removed_tx.send(std::fs::write(&remove_path, "1"));
    });
    let removal = removed_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the kernel's removal finished: rvhost released the device");
    removal.expect("writing the PCI remove attribute");
    assert!(!Path::new(&format!("/sys/bus/pci/devices/{bdf}")).exists());
    perf_must_end_with_errors(load, Duration::from_secs(120));
    assert_eq!(
        rpc_ok(&rpc_socket, "bdev_nvme_get_controllers", json!({})),
        json!([])
    );
    assert!(!bdev_names(&rpc_socket).contains(&"Nvme0n1".to_owned()));
    let mut nvme = Driver::ready(&socket, wanted);
    let (status, _) = nvme.read_blocks(0, LIFECYCLE_SECTOR, 4096);
    assert_eq!(status, S_IOERR, "vhost.0 stays, without its bdev");
    write_and_check(
        &mut other,
        32,
        &pattern(3, 4096),
        "Malloc0 after the removal",
    );
    eprintln!("NVME-BDEV-LIFECYCLE PASS");
}
