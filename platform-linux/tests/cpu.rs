//! CPU mask parsing (SPDK syntax), pinning and NUMA lookup.

use proptest::prelude::*;
use rvhost_platform_linux::cpu::{current_core, set_current_thread_affinity, MAX_CPUS};
use rvhost_platform_linux::{
    allowed_cores, online_cores, pin_current_thread, pin_reactor, CpuError, CpuMaskError, CpuSet,
    NumaTopology,
};

fn cores(mask: &str) -> Vec<usize> {
    CpuSet::parse(mask)
        .unwrap_or_else(|e| panic!("{mask:?}: {e}"))
        .iter()
        .collect()
}

#[test]
fn hex_masks() {
    assert_eq!(cores("0x3"), [0, 1]);
    assert_eq!(cores("0X3"), [0, 1]);
    assert_eq!(cores("3"), [0, 1]);
    assert_eq!(cores("0x1"), [0]);
    // Without a prefix the digits are still hex, as in SPDK: "10" is core 4, not core 10.
    assert_eq!(cores("10"), [4]);
    assert_eq!(cores("0xF0"), [4, 5, 6, 7]);
    assert_eq!(cores("0xaBc"), [2, 3, 4, 5, 7, 9, 11]);
    assert_eq!(cores("0x8000000000000001"), [0, 63]);
    assert_eq!(cores("0x10000000000000000"), [64]);
    assert_eq!(cores("  0x5\t"), [0, 2]);
    assert_eq!(cores("0x0"), Vec::<usize>::new());
    assert_eq!(
        cores("000000000000000000000000000000000000000000000001"),
        [0]
    );
    // The highest representable core: 256 hex digits.
    let top = format!("0x8{}", "0".repeat(255));
    assert_eq!(cores(&top), [MAX_CPUS - 1]);
}

#[test]
fn hex_mask_errors() {
    assert_eq!(CpuSet::parse(""), Err(CpuMaskError::Empty));
    assert_eq!(CpuSet::parse("   "), Err(CpuMaskError::Empty));
    assert_eq!(CpuSet::parse("0x"), Err(CpuMaskError::Empty));
    assert_eq!(
        CpuSet::parse("0xg"),
        Err(CpuMaskError::InvalidCharacter { ch: 'g', pos: 2 })
    );
    assert_eq!(
        CpuSet::parse(" 1 2"),
        Err(CpuMaskError::InvalidCharacter { ch: ' ', pos: 2 })
    );
    assert_eq!(
        CpuSet::parse("-1"),
        Err(CpuMaskError::InvalidCharacter { ch: '-', pos: 0 })
    );
    assert_eq!(
        CpuSet::parse("0x3]"),
        Err(CpuMaskError::InvalidCharacter { ch: ']', pos: 3 })
    );
    assert_eq!(
        CpuSet::parse("0xé"),
        Err(CpuMaskError::InvalidCharacter { ch: 'é', pos: 2 })
    );
    let too_big = format!("0x1{}", "0".repeat(256));
    assert_eq!(
        CpuSet::parse(&too_big),
        Err(CpuMaskError::CoreOutOfRange { core: 1024 })
    );
    // Leading zeros beyond the limit are harmless.
    let padded = format!("0x{}1", "0".repeat(300));
    assert_eq!(cores(&padded), [0]);
}

#[test]
fn list_masks() {
    assert_eq!(cores("[0,1]"), [0, 1]);
    assert_eq!(cores("[0-3,5]"), [0, 1, 2, 3, 5]);
    assert_eq!(cores("[5]"), [5]);
    assert_eq!(cores("[2-2]"), [2]);
    assert_eq!(cores("[ 0 - 2 , 7 ]"), [0, 1, 2, 7]);
    assert_eq!(cores("[1,1,0-1]"), [0, 1]);
    assert_eq!(cores("[1023]"), [1023]);
    assert_eq!(cores("[10]"), [10], "inside brackets numbers are decimal");
    assert_eq!(CpuSet::parse("[0-1023]").unwrap().len(), MAX_CPUS);
}

#[test]
fn list_mask_errors() {
    assert_eq!(
        CpuSet::parse("[0,1"),
        Err(CpuMaskError::BadList("missing closing ']'"))
    );
    assert_eq!(
        CpuSet::parse("[]"),
        Err(CpuMaskError::BadList("missing core number"))
    );
    assert_eq!(
        CpuSet::parse("[0,]"),
        Err(CpuMaskError::BadList("missing core number"))
    );
    assert_eq!(
        CpuSet::parse("[,0]"),
        Err(CpuMaskError::BadList("missing core number"))
    );
    assert_eq!(
        CpuSet::parse("[-3]"),
        Err(CpuMaskError::BadList("missing core number"))
    );
    assert_eq!(
        CpuSet::parse("[3-]"),
        Err(CpuMaskError::BadList("missing core number"))
    );
    assert_eq!(
        CpuSet::parse("[3-1]"),
        Err(CpuMaskError::BadRange { start: 3, end: 1 })
    );
    assert_eq!(
        CpuSet::parse("[1024]"),
        Err(CpuMaskError::CoreOutOfRange { core: 1024 })
    );
    assert_eq!(
        CpuSet::parse("[0-1024]"),
        Err(CpuMaskError::CoreOutOfRange { core: 1024 })
    );
    assert!(matches!(
        CpuSet::parse("[99999999999999999999999]"),
        Err(CpuMaskError::CoreOutOfRange { .. })
    ));
    assert_eq!(
        CpuSet::parse("[0x1]"),
        Err(CpuMaskError::InvalidCharacter { ch: 'x', pos: 2 })
    );
    assert_eq!(
        CpuSet::parse("[1-2-3]"),
        Err(CpuMaskError::InvalidCharacter { ch: '-', pos: 4 })
    );
    assert_eq!(
        CpuSet::parse("[0] 1"),
        Err(CpuMaskError::BadList("missing closing ']'"))
    );
    assert_eq!(
        CpuSet::parse("[0;1]"),
        Err(CpuMaskError::InvalidCharacter { ch: ';', pos: 2 })
    );
}

#[test]
fn display_is_spdk_hex() {
    assert_eq!(CpuSet::parse("[0,1]").unwrap().to_string(), "0x3");
    assert_eq!(CpuSet::parse("[4]").unwrap().to_string(), "0x10");
    assert_eq!(CpuSet::new().to_string(), "0x0");
    assert_eq!(
        CpuSet::parse("[0,64]").unwrap().to_string(),
        "0x10000000000000001"
    );
    assert_eq!(CpuSet::from_u64(0x3).to_u64(), Some(3));
    assert_eq!(CpuSet::parse("[64]").unwrap().to_u64(), None);
    let set: CpuSet = [1usize, 3, 5000].into_iter().collect();
    assert_eq!(set.iter().collect::<Vec<_>>(), [1, 3]);
    assert_eq!(format!("{set:?}"), "{1, 3}");
}

proptest! {
    /// Printing a set and parsing it back gives the same set, in both syntaxes.
    #[test]
    fn print_parse_roundtrip(list in prop::collection::btree_set(0usize..MAX_CPUS, 0..40)) {
        let set: CpuSet = list.iter().copied().collect();
        prop_assert_eq!(CpuSet::parse(&set.to_string()).unwrap(), set);
        prop_assert_eq!(set.len(), list.len());
        if !list.is_empty() {
            let text = format!("[{}]", list.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","));
            prop_assert_eq!(CpuSet::parse(&text).unwrap(), set);
        }
    }

    /// No input makes the parser panic.
    #[test]
    fn parser_never_panics(s in "\\PC{0,40}") {
        let _ = CpuSet::parse(&s);
    }

    #[test]
    fn bracket_noise_never_panics(s in "\\[[0-9, \\-]{0,20}\\]?") {
        let _ = CpuSet::parse(&s);
    }
}

#[test]
fn core_discovery() {
    let online = online_cores().unwrap();
    let allowed = allowed_cores().unwrap();
    assert!(!allowed.is_empty());
    assert!(
        allowed.is_subset(&online),
        "allowed {allowed} not within online {online}"
    );
}

#[test]
fn pinning_moves_the_thread() {
    let allowed = allowed_cores().unwrap();
    let targets: Vec<usize> = allowed.iter().collect();
    std::thread::spawn(move || {
        for &core in &targets {
            pin_current_thread(core).unwrap();
            assert_eq!(allowed_cores().unwrap().iter().collect::<Vec<_>>(), [core]);
            // The scheduler moves us at the next opportunity; yield until it has.
            for _ in 0..1000 {
                if current_core() == Some(core) {
                    break;
                }
                std::thread::yield_now();
            }
            assert_eq!(current_core(), Some(core));
        }
        // Widening again works, and asking for a core we may not use is a typed error.
        set_current_thread_affinity(&allowed).unwrap();
        assert_eq!(allowed_cores().unwrap(), allowed);
        let missing = (0..MAX_CPUS).find(|c| !allowed.contains(*c)).unwrap();
        assert!(matches!(pin_current_thread(missing), Err(CpuError::CoreNotAvailable { core, .. }) if core == missing));
        assert!(matches!(set_current_thread_affinity(&CpuSet::new()), Err(CpuError::Os { .. })));
    })
    .join()
    .unwrap();
}

#[test]
fn numa_topology_and_reactor_pinning() {
    let topology = NumaTopology::detect();
    let allowed = allowed_cores().unwrap();
    let described = topology.describe(&allowed);
    assert_eq!(described.len(), allowed.len());
    if topology.is_known() {
        // Every core sits on exactly one NUMA node, and the nodes cover every allowed core.
        for info in &described {
            let node = info
                .numa_node
                .unwrap_or_else(|| panic!("core {} has no NUMA node", info.core));
            assert_eq!(
                topology
                    .nodes()
                    .filter(|(_, c)| c.contains(info.core))
                    .count(),
                1
            );
            assert!(topology.nodes().any(|(n, _)| n == node));
        }
    }
    let core = allowed.iter().last().unwrap();
    let (placement, policy) = std::thread::spawn(move || {
        let topology = NumaTopology::detect();
        let placement = pin_reactor(core, &topology).unwrap();
        assert_eq!(allowed_cores().unwrap().iter().collect::<Vec<_>>(), [core]);
        (placement, thread_mempolicy())
    })
    .join()
    .unwrap();
    assert_eq!(placement.core, core);
    assert_eq!(placement.numa_node, topology.numa_node(core));
    if placement.memory_bound {
        // The kernel agrees: the thread has a non-default policy naming the core's node.
        let (mode, nodes) = policy.expect("get_mempolicy");
        assert_ne!(mode, libc::MPOL_DEFAULT);
        let node = placement.numa_node.unwrap();
        assert_ne!(
            nodes & (1 << node),
            0,
            "policy nodes {nodes:#x} lack node {node}"
        );
    } else {
        // Binding may be refused (containers forbid set_mempolicy), but never for a lack of trying
        // when hwloc knows the node.
        eprintln!("memory binding not in effect here: {placement:?}");
    }
    // Without a topology pinning still works and memory binding is skipped.
    let unknown = NumaTopology::unknown();
    let placement = std::thread::spawn(move || pin_reactor(core, &unknown).unwrap())
        .join()
        .unwrap();
    assert_eq!(placement.numa_node, None);
    assert!(!placement.memory_bound);
    assert!(matches!(
        NumaTopology::unknown().bind_thread_memory(0),
        Err(CpuError::NoTopology)
    ));
}

/// The calling thread's NUMA memory policy: (mode, first word of the node mask).
fn thread_mempolicy() -> Option<(i32, u64)> {
    let mut mode: libc::c_int = -1;
    let mut mask = [0 as libc::c_ulong; 16];
    // SAFETY: get_mempolicy writes one int and at most `maxnode` bits (16 * 64) into our buffers;
    // addr is unused without MPOL_F_ADDR.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut libc::c_int,
            mask.as_mut_ptr(),
            (mask.len() * 64) as libc::c_ulong,
            std::ptr::null_mut::<libc::c_void>(),
            0 as libc::c_ulong,
        )
    };
    (rc == 0).then(|| (mode, mask[0]))
}
