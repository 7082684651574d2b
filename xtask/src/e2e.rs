//! `cargo xtask e2e`: boot the real Linux test guest in the VMM and check real outcomes.
//!
//! The checks live in the `tvm-e2e` driver (tests/src/bin/tvm-e2e.rs), a static binary
//! that runs next to the VMM: directly on a host whose /dev/kvm can run Linux, otherwise
//! inside the outer QEMU guest (where kvm-amd gives one). Running the driver beside the VMM
//! keeps the console on fast local pipes and lets it read the VMM's RSS from /proc.

use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, Result};

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
    /// Limit for the whole run, in seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
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

/// Runs the driver with `mode` (e.g. `[]` for the checks, `["boot-time"]` for timing)
/// beside the VMM; `extra_files` are carried into the outer guest as `(host, guest)`.
/// Returns the driver's exit code and its output.
/// `initrd` replaces the test guest's initramfs (a host path; carried into the outer guest).
pub fn run_driver(
    mode: &[&str],
    extra_args: &[&str],
    extra_files: &[(std::path::PathBuf, String)],
    initrd: Option<&std::path::Path>,
    verbose: bool,
    timeout: Duration,
) -> Result<(i32, String)> {
    let vmm = outer::build_static("tvm-vmm", "vmm")?;
    let driver = outer::build_static("tvm-tests", "tvm-e2e")?;
    let images = guest::ensure_prepared()?;
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
    let mut extra: Vec<&str> = extra_args.to_vec();
    if verbose {
        extra.push("--verbose");
    }
    if outer::kvm_is_usable_directly() {
        let disk = scratch_disk.to_string_lossy().into_owned();
        let ro = scratch_ro.to_string_lossy().into_owned();
        let mut extra = extra.clone();
        if mode.is_empty() {
            extra.extend(["--disk", &disk, "--ro-disk", &ro]);
            extra.extend(["--e2fsck", &e2fsck, "--debugfs", &debugfs]);
            extra.extend(["--tap", E2E_TAP]);
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
        let out = cmd.output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        print!("{text}");
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        return Ok((out.status.code().unwrap_or(1), text));
    }
    println!("note: /dev/kvm here is PVM (or missing); running the end-to-end tests inside a QEMU TCG outer guest");
    // The images are the outer guest's virtio disks, so what the inner guest writes
    // crosses our VMM and the outer QEMU into the host files, which are checked below.
    let mut drives = Vec::new();
    let ro_before = if mode.is_empty() {
        drives.push(outer::outer_disk_path(0));
        drives.push(outer::outer_disk_path(1));
        extra.extend(["--disk", &drives[0], "--ro-disk", &drives[1]]);
        extra.extend(["--e2fsck", &e2fsck, "--debugfs", &debugfs]);
        extra.extend(["--tap", E2E_TAP]);
        Some(crc32_file(&scratch_ro)?)
    } else {
        None
    };
    let args = driver_args(
        mode,
        "/tvm/vmm",
        "/tvm/vmlinuz",
        if initrd.is_some() {
            "/tvm/initramfs-alt.cpio.gz"
        } else {
            "/tvm/initramfs.cpio.gz"
        },
        &extra,
    );
    // `sync`: the payload ends with a forced power-off, so nothing may stay in the outer
    // page cache.
    let mut run = OuterRun::new(format!(
        "{} /tvm/tvm-e2e {}\nrc=$?\nsync\nexit $rc\n",
        outer::PIN_TO_ONE_CPU,
        util::shell_join(args)
    ))
    .file(&vmm, "vmm")
    .file(&driver, "tvm-e2e")
    .with_test_guest(&images);
    if mode.is_empty() {
        // The read-write attachment is deliberate for the read-only disk too: our VMM's
        // readonly=on is what must keep it unchanged.
        run.drive(&scratch_disk, false);
        run.drive(&scratch_ro, false);
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
        "xtask: outer guest ran {:.0} s ({} boot{})",
        outcome.elapsed.as_secs_f64(),
        outcome.attempts,
        if outcome.attempts == 1 { "" } else { "s" }
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
    let Some(mut code) = outcome.exit_code else {
        bail!("the driver did not report an exit status");
    };
    if code != 0 && !verbose {
        eprintln!("console tail:\n{}", tail(&outcome.console_output, 60));
    }
    if let Some(ro_before) = ro_before {
        let checks = host_disk_checks(&report, &scratch_disk, &scratch_ro, ro_before, &fs_tools);
        for (name, result) in &checks {
            match result {
                Ok(detail) => println!("E2E PASS {name}: {detail}"),
                Err(why) => println!("E2E FAIL {name}: {why}"),
            }
        }
        if checks.iter().any(|(_, r)| r.is_err()) && code == 0 {
            code = 1;
        }
    }
    Ok((code, report))
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
    let fsck = Command::new(e2fsck).arg("-fn").arg(disk).output();
    checks.push((
        "host-file-e2fsck-clean",
        match fsck {
            Ok(out) if out.status.success() => Ok(format!("e2fsck -fn {}: clean", disk.display())),
            Ok(out) => Err(format!(
                "e2fsck -fn exit {:?}: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout)
            )),
            Err(e) => Err(format!("cannot run {}: {e}", e2fsck.display())),
        },
    ));
    let printed = report
        .lines()
        // In verbose runs the line may follow console text on the same line.
        .find_map(|l| l.split("E2E-DATA path=/data crc32=").nth(1))
        .map(|c| c.trim().to_string());
    let cat = Command::new(debugfs)
        .args(["-R", "cat /data"])
        .arg(disk)
        .output();
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
            (Err(e), _) => Err(format!("cannot run {}: {e}", debugfs.display())),
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

/// `cargo xtask e2e`.
pub fn main(args: Args) -> Result<ExitCode> {
    let flood = args.flood_kib.to_string();
    let net_mib = args.net_mib.to_string();
    let (code, _) = run_driver(
        &[],
        &["--flood-kib", &flood, "--net-mib", &net_mib],
        &[],
        None,
        args.verbose,
        Duration::from_secs(args.timeout),
    )?;
    if code == 0 {
        println!("xtask: end-to-end tests passed");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("xtask: end-to-end tests failed (driver exit code {code})");
        Ok(ExitCode::FAILURE)
    }
}
