//! Socket ownership for the VMM's user: `--socket-group`/`--socket-mode` and
//! `--rpc-socket-group`/`--rpc-socket-mode` set the group and permission bits of the controller
//! sockets and the RPC socket, and another user's connect succeeds or fails as configured. The
//! other user is `nobody` (with `nogroup`, or with a group it is not given), switched to with
//! `setpriv`; the connect is Perl's (perl-base is part of every Debian system). Runs as root.

mod rpc_common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use rpc_common::Target;
use serde_json::json;

const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;
/// A group `nobody` is not in.
const OTHER_GROUP: u32 = 65533;

/// Whether user `nobody` with primary group `gid` (and no other group) can connect to `socket`.
fn connects_as_nobody(socket: &Path, gid: u32) -> bool {
    let out = Command::new("setpriv")
        .arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .args([
            "perl",
            "-MIO::Socket::UNIX",
            "-e",
            "IO::Socket::UNIX->new(Type => SOCK_STREAM(), Peer => $ARGV[0]) or die \"$!\\n\"",
        ])
        .arg(socket)
        .output()
        .expect("running setpriv (util-linux) and perl");
    out.status.success()
}

fn assert_access(path: &Path, gid: u32, mode: u32) {
    let meta = std::fs::metadata(path).expect("socket metadata");
    assert_eq!(meta.gid(), gid, "group of {}", path.display());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        mode,
        "mode of {}",
        path.display()
    );
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("id -u");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// Starts rvhost with `options`, creates controller `vhost.0` over RPC, and returns the target.
fn start(tag: &str, options: &[&str]) -> Target {
    assert!(
        is_root(),
        "this test switches users and must run as root (CI does)"
    );
    let mut args = vec!["--no-default"];
    args.extend_from_slice(options);
    let target = Target::start(tag, &args);
    target.ok(
        "bdev_malloc_create",
        json!({"name": "Malloc0", "num_blocks": 2048, "block_size": 512}),
    );
    target.ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.0", "dev_name": "Malloc0"}),
    );
    target
}

#[test]
fn the_vmm_group_reaches_controller_sockets_and_nobody_else_the_rpc_socket() {
    let target = start(
        "group",
        &[
            "--socket-group",
            "nogroup",
            "--socket-mode",
            "0660",
            "--rpc-socket-mode",
            "0600",
        ],
    );
    let controller = target.dir.join("vhost.0");
    assert_access(&controller, NOGROUP, 0o660);
    assert_access(&target.rpc, 0, 0o600);
    assert!(
        connects_as_nobody(&controller, NOGROUP),
        "a member of the socket group could not connect\n{}",
        target.log()
    );
    assert!(
        !connects_as_nobody(&controller, OTHER_GROUP),
        "a user outside the socket group connected"
    );
    assert!(
        !connects_as_nobody(&target.rpc, NOGROUP),
        "another user connected to a 0600 RPC socket"
    );
    // rvhost's own user still configures it.
    assert_eq!(
        target.ok("vhost_get_controllers", json!({}))[0]["ctrlr"],
        "vhost.0"
    );
}

#[test]
fn a_closed_controller_socket_and_an_open_rpc_socket_are_as_configured_too() {
    let target = start(
        "mode",
        &[
            "--socket-mode",
            "0600",
            "--rpc-socket-group",
            &NOGROUP.to_string(),
            "--rpc-socket-mode",
            "0660",
        ],
    );
    let controller = target.dir.join("vhost.0");
    assert_access(&controller, 0, 0o600);
    assert_access(&target.rpc, NOGROUP, 0o660);
    assert!(
        !connects_as_nobody(&controller, NOGROUP),
        "another user connected to a 0600 controller socket"
    );
    assert!(
        connects_as_nobody(&target.rpc, NOGROUP),
        "a member of the RPC socket's group could not connect\n{}",
        target.log()
    );
    assert!(!connects_as_nobody(&target.rpc, OTHER_GROUP));
}

#[test]
fn an_unknown_group_or_a_bad_mode_is_refused_at_start() {
    for args in [
        &["--socket-group", "no-such-group-here"][..],
        &["--rpc-socket-mode", "0999"],
        &["--socket-mode", "u+rw"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_rvhost"))
            .args(args)
            .output()
            .expect("running rvhost");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(args[0]), "{args:?}: {stderr}");
    }
}
