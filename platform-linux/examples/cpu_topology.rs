//! Prints the cores this process may use, their NUMA nodes, and what pinning a reactor to each
//! would do: `cargo run -p rvhost-platform-linux --example cpu_topology [MASK]`.

use rvhost_platform_linux::{allowed_cores, online_cores, pin_reactor, CpuSet, NumaTopology};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let online = online_cores()?;
    let allowed = allowed_cores()?;
    let mask = match std::env::args().nth(1) {
        Some(text) => CpuSet::parse(&text)?,
        None => allowed,
    };
    println!("online cores:  {online} {online:?}");
    println!("allowed cores: {allowed} {allowed:?}");
    println!("reactor mask:  {mask} {mask:?}");
    let topology = NumaTopology::detect();
    println!("hwloc topology loaded: {}", topology.is_known());
    for (node, cores) in topology.nodes() {
        println!("  NUMA node {node}: cores {cores:?}");
    }
    for core in mask.iter() {
        let placement = std::thread::spawn(move || pin_reactor(core, &NumaTopology::detect()))
            .join()
            .map_err(|_| "pinning thread panicked")??;
        println!(
            "core {core}: numa node {:?}, memory bound to node: {}",
            placement.numa_node, placement.memory_bound
        );
    }
    Ok(())
}
