//! `vmm`: boot a Linux kernel in a KVM virtual machine with its console on this terminal.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use log::LevelFilter;
use tvm_vmm::config::{
    parse_cpus, parse_disk, parse_mem_size, parse_net, parse_vsock, VmConfig, DEFAULT_CMDLINE,
    DEFAULT_MEM_SIZE,
};
use tvm_vmm::seccomp::SeccompLevel;
use tvm_vmm::timing::BootTimes;
use tvm_vmm::vcpu::{log_stop, ExitReason};
use tvm_vmm::{error_chain, logger, run_vm, terminal};

/// A KVM virtual machine monitor for x86_64 Linux guests.
///
/// The guest's serial console (ttyS0) is this terminal; press Ctrl-A x to quit. A guest
/// `reboot` or `poweroff` (or a triple fault, with a warning) ends the VMM with exit code 0;
/// a guest kernel panic reported through pvpanic ends it with exit code 3.
/// `kill -USR2` logs each vCPU's and device's state and lets the guest run on.
#[derive(Debug, Parser)]
#[command(name = "vmm", version)]
struct Cli {
    /// Kernel image: a bzImage or an ELF vmlinux.
    #[arg(long, value_name = "PATH", required_unless_present = "restore")]
    kernel: Option<PathBuf>,
    /// Start from a snapshot instead of booting: the state file PATH and its memory file
    /// PATH.mem (as --snapshot-on-signal writes them). The machine and its devices are
    /// the saved ones; --net tap=NAME options, in order, move the saved interfaces to
    /// other TAPs.
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with_all = ["kernel", "initrd", "memory", "disks", "rng", "vsock", "system_map"]
    )]
    restore: Option<PathBuf>,
    /// On SIGUSR1, pause the VM, write a full snapshot to PATH (the state) and PATH.mem
    /// (guest memory, sparse), and resume it. Both files are created at start.
    #[arg(long, value_name = "PATH")]
    snapshot_on_signal: Option<PathBuf>,
    /// Track the pages written to guest memory (by the guest and by the devices: the
    /// kernel's soft-dirty bits), so that with --snapshot-on-signal each SIGUSR1 after the
    /// first writes only the pages written since the one before, into the same memory
    /// file (a diff snapshot that keeps the file whole).
    #[arg(long)]
    track_dirty_pages: bool,
    /// Initial ramdisk (initramfs) to hand to the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory, e.g. 512M or 2G (a bare number means MiB) [default: 1G].
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// A virtio-blk disk backed by a file: PATH, optionally followed by ,readonly=on,
    /// ,id=STRING, ,cache=writeback|none (none: O_DIRECT), ,num_queues=N (default: one per
    /// vCPU) and ,io_engine=auto|io_uring|sync (default auto: io_uring where the kernel has
    /// it). Repeat for more disks (vda, vdb, ...).
    #[arg(long = "disk", value_name = "PATH[,OPTIONS]")]
    disks: Vec<String>,
    /// A virtio-net interface on a TAP: tap=NAME, optionally followed by ,mac=MAC. The TAP
    /// is created if it does not exist (needs CAP_NET_ADMIN). Repeat for more (eth0, eth1,
    /// ...).
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]")]
    nets: Vec<String>,
    /// A virtio-rng entropy device (the guest's /dev/hwrng), filled from the host's
    /// getrandom(2).
    #[arg(long)]
    rng: bool,
    /// A virtio-vsock device: the guest's context id and the host Unix socket. A host
    /// program connects to PATH and writes `CONNECT <port>\n` to reach a guest listener;
    /// a guest connection to host port P goes to the socket PATH_P (Firecracker's hybrid
    /// vsock).
    #[arg(long, value_name = "cid=N,uds=PATH")]
    vsock: Option<String>,
    /// vCPUs: N, optionally with a topology ,threads=T,cores=C,sockets=S whose product is
    /// N (default: N single-threaded cores on one socket). At most 254, and at most what
    /// this host's KVM allows.
    #[arg(
        long,
        value_name = "N[,threads=T][,cores=C][,sockets=S]",
        default_value = "1"
    )]
    cpus: String,
    /// seccomp filters: on (a syscall outside a thread's list ends the VMM with a message),
    /// log (such syscalls are allowed and logged by the kernel), or off.
    #[arg(long, value_name = "on|off|log", default_value = "on")]
    seccomp: SeccompLevel,
    /// The guest kernel's System.map: state dumps (SIGUSR2) then name the function each
    /// vCPU is in.
    #[arg(long, value_name = "PATH")]
    system_map: Option<PathBuf>,
    /// Log level on stderr: off, error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    log_level: LevelFilter,
}

/// The version of Firecracker's interface this binary answers, for clients that ask
/// `firecracker --version`.
const FIRECRACKER_COMPAT_VERSION: &str = "1.10.0";

/// Firecracker's command line, for clients that start `firecracker --api-sock SOCK
/// [--config-file FILE] [--no-api] ...` (this binary, or a symlink to it named
/// `firecracker`). Options with the same meaning as Firecracker's; those marked "accepted"
/// are taken and have no effect here.
#[derive(Debug, Parser)]
#[command(name = "firecracker", disable_version_flag = true)]
struct FcCli {
    /// Path of the API socket.
    #[arg(long, value_name = "PATH", default_value = "/run/firecracker.socket")]
    api_sock: PathBuf,
    /// The instance id (`GET /`).
    #[arg(long, value_name = "ID", default_value = "anonymous-instance")]
    id: String,
    /// Start the microVM from this JSON file (the shape of `GET /vm/config`).
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Serve no API socket (needs --config-file).
    #[arg(long)]
    no_api: bool,
    /// Log level: Error, Warning, Info, Debug, Trace or Off.
    #[arg(long, value_name = "LEVEL", default_value = "Warning")]
    level: String,
    /// Write the log to this file (appending) instead of stderr.
    #[arg(long, value_name = "PATH")]
    log_path: Option<PathBuf>,
    /// Accepted (the level is always shown).
    #[arg(long)]
    show_level: bool,
    /// Accepted (the module is always shown).
    #[arg(long)]
    show_log_origin: bool,
    /// Accepted (one module filter is not supported).
    #[arg(long, value_name = "MODULE")]
    module: Option<String>,
    /// Write metrics (`FlushMetrics`) to this file.
    #[arg(long, value_name = "PATH")]
    metrics_path: Option<PathBuf>,
    /// Accepted (boot times are printed on stderr at exit anyway).
    #[arg(long)]
    boot_timer: bool,
    /// Install no seccomp filters.
    #[arg(long)]
    no_seccomp: bool,
    /// Accepted (custom BPF filters are not supported; a given file is an error).
    #[arg(long, value_name = "FILE")]
    seccomp_filter: Option<PathBuf>,
    /// Accepted: this VMM's devices are always on PCI.
    #[arg(long)]
    enable_pci: bool,
    /// Largest API request body in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 51200)]
    http_api_max_payload_size: usize,
    /// Accepted (no MMDS).
    #[arg(long, value_name = "BYTES")]
    mmds_size_limit: Option<usize>,
    /// Accepted (process start times from a jailer).
    #[arg(long, value_name = "US")]
    start_time_us: Option<u64>,
    /// Accepted.
    #[arg(long, value_name = "US")]
    start_time_cpu_us: Option<u64>,
    /// Accepted.
    #[arg(long, value_name = "US")]
    parent_cpu_time_us: Option<u64>,
    /// Print the version and exit.
    #[arg(long)]
    version: bool,
}

/// Firecracker's `--level` names (any case; `warn` too).
fn fc_level(text: &str) -> Option<LevelFilter> {
    Some(match text.to_ascii_lowercase().as_str() {
        "off" => LevelFilter::Off,
        "error" => LevelFilter::Error,
        "warning" | "warn" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        _ => return None,
    })
}

/// Whether to read the command line as Firecracker's: the binary is called `firecracker`,
/// or a Firecracker-only option is given.
fn firecracker_mode(args: &[std::ffi::OsString]) -> bool {
    let called_firecracker = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n == "firecracker");
    called_firecracker
        || args.iter().skip(1).any(|a| {
            let a = a.to_string_lossy();
            let name = a.split('=').next().unwrap_or("");
            matches!(name, "--api-sock" | "--config-file" | "--no-api")
        })
}

/// Runs the VMM with Firecracker's command line.
fn main_firecracker(start: Instant, args: Vec<std::ffi::OsString>) -> ExitCode {
    let cli = FcCli::parse_from(args);
    if cli.version {
        println!(
            "Firecracker v{FIRECRACKER_COMPAT_VERSION} (tvm {})",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    let Some(level) = fc_level(&cli.level) else {
        eprintln!(
            "vmm: error: invalid --level {:?}: use Error, Warning, Info, Debug, Trace or Off",
            cli.level
        );
        return ExitCode::from(1);
    };
    logger::init(level, start);
    if let Some(path) = &cli.log_path {
        if let Err(e) = logger::redirect(path) {
            eprintln!("vmm: error: cannot open the log file {path:?}: {e}");
            return ExitCode::from(1);
        }
    }
    if cli.seccomp_filter.is_some() {
        eprintln!("vmm: error: --seccomp-filter: custom filters are not supported");
        return ExitCode::from(1);
    }
    terminal::install_panic_hook();
    let api_sock = (!cli.no_api).then_some(cli.api_sock);
    let opts = tvm_vmm::firecracker::FcOptions {
        api_sock: api_sock.clone(),
        config_file: cli.config_file,
        id: cli.id,
        max_payload: cli.http_api_max_payload_size,
        seccomp: if cli.no_seccomp {
            SeccompLevel::Off
        } else {
            SeccompLevel::On
        },
        metrics_path: cli.metrics_path,
    };
    let times = Arc::new(BootTimes::new(start));
    let result = tvm_vmm::firecracker::run(opts, times.clone());
    terminal::restore();
    finish(result, &times)
}

/// Prints why the VM stopped and turns it into the exit code.
fn finish(result: tvm_vmm::Result<ExitReason>, times: &BootTimes) -> ExitCode {
    match result {
        Ok(reason) => {
            eprintln!("{}", times.summary_line(reason.name()));
            match &reason {
                ExitReason::Error(text) => {
                    eprintln!("vmm: error: {text}");
                }
                other => log_stop(other),
            }
            ExitCode::from(reason.exit_code() as u8)
        }
        Err(e) => {
            if times.get(tvm_vmm::timing::Phase::FirstKvmRun).is_some() {
                eprintln!("{}", times.summary_line("error"));
            }
            eprintln!("vmm: error: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// Parses each value of a repeatable option; the first bad one is the error.
fn parse_all<T>(
    values: &[String],
    parse: fn(&str) -> tvm_vmm::Result<T>,
) -> tvm_vmm::Result<Vec<T>> {
    values.iter().map(|v| parse(v)).collect()
}

/// The memory file next to a state file: `PATH.mem`.
fn mem_file_of(state: &std::path::Path) -> PathBuf {
    let mut p = state.as_os_str().to_owned();
    p.push(".mem");
    PathBuf::from(p)
}

fn main() -> ExitCode {
    let start = Instant::now();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if firecracker_mode(&args) {
        return main_firecracker(start, args);
    }
    let cli = Cli::parse_from(args);
    logger::init(cli.log_level, start);
    terminal::install_panic_hook();

    let mem_size = cli
        .memory
        .as_deref()
        .map_or(Ok(DEFAULT_MEM_SIZE), parse_mem_size);
    let parsed = mem_size.and_then(|m| Ok((m, parse_cpus(&cli.cpus)?)));
    let (mem_size, cpus) = match parsed {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vmm: error: {}", error_chain(&e));
            return ExitCode::from(1);
        }
    };
    let (disks, nets, vsock) = match (
        parse_all(&cli.disks, parse_disk),
        parse_all(&cli.nets, parse_net),
        cli.vsock.as_deref().map(parse_vsock).transpose(),
    ) {
        (Ok(d), Ok(n), Ok(v)) => (d, n, v),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            eprintln!("vmm: error: {}", error_chain(&e));
            return ExitCode::from(1);
        }
    };
    let signal_snapshot = match &cli.snapshot_on_signal {
        Some(path) => match tvm_vmm::snapshot::open_files(
            path,
            &mem_file_of(path),
            tvm_snapshot::SnapshotType::Full,
        ) {
            Ok(files) => Some(files),
            Err(e) => {
                eprintln!("vmm: error: {}", error_chain(&e));
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    if let Some(path) = &cli.restore {
        let times = Arc::new(BootTimes::new(start));
        let overrides: Vec<_> = nets
            .into_iter()
            .enumerate()
            .map(|(index, n)| tvm_vmm::snapshot::NetOverride { index, tap: n.tap })
            .collect();
        let result = tvm_vmm::snapshot::load(path, &mem_file_of(path)).and_then(|mut restore| {
            // The guest's time of day stays right across the gap.
            restore.clock_realtime = true;
            let mut cfg = tvm_vmm::snapshot::restore_config(
                &restore.snapshot,
                &overrides,
                None,
                cli.seccomp,
            )?;
            cfg.track_dirty_pages = cli.track_dirty_pages;
            let mut vmm = tvm_vmm::Vmm::restore(&cfg, times.clone(), restore)?;
            if let Some(files) = signal_snapshot {
                vmm.snapshot_on_signal(files);
            }
            vmm.run()
        });
        terminal::restore();
        return finish(result, &times);
    }
    let cfg = VmConfig {
        kernel: cli.kernel.unwrap_or_default(),
        initrd: cli.initrd,
        cmdline: cli.cmdline,
        mem_size,
        cpus,
        disks,
        nets,
        rng: cli.rng,
        vsock,
        seccomp: cli.seccomp,
        system_map: cli.system_map,
        track_dirty_pages: cli.track_dirty_pages,
    };
    let times = Arc::new(BootTimes::new(start));
    let result = match signal_snapshot {
        None => run_vm(&cfg, times.clone()),
        Some(files) => tvm_vmm::Vmm::build(&cfg, times.clone()).and_then(|mut vmm| {
            vmm.snapshot_on_signal(files);
            vmm.run()
        }),
    };
    // Whatever happened, the terminal is ours again before we print.
    terminal::restore();
    finish(result, &times)
}
