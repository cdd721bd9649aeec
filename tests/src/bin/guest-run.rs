//! `guest-run`: boots a test guest by hand and prints what its script reported, for trying a
//! backend interactively or debugging a guest test.
//!
//! ```text
//! guest-run [--blk SOCKET[:QUEUES]]... [--scsi SOCKET[:QUEUES]]... [--cpus N] [--bin PATH]...
//!           [--env KEY=VALUE]... SCRIPT
//! ```
//! SCRIPT is a shell file run in the guest (`. /lib/guest.sh` gives the helpers); with `--scsi` the
//! virtio-scsi modules are loaded too. Exits non-zero if the guest fails to finish.

use std::path::PathBuf;
use std::process::ExitCode;

use rvhost_tests::{run_guest, GuestConfig, VhostUserDevice, VIRTIO_SCSI_MODULES};

fn device_arg(value: &str, scsi: bool) -> Result<VhostUserDevice, String> {
    let (path, queues) = match value.rsplit_once(':') {
        Some((path, q)) => (
            path,
            q.parse()
                .map_err(|_| format!("bad queue count in {value}"))?,
        ),
        None => (value, 1),
    };
    let socket = PathBuf::from(path);
    Ok(if scsi {
        VhostUserDevice::Scsi {
            socket,
            num_queues: queues,
        }
    } else {
        VhostUserDevice::Blk {
            socket,
            num_queues: queues,
        }
    })
}

fn parse(args: &[String]) -> Result<GuestConfig, String> {
    let mut devices = Vec::new();
    let mut binaries = Vec::new();
    let mut env = Vec::new();
    let mut cpus = 1u8;
    let mut scsi = false;
    let mut script = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--blk" => devices.push(device_arg(&value()?, false)?),
            "--scsi" => {
                scsi = true;
                devices.push(device_arg(&value()?, true)?);
            }
            "--cpus" => cpus = value()?.parse().map_err(|_| "bad --cpus".to_owned())?,
            "--bin" => binaries.push(PathBuf::from(value()?)),
            "--env" => {
                let kv = value()?;
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| format!("--env {kv}: need KEY=VALUE"))?;
                env.push((k.to_owned(), v.to_owned()));
            }
            other if script.is_none() && !other.starts_with("--") => {
                script = Some(other.to_owned())
            }
            other => return Err(format!("unexpected argument {other}")),
        }
    }
    let script_path = script.ok_or("missing SCRIPT")?;
    let text = std::fs::read_to_string(&script_path).map_err(|e| format!("{script_path}: {e}"))?;
    let mut config = GuestConfig::new("guest-run", &text).cpus(cpus);
    if scsi {
        let mut modules: Vec<&str> = rvhost_tests::VIRTIO_BLK_MODULES.to_vec();
        modules.extend(VIRTIO_SCSI_MODULES);
        config = config.modules(&modules);
    }
    for device in devices {
        config = config.device(device);
    }
    for binary in binaries {
        config = config.binary(binary);
    }
    for (k, v) in env {
        config = config.env(&k, v);
    }
    Ok(config)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match parse(&args) {
        Ok(config) => config,
        Err(msg) => {
            eprintln!("guest-run: {msg}");
            eprintln!(
                "usage: guest-run [--blk SOCK[:Q]]... [--scsi SOCK[:Q]]... [--cpus N] [--bin PATH]... \
                 [--env K=V]... SCRIPT"
            );
            return ExitCode::from(2);
        }
    };
    match run_guest(&config) {
        Ok(output) => {
            for (key, value) in &output.lines {
                println!("{key}={value}");
            }
            eprintln!("---- console ----\n{}", output.console);
            eprintln!("guest finished in {:.1} s", output.elapsed.as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("guest-run: {err}");
            ExitCode::FAILURE
        }
    }
}
