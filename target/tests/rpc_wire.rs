//! The real `rvhost` over raw JSON on its RPC socket: the old SPDK method names, malformed and
//! hostile input (the server must answer with the right JSON-RPC error and keep serving), stream
//! framing, several clients, the start-up configuration, the default set-up, and signals.

mod rpc_common;

use std::process::Command;
use std::time::Duration;

use rpc_common::{wait_for_path, Target};
use serde_json::{json, Value};

fn request(method: &str, params: Value, id: u64) -> Value {
    json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id})
}

#[test]
fn old_method_names_from_the_vhost_guide() {
    let target = Target::start("old", &["--no-default"]);
    assert_eq!(
        target.ok(
            "construct_malloc_bdev",
            json!({"num_blocks": 2048, "block_size": 512, "name": "Malloc0"})
        ),
        "Malloc0"
    );
    assert_eq!(
        target.ok(
            "construct_null_bdev",
            json!({"num_blocks": 64, "block_size": 512, "name": "Null0"})
        ),
        "Null0"
    );
    let bdevs = target.ok("get_bdevs", json!({}));
    assert_eq!(bdevs.as_array().unwrap().len(), 2);
    assert_eq!(
        target.ok("get_bdevs", json!({"name": "Null0"}))[0]["product_name"],
        "Null disk"
    );

    assert_eq!(
        target.ok(
            "construct_vhost_blk_controller",
            json!({"ctrlr": "vhost.1", "dev_name": "Malloc0", "cpumask": "0x1", "readonly": true})
        ),
        true
    );
    wait_for_path(&target.dir.join("vhost.1"), true);
    let ctrls = target.ok("get_vhost_controllers", json!({}));
    assert_eq!(ctrls[0]["ctrlr"], "vhost.1");
    assert_eq!(ctrls[0]["backend_specific"]["block"]["readonly"], true);
    assert_eq!(
        target.ok("remove_vhost_controller", json!({"ctrlr": "vhost.1"})),
        true
    );
    wait_for_path(&target.dir.join("vhost.1"), false);

    assert_eq!(target.ok("delete_bdev", json!({"name": "Null0"})), true);
    assert_eq!(
        target.ok("delete_malloc_bdev", json!({"name": "Malloc0"})),
        true
    );
    assert_eq!(target.ok("get_bdevs", json!({})), json!([]));
    assert!(target
        .ok("get_rpc_methods", json!({}))
        .as_array()
        .unwrap()
        .contains(&json!("bdev_get_bdevs")));
    assert_eq!(
        target.ok("get_spdk_version", json!({}))["fields"]["minor"],
        1
    );
    assert_eq!(
        target.err_code("delete_bdev", json!({"name": "Null0"})),
        -19
    );
}

#[test]
fn bad_requests_get_the_right_errors_and_the_server_keeps_serving() {
    let target = Target::start("bad", &["--no-default"]);
    let mut conn = target.connect();
    let mut code = |req: Value| conn.request(&req)["error"]["code"].as_i64().unwrap_or(0);
    assert_eq!(code(request("no_such_method", json!({}), 1)), -32601);
    // Missing, ill-typed and unknown parameters.
    assert_eq!(
        code(request("bdev_malloc_create", json!({"block_size": 512}), 2)),
        -32602
    );
    assert_eq!(
        code(request(
            "bdev_malloc_create",
            json!({"num_blocks": "lots", "block_size": 512}),
            3
        )),
        -32602
    );
    assert_eq!(
        code(request(
            "bdev_malloc_create",
            json!({"num_blocks": 8, "block_size": 512, "colour": "red"}),
            4
        )),
        -32602
    );
    assert_eq!(
        code(request("bdev_malloc_create", json!([8, 512]), 5)),
        -32602
    );
    assert_eq!(
        code(request(
            "vhost_create_blk_controller",
            json!({"ctrlr": 7, "dev_name": "x"}),
            6
        )),
        -32602
    );
    // Duplicate names and unknown objects: SPDK's -EEXIST / -ENODEV.
    assert_eq!(
        code(request(
            "bdev_malloc_create",
            json!({"num_blocks": 8, "block_size": 512, "name": "M"}),
            7
        )),
        0
    );
    assert_eq!(
        code(request(
            "bdev_malloc_create",
            json!({"num_blocks": 8, "block_size": 512, "name": "M"}),
            8
        )),
        -17
    );
    assert_eq!(
        code(request("bdev_malloc_delete", json!({"name": "nope"}), 9)),
        -19
    );
    assert_eq!(
        code(request(
            "vhost_create_blk_controller",
            json!({"ctrlr": "v", "dev_name": "nope"}),
            10
        )),
        -19
    );
    assert_eq!(
        code(request(
            "vhost_delete_controller",
            json!({"ctrlr": "nope"}),
            11
        )),
        -19
    );
    // Not a valid request object.
    assert_eq!(code(json!({"method": "bdev_get_bdevs", "id": 12})), -32600);
    assert_eq!(
        code(json!({"jsonrpc": "2.0", "method": 5, "id": 13})),
        -32600
    );
    assert_eq!(
        code(json!({"jsonrpc": "2.0", "method": "bdev_get_bdevs", "params": 5, "id": 14})),
        -32600
    );
    assert_eq!(code(json!([])), -32600);

    // Messages say what is wrong.
    let reply = conn_request(
        &target,
        request("bdev_malloc_create", json!({"block_size": 512}), 20),
    );
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("num_blocks"),
        "{reply}"
    );
    let reply = conn_request(
        &target,
        request("bdev_get_bdevs", json!({"name": "ghost"}), 21),
    );
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ghost"),
        "{reply}"
    );
    let reply = conn_request(&target, request("bogus_method", json!({}), 22));
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bogus_method"),
        "{reply}"
    );

    // The first connection still works after all of that.
    let names = conn.request(&request("bdev_get_bdevs", json!({}), 30));
    assert_eq!(names["result"][0]["name"], "M");
}

fn conn_request(target: &Target, req: Value) -> Value {
    target.connect().request(&req)
}

#[test]
fn garbage_closes_only_that_connection() {
    let target = Target::start("garbage", &["--no-default"]);
    let mut bystander = target.connect();
    for garbage in [
        &b"this is not json"[..],
        b"{\"jsonrpc\":\"2.0\",,}",
        b"\xff\xfe\x00\x01",
        b"]",
    ] {
        let mut conn = target.connect();
        conn.send_raw(garbage).unwrap();
        let reply = conn.read_reply().expect("a parse error reply");
        assert_eq!(reply["error"]["code"], -32700, "{reply}");
        assert_eq!(reply["id"], Value::Null);
        assert!(
            conn.read_reply().is_none(),
            "the connection should be closed"
        );
    }
    // A request before the garbage is still answered, in order.
    let mut conn = target.connect();
    conn.send_raw(br#"{"jsonrpc":"2.0","method":"bdev_get_bdevs","id":1} {"#)
        .unwrap();
    conn.send_raw(b"oops").unwrap();
    assert_eq!(conn.read_reply().unwrap()["id"], 1);
    assert_eq!(conn.read_reply().unwrap()["error"]["code"], -32700);
    // Connections opened before and after are unaffected.
    assert_eq!(
        bystander.request(&request("bdev_get_bdevs", json!({}), 2))["result"],
        json!([])
    );
    assert_eq!(target.ok("bdev_get_bdevs", json!({})), json!([]));
}

#[test]
fn a_one_mebibyte_request_is_refused_and_the_server_keeps_serving() {
    let target = Target::start("big", &["--no-default"]);
    let mut conn = target.connect();
    let name = "x".repeat(1024 * 1024);
    let huge = request("bdev_get_bdevs", json!({"name": name}), 1).to_string();
    assert!(huge.len() > 1024 * 1024);
    // The server may stop reading before the end; a failed write is part of the test.
    let _ = conn.send_raw(huge.as_bytes());
    let reply = conn.read_reply().expect("an error reply");
    assert_eq!(reply["error"]["code"], -32700, "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1048576"),
        "{reply}"
    );
    assert!(conn.read_reply().is_none());
    // A large but acceptable request (under the limit) works.
    let big_ok = "y".repeat(512 * 1024);
    assert_eq!(
        conn_request(
            &target,
            request("bdev_get_bdevs", json!({"name": big_ok}), 2)
        )["error"]["code"],
        -19
    );
    assert_eq!(
        target.ok("spdk_get_version", json!({}))["fields"]["major"],
        0
    );
}

#[test]
fn framing_back_to_back_split_notifications_and_batches() {
    let target = Target::start("frame", &["--no-default"]);
    let mut conn = target.connect();
    // Two requests in one write: two replies, in order.
    let two = format!(
        "{}{}",
        request(
            "bdev_null_create",
            json!({"name": "N0", "num_blocks": 8, "block_size": 512}),
            1
        ),
        request("bdev_get_bdevs", json!({"name": "N0"}), 2)
    );
    conn.send_raw(two.as_bytes()).unwrap();
    assert_eq!(
        conn.read_reply().unwrap(),
        json!({"jsonrpc": "2.0", "id": 1, "result": "N0"})
    );
    let second = conn.read_reply().unwrap();
    assert_eq!(second["id"], 2);
    assert_eq!(second["result"][0]["name"], "N0");

    // One request split over several writes, even inside a string and a number.
    let text = request(
        "bdev_malloc_create",
        json!({"name": "Split", "num_blocks": 4096, "block_size": 512}),
        3,
    )
    .to_string();
    let cuts = [
        1,
        text.find("Split").unwrap() + 2,
        text.find("4096").unwrap() + 2,
        text.len() - 1,
    ];
    let mut start = 0;
    for cut in cuts {
        conn.send_raw(&text.as_bytes()[start..cut]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        start = cut;
    }
    conn.send_raw(&text.as_bytes()[start..]).unwrap();
    assert_eq!(
        conn.read_reply().unwrap(),
        json!({"jsonrpc": "2.0", "id": 3, "result": "Split"})
    );

    // A notification runs but gets no reply: the next reply is the next request's.
    conn.send_raw(
        json!({"jsonrpc": "2.0", "method": "bdev_null_delete", "params": {"name": "N0"}})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    let reply = conn.request(&request("bdev_get_bdevs", json!({}), 4));
    assert_eq!(reply["id"], 4);
    assert_eq!(reply["result"].as_array().unwrap().len(), 1, "{reply}");

    // Whitespace and newlines between requests are fine (SPDK's client indents its requests).
    conn.send_raw(b"\n\n  \t").unwrap();
    let reply = conn.request(&request("spdk_get_version", json!({}), 5));
    assert_eq!(reply["id"], 5);

    // A batch gets an array of replies, without the notifications'.
    let batch = json!([
        request("bdev_get_bdevs", json!({"name": "Split"}), 6),
        {"jsonrpc": "2.0", "method": "spdk_get_version"},
        request("no_such", json!({}), 7)
    ]);
    let replies = conn.request(&batch);
    let replies = replies.as_array().expect("a batch reply");
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[0]["result"][0]["name"], "Split");
    assert_eq!(replies[1]["error"]["code"], -32601);

    // String ids come back as sent.
    let reply = conn.request(&json!({"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": "abc"}));
    assert_eq!(reply["id"], "abc");
}

#[test]
fn several_clients_at_once() {
    let target = Target::start("multi", &["--no-default"]);
    let rpc = target.rpc.clone();
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let rpc = rpc.clone();
            std::thread::spawn(move || {
                let stream = std::os::unix::net::UnixStream::connect(&rpc).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                for i in 0..10u64 {
                    let name = format!("C{c}_{i}");
                    let req = request(
                        "bdev_null_create",
                        json!({"name": name, "num_blocks": 8, "block_size": 512}),
                        i,
                    );
                    std::io::Write::write_all(&mut writer, req.to_string().as_bytes()).unwrap();
                    let mut line = String::new();
                    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
                    let reply: Value = serde_json::from_str(&line).unwrap();
                    assert_eq!(reply["id"], i);
                    assert_eq!(reply["result"], name);
                }
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client thread");
    }
    assert_eq!(
        target
            .ok("bdev_get_bdevs", json!({}))
            .as_array()
            .unwrap()
            .len(),
        80
    );
}

#[test]
fn default_set_up_exports_malloc0_on_vhost0_and_prints_qemu_args() {
    let target = Target::start("default", &[]);
    let bdev = &target.ok("bdev_get_bdevs", json!({"name": "Malloc0"}))[0];
    assert_eq!(bdev["block_size"], 512);
    assert_eq!(bdev["num_blocks"], 256 * 2048);
    let ctrl = &target.ok("vhost_get_controllers", json!({"name": "vhost.0"}))[0];
    assert_eq!(ctrl["backend_specific"]["block"]["bdev"], "Malloc0");
    assert!(target.dir.join("vhost.0").exists());
    let log = target.log();
    let socket = target.dir.join("vhost.0");
    for needle in [
        "memory-backend-memfd".to_owned(),
        "share=on".to_owned(),
        "-numa node,memdev=mem0".to_owned(),
        format!("-chardev socket,id=char_vhost_0,path={}", socket.display()),
        "-device vhost-user-blk-pci".to_owned(),
    ] {
        assert!(log.contains(&needle), "log lacks {needle:?}:\n{log}");
    }
}

#[test]
fn start_up_config_in_spdk_format() {
    let dir = std::env::temp_dir().join(format!("rvhost-rpc-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        json!({"subsystems": [
            {"subsystem": "vhost_blk", "config": [
                {"method": "vhost_create_blk_controller", "params": {"ctrlr": "cfg.0", "dev_name": "Cfg0", "readonly": true}}
            ]},
            {"subsystem": "accel", "config": null},
            {"subsystem": "bdev", "config": [
                {"method": "bdev_malloc_create", "params": {"name": "Cfg0", "num_blocks": 1024, "block_size": 4096}},
                {"method": "bdev_null_create", "params": {"name": "Cfg1", "num_blocks": 8, "block_size": 512}}
            ]}
        ]})
        .to_string(),
    )
    .unwrap();
    let target = Target::start("cfg", &["-c", config.to_str().unwrap()]);
    let bdevs = target.ok("bdev_get_bdevs", json!({}));
    let names: Vec<&str> = bdevs
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["Cfg0", "Cfg1"],
        "the default Malloc0 must not be created with a config"
    );
    let ctrl = target.ok("vhost_get_controllers", json!({}));
    assert_eq!(ctrl.as_array().unwrap().len(), 1);
    assert_eq!(ctrl[0]["ctrlr"], "cfg.0");
    assert_eq!(ctrl[0]["backend_specific"]["block"]["readonly"], true);
    drop(target);

    // A bare list works too.
    let list = dir.join("list.json");
    std::fs::write(&list, r#"[{"method": "construct_malloc_bdev", "params": {"name": "L0", "num_blocks": 8, "block_size": 512}}]"#)
        .unwrap();
    let target = Target::start("cfglist", &["--json", list.to_str().unwrap()]);
    assert_eq!(target.ok("bdev_get_bdevs", json!({}))[0]["name"], "L0");
    drop(target);

    // A failing entry stops start-up with a message naming it.
    let bad = dir.join("bad.json");
    std::fs::write(&bad, r#"[{"method": "vhost_create_blk_controller", "params": {"ctrlr": "x", "dev_name": "missing"}}]"#)
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rvhost"))
        .args([
            "-S",
            dir.to_str().unwrap(),
            "-r",
            dir.join("bad.sock").to_str().unwrap(),
            "-m",
            "0x1",
            "-c",
        ])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the list, entry 0") && stderr.contains("missing"),
        "{stderr}"
    );
    assert!(!dir.join("bad.sock").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_and_sigint_shut_down_cleanly() {
    for signal in ["-TERM", "-INT"] {
        let mut target = Target::start("signal", &["--no-default"]);
        target.ok(
            "bdev_malloc_create",
            json!({"name": "M", "num_blocks": 8, "block_size": 512}),
        );
        target.ok(
            "vhost_create_blk_controller",
            json!({"ctrlr": "s.0", "dev_name": "M"}),
        );
        let socket = target.dir.join("s.0");
        wait_for_path(&socket, true);
        let status = Command::new("kill")
            .arg(signal)
            .arg(target.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let exit = target.wait_exit(Duration::from_secs(20));
        assert!(exit.success(), "{signal}: {exit}\n{}", target.log());
        assert!(!socket.exists(), "{signal}: controller socket left behind");
        assert!(!target.rpc.exists(), "{signal}: RPC socket left behind");
    }
}

#[test]
fn a_second_target_on_the_same_rpc_socket_is_refused() {
    let target = Target::start("twice", &["--no-default"]);
    let out = Command::new(env!("CARGO_BIN_EXE_rvhost"))
        .args([
            "-S",
            target.dir.to_str().unwrap(),
            "-m",
            "0x1",
            "--no-default",
            "-r",
        ])
        .arg(&target.rpc)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already serving"));
    // The first one is untouched.
    assert_eq!(target.ok("bdev_get_bdevs", json!({})), json!([]));
}

/// A second target started by mistake on the same directory must neither take over nor delete
/// the first one's sockets, and the first must still shut down (its listener used to be woken
/// through the socket path, which hung once another process had replaced the socket).
#[test]
fn a_second_target_on_the_same_sockets_leaves_the_first_intact() {
    let mut target = Target::start("twin", &[]);
    let controller = target.dir.join("vhost.0");
    wait_for_path(&controller, true);
    let second_rpc = target.dir.join("other-rpc.sock");
    for rpc in [&target.rpc, &second_rpc] {
        let out = Command::new(env!("CARGO_BIN_EXE_rvhost"))
            .arg("-S")
            .arg(&target.dir)
            .args(["-m", "0x1", "-r"])
            .arg(rpc)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        let expected = if rpc == &target.rpc {
            "already serving RPC"
        } else {
            "vhost.0 is in use"
        };
        assert!(stderr.contains(expected), "{stderr}");
        // The first target's controller socket still leads to it.
        assert!(
            std::os::unix::net::UnixStream::connect(&controller).is_ok(),
            "controller socket taken away"
        );
        assert!(
            !second_rpc.exists(),
            "the refused target left its RPC socket"
        );
    }
    assert_eq!(
        target.ok("vhost_get_controllers", json!({}))[0]["ctrlr"],
        "vhost.0"
    );
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(target.pid().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let exit = target.wait_exit(Duration::from_secs(20));
    assert!(exit.success(), "{exit}\n{}", target.log());
    assert!(!controller.exists(), "controller socket left behind");
    assert!(!target.rpc.exists(), "RPC socket left behind");
}

#[test]
fn a_pipelined_flood_is_answered_completely_and_in_order() {
    let target = Target::start("flood", &["--no-default"]);
    let stream = std::os::unix::net::UnixStream::connect(&target.rpc).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    const COUNT: u64 = 5000;
    // Written by another thread: the server applies back-pressure while replies are unread.
    let sender = std::thread::spawn(move || {
        let mut all = String::new();
        for id in 0..COUNT {
            all.push_str(&request("bdev_get_bdevs", json!({}), id).to_string());
        }
        std::io::Write::write_all(&mut writer, all.as_bytes()).unwrap();
    });
    let mut reader = std::io::BufReader::new(stream);
    for id in 0..COUNT {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        let reply: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(reply["id"], id);
        assert_eq!(reply["result"], json!([]));
    }
    sender.join().unwrap();
}

#[test]
fn mem_size_limits_ram_bdevs() {
    let target = Target::start("memsize", &["--no-default", "-s", "16"]);
    assert_eq!(
        target.ok(
            "bdev_malloc_create",
            json!({"name": "A", "num_blocks": 20480, "block_size": 512})
        ),
        "A"
    );
    let reply = target.call(
        "bdev_malloc_create",
        json!({"name": "B", "num_blocks": 20480, "block_size": 512}),
    );
    assert_eq!(reply["error"]["code"], -12, "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--mem-size"),
        "{reply}"
    );
    // Memory comes back when a bdev is deleted.
    assert_eq!(target.ok("bdev_malloc_delete", json!({"name": "A"})), true);
    assert_eq!(
        target.ok(
            "bdev_malloc_create",
            json!({"name": "B", "num_blocks": 20480, "block_size": 512})
        ),
        "B"
    );
    // Null bdevs hold no memory.
    assert_eq!(
        target.ok(
            "bdev_null_create",
            json!({"name": "N", "num_blocks": 1u64 << 30, "block_size": 4096})
        ),
        "N"
    );

    // The default 256 MiB Malloc0 does not fit in 64 MiB: start-up fails and says why.
    let dir = std::env::temp_dir().join(format!("rvhost-rpc-memsize-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rvhost"))
        .args([
            "-S",
            dir.to_str().unwrap(),
            "-r",
            dir.join("r.sock").to_str().unwrap(),
            "-m",
            "0x1",
            "-s",
            "64",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Malloc0") || stderr.contains("bdev_malloc_create"),
        "{stderr}"
    );
    assert!(stderr.contains("Cannot allocate memory"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
