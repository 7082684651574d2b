//! `vmm`: boot a Linux kernel in a KVM virtual machine with its console on this terminal.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use log::LevelFilter;
use tvm_vmm::config::{
    parse_cpus, parse_disk, parse_mem_size, parse_net, VmConfig, DEFAULT_CMDLINE, DEFAULT_MEM_SIZE,
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
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initial ramdisk (initramfs) to hand to the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory, e.g. 512M or 2G (a bare number means MiB) [default: 1G].
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// A virtio-blk disk backed by a file: PATH, optionally followed by ,readonly=on and
    /// ,id=STRING. Repeat for more disks (vda, vdb, ...).
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

/// Parses each value of a repeatable option; the first bad one is the error.
fn parse_all<T>(
    values: &[String],
    parse: fn(&str) -> tvm_vmm::Result<T>,
) -> tvm_vmm::Result<Vec<T>> {
    values.iter().map(|v| parse(v)).collect()
}

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = Cli::parse();
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
    let (disks, nets) = match (
        parse_all(&cli.disks, parse_disk),
        parse_all(&cli.nets, parse_net),
    ) {
        (Ok(d), Ok(n)) => (d, n),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("vmm: error: {}", error_chain(&e));
            return ExitCode::from(1);
        }
    };
    let cfg = VmConfig {
        kernel: cli.kernel,
        initrd: cli.initrd,
        cmdline: cli.cmdline,
        mem_size,
        cpus,
        disks,
        nets,
        rng: cli.rng,
        seccomp: cli.seccomp,
        system_map: cli.system_map,
    };
    let times = Arc::new(BootTimes::new(start));
    let result = run_vm(&cfg, times.clone());
    // Whatever happened, the terminal is ours again before we print.
    terminal::restore();
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
