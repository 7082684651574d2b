//! `cargo xtask bench`: measurements against a peer in the same run.
//!
//! Boot time: the test guest booted by our VMM and by QEMU (`-accel kvm`, the peer that is
//! always at hand), alternately, a few times each, from process spawn to the guest's
//! readiness marker, reported as medians and their ratio. On a host without hardware KVM
//! both run inside the same outer QEMU TCG guest, so only the ratio means anything.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
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
}

/// A dynamically linked host binary and the shared libraries `ldd` lists for it, as
/// `(host, guest)` pairs at the same absolute paths, the binary first.
pub fn binary_with_libs(binary: &Path) -> Result<Vec<(PathBuf, String)>> {
    let binary = std::fs::canonicalize(binary)?;
    let mut files = vec![(binary.clone(), binary.to_string_lossy().into_owned())];
    let ldd = util::output(Command::new("ldd").arg(&binary))?;
    for line in ldd.lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line
            .split("=>")
            .nth(1)
            .unwrap_or(line)
            .split_whitespace()
            .next()
            .unwrap_or("");
        if path.starts_with('/') {
            files.push((std::fs::canonicalize(path)?, path.to_string()));
        }
    }
    Ok(files)
}

/// QEMU, the shared libraries it loads and the firmware it reads, as `(host, guest)` pairs
/// at the same absolute paths, so that the dynamically linked binary runs in the outer
/// guest's initramfs.
fn qemu_files() -> Result<Vec<(PathBuf, String)>> {
    let qemu = util::which("qemu-system-x86_64").context("qemu-system-x86_64 not found")?;
    let mut files = binary_with_libs(&qemu)?;
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
    let files = qemu_files()?;
    let qemu = files[0].1.clone();
    let runs = args.runs.to_string();
    let (code, report) = run_driver(
        &["boot-time"],
        &["--qemu", &qemu, "--runs", &runs],
        &files,
        args.verbose,
        Duration::from_secs(1800),
    )?;
    if code != 0 {
        bail!("the boot-time benchmark failed (driver exit code {code})");
    }
    if let Some(summary) = report.lines().find(|l| l.contains("median")) {
        println!("xtask: {summary}");
    }
    Ok(ExitCode::SUCCESS)
}
