//! Unit tests of the JSON-RPC methods, over a fake data plane.

use super::*;
use crate::ops::ControllerInfo;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// A controller as the fake records it: bdev name, cpumask, read-only.
pub(crate) type FakeController = (String, Option<u64>, bool);

/// Records what the control plane asks of the data plane.
#[derive(Default)]
pub(crate) struct FakeOps {
    pub controllers: Mutex<BTreeMap<String, FakeController>>,
    pub detached: Mutex<Vec<String>>,
}

impl ControllerOps for FakeOps {
    fn create_blk_controller(&self, spec: BlkControllerSpec) -> Result<(), OpsError> {
        let mut map = self.controllers.lock().unwrap();
        if map.contains_key(&spec.name) {
            return Err(OpsError::Exists(spec.name));
        }
        if spec.name.contains('/') {
            return Err(OpsError::InvalidParams(format!("bad name {}", spec.name)));
        }
        map.insert(
            spec.name.clone(),
            (spec.bdev.name().to_owned(), spec.cpumask, spec.readonly),
        );
        Ok(())
    }
    fn delete_controller(&self, name: &str) -> Result<(), OpsError> {
        self.controllers
            .lock()
            .unwrap()
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| OpsError::NotFound(name.into()))
    }
    fn controllers(&self, name: Option<&str>) -> Result<Vec<ControllerInfo>, OpsError> {
        let map = self.controllers.lock().unwrap();
        let info = |(ctrlr, (bdev, mask, ro)): (&String, &FakeController)| ControllerInfo {
            ctrlr: ctrlr.clone(),
            cpumask: format!("{:#x}", mask.unwrap_or(1)),
            delay_base_us: 0,
            iops_threshold: 0,
            socket: format!("/tmp/{ctrlr}").into(),
            sessions: 0,
            backend_specific: json!({"block": {"readonly": ro, "bdev": bdev}}),
        };
        match name {
            Some(n) => map
                .get_key_value(n)
                .map(|kv| vec![info(kv)])
                .ok_or_else(|| OpsError::NotFound(n.into())),
            None => Ok(map.iter().map(info).collect()),
        }
    }
    fn bdev_in_use(&self, bdev_name: &str) -> bool {
        self.controllers
            .lock()
            .unwrap()
            .values()
            .any(|(b, _, _)| b == bdev_name)
    }
    fn detach_bdev(&self, bdev_name: &str) {
        self.detached.lock().unwrap().push(bdev_name.to_owned());
    }
    fn reactors_info(&self) -> Value {
        json!({"tick_rate": 1, "reactors": [{"lcore": 0}]})
    }
}

fn methods() -> (RpcMethods, Arc<FakeOps>) {
    let ops = Arc::new(FakeOps::default());
    let m = RpcMethods::new(ops.clone(), MemoryBudget::new(64 << 20), 0x3, "/tmp".into());
    (m, ops)
}

fn call(m: &mut RpcMethods, method: &str, params: Value) -> Result<Value, RpcError> {
    m.call(method, Some(params))
}

#[test]
fn malloc_create_list_delete() {
    let (mut m, _) = methods();
    let r = call(
        &mut m,
        "bdev_malloc_create",
        json!({"num_blocks": 2048, "block_size": 512, "name": "Malloc0"}),
    );
    assert_eq!(r, Ok(json!("Malloc0")));
    // Unnamed bdevs get SPDK's names, skipping taken ones.
    let r = call(
        &mut m,
        "construct_malloc_bdev",
        json!({"num_blocks": 8, "block_size": 4096}),
    );
    assert_eq!(r, Ok(json!("Malloc1")));
    let uuid = "0f0e0d0c-0b0a-0908-0706-050403020100";
    call(
        &mut m,
        "bdev_malloc_create",
        json!({"num_blocks": 8, "block_size": 512, "name": "M2", "uuid": uuid}),
    )
    .unwrap();
    let all = call(&mut m, "bdev_get_bdevs", json!({})).unwrap();
    let names: Vec<_> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].clone())
        .collect();
    assert_eq!(names, [json!("Malloc0"), json!("Malloc1"), json!("M2")]);
    let one = m.call("get_bdevs", Some(json!({"name": uuid}))).unwrap();
    let b = &one[0];
    assert_eq!(b["name"], "M2");
    assert_eq!(b["uuid"], uuid);
    assert_eq!(b["aliases"], json!([uuid]));
    assert_eq!(b["product_name"], "Malloc disk");
    assert_eq!(b["block_size"], 512);
    assert_eq!(b["num_blocks"], 8);
    assert_eq!(b["claimed"], false);
    assert_eq!(b["supported_io_types"]["unmap"], true);
    assert_eq!(b["supported_io_types"]["write_zeroes"], true);
    assert_eq!(b["assigned_rate_limits"]["rw_ios_per_sec"], 0);
    assert_eq!(
        call(&mut m, "bdev_malloc_delete", json!({"name": "Malloc1"})),
        Ok(json!(true))
    );
    let err = call(&mut m, "bdev_malloc_delete", json!({"name": "Malloc1"})).unwrap_err();
    assert_eq!(err.code, -19);
    assert_eq!(
        call(&mut m, "bdev_get_bdevs", json!({"name": "Malloc1"}))
            .unwrap_err()
            .code,
        -19
    );
}

#[test]
fn duplicate_and_invalid_bdevs_get_spdk_codes() {
    let (mut m, _) = methods();
    call(
        &mut m,
        "bdev_malloc_create",
        json!({"num_blocks": 8, "block_size": 512, "name": "A"}),
    )
    .unwrap();
    let dup = call(
        &mut m,
        "bdev_null_create",
        json!({"num_blocks": 8, "block_size": 512, "name": "A"}),
    )
    .unwrap_err();
    assert_eq!(dup.code, -17);
    assert!(dup.message.starts_with("File exists"), "{}", dup.message);
    for (params, code) in [
        (
            json!({"num_blocks": 8, "block_size": 500, "name": "B"}),
            -22,
        ),
        (
            json!({"num_blocks": 0, "block_size": 512, "name": "B"}),
            -22,
        ),
        (
            json!({"num_blocks": 8, "block_size": 512, "name": "B", "md_size": 8}),
            -22,
        ),
        (
            json!({"num_blocks": 8, "block_size": 512, "name": "B", "uuid": "nope"}),
            -22,
        ),
        (json!({"num_blocks": 8, "block_size": 512, "name": ""}), -22),
        (
            json!({"num_blocks": 1u64 << 40, "block_size": 512, "name": "B"}),
            -12,
        ),
        (json!({"block_size": 512, "name": "B"}), -32602),
        (
            json!({"num_blocks": "8", "block_size": 512, "name": "B"}),
            -32602,
        ),
        (
            json!({"num_blocks": -1, "block_size": 512, "name": "B"}),
            -32602,
        ),
        (
            json!({"num_blocks": 8, "block_size": 512, "name": "B", "bogus": 1}),
            -32602,
        ),
    ] {
        let err = call(&mut m, "bdev_malloc_create", params.clone()).unwrap_err();
        assert_eq!(err.code, code, "{params}: {}", err.message);
    }
    let missing = call(&mut m, "bdev_malloc_create", json!({"block_size": 512})).unwrap_err();
    assert!(
        missing.message.contains("num_blocks"),
        "{}",
        missing.message
    );
    let positional = m
        .call("bdev_malloc_create", Some(json!([8, 512])))
        .unwrap_err();
    assert_eq!(positional.code, -32602);
    assert_eq!(m.call("bdev_malloc_create", None).unwrap_err().code, -32602);
    // A null bdev is not deleted through the malloc method, as in SPDK.
    call(
        &mut m,
        "bdev_null_create",
        json!({"num_blocks": 8, "block_size": 512, "name": "N"}),
    )
    .unwrap();
    assert_eq!(
        call(&mut m, "bdev_malloc_delete", json!({"name": "N"}))
            .unwrap_err()
            .code,
        -19
    );
    assert_eq!(
        call(&mut m, "delete_null_bdev", json!({"name": "N"})),
        Ok(json!(true))
    );
    assert_eq!(m.bdevs().len(), 1);
}

#[test]
fn controllers_go_through_the_data_plane() {
    let (mut m, ops) = methods();
    call(
        &mut m,
        "bdev_malloc_create",
        json!({"num_blocks": 8, "block_size": 512, "name": "Malloc0"}),
    )
    .unwrap();
    let create = |m: &mut RpcMethods, p: Value| call(m, "vhost_create_blk_controller", p);
    assert_eq!(
        create(&mut m, json!({"ctrlr": "vhost.0", "dev_name": "Malloc0"})),
        Ok(json!(true))
    );
    assert_eq!(
        m.call("construct_vhost_blk_controller", Some(json!({"ctrlr": "vhost.1", "dev_name": "Malloc0", "cpumask": "0x2", "readonly": true}))),
        Ok(json!(true))
    );
    assert_eq!(
        ops.controllers.lock().unwrap()["vhost.1"],
        ("Malloc0".to_owned(), Some(2), true)
    );
    assert_eq!(ops.controllers.lock().unwrap()["vhost.0"].1, None);
    for (params, code) in [
        (json!({"ctrlr": "vhost.0", "dev_name": "Malloc0"}), -17),
        (json!({"ctrlr": "vhost.2", "dev_name": "Nope"}), -19),
        (
            json!({"ctrlr": "vhost.2", "dev_name": "Malloc0", "cpumask": "0x4"}),
            -22,
        ),
        (
            json!({"ctrlr": "vhost.2", "dev_name": "Malloc0", "cpumask": "zz"}),
            -22,
        ),
        (
            json!({"ctrlr": "vhost.2", "dev_name": "Malloc0", "cpumask": "0x0"}),
            -22,
        ),
        (
            json!({"ctrlr": "vhost.2", "dev_name": "Malloc0", "transport": "vfio"}),
            -22,
        ),
        (json!({"ctrlr": "a/b", "dev_name": "Malloc0"}), -22),
        (json!({"ctrlr": "vhost.2"}), -32602),
        (
            json!({"ctrlr": "vhost.2", "dev_name": "Malloc0", "readonly": "yes"}),
            -32602,
        ),
    ] {
        let err = create(&mut m, params.clone()).unwrap_err();
        assert_eq!(err.code, code, "{params}: {}", err.message);
    }
    let listed = call(&mut m, "vhost_get_controllers", json!({})).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert_eq!(listed[1]["backend_specific"]["block"]["readonly"], true);
    let one = call(&mut m, "get_vhost_controllers", json!({"name": "vhost.0"})).unwrap();
    assert_eq!(one[0]["ctrlr"], "vhost.0");
    assert_eq!(
        call(&mut m, "vhost_get_controllers", json!({"name": "x"}))
            .unwrap_err()
            .code,
        -19
    );
    // Deleting a bdev in use detaches it first.
    let b = call(&mut m, "bdev_get_bdevs", json!({"name": "Malloc0"})).unwrap();
    assert_eq!(b[0]["claimed"], true);
    assert_eq!(
        call(&mut m, "delete_bdev", json!({"name": "Malloc0"})),
        Ok(json!(true))
    );
    assert_eq!(*ops.detached.lock().unwrap(), ["Malloc0"]);
    assert_eq!(
        call(
            &mut m,
            "vhost_delete_controller",
            json!({"ctrlr": "vhost.0"})
        ),
        Ok(json!(true))
    );
    assert_eq!(
        call(
            &mut m,
            "remove_vhost_controller",
            json!({"ctrlr": "vhost.0"})
        )
        .unwrap_err()
        .code,
        -19
    );
}

#[test]
fn saved_config_recreates_bdevs_and_controllers() {
    let (mut m, _) = methods();
    call(
        &mut m,
        "bdev_malloc_create",
        json!({"num_blocks": 16, "block_size": 4096, "name": "M"}),
    )
    .unwrap();
    call(
        &mut m,
        "bdev_null_create",
        json!({"num_blocks": 8, "block_size": 512, "name": "N"}),
    )
    .unwrap();
    call(
        &mut m,
        "vhost_create_blk_controller",
        json!({"ctrlr": "v", "dev_name": "N", "readonly": true}),
    )
    .unwrap();
    let subsystems = m.call("framework_get_subsystems", None).unwrap();
    assert_eq!(
        subsystems[1],
        json!({"subsystem": "vhost_blk", "depends_on": ["bdev"]})
    );
    let bdev = call(
        &mut m,
        "framework_get_config",
        json!({"name": "bdev", "with_batches": false}),
    )
    .unwrap();
    let m_uuid = m.bdevs().get("M").unwrap().uuid();
    assert_eq!(
        bdev[0],
        json!({"method": "bdev_malloc_create", "params": {"name": "M", "num_blocks": 16, "block_size": 4096, "uuid": uuid_string(m_uuid)}})
    );
    assert_eq!(bdev[1]["method"], "bdev_null_create");
    let vhost = call(&mut m, "framework_get_config", json!({"name": "vhost_blk"})).unwrap();
    assert_eq!(
        vhost,
        json!([{"method": "vhost_create_blk_controller", "params": {"ctrlr": "v", "dev_name": "N", "cpumask": "0x1", "readonly": true}}])
    );
    assert_eq!(
        call(&mut m, "framework_get_config", json!({"name": "nvmf"}))
            .unwrap_err()
            .code,
        -32602
    );

    // Replaying the saved calls on a fresh target recreates the same state.
    let (mut fresh, fresh_ops) = methods();
    for entry in bdev
        .as_array()
        .unwrap()
        .iter()
        .chain(vhost.as_array().unwrap())
    {
        fresh
            .call(
                entry["method"].as_str().unwrap(),
                Some(entry["params"].clone()),
            )
            .unwrap();
    }
    assert_eq!(fresh.bdevs().get("M").unwrap().uuid(), m_uuid);
    assert_eq!(
        fresh_ops.controllers.lock().unwrap()["v"],
        ("N".to_owned(), Some(1), true)
    );
}

#[test]
fn introspection_and_kill() {
    let (mut m, _) = methods();
    let names = m.call("rpc_get_methods", None).unwrap();
    assert!(names
        .as_array()
        .unwrap()
        .contains(&json!("bdev_malloc_create")));
    assert!(!names
        .as_array()
        .unwrap()
        .contains(&json!("construct_malloc_bdev")));
    let all = call(
        &mut m,
        "get_rpc_methods",
        json!({"include_aliases": true, "current": true}),
    )
    .unwrap();
    assert!(all
        .as_array()
        .unwrap()
        .contains(&json!("construct_malloc_bdev")));
    let v = m.call("spdk_get_version", None).unwrap();
    assert_eq!(
        v["version"],
        format!("rvhost v{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(v["fields"]["major"], 0);
    assert_eq!(v["fields"]["minor"], 1);
    assert_eq!(v["fields"]["suffix"], "");
    assert_eq!(
        call(&mut m, "spdk_get_version", json!({"x": 1}))
            .unwrap_err()
            .code,
        -32602
    );
    assert_eq!(
        m.call("framework_get_reactors", None).unwrap()["reactors"][0]["lcore"],
        0
    );
    assert_eq!(m.call("nope", None).unwrap_err().code, -32601);
    assert_eq!(m.call("framework_wait_init", None), Ok(json!(true)));
    let level = json!({"level": "DEBUG"});
    assert_eq!(
        call(&mut m, "log_set_level", level.clone())
            .unwrap_err()
            .code,
        -95
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    m.set_log_control(
        Box::new(move |d| {
            record.lock().unwrap().push(d.to_owned());
            Ok(())
        }),
        "warn",
    );
    assert_eq!(m.call("log_get_print_level", None), Ok(json!("WARNING")));
    assert_eq!(call(&mut m, "log_set_print_level", level), Ok(json!(true)));
    assert_eq!(
        call(&mut m, "log_set_level", json!({"level": "notice"})),
        Ok(json!(true))
    );
    assert_eq!(m.call("log_get_level", None), Ok(json!("NOTICE")));
    assert_eq!(*seen.lock().unwrap(), ["debug", "info"]);
    let bad = call(&mut m, "log_set_level", json!({"level": "LOUD"})).unwrap_err();
    assert_eq!(bad.code, -32602);
    assert_eq!(
        m.call("bdev_wait_for_examine", Some(json!({}))),
        Ok(json!(true))
    );
    assert_eq!(
        call(&mut m, "bdev_wait_for_examine", json!({"x": 1}))
            .unwrap_err()
            .code,
        -32602
    );
    assert_eq!(
        call(&mut m, "spdk_kill_instance", json!({"sig_name": "SIGUSR2"}))
            .unwrap_err()
            .code,
        -22
    );
    assert_eq!(m.take_kill_request(), None);
    assert_eq!(
        call(&mut m, "spdk_kill_instance", json!({"sig_name": "SIGTERM"})),
        Ok(json!(true))
    );
    assert_eq!(
        m.take_kill_request(),
        Some(KillRequest::Shutdown("SIGTERM"))
    );
    assert_eq!(m.take_kill_request(), None);
}

#[test]
fn bdev_modules_register_their_methods_once_and_first() {
    let (m, _) = methods();
    let names = m.method_names(true);
    let mut seen = std::collections::HashSet::new();
    for name in &names {
        assert!(seen.insert(*name), "{name} is registered twice");
    }
    // The modules' methods come first, in module order, as `rpc_get_methods` always listed them.
    let current = m.method_names(false);
    assert_eq!(
        current[..24],
        [
            "bdev_malloc_create",
            "bdev_malloc_delete",
            "bdev_null_create",
            "bdev_null_delete",
            "bdev_null_resize",
            "bdev_aio_create",
            "bdev_aio_delete",
            "bdev_aio_rescan",
            "bdev_nvme_attach_controller",
            "bdev_nvme_get_controllers",
            "bdev_nvme_detach_controller",
            "bdev_uring_create",
            "bdev_uring_delete",
            "bdev_uring_rescan",
            "bdev_delay_create",
            "bdev_delay_delete",
            "bdev_delay_update_latency",
            "bdev_rbd_register_cluster",
            "bdev_rbd_unregister_cluster",
            "bdev_rbd_get_clusters_info",
            "bdev_rbd_create",
            "bdev_rbd_delete",
            "bdev_rbd_resize",
            "bdev_get_bdevs",
        ]
    );
    for module in &m.modules {
        for (name, old) in module.method_names() {
            assert_eq!(module.find_method(name), Some(name));
            if let Some(old) = old {
                assert_eq!(module.find_method(old), Some(name));
                assert!(names.contains(&old), "{old}");
            }
        }
    }
}

/// A bdev module only this test knows (null bdevs under other names): a module needs nothing
/// but the `BdevModule` trait to be listed, served, saved and ticked.
struct EchoModule {
    ticks: Arc<std::sync::atomic::AtomicUsize>,
}

impl EchoModule {
    fn create(
        &mut self,
        cx: &mut crate::bdev::BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: ByName = decode(params)?;
        cx.check_new_name(&p.name, [0xec; 16])?;
        let bdev = crate::bdev::null::NullBdev::new(&p.name, 8, 512, [0xec; 16])
            .map_err(crate::bdev::module::bdev_error)?;
        cx.register(bdev, Box::new(|| {}))?;
        Ok(Value::String(p.name))
    }

    fn delete(
        &mut self,
        cx: &mut crate::bdev::BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: ByName = decode(params)?;
        cx.delete(&p.name)?;
        Ok(Value::Bool(true))
    }
}

impl crate::bdev::BdevModule for EchoModule {
    const NAME: &'static str = "echo";
    const METHODS: &'static [crate::bdev::module::RpcMethod<Self>] = &[
        crate::bdev::module::RpcMethod {
            name: "bdev_echo_create",
            old_name: Some("construct_echo_bdev"),
            handler: Self::create,
        },
        crate::bdev::module::RpcMethod {
            name: "bdev_echo_delete",
            old_name: None,
            handler: Self::delete,
        },
    ];

    fn new(_env: &ModuleEnv) -> Self {
        EchoModule {
            ticks: Arc::default(),
        }
    }

    fn bdev_config(&self, bdev: &dyn Bdev) -> Option<Value> {
        Some(json!({"method": "bdev_echo_create", "params": {"name": bdev.name()}}))
    }

    fn module_config(&self) -> Vec<Value> {
        vec![json!({"method": "bdev_echo_set_options", "params": {}})]
    }

    fn tick(&mut self, _cx: &mut crate::bdev::BdevContext<'_>) {
        self.ticks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_new_bdev_module_needs_only_the_trait_and_its_registration() {
    use crate::bdev::BdevModule;
    let (mut m, _) = methods();
    let echo = EchoModule::new(&ModuleEnv {
        budget: MemoryBudget::new(0),
        app_cpumask: 1,
    });
    let ticks = Arc::clone(&echo.ticks);
    m.add_bdev_module(Box::new(echo));

    let listed = m.call("rpc_get_methods", None).unwrap();
    assert!(listed
        .as_array()
        .unwrap()
        .contains(&json!("bdev_echo_create")));
    assert_eq!(
        call(&mut m, "construct_echo_bdev", json!({"name": "E0"})),
        Ok(json!("E0"))
    );
    call(
        &mut m,
        "bdev_null_create",
        json!({"num_blocks": 8, "block_size": 512, "name": "N0"}),
    )
    .unwrap();
    assert_eq!(
        call(&mut m, "bdev_get_bdevs", json!({"name": "E0"})).unwrap()[0]["product_name"],
        "Null disk"
    );
    // Modules delete only their own bdevs.
    assert_eq!(
        call(&mut m, "bdev_echo_delete", json!({"name": "N0"}))
            .unwrap_err()
            .code,
        -19
    );
    assert_eq!(
        call(&mut m, "bdev_null_delete", json!({"name": "E0"}))
            .unwrap_err()
            .code,
        -19
    );
    let saved = call(&mut m, "framework_get_config", json!({"name": "bdev"})).unwrap();
    assert_eq!(saved[0]["method"], "bdev_echo_create");
    assert_eq!(saved[1]["method"], "bdev_null_create");
    assert_eq!(saved[2]["method"], "bdev_echo_set_options");
    m.tick_bdev_modules();
    assert_eq!(ticks.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(
        call(&mut m, "bdev_echo_delete", json!({"name": "E0"})),
        Ok(json!(true))
    );
    assert_eq!(m.bdevs().len(), 1);
}

#[test]
fn a_bdev_claimed_by_a_stacked_bdev_cannot_be_exported() {
    let (mut m, ops) = methods();
    call(
        &mut m,
        "bdev_malloc_create",
        json!({"name": "Malloc0", "num_blocks": 8, "block_size": 512}),
    )
    .unwrap();
    call(&mut m, "bdev_delay_create", json!({"base_bdev_name": "Malloc0", "name": "Delay0",
        "avg_read_latency": 1, "p99_read_latency": 1, "avg_write_latency": 1, "p99_write_latency": 1})).unwrap();
    let b = call(&mut m, "bdev_get_bdevs", json!({"name": "Malloc0"})).unwrap();
    assert_eq!(
        (&b[0]["claimed"], &b[0]["claim_type"]),
        (&json!(true), &json!("exclusive_write"))
    );
    let blk = json!({"ctrlr": "vhost.0", "dev_name": "Malloc0"});
    assert_eq!(
        call(&mut m, "vhost_create_blk_controller", blk.clone())
            .unwrap_err()
            .code,
        -1
    );
    assert!(ops.controllers.lock().unwrap().is_empty());
    // The stacked bdev is exportable; deleting it releases the base.
    call(
        &mut m,
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.1", "dev_name": "Delay0"}),
    )
    .unwrap();
    call(&mut m, "bdev_delay_delete", json!({"name": "Delay0"})).unwrap();
    assert_eq!(
        call(&mut m, "vhost_create_blk_controller", blk),
        Ok(json!(true))
    );
}

#[test]
fn controller_transports() {
    let vvu = |traddr: &str| ControllerTransport::Vvu {
        traddr: traddr.into(),
    };
    let blk = |t: Option<&str>, a: Option<&str>| controller_transport(t, a, "vhost_user_blk");
    assert_eq!(blk(None, None), Ok(ControllerTransport::Socket));
    assert_eq!(
        blk(Some("vhost_user_blk"), None),
        Ok(ControllerTransport::Socket)
    );
    assert_eq!(blk(Some("vvu_emu"), None), Ok(ControllerTransport::VvuEmu));
    // SPDK's short form of a PCI address is completed, so one function has one name.
    assert_eq!(blk(Some("vvu"), Some("00:04.0")), Ok(vvu("0000:00:04.0")));
    assert_eq!(
        blk(Some("vvu"), Some("0000:00:04.0")),
        Ok(vvu("0000:00:04.0"))
    );
    for (t, a) in [
        (Some("vvu"), None),
        (Some("vvu"), Some("00:04")),
        (Some("vvu"), Some("0000:00:20.0")),
        (Some("vvu_emu"), Some("0000:00:04.0")),
        (None, Some("0000:00:04.0")),
        (Some("vhost_user_scsi"), None),
        (Some("vfio_user"), None),
    ] {
        assert_eq!(blk(t, a).map_err(|e| e.code), Err(-22), "{t:?} {a:?}");
    }
    assert_eq!(
        controller_transport(Some("vhost_user_scsi"), None, "vhost_user_scsi"),
        Ok(ControllerTransport::Socket)
    );

    // A data plane without the transport refuses it; the socket transport goes through.
    let (mut m, ops) = methods();
    call(
        &mut m,
        "bdev_malloc_create",
        json!({"num_blocks": 8, "block_size": 512, "name": "M"}),
    )
    .unwrap();
    let r = call(
        &mut m,
        "vhost_create_blk_controller",
        json!({"ctrlr": "v", "dev_name": "M", "transport": "vvu_emu"}),
    );
    assert_eq!(r.map_err(|e| e.code), Err(-22));
    assert!(ops.controllers.lock().unwrap().is_empty());
    let r = call(
        &mut m,
        "vhost_create_blk_controller",
        json!({"ctrlr": "v", "dev_name": "M", "transport": "vhost_user_blk"}),
    );
    assert_eq!(r, Ok(json!(true)));
}
