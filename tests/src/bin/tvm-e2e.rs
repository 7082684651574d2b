//! `tvm-e2e`: the real-Linux end-to-end driver.
//!
//! Runs where /dev/kvm is hardware-backed (directly on such a host, or inside the outer
//! QEMU guest `cargo xtask e2e` starts): boots the test guest in the `vmm` binary with the
//! console on pipes and checks real outcomes — the kernel banner, the readiness marker, a
//! command computed in the guest, input typed while the guest prints, a stdin flood that
//! leaves the VMM's RSS flat, and `reboot` ending the VMM with exit code 0. Prints one
//! `E2E PASS|FAIL <check>` line per check, the boot timings, and exits non-zero on failure.
//!
//! `tvm-e2e boot-time` instead boots the same guest in the VMM and in QEMU (`-accel kvm`)
//! a few times each and reports the time from spawn to the readiness marker.
//! `tvm-e2e disk-bench` boots both with the same disk image as virtio-blk (QEMU's on
//! `aio=io_uring`, both with the host cache mode `--disk-cache`) and runs `tvm-iobench` in
//! the guest: O_DIRECT sequential write and read, 4 KiB random reads one at a time and from
//! 32 threads at once, and each VMM's peak RSS. `tvm-e2e net-bench` boots both with eth0 on the same TAP and times
//! TCP transfers both ways against this process. `tvm-e2e vsock-bench` boots ours with
//! `--vsock` and QEMU with `vhost-vsock-pci` and times vsock streams both ways with one and
//! with eight connections (tvm-e2e/vsockbench.rs).
//!
//! With `--disk`/`--ro-disk` the checks include virtio-blk (ext4 mount, write, re-read, a
//! read-only disk, e2fsck/debugfs on the image afterwards); with `--tap` they include
//! virtio-net (ping both ways, TCP both ways with CRC-32 compared on both ends).
//!
//! With `--smp-cpus SPEC,SPEC..` (`4,sockets=2,8,threads=2,sockets=2` is two specs: a
//! `key=value` part belongs to the count before it) one more boot per spec follows the main
//! one (`--smp-only`: only they run): the guest with `--cpus SPEC` and the default memory,
//! checked for its CPU count, topology,
//! pinned tasks, local timers, a parallel job, CPU offline/online and a `reboot` from the
//! last CPU (tvm-e2e/smp.rs). `boot-time --bench-cpus 1,2,4` measures each vCPU count.
//!
//! `tvm-e2e power-cut --dur-raw DISK --dur-ext4 DISK` boots the guest on two disks, has it
//! write 4 MiB with fsync to each (raw, and a file on ext4), prints `E2E-DURABLE crc32=..
//! E2E-POWER-CUT-NOW` and waits, VMM running, for whoever runs the VMM's host (xtask, for
//! the outer QEMU guest) to kill that host and check the disks' files.
//!
//! Every wait has a limit; `--timeout SECS` limits the whole run (a watchdog thread prints
//! the consoles of the guests still running, kills them and exits 1), and a VMM never
//! outlives the driver (PR_SET_PDEATHSIG).

#[path = "tvm-e2e/fcapi.rs"]
mod fcapi;
#[path = "tvm-e2e/hosterr.rs"]
mod hosterr;
#[path = "tvm-e2e/smp.rs"]
mod smp;
#[path = "tvm-e2e/snapshot.rs"]
mod snapshot;
#[path = "tvm-e2e/vsock.rs"]
mod vsock;
#[path = "tvm-e2e/vsockbench.rs"]
mod vsockbench;

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const READY: &str = "TVM-READY uptime=";

/// Everything the guest printed so far, shared with the reader thread.
#[derive(Default)]
struct Console {
    buf: Mutex<Vec<u8>>,
    more: Condvar,
    closed: Mutex<bool>,
}

impl Console {
    fn len(&self) -> usize {
        self.buf.lock().map(|b| b.len()).unwrap_or(0)
    }

    /// Waits until `needle` appears at or after `from`; returns the offset just past it.
    fn wait_for(&self, needle: &str, from: usize, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        let mut buf = self.buf.lock().ok()?;
        loop {
            if let Some(pos) = find(&buf[from.min(buf.len())..], needle.as_bytes()) {
                return Some(from + pos + needle.len());
            }
            let now = Instant::now();
            if now >= deadline || self.closed.lock().map(|c| *c).unwrap_or(true) {
                return None;
            }
            buf = self.more.wait_timeout(buf, deadline - now).ok()?.0;
        }
    }

    fn text_from(&self, from: usize) -> String {
        let buf = self.buf.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&buf[from.min(buf.len())..]).into_owned()
    }

    /// Waits for `marker` after `from`, then for `-end`; returns the end's position and
    /// the text between the two.
    fn value_until_end(
        &self,
        marker: &str,
        from: usize,
        timeout: Duration,
    ) -> Option<(usize, String)> {
        let p = self.wait_for(marker, from, timeout)?;
        let e = self.wait_for("-end", p, STEP_TIMEOUT)?;
        Some((e, self.text_between(p, e - 4)))
    }

    fn tail(&self, n: usize) -> String {
        let len = self.len();
        self.text_from(len.saturating_sub(n))
    }

    /// The text in `from..to` (byte offsets, clamped).
    fn text_between(&self, from: usize, to: usize) -> String {
        let buf = self.buf.lock().map(|b| b.clone()).unwrap_or_default();
        let to = to.min(buf.len());
        String::from_utf8_lossy(&buf[from.min(to)..to]).into_owned()
    }

    /// Waits until `done` holds for the text after `from`; false when `timeout` passed or
    /// the stream closed first.
    fn wait_until(&self, from: usize, timeout: Duration, done: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let Ok(mut buf) = self.buf.lock() else {
            return false;
        };
        loop {
            if done(&String::from_utf8_lossy(&buf[from.min(buf.len())..])) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || self.closed.lock().map(|c| *c).unwrap_or(true) {
                return false;
            }
            match self.more.wait_timeout(buf, deadline - now) {
                Ok((b, _)) => buf = b,
                Err(_) => return false,
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn spawn_reader<R: Read + Send + 'static>(mut src: R, console: Arc<Console>, echo: bool) {
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        loop {
            match src.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if echo {
                        let _ = std::io::stderr().write_all(&chunk[..n]);
                    }
                    if let Ok(mut b) = console.buf.lock() {
                        b.extend_from_slice(&chunk[..n]);
                    }
                    console.more.notify_all();
                }
            }
        }
        if let Ok(mut c) = console.closed.lock() {
            *c = true;
        }
        console.more.notify_all();
    });
}

#[derive(Clone)]
struct Opts {
    vmm: String,
    kernel: String,
    initrd: String,
    qemu: Option<String>,
    runs: usize,
    flood_kib: usize,
    append: String,
    disk: Option<String>,
    ro_disk: Option<String>,
    e2fsck: Option<String>,
    debugfs: Option<String>,
    bench_mib: u64,
    bench_secs: u64,
    /// `disk-bench`: the host cache mode of the bench disk, for our VMM and QEMU alike.
    disk_cache: DiskCache,
    /// `disk-bench`: our VMM's `io_engine=` for the bench disk (`None`: its default).
    disk_engine: Option<String>,
    /// A TAP for the guest's eth0 (`--net tap=NAME`), host end 10.0.2.1/24, guest 10.0.2.2/24.
    tap: Option<String>,
    /// MiB moved over TCP in each direction by the net check and bench.
    net_mib: u64,
    /// MiB each direction of `vsock-bench` moves, split over the connections.
    vsock_mib: u64,
    verbose: bool,
    /// What `uname -r` must print in the guest (the packaged kernel's release).
    kernel_release: Option<String>,
    /// Text `uname -v` must contain (the Debian package version of the kernel).
    kernel_version: Option<String>,
    /// Limit for the whole run ([`start_watchdog`]).
    timeout: Option<Duration>,
    /// After the checks, the SIGKILL durability check ([`durability_check`]).
    sigkill_durability: bool,
    /// `power-cut` mode: the raw disk and the ext4 disk the guest writes durably.
    dur_raw: Option<String>,
    dur_ext4: Option<String>,
    /// `power-cut` mode: how long to wait for the host to end the VMM's host.
    power_cut_wait: Duration,
    /// The guest kernel's System.map, passed on to the VMM (`--system-map`) so that the
    /// state dumps of [`request_dump`] name the kernel function each vCPU is in.
    system_map: Option<String>,
    /// `--cpus` of the main boot.
    cpus: String,
    /// The main boot's EIO disk ([`hosterr::EioDisk`]): its backing (a block device, or a
    /// file to attach to a loop device) and the `dmsetup` to use.
    eio_backing: Option<String>,
    dmsetup: String,
    /// `--cpus` of the many-vCPU boot ([`smp::smp_checks`]), which runs after the main
    /// checks when given.
    smp_cpus: Option<String>,
    /// Only the many-vCPU boot.
    smp_only: bool,
    /// A raw disk for the many-vCPU boots, given with `cache=none` and the default queues
    /// (one per vCPU); it must support O_DIRECT and hold `smp::DISK_MIB` per vCPU.
    smp_disk: Option<String>,
    /// The boots through Firecracker's interface ([`fcapi::fc_api_checks`]), after the
    /// others.
    fc_api: bool,
    /// Only the boots through Firecracker's interface.
    fc_api_only: bool,
    /// The snapshot and restore boots ([`snapshot::snapshot_checks`]), after the others.
    snapshot: bool,
    /// Only the snapshot and restore boots.
    snapshot_only: bool,
    /// `boot-time`: the vCPU counts (or `--cpus` specs) to measure, one after another.
    bench_cpus: Vec<String>,
}

fn parse_opts(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        vmm: String::new(),
        kernel: String::new(),
        initrd: String::new(),
        qemu: None,
        runs: 3,
        flood_kib: 4096,
        append: String::new(),
        disk: None,
        ro_disk: None,
        e2fsck: None,
        debugfs: None,
        bench_mib: 256,
        bench_secs: 10,
        disk_cache: DiskCache::Writeback,
        disk_engine: None,
        tap: None,
        net_mib: 64,
        vsock_mib: 64,
        verbose: false,
        kernel_release: None,
        kernel_version: None,
        timeout: None,
        sigkill_durability: false,
        dur_raw: None,
        dur_ext4: None,
        power_cut_wait: Duration::from_secs(60),
        system_map: None,
        cpus: "1".into(),
        smp_cpus: None,
        smp_only: false,
        smp_disk: None,
        eio_backing: None,
        dmsetup: "dmsetup".into(),
        fc_api: false,
        fc_api_only: false,
        snapshot: false,
        snapshot_only: false,
        bench_cpus: vec!["1".into()],
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--vmm" => o.vmm = val()?,
            "--kernel" => o.kernel = val()?,
            "--initrd" => o.initrd = val()?,
            "--qemu" => o.qemu = Some(val()?),
            "--runs" => o.runs = val()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--flood-kib" => {
                o.flood_kib = val()?.parse().map_err(|e| format!("--flood-kib: {e}"))?
            }
            "--append" => o.append = val()?,
            "--disk" => o.disk = Some(val()?),
            "--ro-disk" => o.ro_disk = Some(val()?),
            "--e2fsck" => o.e2fsck = Some(val()?),
            "--debugfs" => o.debugfs = Some(val()?),
            "--bench-mib" => {
                o.bench_mib = val()?.parse().map_err(|e| format!("--bench-mib: {e}"))?
            }
            "--bench-secs" => {
                o.bench_secs = val()?.parse().map_err(|e| format!("--bench-secs: {e}"))?
            }
            "--disk-cache" => o.disk_cache = DiskCache::parse(&val()?)?,
            "--disk-engine" => o.disk_engine = Some(val()?),
            "--tap" => o.tap = Some(val()?),
            "--net-mib" => o.net_mib = val()?.parse().map_err(|e| format!("--net-mib: {e}"))?,
            "--vsock-mib" => {
                o.vsock_mib = val()?.parse().map_err(|e| format!("--vsock-mib: {e}"))?
            }
            "--verbose" => o.verbose = true,
            "--kernel-release" => o.kernel_release = Some(val()?),
            "--kernel-version" => o.kernel_version = Some(val()?),
            "--timeout" => {
                let secs: u64 = val()?.parse().map_err(|e| format!("--timeout: {e}"))?;
                o.timeout = Some(Duration::from_secs(secs));
            }
            "--sigkill-durability" => o.sigkill_durability = true,
            "--dur-raw" => o.dur_raw = Some(val()?),
            "--dur-ext4" => o.dur_ext4 = Some(val()?),
            "--system-map" => o.system_map = Some(val()?),
            "--cpus" => o.cpus = val()?,
            "--smp-cpus" => o.smp_cpus = Some(val()?),
            "--smp-only" => o.smp_only = true,
            "--smp-disk" => o.smp_disk = Some(val()?),
            "--eio-backing" => o.eio_backing = Some(val()?),
            "--dmsetup" => o.dmsetup = val()?,
            "--fc-api" => o.fc_api = true,
            "--snapshot" => o.snapshot = true,
            "--snapshot-only" => {
                o.snapshot = true;
                o.snapshot_only = true;
            }
            "--fc-api-only" => {
                o.fc_api = true;
                o.fc_api_only = true;
            }
            "--bench-cpus" => {
                o.bench_cpus = smp::split_specs(&val()?);
            }
            "--power-cut-wait" => {
                let secs: u64 = val()?
                    .parse()
                    .map_err(|e| format!("--power-cut-wait: {e}"))?;
                o.power_cut_wait = Duration::from_secs(secs);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.vmm.is_empty() || o.kernel.is_empty() || o.initrd.is_empty() {
        return Err("usage: tvm-e2e [boot-time|disk-bench|net-bench|vsock-bench|power-cut] --vmm PATH --kernel PATH --initrd PATH [--qemu PATH] [--runs N] [--flood-kib N] [--append CMDLINE] [--disk PATH [--ro-disk PATH] [--e2fsck PATH --debugfs PATH] [--sigkill-durability]] [--bench-mib N] [--bench-secs N] [--disk-cache writeback|none] [--disk-engine auto|io_uring|sync] [--tap NAME [--net-mib N]] [--vsock-mib N] [--kernel-release R] [--kernel-version V] [--timeout SECS] [--dur-raw PATH --dur-ext4 PATH [--power-cut-wait SECS]] [--system-map PATH] [--cpus SPEC] [--smp-cpus SPEC,SPEC.. [--smp-only] [--smp-disk PATH]] [--eio-backing PATH [--dmsetup PATH]] [--fc-api|--fc-api-only] [--snapshot|--snapshot-only] [--bench-cpus SPEC,SPEC..] [--verbose]".into());
    }
    if o.smp_only && o.smp_cpus.is_none() {
        return Err("--smp-only needs --smp-cpus SPEC,SPEC..".into());
    }
    Ok(o)
}

struct Guest {
    child: Child,
    runner: Runner,
    stdin: Option<ChildStdin>,
    console: Arc<Console>,
    stderr: Arc<Console>,
    started: Instant,
}

/// What runs a guest: our VMM, which logs a state dump on SIGUSR2 (docs/debugging.md), or
/// the peer the benchmarks compare it with (QEMU, which SIGUSR2 would just end).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Runner {
    Vmm,
    Qemu,
}

impl Runner {
    fn name(self) -> &'static str {
        match self {
            Runner::Vmm => "vmm",
            Runner::Qemu => "qemu",
        }
    }
}

/// A VMM (or QEMU) this process runs: what the watchdog kills and shows when the run
/// outlives `--timeout`.
struct LiveGuest {
    pid: u32,
    runner: Runner,
    console: Arc<Console>,
    stderr: Arc<Console>,
}

/// The guests alive right now (registered by [`Guest::spawn`], removed on drop).
static LIVE: Mutex<Vec<LiveGuest>> = Mutex::new(Vec::new());

/// How long [`request_dump`] waits for the VMM's `dump N: end` line.
const DUMP_WAIT: Duration = Duration::from_secs(2);

/// Whether `line` is the last line of a state dump: `... dump N: end` (vmm/src/vmm.rs
/// `dump_state`).
fn is_dump_end(line: &str) -> bool {
    line.trim_end()
        .strip_suffix(": end")
        .and_then(|head| head.rsplit_once("dump "))
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether process `pid` exists and is not a zombie.
fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may hold any byte.
    stat.rsplit(')')
        .next()
        .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
}

/// Asks VMM `pid`, whose stderr is `stderr`, for its state dump (SIGUSR2; it logs the
/// state of every vCPU and device and keeps running) and waits up to [`DUMP_WAIT`] for
/// the dump's last line, `dump N: end`. Returns the stderr offset from which the dump
/// was logged and what to print about it: the lines the VMM logged since (the dump's
/// among them), or why there is no dump. Never signals a process that is gone or a zombie,
/// and never waits longer than [`DUMP_WAIT`], nor on a stderr that has closed.
fn request_dump(pid: u32, stderr: &Console) -> (usize, Vec<String>) {
    let from = stderr.len();
    let Ok(ipid) = i32::try_from(pid) else {
        return (from, vec![format!("no dump: pid {pid} out of range")]);
    };
    if !running(pid) {
        return (from, vec!["no dump: the vmm is no longer running".into()]);
    }
    // SAFETY: kill has no memory effects; `pid` is a child of this process that has not
    // been reaped (a reaped one is gone from /proc, or a zombie until reaped).
    if unsafe { libc::kill(ipid, libc::SIGUSR2) } != 0 {
        let e = std::io::Error::last_os_error();
        return (from, vec![format!("no dump: SIGUSR2 to pid {pid}: {e}")]);
    }
    let ended = stderr.wait_until(from, DUMP_WAIT, |t| t.lines().any(is_dump_end));
    let mut lines: Vec<String> = stderr
        .text_from(from)
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect();
    if let Some(end) = lines.iter().position(|l| is_dump_end(l)) {
        lines.truncate(end + 1);
    }
    if !ended {
        lines.push(format!(
            "no `dump N: end` within {} ms of SIGUSR2 (vmm {})",
            DUMP_WAIT.as_millis(),
            if running(pid) {
                "still running"
            } else {
                "gone; one still building its VM ends on SIGUSR2"
            }
        ));
    }
    (from, lines)
}

/// Prints why a run is being given up on, as `E2E-DIAG` lines (the only lines xtask shows
/// from a nested run without `--verbose`): with `dump` (a VMM of ours that is still
/// running), first its state dump ([`request_dump`]); then the end of the guest's console,
/// the end of the VMM's stderr before the dump, and the dump as `E2E-DIAG vmm dump:`
/// lines. Every path that gives up on a running VMM calls this before killing it.
fn print_diag(pid: u32, dump: bool, console: &Console, stderr: &Console) {
    let (before, dumped) = if dump {
        let (from, lines) = request_dump(pid, stderr);
        (from, Some(lines))
    } else {
        (usize::MAX, None)
    };
    for line in console
        .tail(3000)
        .lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        println!("E2E-DIAG console: {}", line.trim_end_matches('\r'));
    }
    let before = before.min(stderr.len());
    for line in stderr
        .text_between(before.saturating_sub(4000), before)
        .lines()
    {
        println!("E2E-DIAG vmm stderr: {line}");
    }
    for line in dumped.unwrap_or_default() {
        println!("E2E-DIAG vmm dump: {line}");
    }
}

/// Ends the whole driver after `limit`, whatever it is waiting for: prints a failure with
/// the console and stderr of every guest still running, kills them, and exits 1.
fn start_watchdog(limit: Duration) {
    thread::spawn(move || {
        thread::sleep(limit);
        println!(
            "E2E FAIL run-time-limit: the driver was still running after {} s (--timeout)",
            limit.as_secs()
        );
        if let Ok(live) = LIVE.lock() {
            for g in live.iter() {
                println!("E2E-DIAG guest pid {} still running", g.pid);
                print_diag(g.pid, g.runner == Runner::Vmm, &g.console, &g.stderr);
                if let Ok(pid) = i32::try_from(g.pid) {
                    // SAFETY: kill has no memory effects; `pid` is a child of this process
                    // that has not been reaped (it is removed from LIVE before the wait).
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
        println!(
            "E2E RESULT error: run-time limit of {} s reached",
            limit.as_secs()
        );
        std::process::exit(1);
    });
}

impl Guest {
    fn spawn(mut cmd: Command, runner: Runner, echo: bool) -> Result<Guest, String> {
        use std::os::unix::process::CommandExt as _;
        let started = Instant::now();
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // prctl, which is async-signal-safe.
        unsafe {
            // The VMM dies with this process, even when this process is SIGKILLed (by
            // xtask's limit): it must never outlive the run. All guests are spawned from the
            // main thread, whose exit is the process's.
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
        let console = Arc::new(Console::default());
        let stderr = Arc::new(Console::default());
        let out = child.stdout.take().ok_or("no stdout")?;
        let err = child.stderr.take().ok_or("no stderr")?;
        spawn_reader(out, console.clone(), echo);
        spawn_reader(err, stderr.clone(), echo);
        if let Ok(mut live) = LIVE.lock() {
            live.push(LiveGuest {
                pid: child.id(),
                runner,
                console: console.clone(),
                stderr: stderr.clone(),
            });
        }
        Ok(Guest {
            stdin: child.stdin.take(),
            child,
            runner,
            console,
            stderr,
            started,
        })
    }

    /// [`print_diag`] for this guest, with the VMM's state dump if it is ours and still
    /// running: what every failure path that gives up on a guest calls before it is killed.
    fn print_diag(&mut self) {
        let running = matches!(self.child.try_wait(), Ok(None));
        print_diag(
            self.child.id(),
            running && self.runner == Runner::Vmm,
            &self.console,
            &self.stderr,
        );
    }

    fn send(&mut self, text: &[u8]) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        stdin
            .write_all(text)
            .and_then(|_| stdin.flush())
            .map_err(|e| format!("writing to the console: {e}"))
    }

    fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Waits for the readiness marker, moves the VMM's I/O threads off a pinned CPU
    /// ([`unpin_io_threads`]) and waits for the shell prompt; returns the spawn-to-marker
    /// time and the console position after the prompt (after the marker if no prompt came).
    fn ready_at_prompt(&mut self, what: &str) -> Result<(Duration, usize), String> {
        let c = self.console.clone();
        let Some(ready) = c.wait_for(READY, 0, BOOT_TIMEOUT) else {
            let why = format!(
                "{what}: no readiness marker; stderr: {}; console: {}",
                self.stderr.tail(2000),
                c.tail(2000)
            );
            self.print_diag();
            return Err(why);
        };
        let took = self.started.elapsed();
        unpin_io_threads(self.child.id());
        Ok((took, c.wait_for("# ", ready, STEP_TIMEOUT).unwrap_or(ready)))
    }

    /// Types `reboot` and kills the process if it has not exited within STEP_TIMEOUT.
    fn reboot_or_kill(&mut self) -> Result<(), String> {
        self.send(b"reboot\n")?;
        if self.wait_exit(STEP_TIMEOUT).is_none() {
            println!(
                "E2E-DIAG pid {}: still running {} s after `reboot`; killed",
                self.child.id(),
                STEP_TIMEOUT.as_secs()
            );
            self.print_diag();
            let _ = self.child.kill();
        }
        Ok(())
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let pid = self.child.id();
        if let Ok(mut live) = LIVE.lock() {
            live.retain(|g| g.pid != pid);
        }
        let _ = self.child.kill();
        // SIGKILL ends it unless it is stuck in the kernel; do not wait for ever then.
        if self.wait_exit(Duration::from_secs(10)).is_none() {
            println!("E2E-DIAG pid {pid} did not end within 10 s of SIGKILL; left behind");
        }
    }
}

fn vmm_command(o: &Opts) -> Command {
    let mut c = Command::new(&o.vmm);
    c.args([
        "--kernel",
        &o.kernel,
        "--initrd",
        &o.initrd,
        "--memory",
        "512M",
        "--cpus",
        &o.cpus,
        "--log-level",
        "info",
        "--cmdline",
        &cmdline(o),
    ]);
    if let Some(disk) = &o.disk {
        let mut arg = disk.clone();
        if o.disk_cache == DiskCache::None {
            arg.push_str(",cache=none");
        }
        if let Some(engine) = &o.disk_engine {
            arg.push_str(&format!(",io_engine={engine}"));
        }
        c.args(["--disk", &arg]);
    }
    if let Some(disk) = &o.ro_disk {
        c.args(["--disk", &format!("{disk},readonly=on")]);
    }
    if let Some(tap) = &o.tap {
        c.args(["--net", &format!("tap={tap}")]);
    }
    if let Some(map) = &o.system_map {
        c.args(["--system-map", map]);
    }
    c
}

/// The guest command line: the VMM's documented default, eth0's address when there is a
/// TAP, plus `--append`.
fn cmdline(o: &Opts) -> String {
    let mut line = "console=ttyS0 reboot=k panic=1 pci=conf1".to_string();
    if o.tap.is_some() {
        line.push_str(&format!(" tvm.ip={GUEST_IP}/24"));
    }
    if !o.append.is_empty() {
        line.push(' ');
        line.push_str(&o.append);
    }
    line
}

/// Limit for a host tool the driver runs (ip, ping, e2fsck, debugfs on small images).
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// `cmd.output()` with a limit: the command is killed if it has not ended within `limit`.
fn output_within(cmd: &mut Command, limit: Duration) -> Result<std::process::Output, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let collect = |src: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut src) = src {
                let _ = src.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = collect(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = collect(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{cmd:?} still running after {} s; killed",
                    limit.as_secs()
                ));
            }
            Err(e) => return Err(format!("waiting for {cmd:?}: {e}")),
        }
    };
    // The pipes close with the child (none of these tools leaves a process behind), so
    // the readers end; do not wait for ever if one did.
    let joined = |h: thread::JoinHandle<Vec<u8>>| join_within(h, Duration::from_secs(10));
    Ok(std::process::Output {
        status,
        stdout: joined(out).unwrap_or_default(),
        stderr: joined(err).unwrap_or_default(),
    })
}

/// Joins `handle` if its thread ends within `limit`; otherwise leaves it running and
/// returns `None`.
fn join_within<T>(handle: thread::JoinHandle<T>, limit: Duration) -> Option<T> {
    let deadline = Instant::now() + limit;
    while !handle.is_finished() {
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
    handle.join().ok()
}

/// The host end of the TAP.
const HOST_IP: &str = "10.0.2.1";
/// The guest's eth0.
const GUEST_IP: &str = "10.0.2.2";

/// Waits until the VMM (or QEMU) has created TAP `name`, then gives it HOST_IP/24 and sets
/// it up, with `ip` (iproute2 or busybox).
fn tap_up(name: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::path::Path::new(&format!("/sys/class/net/{name}")).exists() {
        if Instant::now() > deadline {
            return Err(format!("tap {name} did not appear within 60 s"));
        }
        thread::sleep(Duration::from_millis(50));
    }
    for args in [
        vec!["addr", "add", &format!("{HOST_IP}/24"), "dev", name],
        vec!["link", "set", name, "up"],
    ] {
        let out = output_within(Command::new("ip").args(&args), TOOL_TIMEOUT)?;
        // An address left from an earlier run is fine.
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !stderr.contains("exists") {
            return Err(format!("ip {}: {}", args.join(" "), stderr.trim()));
        }
    }
    Ok(())
}

/// Deterministic test data for TCP transfers, in 64 KiB blocks.
fn net_block(index: u64) -> Vec<u8> {
    let mut x = index.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// CRC-32 continued over more data (zlib's, as busybox `crc32` prints it).
fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    let mut crc = !crc;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The CPUs other than the single one this process is pinned to, when it is pinned to
/// exactly one and there are others (the outer guest pins the driver, and through it the
/// VMM, to its vCPU 1).
fn unpinned_cpus() -> Option<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data and all zeros is a valid empty set;
    // sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into `set`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0
            || libc::CPU_COUNT(&set) != 1
        {
            return None;
        }
        let online = libc::sysconf(libc::_SC_NPROCESSORS_ONLN);
        let mut others: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..usize::try_from(online).unwrap_or(0) {
            if !libc::CPU_ISSET(cpu, &set) {
                libc::CPU_SET(cpu, &mut others);
            }
        }
        (libc::CPU_COUNT(&others) > 0).then_some(others)
    }
}

/// Moves every thread of process `pid` except its vCPU threads (ours are named `vcpuN`,
/// QEMU's `CPU N/KVM`) off the pinned CPU. Only the vCPU threads need the pin (a vCPU
/// that migrates between outer vCPUs is what made nested guests die); an event loop
/// sharing the vCPU's only CPU waits a whole scheduler slice for every queue kick while
/// the guest is busy. Does nothing when this process is not pinned to a single CPU.
fn unpin_io_threads(pid: u32) {
    let Some(others) = unpinned_cpus() else {
        return;
    };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm.starts_with("vcpu") || comm.contains("/KVM") {
            continue;
        }
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: sched_setaffinity reads size_of::<cpu_set_t>() bytes from `others`, a
        // valid set, and changes only the scheduling of thread `tid`.
        unsafe {
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &others);
        }
    }
}

/// If this process is pinned to one CPU (the outer guest pins the driver and, through it,
/// the VMM, to its vCPU 1) and there are others, moves the calling thread to the others,
/// so that the host end of a transfer does not compete with the VMM's threads.
fn avoid_pinned_cpu() {
    if let Some(others) = unpinned_cpus() {
        // SAFETY: sched_setaffinity reads size_of::<cpu_set_t>() bytes from `others`, a
        // valid set, and changes only the calling thread (0).
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &others);
        }
    }
}

/// What a [`tcp_peer`] moved: bytes, their crc32, seconds.
type Transfer = (u64, u32, f64);

/// How long a [`tcp_peer`] waits for the guest to connect.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(600);
/// A [`tcp_peer`] gives up when its connection moves no byte for this long.
const TCP_STALL: Duration = Duration::from_secs(120);

/// The host end of one TCP transfer, running in a thread; see [`tcp_peer`].
struct TcpPeer {
    handle: thread::JoinHandle<Result<Transfer, String>>,
    cancel: Arc<std::sync::atomic::AtomicBool>,
}

impl TcpPeer {
    /// The transfer's result: waits up to `grace` for the peer to end on its own (the guest
    /// has printed its line, so it should be done or about to be), then tells it to stop
    /// and waits a little more. Never waits longer than that.
    fn finish(self, grace: Duration) -> Result<Transfer, String> {
        let deadline = Instant::now() + grace;
        while !self.handle.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        self.cancel
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // Every blocking call of the peer returns within a second to look at `cancel`.
        match join_within(self.handle, Duration::from_secs(10)) {
            Some(result) => result,
            None => Err("the tcp peer did not stop within 10 s of being cancelled".into()),
        }
    }
}

/// A one-connection TCP server on HOST_IP:`port`, in a thread. `send_mib` > 0: sends that
/// many MiB of [`net_block`] data, half-closes, and waits for the peer to close; otherwise
/// reads until EOF. The result is (bytes, crc32 of the bytes received or sent, seconds
/// from accept to the end). Every wait is bounded: the accept by [`ACCEPT_TIMEOUT`], each
/// read or write by [`TCP_STALL`] without progress, and all of it by
/// [`TcpPeer::finish`], which cancels the peer.
fn tcp_peer(port: u16, send_mib: u64) -> Result<TcpPeer, String> {
    let listener = std::net::TcpListener::bind((HOST_IP, port))
        .map_err(|e| format!("bind {HOST_IP}:{port}: {e}"))?;
    tcp_peer_on(listener, send_mib, ACCEPT_TIMEOUT)
}

/// [`tcp_peer`] on a listener of the caller's, with its own accept limit.
fn tcp_peer_on(
    listener: std::net::TcpListener,
    send_mib: u64,
    accept_timeout: Duration,
) -> Result<TcpPeer, String> {
    use std::io::ErrorKind;
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("nonblocking listener: {e}"))?;
    let cancel = Arc::new(AtomicBool::new(false));
    let stop = cancel.clone();
    let handle = thread::spawn(move || {
        avoid_pinned_cpu();
        let accept_deadline = Instant::now() + accept_timeout;
        let mut conn = loop {
            match listener.accept() {
                Ok((conn, _)) => break conn,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if stop.load(Relaxed) {
                        return Err("cancelled before the guest connected".into());
                    }
                    if Instant::now() >= accept_deadline {
                        return Err(format!(
                            "no connection on port {port} within {} s",
                            accept_timeout.as_secs()
                        ));
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        let tick = Some(Duration::from_secs(1));
        conn.set_nonblocking(false)
            .and_then(|()| conn.set_read_timeout(tick))
            .and_then(|()| conn.set_write_timeout(tick))
            .map_err(|e| format!("socket options: {e}"))?;
        let start = Instant::now();
        let mut last_progress = Instant::now();
        // Called when a read or write timed out: go on, or give up.
        let idle = |what: &str, last: Instant| -> Result<(), String> {
            if stop.load(Relaxed) {
                return Err(format!("cancelled while waiting to {what}"));
            }
            if last.elapsed() >= TCP_STALL {
                return Err(format!(
                    "no progress for {} s ({what})",
                    TCP_STALL.as_secs()
                ));
            }
            Ok(())
        };
        let timed_out = |e: &std::io::Error| {
            matches!(
                e.kind(),
                ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
            )
        };
        let mut crc = 0u32;
        let mut bytes = 0u64;
        if send_mib > 0 {
            for i in 0..send_mib * 16 {
                let block = net_block(i);
                crc = crc32_update(crc, &block);
                let mut off = 0;
                while off < block.len() {
                    match conn.write(&block[off..]) {
                        Ok(0) => return Err("send: connection closed".into()),
                        Ok(n) => {
                            off += n;
                            last_progress = Instant::now();
                        }
                        Err(e) if timed_out(&e) => idle("send", last_progress)?,
                        Err(e) => return Err(format!("send: {e}")),
                    }
                }
                bytes += block.len() as u64;
            }
            conn.shutdown(std::net::Shutdown::Write)
                .map_err(|e| format!("shutdown: {e}"))?;
            let mut sink = [0u8; 4096];
            loop {
                match conn.read(&mut sink) {
                    Ok(0) => break,
                    Ok(_) => last_progress = Instant::now(),
                    Err(e) if timed_out(&e) => idle("see the guest close", last_progress)?,
                    Err(e) => return Err(format!("recv: {e}")),
                }
            }
        } else {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        crc = crc32_update(crc, &buf[..n]);
                        bytes += n as u64;
                        last_progress = Instant::now();
                    }
                    Err(e) if timed_out(&e) => idle("receive", last_progress)?,
                    Err(e) => return Err(format!("recv: {e}")),
                }
            }
        }
        Ok((bytes, crc, start.elapsed().as_secs_f64()))
    });
    Ok(TcpPeer { handle, cancel })
}

/// Pings from the host; true when a reply came back.
fn host_ping(ip: &str) -> Result<String, String> {
    let out = output_within(
        Command::new("ping").args(["-c", "3", "-W", "5", ip]),
        TOOL_TIMEOUT,
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or("")
            .to_string())
    } else {
        Err(format!("ping {ip} failed: {text}"))
    }
}

/// The virtio-net checks: ping both ways, then `o.net_mib` MiB over TCP each way with the
/// CRC compared on both ends. `pos` is where to start looking on the console.
fn net_checks(o: &Opts, g: &mut Guest, r: &mut Report, mut pos: usize) -> Result<usize, String> {
    let c = g.console.clone();
    // Guest to host.
    g.send(
        format!("ping -c 3 -W 5 {HOST_IP} >/dev/null && echo ping-$((1+1))-ok || echo ping-$((1+1))-failed\n")
            .as_bytes(),
    )?;
    let word = |marker: &str, from: usize, timeout: Duration| {
        c.wait_for(marker, from, timeout).and_then(|p| {
            c.wait_for("\n", p, STEP_TIMEOUT)
                .map(|e| (e, c.text_between(p, e).trim().to_string()))
        })
    };
    let ping = word("ping-2-", pos, STEP_TIMEOUT);
    r.check(
        "net-ping-guest-to-host",
        match &ping {
            Some((_, w)) if w == "ok" => Ok(format!("guest pinged {HOST_IP}")),
            other => Err(format!("{other:?}; console tail: {}", c.tail(2000))),
        },
    );
    pos = ping.map(|(e, _)| e).unwrap_or(c.len());
    r.check("net-ping-host-to-guest", host_ping(GUEST_IP));

    let mib = o.net_mib;
    // Host to guest: the guest receives and prints the CRC of what it got.
    let peer = tcp_peer(5001, mib)?;
    g.send(
        format!(
            "echo rx-$((1+1))-crc=$(nc {HOST_IP} 5001 </dev/null | crc32 | cut -d' ' -f1)-end\n"
        )
        .as_bytes(),
    )?;
    let got = c.value_until_end("rx-2-crc=", pos, Duration::from_secs(600));
    // Once the guest has printed, the peer is done or about to be; without the line it is
    // cancelled at once.
    let sent = peer.finish(if got.is_some() {
        STEP_TIMEOUT
    } else {
        Duration::ZERO
    });
    r.check(
        "net-tcp-host-to-guest",
        match (&sent, &got) {
            (Ok((bytes, crc, secs)), Some((_, g))) if format!("{crc:08x}") == *g => Ok(format!(
                "{bytes} bytes, crc32 {g} on both ends, {:.1} MiB/s",
                *bytes as f64 / (1 << 20) as f64 / secs
            )),
            (s, g) => Err(format!(
                "sent {s:?}, guest got {g:?}; console tail: {}",
                c.tail(2000)
            )),
        },
    );
    pos = got.map(|(e, _)| e).unwrap_or(c.len());

    // Guest to host: the guest sends a file of random data and prints its CRC.
    let peer = tcp_peer(5002, 0)?;
    g.send(
        format!(
            "dd if=/dev/urandom of=/tmp/tx bs=1M count={mib} 2>/dev/null; \
             echo tx-$((1+1))-crc=$(crc32 /tmp/tx | cut -d' ' -f1)-end; nc {HOST_IP} 5002 </tmp/tx; rm -f /tmp/tx\n"
        )
        .as_bytes(),
    )?;
    let printed = c.value_until_end("tx-2-crc=", pos, Duration::from_secs(600));
    // The guest prints before it sends: give the transfer the same bound as the line.
    let received = peer.finish(if printed.is_some() {
        Duration::from_secs(600)
    } else {
        Duration::ZERO
    });
    r.check(
        "net-tcp-guest-to-host",
        match (&received, &printed) {
            (Ok((bytes, crc, secs)), Some((_, p)))
                if format!("{crc:08x}") == *p && *bytes == mib << 20 =>
            {
                Ok(format!(
                    "{bytes} bytes, crc32 {p} on both ends, {:.1} MiB/s",
                    *bytes as f64 / (1 << 20) as f64 / secs
                ))
            }
            (rcv, p) => Err(format!(
                "host received {rcv:?}, guest printed {p:?}; console tail: {}",
                c.tail(2000)
            )),
        },
    );
    Ok(printed.map(|(e, _)| e).unwrap_or(c.len()))
}

/// Kernel log lines that mean the ACPI tables or the interrupt wiring they describe are
/// wrong (`grep -iE`).
const ACPI_TROUBLE: &str = "acpi (bios )?(error|warning)|ae_not_found|firmware bug|\
                            madt or mp tables|timer doesn.t work|mp-bios bug";

/// One line of the guest's /proc/interrupts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IrqLine {
    /// `0:`, `9:`, `LOC:`.
    label: String,
    /// The count summed over the CPUs.
    count: u64,
    /// What follows the counts (`IO-APIC 2-edge timer`).
    what: String,
}

/// Parses a /proc/interrupts line: the label, one count per CPU, then the description.
fn parse_irq_line(line: &str) -> Option<IrqLine> {
    let mut words = line.split_whitespace();
    let label = words.next().filter(|l| l.ends_with(':'))?.to_string();
    let mut count = 0u64;
    let mut what = Vec::new();
    let mut counted = false;
    for w in words {
        match w.parse::<u64>() {
            Ok(n) if what.is_empty() => {
                count += n;
                counted = true;
            }
            _ => what.push(w),
        }
    }
    counted.then(|| IrqLine {
        label,
        count,
        what: what.join(" "),
    })
}

/// Prints the guest's interrupt counts of the PIT, the SCI and the LAPIC timer (E2E-INFO,
/// tagged `when`); returns the console position after them and the lines parsed.
fn print_interrupts(
    g: &mut Guest,
    pos: usize,
    when: &str,
) -> Result<(usize, Vec<IrqLine>), String> {
    let c = g.console.clone();
    g.send(
        b"grep -E 'timer|acpi|LOC' /proc/interrupts | while read -r l; do echo \"irq-$((1+1)): $l\"; done; \
          echo irq-$((1+2))-done-end\n",
    )?;
    let irqs = c.value_until_end("irq-3-", pos, STEP_TIMEOUT);
    let end = irqs.as_ref().map(|(e, _)| *e).unwrap_or(c.len());
    let mut parsed = Vec::new();
    for line in c.text_between(pos, end).lines() {
        if let Some((_, l)) = line.split_once("irq-2: ") {
            println!("E2E-INFO interrupts {when}: {}", l.trim());
            parsed.extend(parse_irq_line(l));
        }
    }
    Ok((end, parsed))
}

/// The PIT (IRQ 0) and the SCI (the `acpi` line) take no interrupt while the guest idles:
/// the LAPIC timer is the clock event device and nothing raises the SCI. `before` and
/// `after` are the counts around the idle window.
fn quiet_while_idle(before: &[IrqLine], after: &[IrqLine]) -> Result<String, String> {
    let find = |lines: &[IrqLine], pick: &dyn Fn(&IrqLine) -> bool| {
        lines.iter().find(|l| pick(l)).map(|l| l.count)
    };
    let pit = |l: &IrqLine| l.label == "0:";
    let sci = |l: &IrqLine| l.what.ends_with("acpi");
    let (Some(pit0), Some(pit1)) = (find(before, &pit), find(after, &pit)) else {
        return Err(format!(
            "no IRQ 0 line in /proc/interrupts: {before:?} / {after:?}"
        ));
    };
    if pit1 != pit0 {
        return Err(format!(
            "the PIT took {} interrupt(s) while the guest idled ({pit0} -> {pit1})",
            pit1.saturating_sub(pit0)
        ));
    }
    let sci_text = match (find(before, &sci), find(after, &sci)) {
        (Some(a), Some(b)) if a != b => {
            return Err(format!("the SCI fired while the guest idled ({a} -> {b})"));
        }
        (Some(a), Some(_)) => format!(", SCI at {a}"),
        _ => String::new(),
    };
    Ok(format!("PIT (IRQ 0) stayed at {pit0}{sci_text}"))
}

/// ACPI: the guest found the tables, its clock events come from the LAPIC timer (not the
/// PIT, as without a MADT), and its kernel log has no ACPI errors or firmware-bug lines
/// (each one found is printed). Returns the console position after the checks and the
/// interrupt counts printed on the way ([`print_interrupts`]).
fn acpi_checks(g: &mut Guest, r: &mut Report, pos: usize) -> Result<(usize, Vec<IrqLine>), String> {
    let c = g.console.clone();
    g.send(b"echo acpi-$((1+1))-$(ls /sys/firmware/acpi/tables)-end\n")?;
    let tables = c.value_until_end("acpi-2-", pos, STEP_TIMEOUT);
    r.check(
        "acpi-tables-found",
        match &tables {
            Some((_, t)) => {
                let names: Vec<&str> = t.split_whitespace().collect();
                let missing: Vec<&str> = ["APIC", "DSDT", "FACP", "FACS"]
                    .into_iter()
                    .filter(|n| !names.contains(n))
                    .collect();
                if missing.is_empty() {
                    Ok(format!("/sys/firmware/acpi/tables: {}", names.join(" ")))
                } else {
                    Err(format!("{missing:?} missing from {t:?}"))
                }
            }
            None => Err(format!("no answer; console tail: {}", c.tail(1000))),
        },
    );
    let pos = tables.map(|(e, _)| e).unwrap_or(c.len());

    g.send(
        b"echo clk-$((1+1))-$(cat /sys/devices/system/clockevents/clockevent0/current_device)-end\n",
    )?;
    let clock = c.value_until_end("clk-2-", pos, STEP_TIMEOUT);
    r.check(
        "clockevent-is-lapic-timer",
        match &clock {
            Some((_, d)) if d.contains("lapic") => Ok(format!("clockevent0 is {d}")),
            Some((_, d)) => Err(format!("clockevent0 is {d:?}, not the LAPIC timer")),
            None => Err(format!("no answer; console tail: {}", c.tail(1000))),
        },
    );
    let pos = clock.map(|(e, _)| e).unwrap_or(c.len());

    let (pos, irqs) = print_interrupts(g, pos, "after boot")?;

    let cmd = format!(
        "dmesg | grep -iE '{ACPI_TROUBLE}' | while read -r l; do echo \"dmesg-$((1+1)): $l\"; done; \
         echo dmesg-$((1+2))-$(dmesg | grep -ciE '{ACPI_TROUBLE}')-end\n"
    );
    g.send(cmd.as_bytes())?;
    let count = c.value_until_end("dmesg-3-", pos, STEP_TIMEOUT);
    let end = count.as_ref().map(|(e, _)| *e).unwrap_or(c.len());
    let found: Vec<String> = c
        .text_between(pos, end)
        .lines()
        .filter_map(|l| l.split_once("dmesg-2: ").map(|(_, m)| m.trim().to_string()))
        .collect();
    for l in &found {
        println!("E2E-INFO acpi-dmesg: {l}");
    }
    r.check(
        "dmesg-no-acpi-errors",
        match count {
            Some((_, n)) if n.trim() == "0" => {
                Ok("no ACPI error, firmware-bug or missing-MADT line in dmesg".into())
            }
            Some((_, n)) => Err(format!("{} matching line(s): {found:?}", n.trim())),
            None => Err(format!("no answer; console tail: {}", c.tail(1000))),
        },
    );
    Ok((end, irqs))
}

struct Report {
    failed: usize,
}

impl Report {
    fn check(&mut self, name: &str, result: Result<String, String>) -> bool {
        match result {
            Ok(detail) => {
                println!(
                    "E2E PASS {name}{}",
                    if detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {detail}")
                    }
                );
                true
            }
            Err(why) => {
                println!("E2E FAIL {name}: {why}");
                self.failed += 1;
                false
            }
        }
    }
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Limit for the disk check (mount, write, sync, remount under nested TCG).
const DISK_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the flood is offered.
const FLOOD_WINDOW: Duration = Duration::from_secs(20);
/// How long the guest may take to read what is left in the pipe after the window.
const FLOOD_DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// Flood line length, newline included (well under the tty's 4095-byte line limit).
const FLOOD_LINE: usize = 256;

/// Deterministic, non-repeating-looking printable data (raw mode passes every byte, but
/// keep clear of control characters the VMM's Ctrl-A escape would act on).
fn flood_data(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|i| {
            if i % FLOOD_LINE == FLOOD_LINE - 1 {
                return b'\n';
            }
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            b' ' + (x % 95) as u8
        })
        .collect()
}

/// CRC-32 as zlib and busybox `crc32` compute it (reflected, polynomial 0xEDB88320).
fn crc32(data: &[u8]) -> u32 {
    crc32_update(0, data)
}

/// Every thread of process `pid` runs under exactly one seccomp filter (`Seccomp: 2`,
/// `Seccomp_filters: 1` in /proc), as the VMM's default `--seccomp on` promises; so every
/// other check of the run passed with the filters in place.
fn seccomp_of_threads(pid: u32) -> Result<String, String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    for task in tasks {
        let path = task.map_err(|e| e.to_string())?.path().join("status");
        let status = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        let field = |f: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(f))
                .map(str::trim)
                .unwrap_or("?")
        };
        let name = field("Name:");
        // KVM's kernel workers (kvm-nx-lpage-recovery, ...) run no user code.
        if name.starts_with("kvm-") {
            continue;
        }
        let (mode, filters) = (field("Seccomp:"), field("Seccomp_filters:"));
        if mode != "2" || !matches!(filters, "1" | "?") {
            return Err(format!(
                "thread {name}: Seccomp {mode}, Seccomp_filters {filters}"
            ));
        }
        names.push(name.to_string());
    }
    names.sort();
    Ok(format!("one filter on each of {}", names.join(", ")))
}

/// How long the idle guest is watched for `idle-cpu`.
const IDLE_WINDOW: Duration = Duration::from_secs(10);

/// User + system CPU time of process `pid` so far, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces:
    // state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Percentage of one CPU that process `pid` used over `window`.
fn idle_cpu(pid: u32, window: Duration) -> Option<f64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0)?;
    let before = cpu_ticks(pid)?;
    let start = Instant::now();
    thread::sleep(window);
    let used = cpu_ticks(pid)?.saturating_sub(before);
    Some(used as f64 / hz as f64 / start.elapsed().as_secs_f64() * 100.0)
}

/// The durability boot: the VMM with `raw` as the guest's /dev/vda and, if given, `ext4`
/// (a clean ext4 image) as /dev/vdb. The guest writes 4 MiB of random data to the raw disk
/// with O_DIRECT and fsync and (with `ext4`) the same data to /durable on the ext4 disk
/// with fsync, and then prints the data's crc32. Returns the guest and the crc32, or a
/// failure that shows the console.
fn durable_write(
    o: &Opts,
    raw: &std::path::Path,
    ext4: Option<&std::path::Path>,
) -> Result<(Guest, String), String> {
    let mut cmd = Command::new(&o.vmm);
    cmd.args([
        "--kernel", &o.kernel, "--initrd", &o.initrd, "--memory", "512M",
    ])
    .args(["--cmdline", "console=ttyS0 reboot=k panic=1 pci=conf1"])
    .arg("--disk")
    .arg(raw);
    if let Some(ext4) = ext4 {
        cmd.arg("--disk").arg(ext4);
    }
    if let Some(map) = &o.system_map {
        cmd.args(["--system-map", map]);
    }
    let mut g = Guest::spawn(cmd, Runner::Vmm, o.verbose)?;
    let c = g.console.clone();
    let (_, pos) = g.ready_at_prompt("durability boot")?;
    let to_ext4 = if ext4.is_some() {
        "mkdir -p /mnt/dur && mount /dev/vdb /mnt/dur && \
         dd if=/tmp/d of=/mnt/dur/durable bs=1M conv=fsync 2>/dev/null && "
    } else {
        ""
    };
    g.send(
        format!(
            "dd if=/dev/urandom of=/tmp/d bs=1M count=4 2>/dev/null && \
             dd if=/tmp/d of=/dev/vda bs=1M oflag=direct conv=fsync 2>/dev/null && {to_ext4}\
             echo dur-$((1+1))-crc=$(crc32 /tmp/d | cut -d' ' -f1)-end\n"
        )
        .as_bytes(),
    )?;
    match c.value_until_end("dur-2-crc=", pos, DISK_TIMEOUT) {
        Some((_, crc)) => Ok((g, crc)),
        None => {
            g.print_diag();
            Err(format!(
                "the guest did not report its fsync'ed write within {} s",
                DISK_TIMEOUT.as_secs()
            ))
        }
    }
}

/// What xtask waits for on the outer guest's console to cut its power (kill the outer
/// QEMU): printed by `power-cut` mode once the guest's writes are fsync'ed.
const POWER_CUT_MARK: &str = "E2E-POWER-CUT-NOW";

/// `power-cut` mode: the durability boot ([`durable_write`]) on `--dur-raw` and
/// `--dur-ext4`, then `E2E-DURABLE crc32=<crc> E2E-POWER-CUT-NOW`, and the VMM is left
/// running with the data wherever it is. The host that runs this (xtask, outside the outer
/// guest) kills the VMM's host right then and checks its own files; nothing here may flush
/// or close anything. Returns only when something failed: the write, or no power cut
/// within `--power-cut-wait`.
fn power_cut(o: &Opts) -> Result<bool, String> {
    let raw = o.dur_raw.as_deref().ok_or("power-cut needs --dur-raw")?;
    let ext4 = o.dur_ext4.as_deref().map(std::path::Path::new);
    let (mut g, crc) = match durable_write(o, std::path::Path::new(raw), ext4) {
        Ok(done) => done,
        Err(e) => {
            println!("E2E FAIL durability-write: {e}");
            return Ok(false);
        }
    };
    // A VMM that has exited closed the disks, and the last close of a block device writes
    // its dirty pages back: a power cut then would prove nothing.
    if let Ok(Some(status)) = g.child.try_wait() {
        println!("E2E FAIL durability-power-cut: the VMM exited ({status}) before the power cut");
        g.print_diag();
        return Ok(false);
    }
    println!("E2E-DURABLE crc32={crc} {POWER_CUT_MARK}");
    let _ = std::io::stdout().flush();
    thread::sleep(o.power_cut_wait);
    println!(
        "E2E FAIL durability-power-cut: still running {} s after asking for the power cut",
        o.power_cut_wait.as_secs()
    );
    g.print_diag();
    drop(g);
    Ok(false)
}

/// Durability without a power cut, for hosts where the driver runs directly (hardware
/// KVM, no outer guest to kill): the durability boot ([`durable_write`]) on images in a
/// temporary directory, and the VMM is killed with SIGKILL the moment the guest reports.
/// The raw image must hold exactly those bytes (crc32 compared); the ext4 image, once its
/// journal is replayed (what a mount would do), must pass `e2fsck -fn` and hold the file
/// with the same crc32. This shows that nothing the guest was told is durable was still
/// only inside the VMM; it cannot show that FLUSH reached the disk (the host's page cache
/// survives a SIGKILL), which only the power cut of the nested run does.
fn durability_check(o: &Opts, r: &mut Report) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("tvm-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let image = dir.join("durability.img");
    std::fs::write(&image, vec![0u8; 8 << 20]).map_err(|e| format!("{}: {e}", image.display()))?;
    // A copy of the e2e's ext4 disk, clean after the first boot (its checks said so).
    let ext4 = match (&o.disk, &o.e2fsck, &o.debugfs) {
        (Some(disk), Some(e2fsck), Some(debugfs)) => {
            let copy = dir.join("durability.ext4");
            // Read and write, not fs::copy: the disk may be a block device.
            std::fs::read(disk)
                .and_then(|data| std::fs::write(&copy, data))
                .map_err(|e| format!("copy {disk} to {}: {e}", copy.display()))?;
            Some((copy, e2fsck, debugfs))
        }
        _ => None,
    };
    let written = durable_write(o, &image, ext4.as_ref().map(|(copy, _, _)| copy.as_path()));
    let printed = match written {
        Ok((mut g, crc)) => {
            // The guest was told its data is durable: kill the VMM before it can do
            // anything more.
            let _ = g.child.kill();
            let _ = g.wait_exit(Duration::from_secs(10));
            Some(crc)
        }
        Err(e) => {
            println!("E2E-DIAG durability boot: {e}");
            None
        }
    };
    let on_host = std::fs::read(&image)
        .map(|d| format!("{:08x}", crc32(&d[..4 << 20])))
        .map_err(|e| format!("{}: {e}", image.display()));
    r.check(
        "durability-after-sigkill",
        match (&printed, on_host) {
            (Some(p), Ok(h)) if *p == h => Ok(format!(
                "4 MiB written with O_DIRECT + fsync, VMM SIGKILLed, crc32 {h} on the host file"
            )),
            (p, h) => Err(format!("guest printed {p:?}, host file has {h:?}")),
        },
    );
    if let Some((copy, e2fsck, debugfs)) = &ext4 {
        r.check(
            "durability-ext4-after-sigkill",
            ext4_after_kill(copy, e2fsck, debugfs, printed.as_deref()),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The ext4 half of [`durability_check`]: replay the journal of the image a killed VMM
/// left mounted, then `e2fsck -fn` must be clean and /durable must have crc32 `want`.
fn ext4_after_kill(
    image: &std::path::Path,
    e2fsck: &str,
    debugfs: &str,
    want: Option<&str>,
) -> Result<String, String> {
    let want = want.ok_or("the guest printed no crc (write or mount failed)")?;
    let run = |cmd: &mut Command| output_within(cmd, TOOL_TIMEOUT);
    // Only the journal: exit 0 (nothing to do) or 1 (replayed) are both fine.
    let replay = run(Command::new(e2fsck)
        .args(["-y", "-E", "journal_only"])
        .arg(image))?;
    if !matches!(replay.status.code(), Some(0 | 1)) {
        return Err(format!(
            "journal replay: e2fsck exit {:?}: {}",
            replay.status.code(),
            String::from_utf8_lossy(&replay.stdout)
        ));
    }
    let fsck = run(Command::new(e2fsck).arg("-fn").arg(image))?;
    if !fsck.status.success() {
        return Err(format!(
            "e2fsck -fn after the replay: exit {:?}: {}",
            fsck.status.code(),
            String::from_utf8_lossy(&fsck.stdout)
        ));
    }
    let cat = run(Command::new(debugfs)
        .args(["-R", "cat /durable"])
        .arg(image))?;
    let got = format!("{:08x}", crc32(&cat.stdout));
    if cat.stdout.len() != 4 << 20 || got != want {
        return Err(format!(
            "/durable: {} bytes with crc32 {got}, the guest printed {want}",
            cat.stdout.len()
        ));
    }
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&replay.stdout),
        String::from_utf8_lossy(&replay.stderr)
    );
    Ok(format!(
        "file fsynced on ext4, VMM SIGKILLed, {}, e2fsck -fn clean, crc32 {got} read back \
         with debugfs",
        if said.contains("recovering journal") {
            "journal replayed by e2fsck"
        } else {
            "no journal replay needed"
        }
    ))
}

/// The main boot's checks (unless `--smp-only`), then one many-vCPU boot's for each spec
/// in `--smp-cpus`, then the boots through Firecracker's interface (`--fc-api`); every
/// boot runs even when an earlier one fails.
fn all_boot_checks(o: &Opts) -> Result<bool, String> {
    if o.fc_api_only {
        return fcapi::fc_api_checks(o);
    }
    if o.snapshot_only {
        return snapshot::snapshot_checks(o);
    }
    let mut result = if o.smp_only { Ok(true) } else { boot_checks(o) };
    let and = |result, next| match (result, next) {
        (Err(e), _) | (Ok(_), Err(e)) => Err(e),
        (Ok(a), Ok(b)) => Ok(a && b),
    };
    if let Some(list) = &o.smp_cpus {
        for spec in smp::split_specs(list) {
            result = and(result, smp::smp_checks(o, &spec));
        }
    }
    if o.fc_api {
        result = and(result, fcapi::fc_api_checks(o));
    }
    if o.snapshot {
        result = and(result, snapshot::snapshot_checks(o));
    }
    result
}

fn boot_checks(o: &Opts) -> Result<bool, String> {
    // The main boot also has the entropy device (`entropy-from-hwrng`), a vsock device
    // (the `vsock-*` checks, tvm-e2e/vsock.rs) and, as its last disk, one whose host file
    // system fills up (`host-enospc-*`, tvm-e2e/hosterr.rs).
    let uds = vsock::uds_path();
    let _ = std::fs::remove_file(&uds);
    let full = hosterr::FullDisk::new()?;
    let eio = o
        .eio_backing
        .as_deref()
        .map(|b| hosterr::EioDisk::new(&o.dmsetup, b))
        .transpose()?;
    let mut cmd = vmm_command(o);
    cmd.arg("--rng").args(["--vsock", &vsock::vmm_arg(&uds)]);
    cmd.arg("--disk").arg(full.image());
    if let Some(eio) = &eio {
        // O_DIRECT: through the page cache a write to a block device succeeds and its EIO
        // comes only with the flush (the guest's fsync, or the VMM's at exit).
        cmd.arg("--disk")
            .arg(format!("{},cache=none", eio.path().display()));
    }
    // The guest names virtio disks in PCI order: after --disk and --disk ...,readonly=on.
    let first = b'a' + u8::from(o.disk.is_some()) + u8::from(o.ro_disk.is_some());
    let full_dev = format!("vd{}", char::from(first));
    let eio_dev = eio
        .as_ref()
        .map(|d| (format!("vd{}", char::from(first + 1)), d));
    let mut g = Guest::spawn(cmd, Runner::Vmm, o.verbose)?;
    if let Some(tap) = &o.tap {
        tap_up(tap)?;
    }
    let result = boot_checks_on(o, &mut g, &uds, &full_dev, eio_dev);
    let _ = std::fs::remove_file(&uds);
    if !matches!(result, Ok(true)) {
        // Whatever went wrong, say how the VMM is doing, what the guest printed last and
        // what the VMM logged.
        thread::sleep(Duration::from_millis(300));
        println!(
            "E2E-DIAG vmm status: {:?}",
            g.child.try_wait().ok().flatten()
        );
        g.print_diag();
        return result;
    }
    if o.sigkill_durability && o.disk.is_some() {
        drop(g);
        let mut r = Report { failed: 0 };
        return durability_check(o, &mut r).map(|()| r.failed == 0);
    }
    result
}

/// Types `command` (which reboots the guest) and checks, as `name`, that the VMM then ends
/// within 60 s as [`clean_reboot`] says; `what` names the command in the pass line.
fn reboot_check(
    g: &mut Guest,
    r: &mut Report,
    name: &str,
    command: &str,
    what: &str,
) -> Result<(), String> {
    let asked = Instant::now();
    g.send(format!("{command}\n").as_bytes())?;
    let status = g.wait_exit(Duration::from_secs(60));
    // Give the readers a moment to see the final lines.
    thread::sleep(Duration::from_millis(200));
    r.check(
        name,
        clean_reboot(
            status.map(|s| s.code()),
            &g.console.text_from(0),
            &g.stderr.text_from(0),
        )
        .map(|why| {
            format!(
                "{why}, {:.0} ms after {what}",
                asked.elapsed().as_secs_f64() * 1000.0
            )
        })
        .map_err(|e| format!("{e}; console tail: {}", g.console.tail(2000))),
    );
    Ok(())
}

/// Checks, as `name`, that the guest's hwrng core picked virtio-rng and that /dev/hwrng
/// gives what was asked for, different each time ([`hwrng_answer`]); asks after console
/// position `pos` and returns the position after the answer (`pos` when none came).
fn hwrng_check(g: &mut Guest, r: &mut Report, name: &str, pos: usize) -> Result<usize, String> {
    let c = g.console.clone();
    g.send(
        b"echo rng-$((1+1))-$(cat /sys/devices/virtual/misc/hw_random/rng_current)\
          -$(head -c 4096 /dev/hwrng | wc -c)-$(head -c 64 /dev/hwrng | md5sum | cut -c1-32)\
          -$(head -c 64 /dev/hwrng | md5sum | cut -c1-32)-end\n",
    )?;
    let rng = c.value_until_end("rng-2-", pos, STEP_TIMEOUT);
    r.check(
        name,
        match &rng {
            Some((_, v)) => hwrng_answer(v),
            None => Err(format!("no answer; console tail: {}", c.tail(1000))),
        },
    );
    Ok(rng.map_or(pos, |(e, _)| e))
}

/// The md5 of 64 zero bytes: what a device that writes nothing would give.
const MD5_OF_64_ZEROS: &str = "3b5d3c7d207e37dceeedd301e35e2e58";

/// Judges the guest's `CURRENT-COUNT-MD5A-MD5B` answer about /dev/hwrng: the current
/// hwrng is virtio-rng, 4096 bytes came out of a 4096-byte read, and two 64-byte reads
/// differ from each other and from zeros.
fn hwrng_answer(v: &str) -> Result<String, String> {
    let parts: Vec<&str> = v.trim().split('-').map(str::trim).collect();
    let [current, count, a, b] = parts[..] else {
        return Err(format!("unexpected answer {v:?}"));
    };
    if !current.starts_with("virtio_rng") {
        return Err(format!("the current hwrng is {current:?}, not virtio_rng"));
    }
    if count != "4096" {
        return Err(format!("a 4096-byte read gave {count:?} bytes"));
    }
    if a.len() != 32 || a == b || a == MD5_OF_64_ZEROS || b == MD5_OF_64_ZEROS {
        return Err(format!("two 64-byte reads gave md5 {a} and {b}"));
    }
    Ok(format!(
        "{current}: 4096 bytes read, two 64-byte reads differ (md5 {a}, {b})"
    ))
}

/// What the console shows when the guest kernel panics (before `panic=1` reboots it, which
/// would end the VMM as cleanly as `reboot`).
const KERNEL_PANIC: &str = "Kernel panic - not syncing";

/// A reboot that ended the run cleanly: the VMM exited (`status`: `Some(code)`, `code` is
/// `None` for a signal) with code 0, the console has no kernel panic, and the VMM's log no
/// triple fault (a crashing guest's way out; matched loosely, in any spelling the log may
/// use). Returns the VMM's exit-reason line, if it logged one.
fn clean_reboot(
    status: Option<Option<i32>>,
    console: &str,
    stderr: &str,
) -> Result<String, String> {
    let code = match status {
        None => return Err("still running 60 s after `reboot`".into()),
        Some(None) => return Err("the VMM was killed by a signal".into()),
        Some(Some(code)) => code,
    };
    if let Some(at) = console.find(KERNEL_PANIC) {
        let line = console[at..].lines().next().unwrap_or("");
        return Err(format!(
            "the guest panicked: {line:?} (VMM exit code {code})"
        ));
    }
    let flat = |l: &str| {
        l.to_lowercase()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect::<String>()
    };
    if let Some(line) = stderr.lines().find(|l| flat(l).contains("triplefault")) {
        return Err(format!(
            "the VMM reports a triple fault: {line:?} (exit code {code})"
        ));
    }
    if code != 0 {
        return Err(format!(
            "VMM exit code {code}; stderr: {}",
            stderr
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    // The VMM names how the run ended on its TVM-BOOT-TIMES line: a `reboot` must end as
    // one, not as a power-off, a halt or a signal that also exit 0.
    let exit_reason = stderr.lines().rev().find_map(|l| {
        l.split_whitespace()
            .find_map(|kv| kv.strip_prefix("exit_reason="))
    });
    match exit_reason {
        Some("reboot") => {}
        Some(other) => {
            return Err(format!(
                "the VMM ended with exit_reason={other}, not reboot"
            ))
        }
        None => return Err("no exit_reason= on the VMM's TVM-BOOT-TIMES line".into()),
    }
    let reason = stderr
        .lines()
        .find(|l| {
            let f = flat(l);
            f.contains("guest") && ["stopped", "reset", "reboot"].iter().any(|w| f.contains(w))
        })
        .map(|l| format!("exit code 0, exit_reason=reboot ({})", l.trim()))
        .unwrap_or_else(|| "exit code 0, exit_reason=reboot".into());
    Ok(reason)
}

/// `uname -r` (`release`) must be `want_release` and `uname -v` (`version`) must contain
/// `want_version`, when those are given.
fn uname_check(
    release: Option<&str>,
    version: Option<&str>,
    want_release: Option<&str>,
    want_version: Option<&str>,
) -> Result<String, String> {
    let release = release
        .filter(|r| !r.is_empty())
        .ok_or("no release printed")?;
    if let Some(want) = want_release {
        if release != want {
            return Err(format!(
                "the guest runs {release:?}, the packaged kernel is {want:?}"
            ));
        }
    }
    let version = version.unwrap_or("");
    if let Some(want) = want_version {
        if !version.contains(want) {
            return Err(format!(
                "uname -v is {version:?}, which does not name the packaged version {want:?}"
            ));
        }
    }
    Ok(match (want_release, want_version) {
        (Some(_), Some(v)) => format!("{release}, the packaged kernel ({v}: {version})"),
        (Some(_), None) => format!("{release}, the packaged kernel"),
        _ => format!("{release} (no expected release given)"),
    })
}

fn boot_checks_on(
    o: &Opts,
    g: &mut Guest,
    uds: &std::path::Path,
    full_dev: &str,
    eio: Option<(String, &hosterr::EioDisk)>,
) -> Result<bool, String> {
    let mut r = Report { failed: 0 };
    let ro_before = o
        .ro_disk
        .as_ref()
        .and_then(|p| std::fs::read(p).ok())
        .map(|d| crc32(&d));
    let mut data_crc: Option<String> = None;
    let c = g.console.clone();

    let banner = c.wait_for("Linux version", 0, BOOT_TIMEOUT);
    let ok = r.check(
        "kernel-banner",
        banner.map(|_| String::new()).ok_or_else(|| {
            format!(
                "no banner; stderr: {}; console: {}",
                g.stderr.tail(2000),
                c.tail(2000)
            )
        }),
    );
    if !ok {
        return Ok(false);
    }
    let ready = c.wait_for(READY, 0, BOOT_TIMEOUT);
    let boot_to_ready = g.started.elapsed();
    let ok = r.check(
        "readiness-marker",
        ready
            .map(|_| format!("{:.0} ms after spawn", boot_to_ready.as_secs_f64() * 1000.0))
            .ok_or_else(|| {
                format!(
                    "no marker; vmm status {:?}; stderr: {}; console tail: {}",
                    g.child.try_wait().ok().flatten(),
                    g.stderr.tail(3000),
                    c.tail(3000)
                )
            }),
    );
    if !ok {
        return Ok(false);
    }
    unpin_io_threads(g.child.id());
    let mut pos = ready.unwrap_or(0);
    // Wait for the shell prompt before typing.
    if let Some(p) = c.wait_for("# ", pos, STEP_TIMEOUT) {
        pos = p;
    }

    // A command whose answer only the guest computes.
    g.send(b"echo answer=$((6*7))\n")?;
    let answered = c.wait_for("answer=42", pos, STEP_TIMEOUT);
    r.check(
        "serial-input-computed-in-guest",
        answered
            .map(|_| "echo $((6*7)) answered 42".into())
            .ok_or_else(|| format!("no answer; console tail: {}", c.tail(2000))),
    );
    pos = answered.unwrap_or(c.len());

    // uname -r: the guest kernel's version, which must be the packaged one (xtask passes
    // the release of the vmlinuz it unpacked, and the Debian version when it is the pinned
    // package). The marker is computed in the guest so that the echo of the typed command
    // cannot match it.
    g.send(b"echo release-$((1+1))-$(uname -r)-end; echo version-$((1+1))-$(uname -v)-end\n")?;
    let rel = c.value_until_end("release-2-", pos, STEP_TIMEOUT);
    let ver = rel
        .as_ref()
        .and_then(|(e, _)| c.value_until_end("version-2-", *e, STEP_TIMEOUT));
    r.check(
        "uname-r",
        uname_check(
            rel.as_ref().map(|(_, r)| r.trim()),
            ver.as_ref().map(|(_, v)| v.trim()),
            o.kernel_release.as_deref(),
            o.kernel_version.as_deref(),
        )
        .map_err(|e| format!("{e}; console tail: {}", c.tail(500))),
    );
    pos = ver.or(rel).map(|(e, _)| e).unwrap_or(c.len());

    let (p, irqs_before_idle) = acpi_checks(g, &mut r, pos)?;
    pos = p;

    // What the VMM costs while the guest sits idle at its prompt. Reported, not asserted:
    // figures belong to benchmarks, not to pass/fail checks.
    match idle_cpu(g.child.id(), IDLE_WINDOW) {
        Some(pct) => println!(
            "E2E-INFO idle-cpu: the VMM used {pct:.2}% of one CPU over {} s with the guest idle at its prompt",
            IDLE_WINDOW.as_secs()
        ),
        None => println!("E2E-INFO idle-cpu: /proc/{}/stat unreadable", g.child.id()),
    }
    // The counts again: what changed is what the idle guest took.
    let (p, irqs_after_idle) = print_interrupts(g, pos, "after the idle window")?;
    pos = p;
    r.check(
        "pit-quiet-while-idle",
        quiet_while_idle(&irqs_before_idle, &irqs_after_idle),
    );
    r.check("seccomp-on-every-thread", seccomp_of_threads(g.child.id()));

    pos = hwrng_check(g, &mut r, "entropy-from-hwrng", pos)?;
    pos = vsock::vsock_checks(g, &mut r, uds, pos)?;
    pos = hosterr::check(g, &mut r, full_dev, pos)?;
    if let Some((dev, disk)) = &eio {
        pos = hosterr::check_eio(g, &mut r, dev, disk, pos)?;
    }

    // virtio-blk: mount the ext4 disk, write 4 MiB of random data, sync, unmount, mount
    // again (so the read goes through the device, not the page cache) and compare.
    if o.disk.is_some() {
        g.send(
            b"mkdir -p /mnt && mount /dev/vda /mnt && dd if=/dev/urandom of=/mnt/data bs=64k count=64 2>/dev/null \
              && sync && echo disk-$((1+1))-w=$(md5sum /mnt/data | cut -d' ' -f1)-end \
              && echo disk-$((1+3))-crc=$(crc32 /mnt/data | cut -d' ' -f1)-end \
              && umount /mnt && mount /dev/vda /mnt \
              && echo disk-$((1+2))-r=$(md5sum /mnt/data | cut -d' ' -f1)-end; umount /mnt\n",
        )?;
        let grab = |marker: &str| c.value_until_end(marker, pos, DISK_TIMEOUT).map(|(_, v)| v);
        let written = grab("disk-2-w=");
        data_crc = grab("disk-4-crc=");
        let read = grab("disk-3-r=");
        if let Some(crc) = &data_crc {
            // For whoever checks the image after the run (xtask, on the real host).
            println!("E2E-DATA path=/data crc32={crc}");
        }
        r.check(
            "virtio-blk-ext4",
            match (written, read) {
                (Some(w), Some(rd)) if w == rd && w.len() == 32 => Ok(format!(
                    "mounted /dev/vda, wrote 4 MiB, remounted, md5 {w} read back"
                )),
                (w, rd) => Err(format!(
                    "md5 written {w:?}, read back {rd:?}; console tail: {}",
                    c.tail(4000)
                )),
            },
        );
        pos = c.len();
    }

    // A read-only second disk: the guest's writes fail (the device says RO, so the kernel
    // refuses to open it for writing), and the image stays byte-identical (checked after
    // the VMM exits).
    if o.ro_disk.is_some() {
        g.send(
            b"dd if=/dev/zero of=/dev/vdb bs=512 count=1 2>/dev/null \
              && echo ro-$((1+1))-written || echo ro-$((1+1))-refused; \
              mkdir -p /mnt2 && mount /dev/vdb /mnt2 2>/dev/null; \
              (echo x > /mnt2/f) 2>/dev/null && echo ro-$((2+1))-written || echo ro-$((2+1))-refused; \
              umount /mnt2 2>/dev/null\n",
        )?;
        // The word after each marker, once its line is complete.
        let word = |marker: &str| {
            c.wait_for(marker, pos, DISK_TIMEOUT).and_then(|p| {
                c.wait_for("\n", p, STEP_TIMEOUT)
                    .map(|e| c.text_between(p, e).trim().to_string())
            })
        };
        let raw = word("ro-2-");
        let fs = word("ro-3-");
        r.check(
            "virtio-blk-read-only-refuses-writes",
            match (raw, fs) {
                (Some(a), Some(b)) if a.starts_with("refused") && b.starts_with("refused") => {
                    Ok("raw write to /dev/vdb and file write on its ext4 both refused".into())
                }
                (a, b) => Err(format!(
                    "raw write: {:?}, file write: {:?}",
                    a.map(|t| t.chars().take(8).collect::<String>()),
                    b.map(|t| t.chars().take(8).collect::<String>())
                )),
            },
        );
        pos = c.len();
    }

    if o.tap.is_some() {
        pos = net_checks(o, g, &mut r, pos)?;
    }

    // Input typed while the guest is busy printing must not be lost.
    g.send(b"i=0; while [ $i -lt 1000 ]; do echo busy-line-$i; i=$((i+1)); done\n")?;
    let busy = c.wait_for("busy-line-10\r\n", pos, STEP_TIMEOUT);
    g.send(b"echo typed-while-busy-$((40+2))\n")?;
    let got = busy.and_then(|p| c.wait_for("typed-while-busy-42", p, STEP_TIMEOUT));
    r.check(
        "input-while-printing",
        got.map(|_| "typed during 1000 lines of output, executed afterwards".into())
            .ok_or_else(|| format!("typed command lost; console tail: {}", c.tail(1500))),
    );
    pos = c.len();

    // A flood on stdin: several MiB offered as fast as the pipe takes them. The VMM may
    // read only what the guest's receive FIFO has room for, so the writer must block, the
    // VMM's RSS must stay flat, and every byte that was written must reach the guest intact
    // and in order. The offer runs for a bounded window (the guest reads a few KiB/s under
    // nested TCG, much more on hardware); then Ctrl-D ends the guest's `cat`.
    let offered = o.flood_kib * 1024;
    g.send(
        b"stty -echo; cat > /tmp/flood; stty echo; \
          echo flood-$((1+1))-bytes=$(wc -c < /tmp/flood)-crc=$(crc32 /tmp/flood | cut -d' ' -f1)-end\n",
    )?;
    thread::sleep(Duration::from_secs(2));
    let mut stdin = g.stdin.take().ok_or("stdin gone")?;
    let rss_before = g.rss_kib().unwrap_or(0);
    let data = Arc::new(flood_data(offered));
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (data, written, stop) = (data.clone(), written.clone(), stop.clone());
        thread::spawn(move || -> Result<ChildStdin, String> {
            use std::sync::atomic::Ordering::Relaxed;
            // Whole lines per chunk, so Ctrl-D below lands at the start of a line.
            for chunk in data.chunks(FLOOD_LINE * 16) {
                if stop.load(Relaxed) {
                    break;
                }
                stdin.write_all(chunk).map_err(|e| e.to_string())?;
                written.fetch_add(chunk.len(), Relaxed);
            }
            stdin.write_all(&[4]).map_err(|e| e.to_string())?;
            stdin.flush().map_err(|e| e.to_string())?;
            Ok(stdin)
        })
    };
    let flood_started = Instant::now();
    let mut rss_max = rss_before;
    while !writer.is_finished() && flood_started.elapsed() < FLOOD_WINDOW {
        rss_max = rss_max.max(g.rss_kib().unwrap_or(0));
        thread::sleep(Duration::from_millis(100));
    }
    let window = flood_started.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // Computed in the guest, so the echo of the typed command cannot match.
    let want = "flood-2-bytes=";
    let mut reply = None;
    let drain_deadline = Instant::now() + FLOOD_DRAIN_TIMEOUT;
    while Instant::now() < drain_deadline {
        rss_max = rss_max.max(g.rss_kib().unwrap_or(0));
        if let Some(p) = c.wait_for(want, pos, Duration::from_millis(200)) {
            reply = c
                .wait_for("-end", p, STEP_TIMEOUT)
                .map(|e| c.text_between(p, e - 4));
            break;
        }
    }
    let secs = flood_started.elapsed().as_secs_f64();
    // The writer ends once the guest has read its last chunk and the Ctrl-D.
    while !writer.is_finished() && Instant::now() < drain_deadline {
        thread::sleep(Duration::from_millis(100));
    }
    if writer.is_finished() {
        if let Ok(Ok(stdin)) = writer.join() {
            g.stdin = Some(stdin);
        }
    }
    let sent = written.load(std::sync::atomic::Ordering::Relaxed);
    let expected = format!("{sent}-crc={:08x}", crc32(&data[..sent]));
    let growth = rss_max.saturating_sub(rss_before);
    r.check(
        "stdin-flood",
        match reply {
            Some(got) if got != expected => Err(format!(
                "the guest reports bytes={got}, expected {expected}"
            )),
            Some(_) if growth >= 2048 => Err(format!(
                "VMM RSS grew by {growth} KiB during the flood ({rss_before} KiB -> {rss_max} KiB)"
            )),
            Some(_) => Ok(format!(
                "{} KiB offered, {} KiB taken in a {window:.0} s window as the guest read them, \
                 all delivered intact (crc32) after {secs:.0} s ({:.1} KiB/s); VMM RSS \
                 {rss_before} KiB before, peak {rss_max} KiB (+{growth} KiB)",
                offered / 1024,
                sent / 1024,
                sent as f64 / 1024.0 / secs,
            )),
            None => Err(format!(
                "no reply within {FLOOD_DRAIN_TIMEOUT:?} after the window; {sent} bytes written; \
                 VMM RSS peak +{growth} KiB; console tail: {}",
                c.tail(300)
            )),
        },
    );
    // reboot ends the VMM with exit code 0, within a bound, and the guest did not get there
    // by crashing: no kernel panic on the console (panic=1 reboots the same way), no
    // triple fault in the VMM's exit reason.
    if g.stdin.is_some() {
        reboot_check(g, &mut r, "reboot-exits-0", "reboot", "`reboot`")?;
    }
    let stderr = g.stderr.text_from(0);
    if g.stdin.is_some() {
        hosterr::check_after_exit(&stderr, &mut r);
        if let Some((_, disk)) = &eio {
            hosterr::check_eio_after_exit(&stderr, disk, &mut r);
        }
    }
    let timing = stderr.lines().find(|l| l.starts_with("TVM-BOOT-TIMES "));
    r.check(
        "boot-times-line",
        timing
            .map(|l| l.to_string())
            .ok_or_else(|| format!("no TVM-BOOT-TIMES line in stderr: {stderr}")),
    );
    // After the VMM has exited: the disks as the host sees them.
    if let Some(ro) = &o.ro_disk {
        let after = std::fs::read(ro).ok().map(|d| crc32(&d));
        r.check(
            "read-only-image-unchanged",
            match (ro_before, after) {
                (Some(b), Some(a)) if a == b => Ok(format!("crc32 {a:08x} before and after")),
                (b, a) => Err(format!("crc32 before {b:x?}, after {a:x?}")),
            },
        );
    }
    if let (Some(disk), Some(e2fsck), Some(debugfs)) = (&o.disk, &o.e2fsck, &o.debugfs) {
        let fsck = output_within(Command::new(e2fsck).args(["-fn", disk]), TOOL_TIMEOUT);
        r.check(
            "beside-vmm-e2fsck-clean",
            match fsck {
                Ok(out) if out.status.success() => Ok("e2fsck -fn: clean".into()),
                Ok(out) => Err(format!(
                    "e2fsck -fn exit {:?}: {}",
                    out.status.code(),
                    String::from_utf8_lossy(&out.stdout)
                )),
                Err(e) => Err(e),
            },
        );
        let cat = output_within(
            Command::new(debugfs).args(["-R", "cat /data", disk]),
            TOOL_TIMEOUT,
        );
        r.check(
            "beside-vmm-debugfs-reads-guest-file",
            match (cat, &data_crc) {
                (Ok(out), Some(want)) if format!("{:08x}", crc32(&out.stdout)) == *want => {
                    Ok(format!(
                        "{} bytes, crc32 {want} as the guest printed",
                        out.stdout.len()
                    ))
                }
                (Ok(out), want) => Err(format!(
                    "debugfs gave {} bytes with crc32 {:08x}, the guest printed {want:?}",
                    out.stdout.len(),
                    crc32(&out.stdout)
                )),
                (Err(e), _) => Err(e),
            },
        );
    }
    println!(
        "E2E-TIMING boot_to_ready_ms={:.1}",
        boot_to_ready.as_secs_f64() * 1000.0
    );
    Ok(r.failed == 0)
}

/// Boots `cmd` until the readiness marker; returns spawn-to-marker.
/// Boots `cmd` until the readiness marker; returns spawn-to-marker and, once the shell
/// prompt is up, the CPU the process used over [`IDLE_WINDOW`] with the guest idle (percent
/// of one CPU; the I/O threads moved off a pinned CPU first, as in the other benchmarks).
fn time_to_ready(cmd: Command, runner: Runner, verbose: bool) -> Result<(Duration, f64), String> {
    let mut g = Guest::spawn(cmd, runner, verbose)?;
    let (took, _) = g.ready_at_prompt("boot")?;
    // Let the shell settle (ash asks the terminal for the cursor position once).
    thread::sleep(Duration::from_secs(2));
    let idle = idle_cpu(g.child.id(), IDLE_WINDOW).ok_or("cannot read /proc/PID/stat")?;
    Ok((took, idle))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// QEMU with the same guest as [`vmm_command`] (`-accel kvm -cpu host`, 512 MiB, the same
/// vCPU topology and command line), and `disk` as a virtio-blk-pci drive with the same host
/// cache mode as ours (`--disk-cache`) on QEMU's fastest engine, `aio=io_uring`.
fn qemu_command(qemu: &str, o: &Opts, disk: Option<&str>) -> Result<Command, String> {
    qemu_command_mem(qemu, o, disk, "512M")
}

/// [`qemu_command`] with `mem` of guest memory.
fn qemu_command_mem(
    qemu: &str,
    o: &Opts,
    disk: Option<&str>,
    mem: &str,
) -> Result<Command, String> {
    let topo = smp::Topology::parse(&o.cpus)?;
    let smp = format!(
        "{},sockets={},cores={},threads={}",
        topo.cpus(),
        topo.sockets,
        topo.cores,
        topo.threads
    );
    let mut q = Command::new(qemu);
    q.args([
        "-M",
        "pc",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        mem,
        "-smp",
        &smp,
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-kernel",
        &o.kernel,
        "-initrd",
        &o.initrd,
        "-append",
        &cmdline(o),
        "-no-reboot",
    ]);
    if let Some(disk) = disk {
        q.arg("-drive")
            .arg(format!(
                "file={},if=none,id=d0,format=raw,cache={},aio=io_uring",
                disk.replace(',', ",,"),
                o.disk_cache.as_str()
            ))
            .args(["-device", "virtio-blk-pci,drive=d0"]);
    }
    Ok(q)
}

/// Peak RSS (`VmHWM`) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The host cache mode of the bench disk (`--disk-cache`): our `--disk PATH,cache=MODE`
/// and QEMU's `-drive cache=MODE`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DiskCache {
    /// Through the host page cache (our default; QEMU's `cache=writeback`).
    Writeback,
    /// `O_DIRECT` on the host: the image's file system must support it.
    None,
}

impl DiskCache {
    fn parse(text: &str) -> Result<Self, String> {
        match text {
            "writeback" => Ok(DiskCache::Writeback),
            "none" => Ok(DiskCache::None),
            other => Err(format!("--disk-cache {other}: expected writeback or none")),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            DiskCache::Writeback => "writeback",
            DiskCache::None => "none",
        }
    }
}

/// Threads of the `disk-bench` random-read run with many requests in flight, each with one
/// synchronous 4 KiB read at a time: queue depth up to this many.
const RAND_JOBS: u64 = 32;
// The summary row is named after it.
const _: () = assert!(
    RAND_JOBS == 32,
    "rename the rand-read-4k-qd32 row of disk_bench"
);

/// One guest's block figures.
#[derive(Clone, Copy, Debug)]
struct DiskFigures {
    /// O_DIRECT sequential write, 1 MiB requests, MiB/s.
    seq_write: f64,
    /// O_DIRECT sequential read, 1 MiB requests, MiB/s.
    seq_read: f64,
    /// 4 KiB random reads, one at a time: IOPS.
    rand_iops: f64,
    /// The same run's mean time per read, µs.
    rand_lat_us: f64,
    /// 4 KiB random reads from [`RAND_JOBS`] threads at once: IOPS, summed.
    rand_many_iops: f64,
    /// The VMM process's `VmHWM` after the runs, KiB.
    peak_rss_kib: u64,
}

/// Boots `cmd` (a guest with the bench disk as /dev/vda and `tvm-iobench` in its
/// initramfs), runs the three measurements and returns the figures.
fn disk_bench_one(cmd: Command, runner: Runner, o: &Opts) -> Result<DiskFigures, String> {
    let what = runner.name();
    let mut g = Guest::spawn(cmd, runner, o.verbose)?;
    let c = g.console.clone();
    let (_, pos) = g.ready_at_prompt(what)?;
    let mib = o.bench_mib;
    let secs = o.bench_secs;
    g.send(
        format!(
            "tvm-iobench seq-write /dev/vda {mib}; tvm-iobench seq-read /dev/vda {mib}; \
             tvm-iobench rand-read /dev/vda {secs}; \
             tvm-iobench rand-read /dev/vda {secs} {RAND_JOBS}; \
             echo bench-$((1+1))-done\n"
        )
        .as_bytes(),
    )?;
    // Generous for the sequential runs (slow under nested TCG), plus the two timed runs.
    let limit = Duration::from_secs(600 + 2 * secs);
    let Some(done) = c.wait_for("bench-2-done", pos, limit) else {
        let why = format!(
            "{what}: the benchmark did not finish; console: {}",
            c.tail(2000)
        );
        g.print_diag();
        return Err(why);
    };
    let text = c.text_between(pos, done);
    let text = text.as_str();
    let field = |op: &str, key: &str| -> Result<f64, String> {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("IOBENCH op={op} ")))
            .ok_or_else(|| format!("{what}: no {op} result; console: {text}"))?;
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{what}: no {key} in {line:?}"))
    };
    let many = format!("rand-read-qd{RAND_JOBS}");
    // What the guest's kernel counted in each run (information only): the requests the
    // device completed per access (how the block layer split a 1 MiB access) and the
    // virtio interrupts per request (how many completions one interrupt carries).
    for op in ["seq-write", "seq-read", "rand-read", many.as_str()] {
        if let (Ok(ios), Ok(reqs), Ok(irqs)) =
            (field(op, "ios"), field(op, "reqs"), field(op, "irqs"))
        {
            if reqs >= 0.0 && irqs >= 0.0 {
                println!(
                    "BENCH-DISK {what}: {op}: {reqs} device requests ({:.2} per access), \
                     {irqs} virtio interrupts ({:.2} per request) (information only)",
                    reqs / ios.max(1.0),
                    irqs / reqs.max(1.0)
                );
            }
        }
    }
    let f = DiskFigures {
        seq_write: field("seq-write", "mib_s")?,
        seq_read: field("seq-read", "mib_s")?,
        rand_iops: field("rand-read", "iops")?,
        rand_lat_us: field("rand-read", "lat_us")?,
        rand_many_iops: field(&many, "iops")?,
        peak_rss_kib: peak_rss_kib(g.child.id()).unwrap_or(0),
    };
    println!(
        "BENCH-DISK {what}: seq-write {:.1} MiB/s, seq-read {:.1} MiB/s, rand-read {:.0} IOPS \
         ({:.1} us each), {many} {:.0} IOPS, peak RSS {} KiB",
        f.seq_write, f.seq_read, f.rand_iops, f.rand_lat_us, f.rand_many_iops, f.peak_rss_kib
    );
    g.reboot_or_kill()?;
    Ok(f)
}

/// One guest's network figures: (host->guest MiB/s, guest->host MiB/s, guest->host MiB/s
/// in 1 KiB writes, peak RSS KiB).
type NetFigures = (f64, f64, f64, u64);

/// Counters that say where a transfer loses packets, read on this host (where the TAP's
/// host end is): the TAP's own, and the TCP stack's (`/proc/net/snmp`, `/proc/net/netstat`).
fn net_diag_counters(tap: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for f in ["rx_packets", "rx_dropped", "tx_packets", "tx_dropped"] {
        let v = std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/{f}"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        out.push((format!("tap.{f}"), v));
    }
    // Pairs of lines: names, then values, per protocol.
    let wanted = [
        "InSegs",
        "OutSegs",
        "RetransSegs",
        "InErrs",
        "InCsumErrors",
        "TCPOFOQueue",
        "TCPOFODrop",
        "TCPRcvQDrop",
        "TCPBacklogDrop",
        "PruneCalled",
        "TCPZeroWindowDrop",
        "TCPLossProbes",
    ];
    for file in ["/proc/net/snmp", "/proc/net/netstat"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            for (n, v) in names
                .split_whitespace()
                .zip(values.split_whitespace())
                .skip(1)
            {
                if wanted.contains(&n) {
                    out.push((format!("host.{n}"), v.parse().unwrap_or(0)));
                }
            }
        }
    }
    out
}

/// `name +delta` for each counter that moved between `before` and `after`.
fn net_diag_delta(before: &[(String, u64)], after: &[(String, u64)]) -> String {
    let moved: Vec<String> = after
        .iter()
        .filter_map(|(n, a)| {
            let b = before.iter().find(|(m, _)| m == n).map_or(0, |(_, b)| *b);
            (a != &b).then(|| format!("{n} +{}", a.saturating_sub(b)))
        })
        .collect();
    moved.join(", ")
}

/// Boots `cmd` (a guest whose eth0 is on TAP `o.tap`, `tvm-iobench` in its initramfs),
/// times `o.net_mib` MiB over TCP in each direction and returns the figures. The host end
/// is this process (`tcp_peer`, timed from accept to EOF); the guest end is `tvm-iobench
/// tcp-recv` / `tcp-send` (64 KiB per system call: bulk transfer), then, guest to host
/// once more, busybox `nc` fed by `dd` (1 KiB per write: small segments).
fn net_bench_one(cmd: Command, runner: Runner, o: &Opts) -> Result<NetFigures, String> {
    let what = runner.name();
    let tap = o.tap.as_deref().ok_or("net-bench needs --tap")?;
    let mut g = Guest::spawn(cmd, runner, o.verbose)?;
    tap_up(tap)?;
    let c = g.console.clone();
    let (_, mut pos) = g.ready_at_prompt(what)?;
    let mib = o.net_mib;
    let mut rates = Vec::new();
    for (port, send, script) in [
        (
            5003,
            mib,
            format!("tvm-iobench tcp-recv {HOST_IP} 5003; echo nb-$((1+1))-done\n"),
        ),
        (
            5004,
            0,
            format!("tvm-iobench tcp-send {HOST_IP} 5004 {mib}; echo nb-$((1+1))-done\n"),
        ),
        (
            5005,
            0,
            format!(
                "dd if=/dev/zero bs=64k count={} 2>/dev/null | nc {HOST_IP} 5005; echo nb-$((1+1))-done\n",
                mib * 16
            ),
        ),
    ] {
        let peer = tcp_peer(port, send)?;
        let before = net_diag_counters(tap);
        g.send(script.as_bytes())?;
        let done = c.wait_for("nb-2-done", pos, Duration::from_secs(1200));
        let result = peer.finish(if done.is_some() { STEP_TIMEOUT } else { Duration::ZERO });
        let Some(done) = done else {
            let why = format!(
                "{what}: transfer on port {port} did not finish ({result:?}); console: {}",
                c.tail(2000)
            );
            g.print_diag();
            return Err(why);
        };
        pos = done;
        // The guest's side: its TCP retransmissions (12th value of the `Tcp:` line).
        g.send(b"echo rt-$((1+1))-$(awk '/^Tcp:/{getline; print $13; exit}' /proc/net/snmp)-end\n")?;
        let retrans = c.value_until_end("rt-2-", pos, STEP_TIMEOUT);
        if let Some((end, _)) = &retrans {
            pos = *end;
        }
        println!(
            "BENCH-NET-DIAG {what} port {port}: {}; guest RetransSegs (since boot) {} \
             (information only)",
            net_diag_delta(&before, &net_diag_counters(tap)),
            retrans.map_or("?".to_string(), |(_, v)| v.trim().to_string())
        );
        let (bytes, _, secs) = result?;
        if bytes != mib << 20 {
            return Err(format!("{what}: {bytes} bytes moved on port {port}, expected {}", mib << 20));
        }
        rates.push(bytes as f64 / (1 << 20) as f64 / secs);
    }
    let figures = (
        rates[0],
        rates[1],
        rates[2],
        peak_rss_kib(g.child.id()).unwrap_or(0),
    );
    println!(
        "BENCH-NET {what}: host->guest {:.2} MiB/s, guest->host {:.2} MiB/s, guest->host in \
         1 KiB writes {:.2} MiB/s, peak RSS {} KiB",
        figures.0, figures.1, figures.2, figures.3
    );
    g.reboot_or_kill()?;
    // The TAP goes away with its last user; wait so the next guest creates it afresh.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/sys/class/net/{tap}")).exists()
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(50));
    }
    Ok(figures)
}

/// Keeps a benchmark sample, or reports a failed boot (under nested TCG a guest now and
/// then hangs) so that one bad boot does not void the other samples. The medians say how
/// many samples they come from.
fn keep<T>(tag: &str, sample: Result<T, String>, into: &mut Vec<T>) {
    match sample {
        Ok(s) => into.push(s),
        Err(e) => println!("{tag} sample failed, left out: {e}"),
    }
}

/// `net-bench`: TCP throughput both ways and peak RSS, our VMM against QEMU's
/// virtio-net-pci on the same TAP (vhost off), interleaved `--runs` times.
fn net_bench(o: &Opts) -> Result<bool, String> {
    let qemu = o.qemu.clone().ok_or("net-bench needs --qemu")?;
    let tap = o.tap.clone().ok_or("net-bench needs --tap")?;
    let mut ours: Vec<NetFigures> = Vec::new();
    let mut peer: Vec<NetFigures> = Vec::new();
    for run in 0..o.runs {
        println!("BENCH-NET run {run}");
        keep(
            "BENCH-NET",
            net_bench_one(vmm_command(o), Runner::Vmm, o),
            &mut ours,
        );
        let mut q = qemu_command(&qemu, o, None)?;
        q.arg("-netdev")
            .arg(format!(
                "tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off"
            ))
            // No option ROM: nothing PXE-boots, and the outer guest carries no ROM files.
            .args(["-device", "virtio-net-pci,netdev=n0,romfile="]);
        keep("BENCH-NET", net_bench_one(q, Runner::Qemu, o), &mut peer);
    }
    if ours.is_empty() || peer.is_empty() {
        return Err("no complete sample for one of the two".into());
    }
    let rows: [MedianRow<NetFigures>; 4] = [
        ("tcp-host-to-guest", "MiB/s", |f| f.0),
        ("tcp-guest-to-host", "MiB/s", |f| f.1),
        ("tcp-guest-to-host-1k-writes", "MiB/s", |f| f.2),
        ("peak-rss", "KiB", |f| f.3 as f64),
    ];
    print_medians("BENCH-NET", &rows, &ours, &peer);
    Ok(true)
}

/// One line of a benchmark summary: name, unit, and the figure it picks from a sample.
type MedianRow<T> = (&'static str, &'static str, fn(&T) -> f64);

/// Prints `<tag> median <name>: vmm A unit, qemu B unit, ratio vmm/qemu R (n and m runs)`
/// for each row, a row picking one figure out of a sample.
fn print_medians<T>(tag: &str, rows: &[MedianRow<T>], ours: &[T], peer: &[T]) {
    for (name, unit, f) in rows {
        let mut a: Vec<f64> = ours.iter().map(f).collect();
        let mut b: Vec<f64> = peer.iter().map(f).collect();
        let (a, b) = (median(&mut a), median(&mut b));
        println!(
            "{tag} median {name}: vmm {a:.2} {unit}, qemu {b:.2} {unit}, ratio vmm/qemu {:.2} ({} and {} runs)",
            a / b,
            ours.len(),
            peer.len()
        );
    }
}

/// `disk-bench`: block throughput, IOPS and peak RSS, for our VMM and QEMU's
/// virtio-blk-pci (`aio=io_uring`) on the same image with the same host cache mode
/// (`--disk-cache`), interleaved `--runs` times; medians and ratios.
fn disk_bench(o: &Opts) -> Result<bool, String> {
    let qemu = o.qemu.clone().ok_or("disk-bench needs --qemu")?;
    let disk = o.disk.clone().ok_or("disk-bench needs --disk")?;
    // A raw image with room for the sequential runs, fully written once, so that neither
    // VMM pays for the host allocating its blocks (on tmpfs that is page allocation and
    // zeroing) during its write run.
    // The image may also be a block device of at least that size (a RAM disk for
    // `--disk-cache none` where the file systems at hand have no O_DIRECT): then this
    // fills it, and the sync leaves nothing for the host to write back during the runs.
    let fill = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&disk)?;
        f.write_all(&vec![0u8; ((o.bench_mib + 64) << 20) as usize])?;
        f.sync_all()
    };
    fill().map_err(|e| format!("cannot create the bench image {disk}: {e}"))?;
    println!(
        "BENCH-DISK image {disk}, host cache mode {}",
        o.disk_cache.as_str()
    );
    let mut ours: Vec<DiskFigures> = Vec::new();
    let mut peer: Vec<DiskFigures> = Vec::new();
    for run in 0..o.runs {
        println!("BENCH-DISK run {run}");
        keep(
            "BENCH-DISK",
            disk_bench_one(vmm_command(o), Runner::Vmm, o),
            &mut ours,
        );
        keep(
            "BENCH-DISK",
            disk_bench_one(qemu_command(&qemu, o, Some(&disk))?, Runner::Qemu, o),
            &mut peer,
        );
    }
    if ours.is_empty() || peer.is_empty() {
        return Err("no complete sample for one of the two".into());
    }
    let rows: [MedianRow<DiskFigures>; 6] = [
        ("seq-write", "MiB/s", |f| f.seq_write),
        ("seq-read", "MiB/s", |f| f.seq_read),
        ("rand-read-4k", "IOPS", |f| f.rand_iops),
        ("rand-read-4k-latency", "us", |f| f.rand_lat_us),
        ("rand-read-4k-qd32", "IOPS", |f| f.rand_many_iops),
        ("peak-rss", "KiB", |f| f.peak_rss_kib as f64),
    ];
    print_medians("BENCH-DISK", &rows, &ours, &peer);
    Ok(true)
}

/// `boot-time`: for each of `--bench-cpus`, the VMM and QEMU booted alternately
/// `--runs` times each with that many vCPUs; spawn-to-ready and the idle CPU figure
/// (every vCPU idle), per run and as medians with their ratio.
fn boot_time(o: &Opts) -> Result<bool, String> {
    let qemu = o.qemu.clone().ok_or("boot-time needs --qemu")?;
    for cpus in &o.bench_cpus {
        let o = Opts {
            cpus: cpus.clone(),
            ..o.clone()
        };
        let n = smp::Topology::parse(cpus)?.cpus();
        let mut ours = Vec::new();
        let mut peer = Vec::new();
        let mut idle_ours = Vec::new();
        let mut idle_peer = Vec::new();
        for run in 0..o.runs {
            // Interleave the two so drift in the machine's speed hits both alike.
            let (t, idle) = time_to_ready(vmm_command(&o), Runner::Vmm, o.verbose)?;
            ours.push(t.as_secs_f64() * 1000.0);
            idle_ours.push(idle);
            let q = qemu_command(&qemu, &o, None)?;
            let (t, idle) = time_to_ready(q, Runner::Qemu, o.verbose)?;
            peer.push(t.as_secs_f64() * 1000.0);
            idle_peer.push(idle);
            println!(
                "BOOT-TIME cpus={cpus} run {run}: vmm {:.0} ms, qemu {:.0} ms; idle CPU vmm {:.2}%, qemu {:.2}%",
                ours[run], peer[run], idle_ours[run], idle_peer[run]
            );
        }
        let (m_ours, m_peer) = (median(&mut ours), median(&mut peer));
        println!(
            "BOOT-TIME median spawn-to-ready with {n} vCPU(s) (--cpus {cpus}): vmm {m_ours:.0} ms, qemu {m_peer:.0} ms, ratio vmm/qemu {:.2} ({} runs each)",
            m_ours / m_peer,
            o.runs
        );
        let (i_ours, i_peer) = (median(&mut idle_ours), median(&mut idle_peer));
        println!(
            "IDLE-CPU median with the guest idle at its prompt, {n} idle vCPU(s): vmm {i_ours:.2}%, qemu {i_peer:.2}% of one CPU, ratio vmm/qemu {:.2} ({} runs each)",
            i_ours / i_peer,
            o.runs
        );
    }
    Ok(true)
}

fn main() -> ExitCode {
    hosterr::private_mounts();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, rest) = match args.first().map(String::as_str) {
        Some("boot-time") => ("boot-time", &args[1..]),
        Some("disk-bench") => ("disk-bench", &args[1..]),
        Some("net-bench") => ("net-bench", &args[1..]),
        Some("vsock-bench") => ("vsock-bench", &args[1..]),
        Some("power-cut") => ("power-cut", &args[1..]),
        Some("snapshot-bench") => ("snapshot-bench", &args[1..]),
        Some("boot") => ("boot", &args[1..]),
        _ => ("boot", &args[..]),
    };
    let result = parse_opts(rest).inspect(|o| {
        if let Some(limit) = o.timeout {
            start_watchdog(limit);
        }
    });
    let result = result.and_then(|o| match mode {
        "boot-time" => boot_time(&o),
        "power-cut" => power_cut(&o),
        "disk-bench" => disk_bench(&o),
        "net-bench" => net_bench(&o),
        "vsock-bench" => vsockbench::vsock_bench(&o),
        "snapshot-bench" => snapshot::snapshot_bench(&o),
        _ => all_boot_checks(&o),
    });
    match result {
        Ok(true) => {
            println!("E2E RESULT ok");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("E2E RESULT failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("E2E RESULT error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_bench_cache_mode_reaches_both_vmms() {
        let args = |extra: &[&str]| -> Vec<String> {
            [
                "--vmm", "v", "--kernel", "k", "--initrd", "i", "--disk", "/d.img",
            ]
            .iter()
            .chain(extra)
            .map(|a| a.to_string())
            .collect()
        };
        let cmd_args = |c: &Command| -> Vec<String> {
            c.get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        for (extra, ours, theirs) in [
            (&[][..], "/d.img", "cache=writeback,aio=io_uring"),
            (
                &["--disk-cache", "writeback"][..],
                "/d.img",
                "cache=writeback,aio=io_uring",
            ),
            (
                &["--disk-cache", "none"][..],
                "/d.img,cache=none",
                "cache=none,aio=io_uring",
            ),
        ] {
            let o = parse_opts(&args(extra)).expect("valid options");
            let vmm = cmd_args(&vmm_command(&o));
            let at = vmm.iter().position(|a| a == "--disk").expect("a --disk");
            assert_eq!(vmm[at + 1], ours, "{extra:?}");
            let qemu = cmd_args(&qemu_command("q", &o, o.disk.as_deref()).expect("a topology"));
            assert!(
                qemu.iter()
                    .any(|a| a.starts_with("file=/d.img,") && a.ends_with(theirs)),
                "{extra:?}: {qemu:?}"
            );
        }
        assert!(parse_opts(&args(&["--disk-cache", "directsync"])).is_err());
    }

    #[test]
    fn hwrng_answers() {
        let a = "0123456789abcdef0123456789abcdef";
        let b = "fedcba9876543210fedcba9876543210";
        assert!(hwrng_answer(&format!("virtio_rng.0-4096-{a}-{b}")).is_ok());
        for bad in [
            format!("none-4096-{a}-{b}"),
            format!("virtio_rng.0-0-{a}-{b}"),
            format!("virtio_rng.0-4096-{a}-{a}"),
            format!("virtio_rng.0-4096-{MD5_OF_64_ZEROS}-{b}"),
            "virtio_rng.0-4096".to_string(),
        ] {
            assert!(hwrng_answer(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn crc32_matches_busybox() {
        // `printf 'hello\n' | busybox crc32` prints 363a3020.
        assert_eq!(crc32(b"hello\n"), 0x363a_3020);
        assert_eq!(crc32(b""), 0);
        let d = flood_data(1000);
        assert!(d.iter().all(|b| (b' '..=b'~').contains(b) || *b == b'\n'));
        assert_eq!(d[255], b'\n');
    }

    fn local_listener() -> std::net::TcpListener {
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")
    }

    /// A guest whose `nc` never connects: the peer gives up at its accept limit.
    #[test]
    fn tcp_peer_without_a_connection_gives_up() {
        let started = Instant::now();
        let peer = tcp_peer_on(local_listener(), 1, Duration::from_millis(300)).expect("peer");
        let err = peer
            .finish(Duration::from_secs(30))
            .expect_err("nobody connected");
        assert!(err.contains("no connection"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    /// A guest that never printed its line: the peer is cancelled at once, accept or not.
    #[test]
    fn tcp_peer_is_cancelled() {
        let started = Instant::now();
        let peer = tcp_peer_on(local_listener(), 0, Duration::from_secs(600)).expect("peer");
        let err = peer.finish(Duration::ZERO).expect_err("cancelled");
        assert!(err.contains("cancelled"), "{err}");
        // A connection that sends nothing and never closes is cancelled too.
        let listener = local_listener();
        let addr = listener.local_addr().expect("addr");
        let peer = tcp_peer_on(listener, 0, Duration::from_secs(600)).expect("peer");
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        thread::sleep(Duration::from_millis(300));
        let err = peer.finish(Duration::ZERO).expect_err("cancelled");
        assert!(err.contains("cancelled"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    /// Both directions move the data and report the CRC the other end computes.
    #[test]
    fn tcp_peer_moves_data_both_ways() {
        let listener = local_listener();
        let addr = listener.local_addr().expect("addr");
        let peer = tcp_peer_on(listener, 1, Duration::from_secs(10)).expect("peer");
        let mut got = Vec::new();
        std::net::TcpStream::connect(addr)
            .and_then(|mut c| c.read_to_end(&mut got))
            .expect("receive");
        let (bytes, crc, _) = peer.finish(Duration::from_secs(10)).expect("sent");
        assert_eq!((bytes, got.len()), (1 << 20, 1 << 20));
        assert_eq!(crc, crc32(&got));

        let listener = local_listener();
        let addr = listener.local_addr().expect("addr");
        let peer = tcp_peer_on(listener, 0, Duration::from_secs(10)).expect("peer");
        let data = flood_data(100_000);
        std::net::TcpStream::connect(addr)
            .and_then(|mut c| c.write_all(&data))
            .expect("send");
        let (bytes, crc, _) = peer.finish(Duration::from_secs(10)).expect("received");
        assert_eq!((bytes, crc), (100_000, crc32(&data)));
    }

    #[test]
    fn tools_are_killed_at_their_limit() {
        let started = Instant::now();
        let err = output_within(Command::new("sleep").arg("30"), Duration::from_millis(200))
            .expect_err("killed");
        assert!(err.contains("killed"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let out =
            output_within(Command::new("echo").arg("hi"), Duration::from_secs(10)).expect("echo");
        assert_eq!(out.stdout, b"hi\n");
        assert!(out.status.success());
        let h = thread::spawn(|| thread::sleep(Duration::from_secs(5)));
        assert!(join_within(h, Duration::from_millis(100)).is_none());
        assert_eq!(
            join_within(thread::spawn(|| 7), Duration::from_secs(5)),
            Some(7)
        );
    }

    #[test]
    fn interrupt_lines_parse() {
        let pit = parse_irq_line("  0:         47   IO-APIC   2-edge      timer").expect("pit");
        assert_eq!((pit.label.as_str(), pit.count), ("0:", 47));
        assert_eq!(pit.what, "IO-APIC 2-edge timer");
        let two = parse_irq_line("LOC:   100  23   Local timer interrupts").expect("loc");
        assert_eq!((two.label.as_str(), two.count), ("LOC:", 123));
        assert_eq!(parse_irq_line("           CPU0"), None);
        assert_eq!(parse_irq_line("garbage"), None);
    }

    #[test]
    fn pit_and_sci_must_not_move_while_idle() {
        let lines = |pit: u64, sci: u64| {
            vec![
                parse_irq_line(&format!("  0: {pit} IO-APIC 2-edge timer")).expect("pit"),
                parse_irq_line(&format!("  9: {sci} IO-APIC 9-fasteoi acpi")).expect("sci"),
                parse_irq_line("LOC: 500 Local timer interrupts").expect("loc"),
            ]
        };
        let ok = quiet_while_idle(&lines(47, 0), &lines(47, 0)).expect("quiet");
        assert!(ok.contains("stayed at 47"), "{ok}");
        let err = quiet_while_idle(&lines(47, 0), &lines(52, 0)).expect_err("pit moved");
        assert!(err.contains("took 5 interrupt"), "{err}");
        assert!(quiet_while_idle(&lines(47, 0), &lines(47, 1)).is_err());
        assert!(quiet_while_idle(&[], &lines(47, 0)).is_err());
    }

    #[test]
    fn a_panic_or_a_triple_fault_is_not_a_clean_reboot() {
        let console = "ok\r\n# reboot\r\n[   9.1] reboot: Restarting system\r\n";
        let stderr = "[INFO] guest stopped: the guest rebooted\n\
                      TVM-BOOT-TIMES vmm_start_ms=0.0 exit_ms=9.3 exit_reason=reboot\n";
        let ok = clean_reboot(Some(Some(0)), console, stderr).expect("clean");
        assert!(ok.contains("the guest rebooted"), "{ok}");
        // Other ways out that also exit 0 are not a reboot, nor is a VMM that names none.
        for other in ["poweroff", "halted", "signal", "console_escape"] {
            let stderr = stderr.replace("exit_reason=reboot", &format!("exit_reason={other}"));
            let err = clean_reboot(Some(Some(0)), console, &stderr).expect_err(other);
            assert!(err.contains(other), "{err}");
        }
        let unnamed = stderr.replace(" exit_reason=reboot", "");
        assert!(clean_reboot(Some(Some(0)), console, &unnamed).is_err());
        let panicked = format!("{console}[   9.2] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009\r\n");
        let err = clean_reboot(Some(Some(0)), &panicked, stderr).expect_err("panic");
        assert!(err.contains("Attempted to kill init"), "{err}");
        for triple in [
            "guest stopped: TripleFault",
            "WARN guest triple fault at rip 0x1000",
        ] {
            assert!(
                clean_reboot(Some(Some(0)), console, triple).is_err(),
                "{triple}"
            );
        }
        assert!(clean_reboot(Some(Some(1)), console, stderr).is_err());
        assert!(clean_reboot(Some(None), console, stderr).is_err());
        assert!(clean_reboot(None, console, stderr).is_err());
    }

    #[test]
    fn uname_must_be_the_packaged_kernel() {
        let v = "#1 SMP PREEMPT_DYNAMIC Debian 6.1.176-1 (2026-10-01)";
        let r = "6.1.0-50-cloud-amd64";
        assert!(uname_check(Some(r), Some(v), Some(r), Some("6.1.176-1")).is_ok());
        assert!(uname_check(Some(r), Some(v), Some(r), None).is_ok());
        assert!(uname_check(Some("6.1.0-49-cloud-amd64"), Some(v), Some(r), None).is_err());
        assert!(uname_check(Some(r), Some(v), Some(r), Some("6.1.177-1")).is_err());
        assert!(uname_check(None, None, Some(r), None).is_err());
        assert!(uname_check(Some(""), None, None, None).is_err());
    }

    #[test]
    fn options_parse() {
        let args: Vec<String> = [
            "--vmm",
            "v",
            "--kernel",
            "k",
            "--initrd",
            "i",
            "--timeout",
            "30",
            "--kernel-release",
            "6.1.0-50-cloud-amd64",
            "--sigkill-durability",
            "--dur-raw",
            "/dev/vdc",
            "--dur-ext4",
            "/dev/vdd",
            "--power-cut-wait",
            "5",
            "--system-map",
            "/tvm/System.map",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let o = parse_opts(&args).expect("parse");
        assert_eq!(o.timeout, Some(Duration::from_secs(30)));
        assert_eq!(o.kernel_release.as_deref(), Some("6.1.0-50-cloud-amd64"));
        assert!(o.sigkill_durability);
        assert_eq!(o.dur_raw.as_deref(), Some("/dev/vdc"));
        assert_eq!(o.dur_ext4.as_deref(), Some("/dev/vdd"));
        assert_eq!(o.power_cut_wait, Duration::from_secs(5));
        assert_eq!(o.system_map.as_deref(), Some("/tvm/System.map"));
        let vmm: Vec<String> = vmm_command(&o)
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(vmm
            .windows(2)
            .any(|w| w == ["--system-map", "/tvm/System.map"]));
        assert!(parse_opts(&["--timeout".to_string(), "x".to_string()]).is_err());
    }

    #[test]
    fn dump_end_line() {
        assert!(is_dump_end("dump 1: end"));
        assert!(is_dump_end(
            "[  0.534458] WARN  tvm_vmm::vmm: dump 12: end\r"
        ));
        assert!(!is_dump_end("dump 1: vcpu0: exits 9 (io-out 8); last: end"));
        assert!(!is_dump_end("dump : end"));
        assert!(!is_dump_end("dump x1: end"));
        assert!(!is_dump_end("dump 1: endless"));
    }

    #[test]
    fn a_dump_is_never_requested_from_a_process_that_is_gone() {
        let mut child = Command::new("true").spawn().expect("true");
        let pid = child.id();
        child.wait().expect("wait");
        let stderr = Console::default();
        let started = Instant::now();
        let (_, lines) = request_dump(pid, &stderr);
        assert!(started.elapsed() < Duration::from_millis(500));
        assert_eq!(lines, ["no dump: the vmm is no longer running"]);
    }
}
