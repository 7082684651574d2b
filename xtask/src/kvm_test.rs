//! `cargo xtask kvm-test`: the tests that need /dev/kvm (tiny hand-made guests), which plain
//! `cargo test` skips. They fail, not skip, when /dev/kvm is missing. The
//! `kvm_hostile_net_*` tests among them also create TAP interfaces, which needs root
//! (CAP_NET_ADMIN): CI runs as root; without it they fail, saying so. The Python
//! environment of the client-library test is made first ([`crate::pyclient`]).

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
    let me = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if effective_uid(&me) != Some(0) {
        println!(
            "xtask: note: not root, so the kvm_hostile_net_* tests cannot create their TAPs \
             and will fail (they need CAP_NET_ADMIN)"
        );
    }
    // The client-library test runs a Firecracker client from PyPI.
    let python = crate::pyclient::ensure()?;
    let mut cmd = Command::new(util::cargo());
    cmd.args(["test", "--workspace", "--", "--ignored", "kvm_"])
        .env(crate::pyclient::PYTHON_ENV, &python);
    println!("xtask: {}", util::display_cmd(&cmd));
    let status = cmd.status()?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The effective user id in the text of `/proc/PID/status` (`Uid: real effective ...`).
fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_uid_is_the_second_field() {
        let status =
            "Name:\tcargo\nUmask:\t0022\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Uid:\t0\t1000\t1000\t1000\n"), Some(1000));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }
}
