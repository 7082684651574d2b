//! `cargo xtask ci`: everything CI runs, in order, cheapest first: format, lints and docs
//! (the fuzz workspace's too), the unit tests on a machine made bare (no /dev/kvm, no
//! TAP, no user namespaces), the fuzz workspace's replay tests, the TAP tests and the
//! tests that need /dev/net/tun or user namespaces (root), a short, deterministic fuzzing
//! pass (nightly), the /dev/kvm tests, the outer-guest tests (QEMU), then the real-Linux
//! end-to-end tests. Stops at the first failure and prints how long each step took.

use std::path::Path;
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

/// Where the fuzz workspace builds on stable (its lints and replay tests), apart from
/// cargo-fuzz's nightly sanitizer build in `target/fuzz`.
const FUZZ_STABLE_TARGET: &str = "fuzz-stable";

/// `cargo ARGS` in `dir` (the workspace root when `None`), with `env`.
fn cargo(dir: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(util::cargo());
    cmd.args(args);
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn step(name: &str, mut cmd: Command) -> Result<(bool, f64)> {
    println!("xtask ci: == {name}: {}", util::display_cmd(&cmd));
    let start = Instant::now();
    let ok = cmd.status()?.success();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "xtask ci: == {name}: {} in {secs:.1} s",
        if ok { "ok" } else { "FAILED" },
    );
    Ok((ok, secs))
}

/// The steps, in order: a name and the command.
fn steps(args: &Args) -> Vec<(&'static str, Command)> {
    let root = util::workspace_root();
    let fuzz = root.join("fuzz");
    let fuzz_target = util::cargo_target_dir().join(FUZZ_STABLE_TARGET);
    let fuzz_target = fuzz_target.to_string_lossy().into_owned();
    let mut v = vec![
        ("fmt", cargo(None, &["fmt", "--all", "--", "--check"], &[])),
        (
            "fmt-fuzz",
            cargo(Some(&fuzz), &["fmt", "--", "--check"], &[]),
        ),
        (
            "clippy",
            cargo(
                None,
                &[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ],
                &[],
            ),
        ),
        // The fuzz workspace builds on stable too (libFuzzer is linked, not run).
        (
            "clippy-fuzz",
            cargo(
                Some(&fuzz),
                &[
                    "clippy",
                    "--all-targets",
                    "--target-dir",
                    &fuzz_target,
                    "--",
                    "-D",
                    "warnings",
                ],
                &[],
            ),
        ),
        (
            "doc",
            cargo(
                None,
                &["doc", "--workspace", "--no-deps"],
                &[("RUSTDOCFLAGS", "-D warnings")],
            ),
        ),
    ];
    // The unit tests as a machine without /dev/kvm, TAP or user namespaces runs them
    // (scripts/bare-machine.sh: needs root and unshare).
    let mut test = Command::new(root.join("scripts/bare-machine.sh"));
    test.arg(util::cargo()).args(["test", "--workspace"]);
    v.push(("test", test));
    v.push((
        "fuzz-replay",
        cargo(Some(&fuzz), &["test", "--target-dir", &fuzz_target], &[]),
    ));
    // Real TAP interfaces: root (CAP_NET_ADMIN) and /dev/net/tun; fails without them.
    v.push((
        "tap-test",
        cargo(
            None,
            &[
                "test",
                "-p",
                "tvm-virtio-net",
                "--test",
                "tap",
                "--",
                "--ignored",
            ],
            &[],
        ),
    ));
    // The vmm's `host_*` tests: /dev/net/tun and user namespaces.
    v.push((
        "host-test",
        cargo(
            None,
            &[
                "test",
                "-p",
                "tvm-vmm",
                "--test",
                "cli",
                "--",
                "--ignored",
                "host_",
            ],
            &[],
        ),
    ));
    // Every target from the committed inputs only, fixed seed and number of runs
    // (xtask/src/fuzz.rs, `--ci`), after the committed inputs replay under the sanitizer.
    v.push(("fuzz", xtask_cmd(&["fuzz", "--ci"])));
    v.push(("kvm-test", xtask_cmd(&["kvm-test"])));
    // The outer QEMU guest itself (xtask/src/outer.rs): a boot, a payload timeout, a
    // frozen guest retried, a power cut. One at a time: a loaded machine makes a
    // heartbeat late.
    v.push((
        "outer-test",
        cargo(
            None,
            &[
                "test",
                "-p",
                "xtask",
                "--",
                "--ignored",
                "outer_",
                "--test-threads=1",
            ],
            &[],
        ),
    ));
    if !args.no_e2e {
        v.push(("e2e", xtask_cmd(&["e2e"])));
    }
    v
}

/// `cargo xtask ci`.
pub fn main(args: Args) -> Result<ExitCode> {
    let start = Instant::now();
    let mut times = Vec::new();
    for (name, cmd) in steps(&args) {
        let (ok, secs) = step(name, cmd)?;
        times.push((name, secs));
        if !ok {
            print_times(&times);
            return Ok(ExitCode::FAILURE);
        }
    }
    print_times(&times);
    println!(
        "xtask ci: all steps passed in {:.0} s",
        start.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn print_times(times: &[(&str, f64)]) {
    println!("xtask ci: step times");
    for (name, secs) in times {
        println!("  {name:<12} {secs:>7.1} s");
    }
}

fn xtask_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(util::cargo());
    cmd.args(["xtask"]).args(args);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_is_there_in_order() {
        let names = |no_e2e| -> Vec<&str> {
            steps(&Args { no_e2e })
                .into_iter()
                .map(|(n, _)| n)
                .collect()
        };
        assert_eq!(
            names(false),
            [
                "fmt",
                "fmt-fuzz",
                "clippy",
                "clippy-fuzz",
                "doc",
                "test",
                "fuzz-replay",
                "tap-test",
                "host-test",
                "fuzz",
                "kvm-test",
                "outer-test",
                "e2e"
            ]
        );
        assert_eq!(names(true).last(), Some(&"outer-test"));
    }
}
