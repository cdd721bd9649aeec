//! The guest's kernel (a Debian package, fetched once and cached) and its initramfs (busybox, the
//! needed kernel modules with their dependencies, helper binaries and the test script).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::cpio::CpioWriter;
use crate::error::{HarnessError, Result};
use crate::host::{self, FileLock};

const COMPLETE_MARKER: &str = ".complete";

/// An extracted Debian kernel package with a generated `modules.dep`.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// e.g. `linux-image-6.1.0-56-amd64`
    pub package: String,
    /// e.g. `6.1.0-56-amd64`
    pub release: String,
    /// The bootable `vmlinuz`.
    pub image: PathBuf,
    /// `lib/modules/<release>` inside the extracted package.
    pub modules_dir: PathBuf,
}

/// A kernel module to put into the initramfs, in load order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFile {
    pub name: String,
    pub path: PathBuf,
}

impl Kernel {
    /// The cached kernel, downloading and extracting it on first use. `RVHOST_GUEST_KERNEL_PKG`
    /// picks a specific package (e.g. `linux-image-6.1.0-56-amd64`).
    pub fn get() -> Result<Self> {
        static KERNEL: OnceLock<std::result::Result<Kernel, String>> = OnceLock::new();
        KERNEL
            .get_or_init(|| Self::prepare().map_err(|e| e.to_string()))
            .clone()
            .map_err(HarnessError::NoKernel)
    }

    fn prepare() -> Result<Self> {
        host::ensure_host_tools()?;
        let dir = host::assets_dir();
        host::create_dir_all(&dir)?;
        let wanted = std::env::var("RVHOST_GUEST_KERNEL_PKG").ok();
        if let Some(found) = Self::cached(&dir, wanted.as_deref())? {
            return Ok(found);
        }
        let _lock = FileLock::acquire(&dir.join("kernel.lock"))?;
        // Another process may have finished the download while we waited for the lock.
        if let Some(found) = Self::cached(&dir, wanted.as_deref())? {
            return Ok(found);
        }
        let package = match wanted {
            Some(p) => p,
            None => resolve_kernel_package()?,
        };
        fetch_and_extract(&dir, &package)?;
        Self::cached(&dir, Some(&package))?.ok_or_else(|| {
            HarnessError::NoKernel(format!("{package} was extracted but is not usable"))
        })
    }

    /// The newest completely extracted kernel in the cache (or the wanted one).
    fn cached(dir: &Path, wanted: Option<&str>) -> Result<Option<Self>> {
        let entries =
            std::fs::read_dir(dir).map_err(|e| HarnessError::io("list assets", dir, e))?;
        let mut candidates: Vec<(Vec<u64>, PathBuf)> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.join(COMPLETE_MARKER).is_file())
            .filter_map(|path| {
                let name = path.file_name()?.to_str()?.to_owned();
                let keep = match wanted {
                    Some(w) => name == w,
                    None => name.starts_with("linux-image-"),
                };
                keep.then(|| (version_key(&name), path))
            })
            .collect();
        candidates.sort();
        let Some((_, path)) = candidates.pop() else {
            return Ok(None);
        };
        Self::from_tree(&path).map(Some)
    }

    fn from_tree(tree: &Path) -> Result<Self> {
        let marker = tree.join(COMPLETE_MARKER);
        let text = std::fs::read_to_string(&marker)
            .map_err(|e| HarnessError::io("read kernel marker", &marker, e))?;
        let mut words = text.split_whitespace();
        let (Some(package), Some(release)) = (words.next(), words.next()) else {
            return Err(HarnessError::NoKernel(format!(
                "malformed {}",
                marker.display()
            )));
        };
        Ok(Self {
            package: package.to_owned(),
            release: release.to_owned(),
            image: tree.join("boot").join(format!("vmlinuz-{release}")),
            modules_dir: tree.join("lib").join("modules").join(release),
        })
    }

    /// The modules named (e.g. `virtio_blk`) plus everything they depend on, dependencies first;
    /// modules built into the kernel are left out.
    pub fn module_closure(&self, names: &[&str]) -> Result<Vec<ModuleFile>> {
        let dep_path = self.modules_dir.join("modules.dep");
        let dep_text = std::fs::read_to_string(&dep_path)
            .map_err(|e| HarnessError::io("read modules.dep", &dep_path, e))?;
        let builtin_path = self.modules_dir.join("modules.builtin");
        let builtin_text = std::fs::read_to_string(&builtin_path).unwrap_or_default();
        let graph = parse_modules_dep(&dep_text);
        let builtin: HashSet<String> = builtin_text.lines().map(module_name).collect();

        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for &name in names {
            let name = module_name(name);
            if graph.contains_key(&name) {
                visit(&graph, &name, &mut seen, &mut order);
            } else if !builtin.contains(&name) {
                return Err(HarnessError::ModuleNotFound(name));
            }
        }
        Ok(order
            .into_iter()
            .filter_map(|name| {
                let (rel, _) = graph.get(&name)?;
                Some(ModuleFile {
                    path: self.modules_dir.join(rel),
                    name,
                })
            })
            .collect())
    }
}

/// `linux-image-6.1.0-56-amd64` sorts by its numbers: (6, 1, 0, 56).
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// `kernel/drivers/block/virtio_blk.ko.xz` -> `virtio_blk`; `virtio-blk` -> `virtio_blk`.
fn module_name(path_or_name: &str) -> String {
    let file = path_or_name
        .rsplit('/')
        .next()
        .unwrap_or(path_or_name)
        .trim();
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// name -> (path relative to the modules dir, names of its dependencies)
type DepGraph = BTreeMap<String, (String, Vec<String>)>;

fn parse_modules_dep(text: &str) -> DepGraph {
    text.lines()
        .filter_map(|line| {
            let (module, deps) = line.split_once(':')?;
            let deps = deps.split_whitespace().map(module_name).collect();
            Some((module_name(module), (module.trim().to_owned(), deps)))
        })
        .collect()
}

fn visit(graph: &DepGraph, name: &str, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
    if !seen.insert(name.to_owned()) {
        return;
    }
    if let Some((_, deps)) = graph.get(name) {
        // modules.dep lists a module's whole closure, innermost last.
        for dep in deps.iter().rev() {
            visit(graph, dep, seen, order);
        }
    }
    order.push(name.to_owned());
}

/// The package behind the `linux-image-amd64` metapackage, else the newest `linux-image-6.1*`.
fn resolve_kernel_package() -> Result<String> {
    let depends =
        host::run_stdout(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))
            .unwrap_or_default();
    if let Some(pkg) = depends.lines().find_map(|line| {
        let dep = line.trim().strip_prefix("Depends:")?.trim();
        (dep.starts_with("linux-image-") && dep.ends_with("-amd64")).then(|| dep.to_owned())
    }) {
        return Ok(pkg);
    }
    let search = host::run_stdout(Command::new("apt-cache").args([
        "search",
        "--names-only",
        r"^linux-image-6\.1\.0-[0-9]+-amd64$",
    ]))?;
    search
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .max_by_key(|name| version_key(name))
        .map(str::to_owned)
        .ok_or_else(|| HarnessError::NoKernel("apt-cache offers no linux-image-6.1*-amd64".into()))
}

fn fetch_and_extract(dir: &Path, package: &str) -> Result<()> {
    let work = dir.join(format!("tmp-{}-{package}", std::process::id()));
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(|e| HarnessError::io("clean", &work, e))?;
    }
    host::create_dir_all(&work)?;
    tracing::info!(package, "downloading the guest kernel");
    let download = || {
        host::run(
            Command::new("apt-get")
                .args(["download", package])
                .current_dir(&work),
        )
    };
    if download().is_err() {
        // Stale package lists are the usual cause; refresh once.
        host::run(Command::new("apt-get").args(["update", "-qq"]))?;
        download()?;
    }
    let deb = std::fs::read_dir(&work)
        .map_err(|e| HarnessError::io("list download", &work, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|ext| ext == "deb"))
        .ok_or_else(|| {
            HarnessError::NoKernel(format!("apt-get download {package} left no .deb"))
        })?;
    let tree = work.join("tree");
    host::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&tree))?;

    let boot = tree.join("boot");
    let release = std::fs::read_dir(&boot)
        .map_err(|e| HarnessError::io("list boot", &boot, e))?
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_owned)
        })
        .next()
        .ok_or_else(|| HarnessError::NoKernel(format!("{package} has no /boot/vmlinuz-*")))?;
    // Newer packages ship modules under usr/lib; depmod -b and our paths expect lib/modules.
    let usr_modules = tree.join("usr/lib/modules");
    if !tree.join("lib/modules").exists() && usr_modules.exists() {
        std::os::unix::fs::symlink("usr/lib", tree.join("lib"))
            .map_err(|e| HarnessError::io("link lib", &tree, e))?;
    }
    // The package's postinst would run depmod; we need modules.dep for dependency resolution.
    host::run(Command::new("depmod").arg("-b").arg(&tree).arg(&release))?;
    let marker = tree.join(COMPLETE_MARKER);
    std::fs::write(&marker, format!("{package} {release}\n"))
        .map_err(|e| HarnessError::io("write marker", &marker, e))?;
    let dest = dir.join(package);
    std::fs::rename(&tree, &dest).map_err(|e| HarnessError::io("install kernel", &dest, e))?;
    std::fs::remove_dir_all(&work).map_err(|e| HarnessError::io("clean", &work, e))?;
    Ok(())
}

/// Reads a module, decompressing `.ko.xz`/`.ko.zst`/`.ko.gz` on the host (busybox `insmod` cannot).
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let decompressor = if name.ends_with(".ko.xz") {
        Some("xz")
    } else if name.ends_with(".ko.zst") {
        Some("zstd")
    } else if name.ends_with(".ko.gz") {
        Some("gzip")
    } else {
        None
    };
    match decompressor {
        None => std::fs::read(path).map_err(|e| HarnessError::io("read module", path, e)),
        Some(tool) => host::run(Command::new(tool).arg("-dc").arg(path)).map(|out| out.stdout),
    }
}

/// Shared libraries a dynamic executable needs (from `ldd`), as absolute host paths.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| HarnessError::io("run ldd", binary, e))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    Ok(text
        .lines()
        .filter_map(|line| {
            let candidate = match line.split_once("=>") {
                Some((_, rhs)) => rhs.trim(),
                None => line.trim(),
            };
            let path = candidate.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// What goes into one guest's initramfs besides busybox and `/init`.
#[derive(Debug, Clone, Default)]
pub struct InitramfsSpec {
    /// Kernel modules to load (dependencies are added), e.g. `virtio_pci`, `virtio_blk`.
    pub modules: Vec<String>,
    /// Host executables copied to `/bin/<name>` (their shared libraries come along).
    pub binaries: Vec<PathBuf>,
    /// The test script, run by `/init` with its stdout going to the results port.
    pub script: String,
    /// Variables exported to the script.
    pub env: Vec<(String, String)>,
}

const INIT_SCRIPT: &str = include_str!("../guest/init.sh");
const GUEST_LIBRARY: &str = include_str!("../guest/lib.sh");

/// Writes a gzip-compressed newc initramfs for `spec` to `out`.
pub fn build_initramfs(kernel: &Kernel, spec: &InitramfsSpec, out: &Path) -> Result<()> {
    let mut cpio = CpioWriter::new();
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "etc", "root",
    ] {
        cpio.dir(dir)?;
    }
    // Without /dev/console the kernel starts /init with no stdin/stdout at all.
    cpio.char_device("dev/console", 0o600, 5, 1)?;

    let busybox = host::which("busybox").ok_or_else(|| HarnessError::MissingTool {
        tool: "busybox".into(),
        detail: "install busybox-static".into(),
    })?;
    let busybox_bytes =
        std::fs::read(&busybox).map_err(|e| HarnessError::io("read busybox", &busybox, e))?;
    cpio.file("bin/busybox", 0o755, &busybox_bytes)?;
    cpio.symlink("bin/sh", "busybox")?;
    cpio.file("init", 0o755, INIT_SCRIPT.as_bytes())?;
    cpio.file("lib/guest.sh", 0o644, GUEST_LIBRARY.as_bytes())?;

    let names: Vec<&str> = spec.modules.iter().map(String::as_str).collect();
    let modules = kernel.module_closure(&names)?;
    let mut load_order = String::new();
    for module in &modules {
        cpio.file(
            &format!("lib/modules/{}.ko", module.name),
            0o644,
            &module_bytes(&module.path)?,
        )?;
        load_order.push_str(&module.name);
        load_order.push('\n');
    }
    cpio.file("etc/modules", 0o644, load_order.as_bytes())?;

    let mut libraries = BTreeSet::new();
    for binary in &spec.binaries {
        let name = binary.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            HarnessError::io(
                "name binary",
                binary,
                std::io::ErrorKind::InvalidInput.into(),
            )
        })?;
        let bytes =
            std::fs::read(binary).map_err(|e| HarnessError::io("read binary", binary, e))?;
        cpio.file(&format!("bin/{name}"), 0o755, &bytes)?;
        libraries.extend(shared_libraries(binary)?);
    }
    for library in &libraries {
        let bytes =
            std::fs::read(library).map_err(|e| HarnessError::io("read library", library, e))?;
        cpio.file(&library.to_string_lossy(), 0o755, &bytes)?;
    }

    let mut script = String::from("#!/bin/sh\n");
    for (key, value) in &spec.env {
        script.push_str(&format!(
            "export {key}='{}'\n",
            value.replace('\'', r"'\''")
        ));
    }
    script.push_str(&spec.script);
    cpio.file("test.sh", 0o755, script.as_bytes())?;

    gzip_to(&cpio.finish(), out)
}

fn gzip_to(data: &[u8], out: &Path) -> Result<()> {
    let file =
        std::fs::File::create(out).map_err(|e| HarnessError::io("create initramfs", out, e))?;
    let mut child = Command::new("gzip")
        .args(["-1", "-n", "-c"])
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .map_err(|e| HarnessError::io("run gzip", out, e))?;
    let written = match child.stdin.take() {
        Some(mut stdin) => stdin.write_all(data),
        None => Err(std::io::ErrorKind::BrokenPipe.into()),
    };
    let status = child
        .wait()
        .map_err(|e| HarnessError::io("wait for gzip", out, e))?;
    written.map_err(|e| HarnessError::io("feed gzip", out, e))?;
    if !status.success() {
        return Err(HarnessError::Command {
            command: "gzip -1 -n -c".into(),
            status: status.to_string(),
            output: String::new(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/scsi/sd_mod.ko: kernel/block/t10-pi.ko kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko
kernel/block/t10-pi.ko:
kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_common.ko:
";

    fn closure(names: &[&str]) -> Vec<String> {
        let graph = parse_modules_dep(DEP);
        let mut seen = BTreeSet::new();
        let mut order = Vec::new();
        for n in names {
            visit(&graph, &module_name(n), &mut seen, &mut order);
        }
        order
    }

    #[test]
    fn dependencies_load_first_and_once() {
        let order = closure(&["virtio_pci", "virtio_blk"]);
        assert_eq!(
            order,
            [
                "virtio_ring",
                "virtio",
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio_pci",
                "virtio_blk"
            ]
        );
        let scsi = closure(&["sd_mod"]);
        assert_eq!(scsi, ["scsi_common", "scsi_mod", "t10_pi", "sd_mod"]);
    }

    #[test]
    fn names_are_normalised() {
        assert_eq!(
            module_name("kernel/drivers/block/virtio_blk.ko.xz"),
            "virtio_blk"
        );
        assert_eq!(module_name("kernel/block/t10-pi.ko"), "t10_pi");
        assert_eq!(module_name("virtio-scsi"), "virtio_scsi");
    }

    #[test]
    fn kernel_packages_sort_numerically() {
        let mut names = ["linux-image-6.1.0-9-amd64", "linux-image-6.1.0-56-amd64"];
        names.sort_by_key(|n| version_key(n));
        assert_eq!(names[1], "linux-image-6.1.0-56-amd64");
    }
}
