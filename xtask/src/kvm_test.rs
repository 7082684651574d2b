//! `cargo xtask kvm-test`: the tests that need /dev/kvm (tiny hand-made guests), which plain
//! `cargo test` skips. They fail, not skip, when /dev/kvm is missing.

use std::process::{Command, ExitCode};

use anyhow::{bail, Result};

use crate::util;

/// Options of `cargo xtask kvm-test`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// `cargo xtask kvm-test`.
pub fn main(_args: Args) -> Result<ExitCode> {
    if !std::path::Path::new("/dev/kvm").exists() {
        bail!("/dev/kvm is missing: the kvm tests need it (load kvm-intel/kvm-amd, or kvm_pvm)");
    }
    let mut cmd = Command::new(util::cargo());
    cmd.args(["test", "--workspace", "--", "--ignored", "kvm_"]);
    println!("xtask: {}", util::display_cmd(&cmd));
    let status = cmd.status()?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
