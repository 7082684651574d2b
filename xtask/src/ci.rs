//! `cargo xtask ci`: everything CI runs, in order, cheapest first: format, lints, docs,
//! unit tests, the TAP tests (root), a short fuzzing pass (nightly), the /dev/kvm tests,
//! then the real-Linux end-to-end tests. Stops at the first failure and prints how long
//! each step took.

use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::Result;

use crate::util;

/// Options of `cargo xtask ci`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Skip the real-Linux end-to-end step.
    #[arg(long)]
    pub no_e2e: bool,
}

/// Seconds each fuzz target runs in CI.
const FUZZ_SECONDS: u64 = 45;

/// A cargo step: name, arguments, environment.
type CargoStep<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>);

fn cargo_step(name: &str, args: &[&str], env: &[(&str, &str)]) -> Result<bool> {
    let mut cmd = Command::new(util::cargo());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    step(name, cmd)
}

fn step(name: &str, mut cmd: Command) -> Result<bool> {
    println!("xtask ci: == {name}: {}", util::display_cmd(&cmd));
    let start = Instant::now();
    let ok = cmd.status()?.success();
    println!(
        "xtask ci: == {name}: {} in {:.1} s",
        if ok { "ok" } else { "FAILED" },
        start.elapsed().as_secs_f64()
    );
    Ok(ok)
}

/// `cargo xtask ci`.
pub fn main(args: Args) -> Result<ExitCode> {
    let start = Instant::now();
    let steps: Vec<CargoStep> = vec![
        ("fmt", vec!["fmt", "--all", "--", "--check"], vec![]),
        (
            "clippy",
            vec![
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
            vec![],
        ),
        (
            "doc",
            vec!["doc", "--workspace", "--no-deps"],
            vec![("RUSTDOCFLAGS", "-D warnings")],
        ),
        ("test", vec!["test", "--workspace"], vec![]),
        // Real TAP interfaces: root (CAP_NET_ADMIN) and /dev/net/tun; fails without them.
        (
            "tap-test",
            vec![
                "test",
                "-p",
                "tvm-virtio-net",
                "--test",
                "tap",
                "--",
                "--ignored",
            ],
            vec![],
        ),
    ];
    for (name, a, env) in &steps {
        if !cargo_step(name, a, env)? {
            return Ok(ExitCode::FAILURE);
        }
    }
    // Every fuzz target for FUZZ_SECONDS after the committed crash inputs replay: about
    // 10 minutes on a cold machine with cargo-fuzz and the sanitizer build included.
    let seconds = FUZZ_SECONDS.to_string();
    if !step("fuzz", xtask_cmd(&["fuzz", "--seconds", &seconds]))? {
        return Ok(ExitCode::FAILURE);
    }
    if !step("kvm-test", xtask_cmd(&["kvm-test"]))? {
        return Ok(ExitCode::FAILURE);
    }
    if !args.no_e2e && !step("e2e", xtask_cmd(&["e2e"]))? {
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "xtask ci: all steps passed in {:.0} s",
        start.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn xtask_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(util::cargo());
    cmd.args(["xtask"]).args(args);
    cmd
}
