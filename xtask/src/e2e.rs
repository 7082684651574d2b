//! `cargo xtask e2e`: boot the real Linux test guest in the VMM and check real outcomes.
//!
//! The checks live in the `tvm-e2e` driver (tests/src/bin/tvm-e2e.rs), a static binary
//! that runs next to the VMM: directly on a host whose /dev/kvm can run Linux, otherwise
//! inside the outer QEMU guest (where kvm-amd gives one). Running the driver beside the VMM
//! keeps the console on fast local pipes and lets it read the VMM's RSS from /proc.

use std::process::{Command, ExitCode, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::guest;
use crate::outer::{self, OuterRun};
use crate::util;

/// The TAP the e2e guest's eth0 is attached to (created by the VMM, configured by the
/// driver: host end 10.0.2.1/24, guest 10.0.2.2/24).
pub const E2E_TAP: &str = "tvm-e2e0";

/// Options of `cargo xtask e2e`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Copy the guest console to stderr as it happens.
    #[arg(long)]
    pub verbose: bool,
    /// Size of the stdin flood, in KiB.
    #[arg(long, default_value_t = 4096)]
    pub flood_kib: usize,
    /// MiB sent over TCP in each direction by the virtio-net check.
    #[arg(long, default_value_t = 64)]
    pub net_mib: u64,
    /// `--cpus` of the main boot (disks, network, console, reboot).
    #[arg(long, default_value = "2")]
    pub cpus: String,
    /// `--cpus` of the many-vCPU boots after the main one, one boot per spec (no
    /// `--memory`: the 1 GiB default): CPU count, topology in sysfs, pinned tasks, local
    /// timers, CPU offline/online, a parallel job, `reboot` from the last CPU. A
    /// `key=value` part belongs to the count before it; `none` skips them.
    #[arg(long, default_value = "4,sockets=2,8,threads=2,sockets=2")]
    pub smp_cpus: String,
    /// Only the many-vCPU boots (no disks, network, durability power cut or Firecracker
    /// API boots).
    #[arg(long)]
    pub smp_only: bool,
    /// Skip the two boots through Firecracker's interface (one configured and started over
    /// the API socket, with pause/resume and Ctrl-Alt-Del; one from `--config-file`).
    #[arg(long)]
    pub no_fc_api: bool,
    /// Only the boots through Firecracker's interface.
    #[arg(long, conflicts_with_all = ["no_fc_api", "smp_only"])]
    pub fc_api_only: bool,
    /// Skip the snapshot boots (a guest saved with --snapshot-on-signal, restored twice,
    /// the second time on another TAP).
    #[arg(long)]
    pub no_snapshot: bool,
    /// Only the snapshot boots.
    #[arg(long, conflicts_with_all = ["no_snapshot", "smp_only", "fc_api_only"])]
    pub snapshot_only: bool,
    /// Limit for the whole run, in seconds.
    #[arg(long, default_value_t = 1020)]
    pub timeout: u64,
    /// Run only the durability power cut (nested runs: one outer boot, one inner boot), to
    /// check a change to how the VMM flushes its disks without the whole run.
    #[arg(long)]
    pub durability_only: bool,
}

/// The driver's arguments, with the three paths it needs.
fn driver_args(
    mode: &[&str],
    vmm: &str,
    kernel: &str,
    initrd: &str,
    extra: &[&str],
) -> Vec<String> {
    mode.iter()
        .chain(["--vmm", vmm, "--kernel", kernel, "--initrd", initrd].iter())
        .chain(extra.iter())
        .map(|s| s.to_string())
        .collect()
}

/// What the nested run keeps of its limit for the outer boot before the payload starts
/// and for the durability phase after the checks: the checks' driver gets the rest as its
/// own `--timeout`, so that it reports its own overrun, with the console, before the outer
/// guest is killed.
const NESTED_RESERVE: Duration = Duration::from_secs(150);
/// The power-cut driver's `--timeout`: one inner boot and 8 MiB of fsync'ed writes.
const POWER_CUT_TIMEOUT: Duration = Duration::from_secs(240);
/// How long the power-cut driver waits to be killed after asking for it.
const POWER_CUT_WAIT: Duration = Duration::from_secs(60);
/// How much longer than the driver's own `--timeout` xtask waits for a driver that runs
/// directly on this host before killing it.
const DIRECT_GRACE: Duration = Duration::from_secs(60);

/// The payload of a nested run: the driver with `main_args` (none: status 0), `sync`, its
/// status on the console as `E2E-MAIN-EXIT <n>`; then, when `power_cut_args` is given and the checks
/// passed, the durability phase: the outer guest stops writing back dirty pages on its own
/// (no periodic flusher, nothing expires for an hour), so that what the inner VMM writes
/// to the durability drives reaches the host files only through its FLUSH (fdatasync on the
/// outer block device), and the driver in `power-cut` mode, which prints
/// [`POWER_CUT_MARK`] for xtask to kill the outer QEMU.
///
/// A non-empty `setup` (shell lines) runs first, in a subshell with `set -e`; if it fails,
/// the driver does not run, the payload prints `E2E FAIL outer-setup` and its status is 1.
fn nested_payload(
    setup: &str,
    main_args: Option<&[String]>,
    power_cut_args: Option<&[String]>,
) -> String {
    let mut script = match main_args {
        Some(args) => format!(
            "{pin} /tvm/tvm-e2e {main}\nrc=$?\n",
            pin = outer::PIN_TO_ONE_CPU,
            main = util::shell_join(args),
        ),
        None => "rc=0\n".to_string(),
    };
    if !setup.is_empty() {
        script = format!(
            // Not `if ( set -e ..)`: a condition's subshell ignores `set -e`.
            "( set -e\n{setup}\n)\nif [ $? -eq 0 ]; then\n{script}else\n\
             \x20   echo \"E2E FAIL outer-setup: the set-up before the driver failed\"\n\
             \x20   rc=1\n\
             fi\n"
        );
    }
    if main_args.is_some() {
        script.push_str("sync\n");
    }
    script.push_str("echo \"E2E-MAIN-EXIT $rc\"\n");
    if let Some(args) = power_cut_args {
        script.push_str(&format!(
            "if [ $rc -eq 0 ]; then\n{}fi\n\
             if [ $rc -eq 0 ]; then\n\
             \x20   {pin} /tvm/tvm-e2e {args}\n\
             \x20   rc=$?\n\
             fi\n",
            outer::no_writeback_script(&DURABILITY_DEVICES),
            pin = outer::PIN_TO_ONE_CPU,
            args = util::shell_join(args),
        ));
    }
    // `sync`: a payload that ends is followed by a forced power-off, so nothing may stay in
    // the outer page cache (the checks' disks were synced above already).
    script.push_str("sync\nexit $rc\n");
    script
}

/// The outer guest's devices of the durability drives (its third and fourth).
const DURABILITY_DEVICES: [&str; 2] = ["vdc", "vdd"];

/// The text the power-cut driver prints when the guest's writes are fsync'ed (the
/// driver's `POWER_CUT_MARK`).
pub const POWER_CUT_MARK: &str = "E2E-POWER-CUT-NOW";

/// The status in the last `E2E-MAIN-EXIT <n>` line of a nested run's console.
fn main_exit(console: &str) -> Option<i32> {
    console
        .lines()
        .rev()
        .filter_map(|l| l.trim_end_matches('\r').split("E2E-MAIN-EXIT ").nth(1))
        .find_map(|n| n.trim().parse().ok())
}

/// `--kernel-release` (the release of the unpacked vmlinuz) and, when the pinned kernel
/// package is the one in the download cache, `--kernel-version` (its Debian version, which
/// `uname -v` names): what the guest's `uname` must say.
fn kernel_args(images: &guest::GuestImages) -> Vec<String> {
    let mut args = vec![
        "--kernel-release".to_string(),
        images.kernel_release.clone(),
    ];
    let pinned = format!(
        "{}_{}_",
        guest::KERNEL_PACKAGE,
        guest::KERNEL_VERSION.replace(':', "%3a")
    );
    let cached = std::fs::read_dir(images.dir.join("debs"))
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(&pinned))
        })
        .unwrap_or(false);
    if cached {
        args.extend([
            "--kernel-version".to_string(),
            guest::KERNEL_VERSION.to_string(),
        ]);
    }
    args
}

/// Runs `cmd`, its output copied to ours as it comes, and kills it if it has not ended
/// within `limit`. Returns its exit code (1 for a signal) and its stdout.
fn run_with_limit(cmd: &mut Command, limit: Duration) -> Result<(i32, String)> {
    use std::io::{Read, Write};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", util::display_cmd(cmd)))?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("the driver's stdout is not piped"))?;
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&buf[..n]);
            let _ = out.flush();
            all.extend_from_slice(&buf[..n]);
        }
        all
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // The driver's VMMs die with it (PR_SET_PDEATHSIG), so the pipe closes; never wait
    // for ever all the same.
    let join_deadline = Instant::now() + Duration::from_secs(10);
    while !reader.is_finished() && Instant::now() < join_deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = if reader.is_finished() {
        reader.join().unwrap_or_default()
    } else {
        Vec::new()
    };
    let text = String::from_utf8_lossy(&text).into_owned();
    match status {
        Some(status) => Ok((status.code().unwrap_or(1), text)),
        None => bail!(
            "the end-to-end driver was still running after {limit:?} and was killed; its \
             output ends:\n{}",
            tail(&text, 40)
        ),
    }
}

/// Runs the driver with `mode` (e.g. `[]` for the checks, `["boot-time"]` for timing)
/// beside the VMM; `extra_files` are carried into the outer guest as `(host, guest)`.
/// Returns the driver's exit code and its output.
/// `initrd` replaces the test guest's initramfs (a host path; carried into the outer guest).
/// `timeout` limits the whole run, wherever the driver runs: the driver gets it (less
/// what the outer boot needs) as its own `--timeout`, and xtask kills what is left after it.
/// `nested_setup`: shell lines the outer guest runs (as root, with `set -e`) before the
/// driver, e.g. to load a [`guest::OUTER_SPARE_MODULES`] module; not run when the driver
/// runs directly on this host.
pub fn run_driver(
    mode: &[&str],
    extra_args: &[&str],
    extra_files: &[(std::path::PathBuf, String)],
    initrd: Option<&std::path::Path>,
    nested_setup: &str,
    verbose: bool,
    timeout: Duration,
) -> Result<(i32, String)> {
    run_driver_with(
        mode,
        extra_args,
        extra_files,
        initrd,
        nested_setup,
        verbose,
        timeout,
        false,
    )
}

/// [`run_driver`]; with `durability_only` (nested, checks mode only) the payload skips
/// the checks and runs only the durability power cut.
#[allow(clippy::too_many_arguments)]
fn run_driver_with(
    mode: &[&str],
    extra_args: &[&str],
    extra_files: &[(std::path::PathBuf, String)],
    initrd: Option<&std::path::Path>,
    nested_setup: &str,
    verbose: bool,
    timeout: Duration,
    durability_only: bool,
) -> Result<(i32, String)> {
    let vmm = outer::build_static("tvm-vmm", "vmm")?;
    let driver = outer::build_static("tvm-tests", "tvm-e2e")?;
    let images = guest::ensure_prepared()?;
    // The checks' guest has the vsock checks' program (tests/src/bin/tvm-vsock-guest.rs).
    let checks_initrd = match (mode.is_empty(), initrd) {
        (true, None) => Some(guest::initramfs_with(
            &["tvm-vsock-guest"],
            "e2e-initramfs.cpio.gz",
        )?),
        _ => None,
    };
    let initrd = checks_initrd.as_deref().or(initrd);
    // The guest writes to its disk: give it a scratch copy of the pristine image.
    let scratch_disk = images.dir.join("e2e-disk.ext4");
    std::fs::copy(&images.disk, &scratch_disk)?;
    let scratch_ro = images.dir.join("e2e-disk-ro.ext4");
    std::fs::copy(&images.disk, &scratch_ro)?;
    // e2fsck and debugfs check the image after the guest is gone, beside the VMM.
    let mut fs_tools = Vec::new();
    for tool in ["e2fsck", "debugfs"] {
        let path =
            util::which(tool).ok_or_else(|| anyhow::anyhow!("{tool} not found (e2fsprogs)"))?;
        fs_tools.push(util::binary_with_libs(&path)?);
    }
    let (e2fsck, debugfs) = (fs_tools[0][0].1.clone(), fs_tools[1][0].1.clone());
    let kernel = kernel_args(&images);
    let mut extra: Vec<&str> = extra_args.to_vec();
    if verbose {
        extra.push("--verbose");
    }
    if mode.is_empty() {
        extra.extend(kernel.iter().map(String::as_str));
    }
    if outer::kvm_is_usable_directly() {
        if durability_only {
            bail!(
                "--durability-only needs the nested run: the power cut is of the outer guest \
                 (this host's /dev/kvm runs the VMM directly)"
            );
        }
        let disk = scratch_disk.to_string_lossy().into_owned();
        let ro = scratch_ro.to_string_lossy().into_owned();
        let limit = timeout.as_secs().to_string();
        let mut extra = extra.clone();
        extra.extend(["--timeout", &limit]);
        if mode.is_empty() {
            extra.extend(["--disk", &disk, "--ro-disk", &ro]);
            extra.extend(["--e2fsck", &e2fsck, "--debugfs", &debugfs]);
            extra.extend(["--tap", E2E_TAP]);
            // No outer guest to cut the power of: the SIGKILL variant (see docs/testing.md).
            extra.push("--sigkill-durability");
        }
        let args = driver_args(
            mode,
            &vmm.to_string_lossy(),
            &images.vmlinuz.to_string_lossy(),
            &initrd.unwrap_or(&images.initramfs).to_string_lossy(),
            &extra,
        );
        let mut cmd = Command::new(&driver);
        cmd.args(&args);
        println!("xtask: {}", util::display_cmd(&cmd));
        return run_with_limit(&mut cmd, timeout + DIRECT_GRACE);
    }
    println!("note: /dev/kvm here is PVM (or missing); running the end-to-end tests inside a QEMU TCG outer guest");
    // The images are the outer guest's virtio disks, so what the inner guest writes
    // crosses our VMM and the outer QEMU into the host files, which are checked below.
    let mut drives = Vec::new();
    let main_limit = timeout
        .saturating_sub(NESTED_RESERVE)
        .max(Duration::from_secs(60));
    let main_limit = main_limit.as_secs().to_string();
    extra.extend(["--timeout", &main_limit]);
    // The durability drives: an 8 MiB raw image of zeros and a clean ext4 image.
    let dur_raw = images.dir.join("e2e-dur.raw");
    let dur_ext4 = images.dir.join("e2e-dur.ext4");
    let ro_before = if mode.is_empty() {
        for i in 0..4 {
            drives.push(outer::outer_disk_path(i));
        }
        extra.extend(["--disk", &drives[0], "--ro-disk", &drives[1]]);
        extra.extend(["--e2fsck", &e2fsck, "--debugfs", &debugfs]);
        extra.extend(["--tap", E2E_TAP]);
        std::fs::write(&dur_raw, vec![0u8; 8 << 20])?;
        std::fs::copy(&images.disk, &dur_ext4)?;
        Some(crc32_file(&scratch_ro)?)
    } else {
        None
    };
    let guest_initrd = if initrd.is_some() {
        "/tvm/initramfs-alt.cpio.gz"
    } else {
        "/tvm/initramfs.cpio.gz"
    };
    let args = driver_args(mode, "/tvm/vmm", "/tvm/vmlinuz", guest_initrd, &extra);
    let power_cut_args = mode.is_empty().then(|| {
        let (limit, wait) = (
            POWER_CUT_TIMEOUT.as_secs().to_string(),
            POWER_CUT_WAIT.as_secs().to_string(),
        );
        debug_assert_eq!(drives[2], format!("/dev/{}", DURABILITY_DEVICES[0]));
        let mut more = vec!["--dur-raw", &drives[2], "--dur-ext4", &drives[3]];
        more.extend(["--timeout", &limit, "--power-cut-wait", &wait]);
        if verbose {
            more.push("--verbose");
        }
        driver_args(
            &["power-cut"],
            "/tvm/vmm",
            "/tvm/vmlinuz",
            guest_initrd,
            &more,
        )
    });
    let main_args = (!durability_only).then_some(args.as_slice());
    let mut run = OuterRun::new(nested_payload(
        nested_setup,
        main_args,
        power_cut_args.as_deref(),
    ))
    .file(&vmm, "vmm")
    .file(&driver, "tvm-e2e")
    .with_test_guest(&images);
    if mode.is_empty() {
        // The read-write attachment is deliberate for the read-only disk too: our VMM's
        // readonly=on is what must keep it unchanged.
        run.drive(&scratch_disk, false);
        run.drive(&scratch_ro, false);
        run.drive(&dur_raw, false);
        run.drive(&dur_ext4, false);
        run.kill_on = Some(POWER_CUT_MARK.to_string());
        // Both tools load libc and friends: carry each path once.
        let unique: std::collections::BTreeMap<&String, &std::path::PathBuf> =
            fs_tools.iter().flatten().map(|(h, g)| (g, h)).collect();
        for (guest, host) in unique {
            run = run.file(host, guest.clone());
        }
    }
    for (host, guest) in extra_files {
        run = run.file(host, guest.clone());
    }
    if let Some(initrd) = initrd {
        run = run.file(initrd, "initramfs-alt.cpio.gz");
    }
    run.timeout = timeout;
    run.quiet = !verbose;
    let outcome = run.run()?;
    println!(
        "xtask: outer guest ran {:.0} s ({} boot{}{})",
        outcome.elapsed.as_secs_f64(),
        outcome.attempts,
        if outcome.attempts == 1 { "" } else { "s" },
        if outcome.power_cut {
            ", ended by the power cut"
        } else {
            ""
        }
    );
    let report: String = outcome
        .console_output
        .lines()
        .filter(|l| {
            l.starts_with("E2E")
                || l.starts_with("BOOT-TIME")
                || l.starts_with("IDLE-CPU")
                || l.starts_with("BENCH")
        })
        .map(|l| format!("{}\n", l.trim_end_matches('\r')))
        .collect();
    if !verbose {
        print!("{report}");
    }
    if outcome.timed_out {
        bail!(
            "the end-to-end run timed out after {timeout:?}; console tail:\n{}",
            tail(&outcome.console_output, 40)
        );
    }
    let Some(mut code) = main_exit(&outcome.console_output).or(outcome.exit_code) else {
        bail!(
            "the driver did not report an exit status; console tail:\n{}",
            tail(&outcome.console_output, 40)
        );
    };
    let mut checks = Vec::new();
    if let Some(ro_before) = ro_before {
        // The main boot's disks, unless it did not run (the durability or snapshot run
        // alone).
        if !durability_only && !extra_args.contains(&"--snapshot-only") {
            checks = host_disk_checks(&report, &scratch_disk, &scratch_ro, ro_before, &fs_tools);
        }
        if code == 0 {
            checks.extend(power_cut_checks(
                &report, &outcome, &dur_raw, &dur_ext4, &fs_tools,
            ));
        } else {
            println!("xtask: the durability power cut did not run: the checks before it failed");
        }
    }
    for (name, result) in &checks {
        match result {
            Ok(detail) => println!("E2E PASS {name}: {detail}"),
            Err(why) => println!("E2E FAIL {name}: {why}"),
        }
    }
    if checks.iter().any(|(_, r)| r.is_err()) && code == 0 {
        code = 1;
    }
    if code != 0 && !verbose {
        eprintln!("console tail:\n{}", tail(&outcome.console_output, 60));
    }
    Ok((code, report))
}

/// The durability checks after the power cut, on the host files behind the outer guest's
/// durability drives: the raw image holds the 4 MiB the guest wrote with O_DIRECT and
/// fsync (crc32 from the `E2E-DURABLE` line), and the ext4 image, once `e2fsck` has
/// replayed its journal (what the next mount would do), is clean under `e2fsck -fn` and
/// has /durable with that crc32. Without a power cut (the payload ended instead), one
/// failure that says why.
fn power_cut_checks(
    report: &str,
    outcome: &outer::OuterOutcome,
    raw: &std::path::Path,
    ext4: &std::path::Path,
    fs_tools: &[Vec<(std::path::PathBuf, String)>],
) -> Vec<(&'static str, std::result::Result<String, String>)> {
    if !outcome.power_cut {
        return vec![(
            "durability-power-cut",
            Err(format!(
                "the outer guest was not killed: the power-cut phase ended with status {:?} \
                 before asking for it (see its E2E FAIL line)",
                outcome.exit_code
            )),
        )];
    }
    let printed = report
        .lines()
        .find_map(|l| l.split("E2E-DURABLE crc32=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string);
    let Some(want) = printed else {
        return vec![(
            "durability-power-cut",
            Err("killed, but no E2E-DURABLE crc32 line was seen".into()),
        )];
    };
    let raw_check = match std::fs::read(raw) {
        Ok(data) if data.len() >= 4 << 20 => {
            let mut crc = flate2::Crc::new();
            crc.update(&data[..4 << 20]);
            let got = format!("{:08x}", crc.sum());
            if got == want {
                Ok(format!(
                    "4 MiB written with O_DIRECT + fsync, outer QEMU killed, crc32 {got} in \
                     the host file"
                ))
            } else {
                Err(format!(
                    "the guest fsync'ed 4 MiB with crc32 {want}, the host file's first 4 MiB \
                     have crc32 {got} after the power cut"
                ))
            }
        }
        Ok(data) => Err(format!("the host file has only {} bytes", data.len())),
        Err(e) => Err(format!("{}: {e}", raw.display())),
    };
    let ext4_check = ext4_after_power_cut(ext4, &fs_tools[0][0].0, &fs_tools[1][0].0, &want);
    vec![
        ("durability-power-cut-raw", raw_check),
        ("durability-power-cut-ext4", ext4_check),
    ]
}

/// Limit for e2fsck and debugfs on the host images.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// `cmd`'s output, killed after `limit`.
fn output_within(cmd: &mut Command, limit: Duration) -> std::result::Result<Output, String> {
    use std::io::Read;
    let shown = util::display_cmd(cmd);
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let read_all = |src: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut src) = src {
                let _ = src.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = read_all(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = read_all(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{shown}: still running after {limit:?}; killed"));
            }
            Err(e) => return Err(format!("{shown}: {e}")),
        }
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// The ext4 half of [`power_cut_checks`]: replay the journal of the image the guest left
/// mounted (`e2fsck -y -E journal_only`: exit 0, nothing to do, or 1, replayed), then
/// `e2fsck -fn` must be clean and /durable must be 4 MiB with crc32 `want`.
fn ext4_after_power_cut(
    image: &std::path::Path,
    e2fsck: &std::path::Path,
    debugfs: &std::path::Path,
    want: &str,
) -> std::result::Result<String, String> {
    let replay = output_within(
        Command::new(e2fsck)
            .args(["-y", "-E", "journal_only"])
            .arg(image),
        TOOL_TIMEOUT,
    )?;
    if !matches!(replay.status.code(), Some(0 | 1)) {
        return Err(format!(
            "journal replay: e2fsck exit {:?}: {}",
            replay.status.code(),
            String::from_utf8_lossy(&replay.stdout)
        ));
    }
    let fsck = output_within(Command::new(e2fsck).arg("-fn").arg(image), TOOL_TIMEOUT)?;
    if !fsck.status.success() {
        return Err(format!(
            "e2fsck -fn after the replay: exit {:?}: {}",
            fsck.status.code(),
            String::from_utf8_lossy(&fsck.stdout)
        ));
    }
    let cat = output_within(
        Command::new(debugfs)
            .args(["-R", "cat /durable"])
            .arg(image),
        TOOL_TIMEOUT,
    )?;
    let mut crc = flate2::Crc::new();
    crc.update(&cat.stdout);
    let got = format!("{:08x}", crc.sum());
    if cat.stdout.len() != 4 << 20 || got != want {
        return Err(format!(
            "after the power cut /durable has {} bytes with crc32 {got}; the guest fsync'ed \
             4 MiB with crc32 {want}",
            cat.stdout.len()
        ));
    }
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&replay.stdout),
        String::from_utf8_lossy(&replay.stderr)
    );
    Ok(format!(
        "file fsync'ed on ext4, outer QEMU killed, {}, e2fsck -fn clean, crc32 {got} read \
         back with debugfs",
        if said.contains("recovering journal") {
            "journal replayed by e2fsck"
        } else {
            "no journal replay needed"
        }
    ))
}

/// CRC-32 (zlib's) of a whole file, as busybox `crc32` prints it.
fn crc32_file(path: &std::path::Path) -> Result<u32> {
    let mut crc = flate2::Crc::new();
    crc.update(&std::fs::read(path)?);
    Ok(crc.sum())
}

/// What the inner guest wrote, checked on the host files after the outer guest is gone:
/// `e2fsck -fn` is clean, `debugfs` reads the guest's file with the CRC the guest printed
/// (`E2E-DATA` line), and the read-only image is byte-identical.
fn host_disk_checks(
    report: &str,
    disk: &std::path::Path,
    ro_disk: &std::path::Path,
    ro_before: u32,
    fs_tools: &[Vec<(std::path::PathBuf, String)>],
) -> Vec<(&'static str, std::result::Result<String, String>)> {
    let (e2fsck, debugfs) = (&fs_tools[0][0].0, &fs_tools[1][0].0);
    let mut checks = Vec::new();
    let fsck = output_within(Command::new(e2fsck).arg("-fn").arg(disk), TOOL_TIMEOUT);
    checks.push((
        "host-file-e2fsck-clean",
        match fsck {
            Ok(out) if out.status.success() => Ok(format!("e2fsck -fn {}: clean", disk.display())),
            Ok(out) => Err(format!(
                "e2fsck -fn exit {:?}: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout)
            )),
            Err(e) => Err(e),
        },
    ));
    let printed = report
        .lines()
        // In verbose runs the line may follow console text on the same line.
        .find_map(|l| l.split("E2E-DATA path=/data crc32=").nth(1))
        .map(|c| c.trim().to_string());
    let cat = output_within(
        Command::new(debugfs).args(["-R", "cat /data"]).arg(disk),
        TOOL_TIMEOUT,
    );
    checks.push((
        "host-file-debugfs-crc",
        match (cat, printed) {
            (Ok(out), Some(want)) => {
                let mut crc = flate2::Crc::new();
                crc.update(&out.stdout);
                let got = format!("{:08x}", crc.sum());
                if got == want {
                    Ok(format!(
                        "{} bytes of /data, crc32 {got} as the guest printed",
                        out.stdout.len()
                    ))
                } else {
                    Err(format!(
                        "debugfs gave {} bytes with crc32 {got}, the guest printed {want}",
                        out.stdout.len()
                    ))
                }
            }
            (Ok(_), None) => Err("the guest printed no E2E-DATA crc32 line".into()),
            (Err(e), _) => Err(e),
        },
    ));
    checks.push((
        "host-file-read-only-unchanged",
        match crc32_file(ro_disk) {
            Ok(after) if after == ro_before => Ok(format!("crc32 {after:08x} before and after")),
            Ok(after) => Err(format!("crc32 {ro_before:08x} before, {after:08x} after")),
            Err(e) => Err(format!("cannot read {}: {e}", ro_disk.display())),
        },
    ));
    checks
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// MiB each vCPU of a many-vCPU boot writes to its disk (`smp::DISK_MIB` in tvm-e2e).
const SMP_DISK_MIB_PER_CPU: u64 = 4;
/// MiB of the EIO disk's backing (`hosterr::EioDisk` in tvm-e2e).
const EIO_BACKING_MIB: u64 = 4;

/// The block devices the checks need beyond the outer guest's drives, and the outer
/// guest's set-up for them (shell lines for [`run_driver`]'s `nested_setup`).
struct ScratchDisks {
    /// The raw disk of the many-vCPU boots (`--smp-disk`, given `cache=none`).
    smp: String,
    /// The backing of the main boot's EIO disk (`--eio-backing`).
    eio_backing: String,
    setup: String,
}

/// [`ScratchDisks`] for the vCPU counts in `smp_cpus`: RAM block devices in the outer guest
/// (`brd`: the outer kernel, 6.1, has no O_DIRECT on tmpfs; `dm-mod` for the EIO disk),
/// files under target/ when the driver runs on this host (which must then have
/// device-mapper for the EIO disk).
fn scratch_disks(smp_cpus: &str) -> Result<ScratchDisks> {
    // A spec is a count with `key=value` parts after it.
    let most = smp_cpus
        .split(',')
        .filter_map(|p| p.trim().parse::<u64>().ok())
        .max()
        .unwrap_or(1);
    let smp_mib = most * SMP_DISK_MIB_PER_CPU + 8;
    if crate::outer::kvm_is_usable_directly() {
        let mut paths = Vec::new();
        for (name, mib) in [
            ("smp-disk.img", smp_mib),
            ("eio-backing.img", EIO_BACKING_MIB),
        ] {
            let image = util::guest_dir().join(name);
            std::fs::File::create(&image)
                .and_then(|f| f.set_len(mib << 20))
                .with_context(|| format!("creating {}", image.display()))?;
            paths.push(image.to_string_lossy().into_owned());
        }
        return Ok(ScratchDisks {
            smp: paths[0].clone(),
            eio_backing: paths[1].clone(),
            setup: String::new(),
        });
    }
    let dir = crate::guest::SPARE_MODULE_DIR;
    Ok(ScratchDisks {
        smp: "/dev/ram0".into(),
        eio_backing: "/dev/ram1".into(),
        setup: format!(
            "insmod {dir}/brd.ko rd_nr=2 rd_size={}\ninsmod {dir}/dm_mod.ko\n\
             test -b /dev/ram0\ntest -b /dev/ram1",
            smp_mib.max(EIO_BACKING_MIB) * 1024
        ),
    })
}

/// `cargo xtask e2e`.
pub fn main(args: Args) -> Result<ExitCode> {
    let scratch = scratch_disks(&args.smp_cpus)?;
    // The EIO disk's dmsetup, carried into the outer guest with its libraries.
    let dmsetup = util::which("dmsetup").context("dmsetup not found (package dmsetup)")?;
    let dmsetup_files = util::binary_with_libs(&dmsetup)?;
    let dmsetup_path = dmsetup_files[0].1.clone();
    let flood = args.flood_kib.to_string();
    let net_mib = args.net_mib.to_string();
    let mut extra = vec![
        "--flood-kib",
        &flood,
        "--net-mib",
        &net_mib,
        "--cpus",
        &args.cpus,
    ];
    if !args.no_fc_api && !args.smp_only && !args.snapshot_only {
        extra.push("--fc-api");
    }
    if args.snapshot_only {
        extra.push("--snapshot-only");
    } else if !args.no_snapshot && !args.smp_only && !args.fc_api_only {
        extra.push("--snapshot");
    }
    if !args.smp_only {
        // The main boot's EIO disk (host-eio-*).
        extra.extend([
            "--eio-backing",
            &scratch.eio_backing,
            "--dmsetup",
            &dmsetup_path,
        ]);
    }
    if args.fc_api_only {
        extra.push("--fc-api-only");
    } else if args.snapshot_only {
        // The snapshot boots only.
    } else if args.smp_cpus != "none" {
        extra.extend(["--smp-cpus", &args.smp_cpus]);
        extra.extend(["--smp-disk", &scratch.smp]);
    } else if args.smp_only {
        bail!("--smp-only with --smp-cpus none leaves nothing to run");
    }
    // `boot` is the default mode spelled out: without the main boot's disks, network and
    // the durability power cut that follows it.
    let mode: &[&str] = if args.smp_only {
        extra.push("--smp-only");
        &["boot"]
    } else if args.fc_api_only {
        &["boot"]
    } else {
        &[]
    };
    let (code, _) = run_driver_with(
        mode,
        &extra,
        &dmsetup_files,
        None,
        &scratch.setup,
        args.verbose,
        Duration::from_secs(args.timeout),
        args.durability_only,
    )?;
    if code == 0 {
        println!("xtask: end-to-end tests passed");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("xtask: end-to-end tests failed (driver exit code {code})");
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn main_exit_is_the_last_mark() {
        assert_eq!(main_exit("x\r\nE2E-MAIN-EXIT 0\r\nmore\r\n"), Some(0));
        assert_eq!(main_exit("E2E-MAIN-EXIT 3\nE2E-MAIN-EXIT 1\n"), Some(1));
        assert_eq!(main_exit("E2E RESULT ok\n"), None);
    }

    /// The payload parses as sh, runs the power-cut phase only after a passing run, with
    /// the outer guest's writeback off, and always reports the checks' status first.
    #[test]
    fn nested_payload_cuts_the_power_only_after_passing_checks() {
        let main = vec!["--vmm".to_string(), "/tvm/vmm".to_string()];
        let cut = vec!["power-cut".to_string(), "--dur-raw".to_string()];
        let script = nested_payload("", Some(&main), Some(&cut));
        let st = Command::new("sh")
            .args(["-n", "-c", &script])
            .status()
            .unwrap();
        assert!(st.success(), "{script}");
        let main_at = script.find("/tvm/tvm-e2e --vmm").unwrap();
        let mark = script.find("E2E-MAIN-EXIT").unwrap();
        let writeback = script.find("dirty_writeback_centisecs").unwrap();
        let cut_at = script.find("/tvm/tvm-e2e power-cut").unwrap();
        assert!(
            main_at < mark && mark < writeback && writeback < cut_at,
            "{script}"
        );
        assert!(script.contains("if [ $rc -eq 0 ]"), "{script}");
        assert!(script.contains("360000 >/proc/sys/vm/dirty_expire_centisecs"));
        assert!(script.contains("for d in vdc vdd; do"), "{script}");
        assert!(script.contains(outer::PIN_TO_ONE_CPU));
        let plain = nested_payload("", Some(&main), None);
        let only = nested_payload("", None, Some(&cut));
        assert!(
            !only.contains("--vmm") && only.contains("/tvm/tvm-e2e power-cut"),
            "{only}"
        );
        let st = Command::new("sh")
            .args(["-n", "-c", &only])
            .status()
            .unwrap();
        assert!(st.success(), "{only}");
        assert!(
            !plain.contains("power-cut") && !plain.contains("dirty_"),
            "{plain}"
        );
        assert!(plain.ends_with("sync\nexit $rc\n"));
    }

    /// A set-up runs before the driver and stops at its first failing line, and a failed
    /// one keeps the driver from running and fails the payload.
    #[test]
    fn nested_payload_runs_the_driver_only_after_its_setup() {
        let main = vec!["--vmm".to_string(), "/tvm/vmm".to_string()];
        let run = |setup: &str| {
            let script = nested_payload(setup, Some(&main), None).replace(
                &format!("{} /tvm/tvm-e2e", outer::PIN_TO_ONE_CPU),
                "echo driver-ran",
            );
            let out = Command::new("sh").args(["-c", &script]).output().unwrap();
            (out.status.code(), String::from_utf8(out.stdout).unwrap())
        };
        let (code, out) = run("echo set-up-ran");
        assert_eq!(code, Some(0), "{out}");
        let (set_up, driver) = (
            out.find("set-up-ran").unwrap(),
            out.find("driver-ran").unwrap(),
        );
        assert!(set_up < driver && out.contains("E2E-MAIN-EXIT 0"), "{out}");
        let (code, out) = run("true\nfalse\necho not-reached");
        assert_eq!(code, Some(1), "{out}");
        assert!(out.contains("E2E FAIL outer-setup"), "{out}");
        assert!(out.contains("E2E-MAIN-EXIT 1"), "{out}");
        assert!(
            !out.contains("not-reached") && !out.contains("driver-ran"),
            "{out}"
        );
    }

    #[test]
    fn tools_are_killed_at_their_limit() {
        let err =
            output_within(Command::new("sleep").arg("30"), Duration::from_millis(200)).unwrap_err();
        assert!(err.contains("killed"), "{err}");
        let (code, text) = run_with_limit(
            Command::new("sh").args(["-c", "echo hi; exit 3"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!((code, text.as_str()), (3, "hi\n"));
        let err = run_with_limit(Command::new("sleep").arg("30"), Duration::from_millis(300))
            .unwrap_err();
        assert!(format!("{err:#}").contains("was killed"), "{err:#}");
    }
}
