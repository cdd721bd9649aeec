//! The NVMe bdev's RPCs against the real `rvhost`, with no NVMe hardware: attaching to a PCI
//! address that does not exist must fail with a clear JSON-RPC error (and leave no bdev or
//! controller behind), arguments are validated as SPDK does, and SPDK's own client gets the same
//! answers. The data path is tested in a QEMU guest (`scripts/nvme-guest-test.sh`).

mod rpc_common;

use rpc_common::Target;
use serde_json::json;

/// A well-formed PCI address with no device behind it on any machine this runs on.
const MISSING_BDF: &str = "0000:7f:1f.7";

#[test]
fn attach_to_a_missing_device_is_a_clear_error() {
    let target = Target::start("nvme-missing", &["--no-default"]);
    for method in ["bdev_nvme_attach_controller", "construct_nvme_bdev"] {
        let reply = target.call(
            method,
            json!({"name": "Nvme0", "trtype": "pcie", "traddr": MISSING_BDF}),
        );
        let error = &reply["error"];
        assert_eq!(error["code"], -19, "{method}: {reply}");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(MISSING_BDF), "{message}");
        assert!(message.contains("vfio"), "{message}");
    }
    assert_eq!(target.ok("bdev_get_bdevs", json!({})), json!([]));
    // Nothing was attached, so there is nothing to detach.
    assert_eq!(
        target.err_code("bdev_nvme_detach_controller", json!({"name": "Nvme0"})),
        -19
    );
    assert_eq!(target.ok("bdev_nvme_get_controllers", json!({})), json!([]));
    assert_eq!(
        target.err_code("bdev_nvme_get_controllers", json!({"name": "Nvme0"})),
        -19
    );
    let methods = target.ok("rpc_get_methods", json!({}));
    for method in [
        "bdev_nvme_attach_controller",
        "bdev_nvme_detach_controller",
        "bdev_nvme_get_controllers",
    ] {
        assert!(
            methods.as_array().unwrap().contains(&json!(method)),
            "{method}"
        );
    }
    // The server still serves.
    assert_eq!(
        target.ok(
            "bdev_malloc_create",
            json!({"name": "M0", "num_blocks": 64, "block_size": 512})
        ),
        "M0"
    );
}

#[test]
fn attach_arguments_are_validated() {
    let target = Target::start("nvme-args", &["--no-default"]);
    let attach = |params| target.err_code("bdev_nvme_attach_controller", params);
    // Missing members, wrong types, unknown members: invalid parameters.
    assert_eq!(attach(json!({"name": "Nvme0", "trtype": "pcie"})), -32602);
    assert_eq!(
        attach(json!({"trtype": "pcie", "traddr": MISSING_BDF})),
        -32602
    );
    assert_eq!(
        attach(json!({"name": "Nvme0", "trtype": "pcie", "traddr": 5})),
        -32602
    );
    assert_eq!(
        attach(json!({"name": "Nvme0", "trtype": "pcie", "traddr": MISSING_BDF, "bogus": 1})),
        -32602
    );
    assert_eq!(
        attach(json!(["Nvme0", "pcie", MISSING_BDF])),
        -32602,
        "positional parameters"
    );
    // Fabrics transports are not served; an unknown transport is invalid.
    assert_eq!(
        attach(json!({"name": "Nvme0", "trtype": "tcp", "traddr": "127.0.0.1"})),
        -95
    );
    assert_eq!(
        attach(json!({"name": "Nvme0", "trtype": "carrier-pigeon", "traddr": MISSING_BDF})),
        -22
    );
    // Not a PCI address.
    for traddr in [
        "",
        "/dev/nvme0",
        "0000:01:00",
        "0000:01:20.0",
        "0000:01:00.8",
        "zz:00.0",
    ] {
        assert_eq!(
            attach(json!({"name": "Nvme0", "trtype": "PCIe", "traddr": traddr})),
            -22,
            "{traddr:?}"
        );
    }
    // Fabrics-only members with PCIe.
    assert_eq!(
        attach(
            json!({"name": "Nvme0", "trtype": "pcie", "traddr": MISSING_BDF,
            "subnqn": "nqn.2016-06.io.spdk:cnode1"})
        ),
        -22
    );
    // Bad names and queue counts.
    assert_eq!(
        attach(json!({"name": "", "trtype": "pcie", "traddr": MISSING_BDF})),
        -22
    );
    for queues in [0, 1025, 70000] {
        assert_eq!(
            attach(
                json!({"name": "Nvme0", "trtype": "pcie", "traddr": MISSING_BDF,
                "num_io_queues": queues})
            ),
            -22,
            "{queues}"
        );
    }
    assert_eq!(
        target.err_code("bdev_nvme_detach_controller", json!({})),
        -32602
    );
    assert_eq!(target.ok("bdev_get_bdevs", json!({})), json!([]));
}

#[test]
fn spdk_client_gets_the_same_answers() {
    let target = Target::start("nvme-spdk", &["--no-default"]);
    let out = target.spdk_err(&[
        "bdev_nvme_attach_controller",
        "-b",
        "Nvme0",
        "-t",
        "pcie",
        "-a",
        MISSING_BDF,
    ]);
    assert!(
        out.contains("-19") || out.contains("No such device"),
        "{out}"
    );
    assert!(out.contains(MISSING_BDF), "{out}");
    // SPDK's client sends its flags as `false`; a set protection-information flag is refused.
    let out = target.spdk_err(&[
        "bdev_nvme_attach_controller",
        "-b",
        "Nvme0",
        "-t",
        "pcie",
        "-a",
        MISSING_BDF,
        "-r",
    ]);
    assert!(
        out.contains("-95") || out.contains("not supported"),
        "{out}"
    );
    let out = target.spdk_err(&["bdev_nvme_detach_controller", "Nvme0"]);
    assert!(
        out.contains("-19") || out.contains("No such device"),
        "{out}"
    );
    let out = target.spdk_err(&[
        "bdev_nvme_attach_controller",
        "-b",
        "Nvme0",
        "-t",
        "rdma",
        "-a",
        "10.0.0.1",
        "-s",
        "4420",
    ]);
    assert!(
        out.contains("-95") || out.contains("not supported"),
        "{out}"
    );
}
