//! The `rvhost` command line, modelled on SPDK's `vhost` application.

use std::path::PathBuf;

use clap::Parser;
use rvhost_platform_linux::cpu::CpuSet;

/// The default RPC socket, where SPDK's `rpc.py`/`spdk-rpc` look without `-s`.
pub const DEFAULT_RPC_SOCKET: &str = "/var/tmp/spdk.sock";

/// The default directory for controller sockets.
pub const DEFAULT_SOCKET_DIR: &str = "/var/tmp";

/// rvhost: a poll-mode vhost-user storage target. It serves virtio-blk and virtio-scsi disks to
/// QEMU guests from reactor threads pinned to cores, and is configured over SPDK-compatible
/// JSON-RPC (SPDK's `spdk-rpc` works against it).
///
/// Controllers: vhost-user-blk (one bdev; vhost_create_blk_controller) and vhost-user-scsi
/// (bdevs as targets 0-7, attached and detached while the guest runs;
/// vhost_create_scsi_controller, vhost_scsi_controller_add_target). Bdevs: RAM
/// (bdev_malloc_create), null, files and block devices through io_uring or Linux AIO
/// (bdev_uring_create, bdev_aio_create), NVMe through rvhost's own VFIO driver
/// (bdev_nvme_attach_controller), Ceph RBD images (bdev_rbd_create), and delay bdevs stacked on
/// another (bdev_delay_create). `spdk-rpc rpc_get_methods` lists every method.
///
/// With no -c/--json file (and without --no-default) it creates a 256 MiB RAM bdev `Malloc0`
/// (512-byte blocks), exports it as the vhost-user-blk controller `vhost.0` in the socket
/// directory, and logs the QEMU arguments that attach it. `spdk-rpc save_config` writes the
/// running configuration in the format -c reads.
///
/// Stop it with Ctrl-C, SIGTERM, or `spdk-rpc spdk_kill_instance SIGTERM`: it takes no new guest
/// requests, lets those in flight complete (within --shutdown-timeout), removes the controller and
/// RPC sockets and exits 0. QEMU with `-chardev socket,...,reconnect=1` reconnects to a restarted
/// rvhost by itself. Under systemd (Type=notify) it sends READY=1 once every socket listens.
#[derive(Debug, Clone, Parser)]
#[command(name = "rvhost", version, about, long_about, verbatim_doc_comment)]
pub struct Cli {
    /// Directory for the controllers' vhost-user sockets (controller `vhost.0` listens on
    /// DIR/vhost.0). SPDK defaults to its working directory; rvhost uses /var/tmp, where SPDK's
    /// documentation puts them.
    #[arg(short = 'S', long = "socket-dir", value_name = "DIR", default_value = DEFAULT_SOCKET_DIR)]
    pub socket_dir: PathBuf,

    /// Cores to run reactors (poll-mode I/O threads) on, as a hex mask (`0x3`, `3`) or a list
    /// (`[0,1]`, `[0-3,5]`). One reactor per core, each pinned to it.
    #[arg(short = 'm', long = "cpumask", value_name = "MASK", default_value = "0x1", value_parser = parse_cpumask)]
    pub cpumask: u64,

    /// Memory in MiB that RAM (malloc) bdevs may use in total; creating one past it fails with
    /// ENOMEM. Default: what the system reports available (MemAvailable) at start.
    #[arg(short = 's', long = "mem-size", value_name = "MiB", value_parser = clap::value_parser!(u64).range(1..))]
    pub mem_size_mib: Option<u64>,

    /// Unix socket to serve JSON-RPC on.
    #[arg(short = 'r', long = "rpc-socket", value_name = "PATH", default_value = DEFAULT_RPC_SOCKET)]
    pub rpc_socket: PathBuf,

    /// Start-up configuration in SPDK's JSON config format ({"subsystems": [...]}, as
    /// `spdk-rpc save_config` writes) or a bare list of {"method", "params"} objects; each entry
    /// runs through the RPC dispatcher in order. Replaces the default Malloc0/vhost.0 set-up.
    #[arg(short = 'c', long = "json", value_name = "FILE")]
    pub json_config: Option<PathBuf>,

    /// Keep going when an entry of the -c/--json file fails (the error is logged).
    #[arg(long = "json-ignore-init-errors")]
    pub json_ignore_init_errors: bool,

    /// Without -c/--json, start with no bdev and no controller instead of Malloc0 on vhost.0.
    #[arg(long = "no-default")]
    pub no_default: bool,

    /// Group owner of the controllers' vhost-user sockets (a name from /etc/group, or a number).
    /// With --socket-mode 0660 the group's members (the VMM's user, e.g. libvirt's QEMU) may
    /// connect and other users may not. Set before a socket accepts its first connection.
    #[arg(long = "socket-group", value_name = "GROUP", value_parser = parse_group)]
    pub socket_group: Option<u32>,

    /// Permission bits of the controllers' sockets, in octal (e.g. 0660; connecting needs write
    /// permission). Default: what the umask leaves.
    #[arg(long = "socket-mode", value_name = "MODE", value_parser = parse_mode)]
    pub socket_mode: Option<u32>,

    /// Group owner of the RPC socket (a name from /etc/group, or a number).
    #[arg(long = "rpc-socket-group", value_name = "GROUP", value_parser = parse_group)]
    pub rpc_socket_group: Option<u32>,

    /// Permission bits of the RPC socket, in octal (e.g. 0600: only rvhost's user may configure
    /// it). Default: what the umask leaves.
    #[arg(long = "rpc-socket-mode", value_name = "MODE", value_parser = parse_mode)]
    pub rpc_socket_mode: Option<u32>,

    /// On SIGTERM, SIGINT or `spdk_kill_instance SIGTERM`, how long to wait for the guests'
    /// requests in flight to complete (no new ones are taken) before exiting. If they do not all
    /// complete in time rvhost says so and exits with status 1 without waiting further.
    #[arg(long = "shutdown-timeout", value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
    pub shutdown_timeout: std::time::Duration,

    /// Serve metrics in Prometheus' text format at http://ADDR/metrics: HOST:PORT (an IP
    /// address, e.g. 127.0.0.1:9477; port 0 picks a free port, which the log names) or
    /// unix:PATH. Off by default.
    #[arg(long = "metrics", value_name = "ADDR")]
    pub metrics: Option<crate::app::metrics::MetricsAddr>,

    /// Log level (error, warn, info, debug, trace) or a tracing filter such as
    /// `rvhost_target=debug`. RUST_LOG, if set, takes precedence.
    #[arg(
        short = 'L',
        long = "log",
        value_name = "LEVEL",
        default_value = "info"
    )]
    pub log: String,
}

/// Parses a group: a number, or a name looked up in /etc/group.
pub fn parse_group(text: &str) -> Result<u32, String> {
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("cannot read /etc/group to look up {text:?}: {e}"))?;
    group_id(&groups, text).ok_or_else(|| format!("no group {text:?} in /etc/group"))
}

/// The id of group `name` in the text of an /etc/group file (`name:password:gid:members`).
fn group_id(groups: &str, name: &str) -> Option<u32> {
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        fields.nth(1)?.trim().parse().ok()
    })
}

/// Parses permission bits in octal (`660`, `0660`, `0o660`); at most 0777.
pub fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!(
            "{text:?} is not a permission mode in octal (0000-0777)"
        )),
    }
}

/// Parses a non-negative number of seconds (fractions allowed).
pub fn parse_seconds(text: &str) -> Result<std::time::Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    std::time::Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text}: {e}"))
}

/// Parses an SPDK CPU mask into a bit mask of cores 0..=63.
pub fn parse_cpumask(text: &str) -> Result<u64, String> {
    let set = CpuSet::parse(text).map_err(|e| e.to_string())?;
    let mask = set
        .to_u64()
        .ok_or_else(|| format!("{text}: rvhost runs reactors on cores 0-63 only"))?;
    if mask == 0 {
        return Err(format!("{text} selects no core"));
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn defaults_match_spdk_s_conventions() {
        let cli = Cli::try_parse_from(["rvhost"]).unwrap();
        assert_eq!(cli.socket_dir, PathBuf::from("/var/tmp"));
        assert_eq!(cli.rpc_socket, PathBuf::from("/var/tmp/spdk.sock"));
        assert_eq!(cli.cpumask, 1);
        assert_eq!(cli.mem_size_mib, None);
        assert!(cli.json_config.is_none() && !cli.no_default && !cli.json_ignore_init_errors);
    }

    #[test]
    fn parses_spdk_style_options() {
        let cli = Cli::try_parse_from([
            "rvhost",
            "-S",
            "/tmp/s",
            "-m",
            "[0-1]",
            "-s",
            "1024",
            "-r",
            "/tmp/r.sock",
            "-c",
            "/tmp/c.json",
            "-L",
            "debug",
        ])
        .unwrap();
        assert_eq!(cli.socket_dir, PathBuf::from("/tmp/s"));
        assert_eq!(cli.cpumask, 0x3);
        assert_eq!(cli.mem_size_mib, Some(1024));
        assert_eq!(cli.json_config, Some(PathBuf::from("/tmp/c.json")));
        assert_eq!(cli.log, "debug");
        let long =
            Cli::try_parse_from(["rvhost", "--cpumask", "0x2", "--json", "x", "--no-default"])
                .unwrap();
        assert_eq!(long.cpumask, 2);
        assert!(long.no_default);
    }

    #[test]
    fn rejects_bad_masks_and_sizes() {
        for args in [
            &["rvhost", "-m", "0x0"][..],
            &["rvhost", "-m", "xyz"],
            &["rvhost", "-m", "[64]"],
            &["rvhost", "-s", "0"],
            &["rvhost", "-s", "-5"],
            &["rvhost", "--bogus"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn parses_socket_groups_and_modes() {
        let cli = Cli::try_parse_from([
            "rvhost",
            "--socket-group",
            "0",
            "--socket-mode",
            "0660",
            "--rpc-socket-group",
            "root",
            "--rpc-socket-mode",
            "600",
        ])
        .unwrap();
        assert_eq!((cli.socket_group, cli.socket_mode), (Some(0), Some(0o660)));
        assert_eq!(
            (cli.rpc_socket_group, cli.rpc_socket_mode),
            (Some(0), Some(0o600))
        );
        assert_eq!(parse_mode("0o755"), Ok(0o755));
        for bad in ["0888", "1777", "rw", "", "-1"] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
        let groups = "root:x:0:\nkvm:x:104:qemu,alice\nlibvirt-qemu:x:64055:\nbroken\n";
        assert_eq!(group_id(groups, "kvm"), Some(104));
        assert_eq!(group_id(groups, "libvirt-qemu"), Some(64055));
        assert_eq!(group_id(groups, "qemu"), None);
        assert_eq!(group_id(groups, "broken"), None);
        assert!(parse_group("no-such-group-here").is_err());
    }

    #[test]
    fn help_is_consistent() {
        Cli::command().debug_assert();
        let help = Cli::command().render_long_help().to_string();
        for needle in [
            "--socket-dir",
            "--cpumask",
            "--mem-size",
            "--rpc-socket",
            "--json",
            "Malloc0",
            "virtio-scsi",
            "vhost_create_scsi_controller",
            "bdev_uring_create",
            "bdev_aio_create",
            "bdev_nvme_attach_controller",
            "bdev_delay_create",
            "bdev_rbd_create",
            "--shutdown-timeout",
            "--socket-group",
            "--rpc-socket-mode",
            "reconnect=1",
        ] {
            assert!(help.contains(needle), "{needle} missing from --help");
        }
    }
}
