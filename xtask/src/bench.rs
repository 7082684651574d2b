//! `cargo xtask bench`: measurements against a peer in the same run.
//!
//! Boot time: the test guest booted by our VMM and by QEMU (`-accel kvm`, the peer that is
//! always at hand), alternately, a few times each, from process spawn to the guest's
//! readiness marker, reported as medians and their ratio. On a host without hardware KVM
//! both run inside the same outer QEMU TCG guest, so only the ratio means anything.
//!
//! Disk: the same guest with a raw image of `--disk-mib` + 64 MiB (written full once before
//! the runs) as virtio-blk: ours (`--disk IMAGE`, with `,cache=none` for `--disk-cache
//! none`) and QEMU's virtio-blk-pci on its fastest engine (`-drive
//! ...,cache=MODE,aio=io_uring`), both with the host cache mode `--disk-cache`: `writeback`
//! (the default: through the host page cache) or `none` (O_DIRECT on the host). In the
//! outer guest the image is a file on its tmpfs for `writeback`, and a RAM block device
//! (`brd`, /dev/ram0) for `none`: the outer kernel (6.1) has no O_DIRECT on tmpfs (that came
//! in 6.6); both keep the outer guest's disk emulation out of the figures. The guest runs
//! `tvm-iobench` (tests/src/bin/tvm-iobench.rs, appended to its initramfs), every access
//! O_DIRECT in the guest: sequential write then read of `--disk-mib` MiB in 1 MiB blocks
//! (queue depth 1), 4 KiB reads at random aligned offsets for `--disk-secs` seconds at
//! queue depth 1 (IOPS and mean latency), the same with 32 threads each doing one
//! synchronous read at a time (queue depth up to 32; aggregate IOPS), and each process's
//! peak RSS (`VmHWM`). Each figure: medians over `--runs`, ours next to QEMU's, and the
//! ratio vmm/qemu.
//!
//! Snapshot: a 256 MiB and a 2 GiB guest, warmed up (a tmpfs file, a counter), saved by
//! our VMM (`--snapshot-on-signal`) and by QEMU (`migrate exec:cat > FILE`, its save to a
//! file), once each, then restored `--runs` times each (ours `--restore`, QEMU
//! `-incoming exec:cat FILE`): create time and the files' size on disk, and the time from
//! spawn to the restored guest's first answer on its console, next to each one's fresh
//! boot (tests/src/bin/tvm-e2e/snapshot.rs).
//!
//! Network: the same guest with `--net tap=...` against QEMU's virtio-net-pci on the same
//! TAP (vhost off): `--net-mib` MiB host to guest and guest to host, the guest's end
//! `tvm-iobench tcp-recv` / `tcp-send` (64 KiB system calls), then guest to host again from
//! busybox `nc` (1 KiB writes: small segments), and peak RSS.
//!
//! Vsock: the same guest with `tvm-vsock-guest` in its initramfs, our `--vsock` (hybrid:
//! a Unix socket on the host) against QEMU's `vhost-vsock-pci` (in-kernel vhost: AF_VSOCK
//! on the host, `vhost_vsock` loaded in the outer guest): `--vsock-mib` MiB each way with
//! one connection and with 8 at once, and peak RSS (tests/src/bin/tvm-e2e/vsockbench.rs).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::e2e::run_driver;
use crate::util;

/// Options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Boots per VMM.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Copy the consoles to stderr.
    #[arg(long)]
    pub verbose: bool,
    /// Which benchmarks: `boot`, `disk`, `net`, `vsock`, `snapshot` or `all`.
    #[arg(long, default_value = "all")]
    pub only: String,
    /// MiB written and read sequentially by the disk benchmark.
    #[arg(long, default_value_t = 256)]
    pub disk_mib: u64,
    /// Seconds of 4 KiB random reads, for each of the two random-read runs (queue depth 1,
    /// and 32 threads).
    #[arg(long, default_value_t = 10)]
    pub disk_secs: u64,
    /// Host cache mode of the disk benchmark's image, for our VMM and QEMU alike:
    /// `writeback` (host page cache) or `none` (O_DIRECT on the host).
    #[arg(long, value_enum, default_value = "writeback")]
    pub disk_cache: DiskCache,
    /// Our VMM's I/O engine for the disk benchmark (`io_engine=` of `--disk`): `auto` (its
    /// default: io_uring where the kernel has it), `io_uring` or `sync`.
    #[arg(long, default_value = "auto")]
    pub disk_engine: String,
    /// MiB sent over TCP in each direction by the network benchmark, and once more guest
    /// to host in 1 KiB writes (small: nested, QEMU moves that at about 0.4 MiB/s).
    #[arg(long, default_value_t = 16)]
    pub net_mib: u64,
    /// MiB the vsock benchmark moves in each direction (split over the connections).
    #[arg(long, default_value_t = 64)]
    pub vsock_mib: u64,
    /// Words added to both guests' kernel command line, e.g. `--append "initcall_debug
    /// loglevel=8"` with `--verbose` to compare driver initcall times (docs/performance.md).
    #[arg(long, default_value = "")]
    pub append: String,
    /// vCPU counts the boot benchmark measures, each against QEMU `-smp` with the same
    /// topology: counts or `--cpus` specs separated by commas (e.g. `1,2,4` or
    /// `4,8,sockets=2`: a `key=value` belongs to the count before it). The disk and
    /// network benchmarks use one vCPU.
    #[arg(long, default_value = "1,2,4")]
    pub cpus: String,
}

/// Host cache mode of the disk benchmark's image (`--disk-cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiskCache {
    /// Through the host page cache: our `--disk IMAGE`, QEMU's `cache=writeback`.
    Writeback,
    /// O_DIRECT on the host: our `--disk IMAGE,cache=none`, QEMU's `cache=none`.
    None,
}

impl DiskCache {
    /// The name both VMMs and `tvm-e2e --disk-cache` use.
    fn as_str(self) -> &'static str {
        match self {
            DiskCache::Writeback => "writeback",
            DiskCache::None => "none",
        }
    }
}

/// MiB `tvm-e2e disk-bench` makes the image beyond `--disk-mib`.
const IMAGE_SPARE_MIB: u64 = 64;

/// Where the disk benchmark's image goes, and the outer guest's set-up for it (shell lines
/// for [`run_driver`]'s `nested_setup`).
fn bench_image(cache: DiskCache, mib: u64) -> (String, String) {
    if crate::outer::kvm_is_usable_directly() {
        // This host's file system; for `none` it must support O_DIRECT (our VMM refuses
        // the disk otherwise).
        let image = util::guest_dir().join("bench-disk.img");
        return (image.to_string_lossy().into_owned(), String::new());
    }
    match cache {
        // On the outer guest's tmpfs: the outer disk emulation stays out of the figures.
        DiskCache::Writeback => ("/tvm/bench-disk.img".to_string(), String::new()),
        // A RAM block device of the image's size (`rd_size` in KiB), for the same reason:
        // the outer kernel has no O_DIRECT on tmpfs.
        DiskCache::None => (
            "/dev/ram0".to_string(),
            format!(
                "insmod {}/brd.ko rd_nr=1 rd_size={}\ntest -b /dev/ram0",
                crate::guest::SPARE_MODULE_DIR,
                (mib + IMAGE_SPARE_MIB) * 1024
            ),
        ),
    }
}

/// QEMU, the shared libraries it loads and the firmware it reads, as `(host, guest)` pairs
/// at the same absolute paths, so that the dynamically linked binary runs in the outer
/// guest's initramfs.
fn qemu_files() -> Result<Vec<(PathBuf, String)>> {
    let qemu = util::which("qemu-system-x86_64").context("qemu-system-x86_64 not found")?;
    let mut files = util::binary_with_libs(&qemu)?;
    for fw in [
        "/usr/share/seabios/bios-256k.bin",
        "/usr/share/qemu/linuxboot_dma.bin",
        "/usr/share/qemu/linuxboot.bin",
        "/usr/share/qemu/kvmvapic.bin",
        "/usr/share/qemu/multiboot_dma.bin",
    ] {
        let p = Path::new(fw);
        if p.exists() {
            files.push((std::fs::canonicalize(p)?, fw.to_string()));
        }
    }
    // QEMU looks for bios-256k.bin in its data dir; Debian keeps it with seabios.
    if let Ok(real) = std::fs::canonicalize("/usr/share/seabios/bios-256k.bin") {
        files.push((real, "/usr/share/qemu/bios-256k.bin".into()));
    }
    Ok(files)
}

/// `cargo xtask bench`.
pub fn main(args: Args) -> Result<ExitCode> {
    let (boot, disk, net, vsock, snapshot) = match args.only.as_str() {
        "all" => (true, true, true, true, true),
        "boot" => (true, false, false, false, false),
        "disk" => (false, true, false, false, false),
        "net" => (false, false, true, false, false),
        "vsock" => (false, false, false, true, false),
        "snapshot" => (false, false, false, false, true),
        other => bail!("--only {other}: expected boot, disk, net, vsock, snapshot or all"),
    };
    let files = qemu_files()?;
    let qemu = files[0].1.clone();
    let runs = args.runs.to_string();
    let mut summary = Vec::new();
    if boot {
        let mut boot_args = vec![
            "--qemu",
            qemu.as_str(),
            "--runs",
            runs.as_str(),
            "--bench-cpus",
            args.cpus.as_str(),
        ];
        if !args.append.is_empty() {
            boot_args.extend(["--append", args.append.as_str()]);
        }
        summary.extend(bench_step(
            "boot-time",
            &["boot-time"],
            &boot_args,
            &files,
            None,
            "",
            args.verbose,
            Duration::from_secs(1200 * boot_counts(&args.cpus)),
        )?);
    }
    // The disk benchmark's guest runs tvm-iobench, and so does the network one's (its
    // tcp-send and tcp-recv are the guest's end of the transfers): built once for both.
    let iobench_initrd = if disk || net {
        Some(bench_initramfs()?)
    } else {
        None
    };
    if disk {
        let (image, setup) = bench_image(args.disk_cache, args.disk_mib);
        let (mib, secs) = (args.disk_mib.to_string(), args.disk_secs.to_string());
        // Two timed random-read runs in each of the two guests of a run.
        let timed = 4 * args.runs as u64 * args.disk_secs;
        summary.extend(bench_step(
            "disk",
            &["disk-bench"],
            &[
                "--qemu",
                &qemu,
                "--runs",
                &runs,
                "--disk",
                &image,
                "--disk-cache",
                args.disk_cache.as_str(),
                "--disk-engine",
                &args.disk_engine,
                "--bench-mib",
                &mib,
                "--bench-secs",
                &secs,
            ],
            &files,
            iobench_initrd.as_deref(),
            &setup,
            args.verbose,
            Duration::from_secs(3600 + timed),
        )?);
    }
    if net {
        let mib = args.net_mib.to_string();
        summary.extend(bench_step(
            "network",
            &["net-bench"],
            &[
                "--qemu",
                &qemu,
                "--runs",
                &runs,
                "--tap",
                crate::e2e::E2E_TAP,
                "--net-mib",
                &mib,
            ],
            &files,
            iobench_initrd.as_deref(),
            "",
            args.verbose,
            Duration::from_secs(3600),
        )?);
    }
    if vsock {
        let initrd = crate::guest::initramfs_with(&["tvm-vsock-guest"], "e2e-initramfs.cpio.gz")?;
        let mib = args.vsock_mib.to_string();
        summary.extend(bench_step(
            "vsock",
            &["vsock-bench"],
            &["--qemu", &qemu, "--runs", &runs, "--vsock-mib", &mib],
            &files,
            Some(&initrd),
            "",
            args.verbose,
            Duration::from_secs(3600),
        )?);
    }
    if snapshot {
        summary.extend(bench_step(
            "snapshot",
            &["snapshot-bench"],
            &["--qemu", &qemu, "--runs", &runs],
            &files,
            None,
            "",
            args.verbose,
            Duration::from_secs(3600),
        )?);
    }
    for line in summary {
        println!("xtask: {line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs one benchmark driver (`run_driver`'s arguments); returns its `median` lines, or
/// an error naming `what` when the driver failed.
#[allow(clippy::too_many_arguments)]
fn bench_step(
    what: &str,
    mode: &[&str],
    extra_args: &[&str],
    files: &[(PathBuf, String)],
    initrd: Option<&Path>,
    nested_setup: &str,
    verbose: bool,
    limit: Duration,
) -> Result<Vec<String>> {
    let (code, report) = run_driver(
        mode,
        extra_args,
        files,
        initrd,
        nested_setup,
        verbose,
        limit,
    )?;
    if code != 0 {
        bail!("the {what} benchmark failed (driver exit code {code})");
    }
    Ok(report
        .lines()
        .filter(|l| l.contains("median") || l.contains("BENCH snapshot create"))
        .map(String::from)
        .collect())
}

/// How many boot configurations `--cpus` lists (a `key=value` part belongs to the count
/// before it).
fn boot_counts(list: &str) -> u64 {
    let n = list
        .split(',')
        .filter(|p| !p.trim().is_empty() && !p.contains('='))
        .count();
    n.max(1) as u64
}

/// The test initramfs with the static `tvm-iobench` in `/bin`.
fn bench_initramfs() -> Result<PathBuf> {
    crate::guest::initramfs_with(&["tvm-iobench"], "bench-initramfs.cpio.gz")
}
