//! CPU masks, core lists, thread pinning and NUMA placement for reactors.
//!
//! Masks use SPDK's syntax (`-m`/`--cpumask`, `cpumask` RPC parameters): a hexadecimal bit mask
//! with or without `0x` (`0x3`, `3`: cores 0 and 1; note `10` is hex, i.e. core 4), or a bracketed
//! list of cores and inclusive ranges (`[0,1]`, `[0-3,5]`). Blanks around items are allowed.
//!
//! NUMA information comes from hwloc (through `hwlocality`). If hwloc cannot load the topology,
//! everything still works: cores report no NUMA node and memory binding is skipped, with a warning.

use std::fmt;
use std::io;
use std::str::FromStr;

use hwlocality::memory::binding::{MemoryBindingFlags, MemoryBindingPolicy};
use hwlocality::object::types::ObjectType;
use hwlocality::Topology;

/// The highest number of CPUs a [`CpuSet`] holds (same as SPDK's `SPDK_CPUSET_SIZE` and glibc's
/// `CPU_SETSIZE`).
pub const MAX_CPUS: usize = 1024;

const WORDS: usize = MAX_CPUS / 64;

/// A set of CPU (core) numbers below [`MAX_CPUS`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CpuSet {
    bits: [u64; WORDS],
}

/// Why a CPU mask could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuMaskError {
    /// The mask is empty or blank.
    #[error("empty CPU mask")]
    Empty,
    /// A character that is not a hex digit in a hex mask.
    #[error("invalid character {ch:?} at position {pos} of CPU mask")]
    InvalidCharacter {
        /// The character.
        ch: char,
        /// Its byte position in the mask.
        pos: usize,
    },
    /// A hex mask sets a bit at or above [`MAX_CPUS`].
    #[error("CPU mask selects core {core} or higher, above the limit of {MAX_CPUS}")]
    CoreOutOfRange {
        /// The lowest offending core.
        core: usize,
    },
    /// A list is malformed (missing number, missing `]`, trailing characters).
    #[error("malformed CPU list: {0}")]
    BadList(&'static str),
    /// A range whose start is above its end (`[3-1]`).
    #[error("invalid CPU range {start}-{end}")]
    BadRange {
        /// First core of the range.
        start: usize,
        /// Last core of the range.
        end: usize,
    },
}

impl CpuSet {
    /// The empty set.
    pub const fn new() -> Self {
        CpuSet { bits: [0; WORDS] }
    }

    /// The set of the low 64 cores given as a bit mask (bit i = core i), as RPC `cpumask`s carry.
    pub const fn from_u64(mask: u64) -> Self {
        let mut bits = [0; WORDS];
        bits[0] = mask;
        CpuSet { bits }
    }

    /// The set as a 64-bit mask, if no core above 63 is in it.
    pub fn to_u64(&self) -> Option<u64> {
        if self.bits.iter().skip(1).all(|&w| w == 0) {
            self.bits.first().copied()
        } else {
            None
        }
    }

    /// Adds `core`; returns `false` (and changes nothing) if `core >= MAX_CPUS`.
    pub fn insert(&mut self, core: usize) -> bool {
        match self.bits.get_mut(core / 64) {
            Some(w) => {
                *w |= 1 << (core % 64);
                true
            }
            None => false,
        }
    }

    /// Removes `core`.
    pub fn remove(&mut self, core: usize) {
        if let Some(w) = self.bits.get_mut(core / 64) {
            *w &= !(1 << (core % 64));
        }
    }

    /// Whether `core` is in the set.
    pub fn contains(&self, core: usize) -> bool {
        self.bits
            .get(core / 64)
            .is_some_and(|w| w & (1 << (core % 64)) != 0)
    }

    /// Number of cores in the set.
    pub fn len(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|&w| w == 0)
    }

    /// The cores in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..MAX_CPUS).filter(move |&c| self.contains(c))
    }

    /// The lowest core, if any.
    pub fn first(&self) -> Option<usize> {
        self.iter().next()
    }

    /// Cores in both sets.
    pub fn intersection(&self, other: &CpuSet) -> CpuSet {
        let mut out = *self;
        for (a, b) in out.bits.iter_mut().zip(other.bits.iter()) {
            *a &= *b;
        }
        out
    }

    /// Whether every core of `self` is also in `other`.
    pub fn is_subset(&self, other: &CpuSet) -> bool {
        self.intersection(other) == *self
    }

    /// Parses an SPDK-style mask (see the module documentation).
    pub fn parse(mask: &str) -> Result<Self, CpuMaskError> {
        let trimmed = mask.trim_matches(is_blank);
        if trimmed.is_empty() {
            return Err(CpuMaskError::Empty);
        }
        // Positions in errors refer to the original string.
        let lead = mask.len() - mask.trim_start_matches(is_blank).len();
        if trimmed.starts_with('[') {
            parse_list(trimmed, lead)
        } else {
            parse_hex(trimmed, lead)
        }
    }

    pub(crate) fn to_libc(self) -> libc::cpu_set_t {
        // SAFETY: `cpu_set_t` is a plain bit array for which all-zeroes is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for core in self.iter() {
            // SAFETY: `core < MAX_CPUS == CPU_SETSIZE`, so CPU_SET writes inside `set`.
            unsafe { libc::CPU_SET(core, &mut set) };
        }
        set
    }

    fn from_libc(set: &libc::cpu_set_t) -> Self {
        let mut out = CpuSet::new();
        for core in 0..MAX_CPUS {
            // SAFETY: `core < MAX_CPUS == CPU_SETSIZE`, so CPU_ISSET reads inside `set`.
            if unsafe { libc::CPU_ISSET(core, set) } {
                out.insert(core);
            }
        }
        out
    }
}

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

fn parse_hex(mask: &str, lead: usize) -> Result<CpuSet, CpuMaskError> {
    let (digits, skip) = match mask.strip_prefix("0x").or_else(|| mask.strip_prefix("0X")) {
        Some(rest) => (rest, 2),
        None => (mask, 0),
    };
    if digits.is_empty() {
        return Err(CpuMaskError::Empty);
    }
    let mut set = CpuSet::new();
    for (i, (pos, ch)) in digits.char_indices().rev().enumerate() {
        let value = ch.to_digit(16).ok_or(CpuMaskError::InvalidCharacter {
            ch,
            pos: lead + skip + pos,
        })?;
        for bit in 0..4 {
            if value & (1 << bit) != 0 {
                let core = i
                    .checked_mul(4)
                    .and_then(|c| c.checked_add(bit))
                    .unwrap_or(usize::MAX);
                if !set.insert(core) {
                    return Err(CpuMaskError::CoreOutOfRange { core });
                }
            }
        }
    }
    Ok(set)
}

fn parse_list(mask: &str, lead: usize) -> Result<CpuSet, CpuMaskError> {
    let inner = mask
        .strip_prefix('[')
        .and_then(|m| m.strip_suffix(']'))
        .ok_or(CpuMaskError::BadList("missing closing ']'"))?;
    parse_core_list(inner, lead + 1)
}

/// Parses `a,b-c,...` (the body of a bracketed mask, and the format of sysfs CPU lists).
pub(crate) fn parse_core_list(list: &str, lead: usize) -> Result<CpuSet, CpuMaskError> {
    let mut set = CpuSet::new();
    let mut offset = lead;
    for item in list.split(',') {
        let (first, last) = match item.split_once('-') {
            Some((a, b)) => (parse_core(a, offset)?, parse_core(b, offset + a.len() + 1)?),
            None => {
                let c = parse_core(item, offset)?;
                (c, c)
            }
        };
        if first > last {
            return Err(CpuMaskError::BadRange {
                start: first,
                end: last,
            });
        }
        for core in first..=last {
            // Both ends were checked against MAX_CPUS by `parse_core`.
            set.insert(core);
        }
        offset += item.len() + 1;
    }
    Ok(set)
}

fn parse_core(text: &str, offset: usize) -> Result<usize, CpuMaskError> {
    let digits = text.trim_matches(is_blank);
    if digits.is_empty() {
        return Err(CpuMaskError::BadList("missing core number"));
    }
    let pos = offset + (text.len() - text.trim_start_matches(is_blank).len());
    if let Some((i, ch)) = digits.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        return Err(CpuMaskError::InvalidCharacter { ch, pos: pos + i });
    }
    match digits.parse::<usize>() {
        Ok(core) if core < MAX_CPUS => Ok(core),
        Ok(core) => Err(CpuMaskError::CoreOutOfRange { core }),
        Err(_) => Err(CpuMaskError::CoreOutOfRange { core: usize::MAX }),
    }
}

impl FromStr for CpuSet {
    type Err = CpuMaskError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CpuSet::parse(s)
    }
}

/// Formats as SPDK prints masks: lowercase hex with `0x` (`0x3`; the empty set is `0x0`).
impl fmt::Display for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let top = self.bits.iter().rposition(|&w| w != 0);
        match top {
            None => f.write_str("0x0"),
            Some(top) => {
                write!(f, "0x{:x}", self.bits.get(top).copied().unwrap_or(0))?;
                for w in self.bits.iter().take(top).rev() {
                    write!(f, "{w:016x}")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl FromIterator<usize> for CpuSet {
    /// Cores at or above [`MAX_CPUS`] are ignored.
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Self {
        let mut set = CpuSet::new();
        for core in iter {
            set.insert(core);
        }
        set
    }
}

/// Errors from pinning and core discovery.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// The core is offline or outside the cgroup's cpuset.
    #[error("core {core} is not available to this process (online cores: {allowed})")]
    CoreNotAvailable {
        /// The core asked for.
        core: usize,
        /// The cores that are online (boxed: a set is 128 bytes).
        allowed: Box<CpuSet>,
    },
    /// A system call failed.
    #[error("{call} failed: {source}")]
    Os {
        /// Which call.
        call: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A sysfs CPU list could not be parsed.
    #[error("cannot parse {path}: {source}")]
    Sysfs {
        /// The file.
        path: &'static str,
        /// Why.
        source: CpuMaskError,
    },
    /// hwloc refused to bind memory.
    #[error("binding memory to NUMA node {node} failed: {reason}")]
    MemoryBinding {
        /// The node.
        node: u32,
        /// hwloc's message.
        reason: String,
    },
    /// hwloc has no topology (it failed to load at start-up).
    #[error("NUMA topology unavailable")]
    NoTopology,
}

/// The cores the calling thread may run on (`sched_getaffinity`). Called at start-up, before any
/// pinning, this is what a reactor mask must be a subset of (what `taskset` or the cgroup allow).
pub fn allowed_cores() -> Result<CpuSet, CpuError> {
    // SAFETY: all-zeroes is a valid empty `cpu_set_t`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most `size_of::<cpu_set_t>()` bytes into `set`, which we own.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(CpuError::Os {
            call: "sched_getaffinity",
            source: io::Error::last_os_error(),
        });
    }
    Ok(CpuSet::from_libc(&set))
}

const ONLINE_PATH: &str = "/sys/devices/system/cpu/online";

/// The cores the kernel has online (`/sys/devices/system/cpu/online`).
pub fn online_cores() -> Result<CpuSet, CpuError> {
    let text = std::fs::read_to_string(ONLINE_PATH).map_err(|source| CpuError::Os {
        call: "read /sys/devices/system/cpu/online",
        source,
    })?;
    parse_core_list(text.trim(), 0).map_err(|source| CpuError::Sysfs {
        path: ONLINE_PATH,
        source,
    })
}

/// Pins the calling thread to `core` alone.
///
/// The core must be online and allowed by the process's cgroup cpuset; the thread's current
/// affinity does not matter (a pinned thread may be re-pinned anywhere the process may run).
pub fn pin_current_thread(core: usize) -> Result<(), CpuError> {
    let online = online_cores()?;
    let not_available = |online: CpuSet| CpuError::CoreNotAvailable {
        core,
        allowed: Box::new(online),
    };
    if !online.contains(core) {
        return Err(not_available(online));
    }
    let mut one = CpuSet::new();
    one.insert(core);
    match set_current_thread_affinity(&one) {
        // EINVAL: the core is outside the cgroup's cpuset.
        Err(CpuError::Os { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
            Err(not_available(online))
        }
        other => other,
    }
}

/// Restricts the calling thread to `cores`.
pub fn set_current_thread_affinity(cores: &CpuSet) -> Result<(), CpuError> {
    let set = cores.to_libc();
    // SAFETY: `set` is a valid, initialised `cpu_set_t` of the size we pass; pid 0 is this thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(CpuError::Os {
            call: "sched_setaffinity",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The core the calling thread is running on right now.
pub fn current_core() -> Option<usize> {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).ok()
}

/// One core and where it sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoreInfo {
    /// The OS core (PU) number.
    pub core: usize,
    /// Its NUMA node, if hwloc knows.
    pub numa_node: Option<u32>,
}

/// The machine's NUMA layout as hwloc sees it, or nothing if hwloc failed (with a warning).
#[derive(Debug)]
pub struct NumaTopology {
    topology: Option<Topology>,
    /// `(node os index, cores of that node)` for every NUMA node.
    nodes: Vec<(u32, CpuSet)>,
}

impl NumaTopology {
    /// Loads the topology through hwloc; on failure warns and returns one that knows no nodes.
    pub fn detect() -> Self {
        match Topology::new() {
            Ok(topology) => {
                let nodes = topology
                    .objects_with_type(ObjectType::NUMANode)
                    .filter_map(|node| {
                        let index = u32::try_from(node.os_index()?).ok()?;
                        let cores: CpuSet = node.cpuset()?.iter_set().map(usize::from).collect();
                        Some((index, cores))
                    })
                    .collect();
                NumaTopology {
                    topology: Some(topology),
                    nodes,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "hwloc could not load the topology; NUMA placement disabled");
                Self::unknown()
            }
        }
    }

    /// A topology that knows nothing (every query answers "unknown").
    pub fn unknown() -> Self {
        NumaTopology {
            topology: None,
            nodes: Vec::new(),
        }
    }

    /// Whether hwloc loaded the topology.
    pub fn is_known(&self) -> bool {
        self.topology.is_some()
    }

    /// The NUMA node of `core`, if known.
    pub fn numa_node(&self, core: usize) -> Option<u32> {
        self.nodes
            .iter()
            .find(|(_, cores)| cores.contains(core))
            .map(|(node, _)| *node)
    }

    /// The NUMA nodes and their cores.
    pub fn nodes(&self) -> impl Iterator<Item = (u32, &CpuSet)> + '_ {
        self.nodes.iter().map(|(n, c)| (*n, c))
    }

    /// Every core of `cores` with its NUMA node.
    pub fn describe(&self, cores: &CpuSet) -> Vec<CoreInfo> {
        cores
            .iter()
            .map(|core| CoreInfo {
                core,
                numa_node: self.numa_node(core),
            })
            .collect()
    }

    /// Makes the calling thread's future allocations come from NUMA node `node`.
    pub fn bind_thread_memory(&self, node: u32) -> Result<(), CpuError> {
        let topology = self.topology.as_ref().ok_or(CpuError::NoTopology)?;
        let nodeset = topology
            .objects_with_type(ObjectType::NUMANode)
            .find(|n| n.os_index() == usize::try_from(node).ok())
            .and_then(|n| n.nodeset())
            .map(|set| set.clone_target())
            .ok_or(CpuError::MemoryBinding {
                node,
                reason: "no such NUMA node".into(),
            })?;
        topology
            .bind_memory(
                &nodeset,
                MemoryBindingPolicy::Bind,
                MemoryBindingFlags::THREAD,
            )
            .map_err(|e| CpuError::MemoryBinding {
                node,
                reason: e.to_string(),
            })
    }
}

/// Where a reactor thread ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReactorPlacement {
    /// The core it is pinned to.
    pub core: usize,
    /// The core's NUMA node, if known.
    pub numa_node: Option<u32>,
    /// Whether the thread's memory is bound to that node.
    pub memory_bound: bool,
}

/// Pins the calling thread to `core` and binds its memory to the core's NUMA node.
///
/// Pinning failures are errors (a reactor off its core breaks the lock-free design's assumptions);
/// memory binding is best effort and only warns, because many containers forbid `set_mempolicy`.
pub fn pin_reactor(core: usize, topology: &NumaTopology) -> Result<ReactorPlacement, CpuError> {
    pin_current_thread(core)?;
    let numa_node = topology.numa_node(core);
    let memory_bound = match numa_node {
        Some(node) => match topology.bind_thread_memory(node) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(core, node, error = %e, "could not bind reactor memory to its NUMA node");
                false
            }
        },
        None => {
            if topology.is_known() {
                tracing::warn!(core, "hwloc reports no NUMA node for this core");
            }
            false
        }
    };
    tracing::info!(core, ?numa_node, memory_bound, "reactor thread pinned");
    Ok(ReactorPlacement {
        core,
        numa_node,
        memory_bound,
    })
}
