//! The data plane's `ControllerOps` as the RPC layer uses it: placement on reactors, parameter
//! checks, listing, deletion.

mod vhost_support;

use std::sync::Arc;

use rvhost_target::dataplane::Dataplane;
use rvhost_target::ops::{BlkControllerSpec, ControllerOps, OpsError};
use vhost_support::*;

fn spec(name: &str, cpumask: Option<u64>) -> BlkControllerSpec {
    BlkControllerSpec {
        name: name.to_string(),
        bdev: malloc_bdev(&format!("M-{name}"), 64, 512),
        cpumask,
        readonly: false,
    }
}

#[test]
fn vhost_ops_checks_parameters() {
    let dir = socket_dir("ops");
    assert!(Dataplane::start(0, dir.clone()).is_err(), "empty cpumask");
    assert!(
        Dataplane::start(1 << 63, dir.clone()).is_err(),
        "core 63 is not online here"
    );

    let dp = Dataplane::start(0x1, dir.clone()).unwrap();
    dp.create_blk_controller(spec("c0", None)).unwrap();
    assert!(matches!(
        dp.create_blk_controller(spec("c0", None)),
        Err(OpsError::Exists(_))
    ));
    for bad in ["", ".", "..", "a/b"] {
        assert!(
            matches!(
                dp.create_blk_controller(spec(bad, None)),
                Err(OpsError::InvalidParams(_))
            ),
            "{bad:?}"
        );
    }
    let long = "x".repeat(120);
    assert!(matches!(
        dp.create_blk_controller(spec(&long, None)),
        Err(OpsError::InvalidParams(_))
    ));
    assert!(
        matches!(
            dp.create_blk_controller(spec("c1", Some(0x4))),
            Err(OpsError::InvalidParams(_))
        ),
        "cpumask outside the target's cores"
    );
    // A file that is not a socket is never replaced.
    std::fs::write(dir.join("plain"), b"keep me").unwrap();
    assert!(matches!(
        dp.create_blk_controller(spec("plain", None)),
        Err(OpsError::Internal(_))
    ));
    assert_eq!(std::fs::read(dir.join("plain")).unwrap(), b"keep me");

    let info = dp.controllers(None).unwrap();
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].ctrlr, "c0");
    assert_eq!(info[0].cpumask, "0x1");
    assert_eq!(info[0].socket, dir.join("c0"));
    assert_eq!(info[0].backend_specific["block"]["bdev"], "M-c0");
    assert_eq!(info[0].backend_specific["block"]["readonly"], false);
    assert!(matches!(
        dp.controllers(Some("nope")),
        Err(OpsError::NotFound(_))
    ));
    assert!(dp.bdev_in_use("M-c0"));
    assert!(!dp.bdev_in_use("M-c1"));

    dp.delete_controller("c0").unwrap();
    assert!(!dir.join("c0").exists());
    assert!(dp.controllers(None).unwrap().is_empty());
    // The name can be reused at once.
    dp.create_blk_controller(spec("c0", None)).unwrap();
    dp.shutdown();
    assert!(!dir.join("c0").exists(), "shutdown removes sockets");
}

#[test]
fn vhost_ops_places_controllers_on_the_least_loaded_reactor() {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    if online.trim() == "0" {
        eprintln!("SKIPPED: needs two online cores, this machine has only core 0");
        return;
    }
    let dir = socket_dir("placement");
    let dp: Arc<Dataplane> = Dataplane::start(0x3, dir.clone()).unwrap();
    for name in ["p0", "p1", "p2", "p3"] {
        dp.create_blk_controller(spec(name, None)).unwrap();
    }
    // Pinned to core 1 only.
    dp.create_blk_controller(spec("p4", Some(0x2))).unwrap();
    let reactors = dp.reactors_info();
    let threads = |core: usize| -> Vec<String> {
        reactors["reactors"][core]["lw_threads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(reactors["reactors"][0]["lcore"], 0);
    assert_eq!(reactors["reactors"][1]["lcore"], 1);
    assert_eq!(threads(0), ["p0", "p2"]);
    assert_eq!(threads(1), ["p1", "p3", "p4"]);
    // Deleting frees slots: core 1 now has the fewest controllers and gets the next one.
    dp.delete_controller("p1").unwrap();
    dp.delete_controller("p3").unwrap();
    dp.create_blk_controller(spec("p5", None)).unwrap();
    assert!(dp.reactors_info()["reactors"][1]["lw_threads"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == "p5"));

    // And I/O works on both reactors.
    let mut a = Driver::ready(&dir.join("p0"), VIRTIO_F_VERSION_1);
    let mut b = Driver::ready(&dir.join("p4"), VIRTIO_F_VERSION_1);
    assert_eq!(a.write_blocks(0, 0, &pattern(1, 512)), S_OK);
    assert_eq!(b.write_blocks(0, 0, &pattern(2, 512)), S_OK);
    assert_eq!(a.read_blocks(0, 0, 512), (S_OK, pattern(1, 512)));
    assert_eq!(b.read_blocks(0, 0, 512), (S_OK, pattern(2, 512)));
    dp.shutdown();
}
