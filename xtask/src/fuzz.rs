//! `cargo xtask fuzz`: builds the cargo-fuzz targets in `fuzz/` (nightly, AddressSanitizer),
//! replays every committed input under the sanitizer (the crash inputs in
//! `fuzz/regressions/<target>/` and the seeds), then runs each target for a bounded time
//! and reports its executions, coverage and corpus. Fails on any crash, naming the input
//! libFuzzer saved.
//!
//! `--replay` stops after the replay. The same inputs also replay without libFuzzer in
//! `cargo test` inside `fuzz/` (`fuzz/tests/replay.rs`).
//!
//! `--ci` is the deterministic pass `cargo xtask ci` runs: each target starts from a fresh
//! copy of the committed seeds and regression inputs (never from what earlier runs on
//! this machine found), with a fixed libFuzzer seed ([`CI_SEED`]) and a fixed number of
//! executions ([`ci_runs`]), so two CI runs of one commit fuzz the same inputs. Without
//! `--ci`, fuzzing is random and open-ended: a random seed, `--seconds` per target, and
//! a working corpus in `target/fuzz/corpus/` that grows from run to run.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util;

/// Options of `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds each target runs (libFuzzer's -max_total_time).
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Run only this target (repeat for more); default: every target in fuzz/fuzz_targets/.
    #[arg(long = "target", value_name = "NAME")]
    pub targets: Vec<String>,
    /// Only replay the committed inputs (fuzz/regressions and the seeds); no fuzzing.
    #[arg(long)]
    pub replay: bool,
    /// The deterministic CI pass: from the committed inputs only, libFuzzer seed
    /// `CI_SEED`, a fixed number of runs per target (`--seconds` is ignored).
    #[arg(long)]
    pub ci: bool,
}

/// libFuzzer's `-seed` in `--ci` runs.
pub const CI_SEED: u64 = 1;

/// Executions per target in `--ci` runs, sized to about 20 s each on the 2-core
/// development machine (AddressSanitizer build), so that the whole CI run stays under
/// 25 minutes. From the full `--ci` pass of 2026-12-04 (whole-run rates, committed inputs):
/// cmdline 4054 exec/s, kernel_loader 5882, legacy 2222, serial 2000, pci_config 625,
/// virtio_net_tx 606, virtio_pci 566, virtio_blk 408, virtio_net_rx 377, virtqueue 329,
/// virtio_rng 317 (inputs grow as the corpus does, so later executions cost more). The
/// pass took 605 s with the earlier counts (30 to 107 s a target); longer fuzzing is
/// `cargo xtask fuzz --seconds N`. vsock, added later, ran at 2272 exec/s in a `--ci` run
/// of its own (50 000 executions in 22.6 s, with a QEMU guest busy on one of the cores).
/// snapshot (the state-file parser) ran at 3000 exec/s in its first `--ci` run (6000 in
/// 3 s) and 4700 exec/s over 60 s of free fuzzing.
/// A target not listed gets [`CI_RUNS_DEFAULT`]; add a row when a new target is much
/// faster or slower than that.
const CI_RUNS: &[(&str, u64)] = &[
    ("cmdline", 80_000),
    ("kernel_loader", 100_000),
    ("legacy", 40_000),
    ("pci_config", 12_000),
    ("serial", 40_000),
    ("virtio_blk", 8_000),
    ("virtio_net_rx", 8_000),
    ("virtio_net_tx", 12_000),
    ("virtio_pci", 12_000),
    ("virtqueue", 6_000),
    ("vsock", 50_000),
    ("snapshot", 40_000),
];

/// Executions in `--ci` runs of a target missing from [`CI_RUNS`].
const CI_RUNS_DEFAULT: u64 = 6_000;

/// Longest a `--ci` target may take (libFuzzer's -max_total_time): a backstop on a slow
/// machine, reported when it cuts the run short.
const CI_MAX_SECONDS: u64 = 120;

/// Executions of `target` in a `--ci` run.
pub fn ci_runs(target: &str) -> u64 {
    CI_RUNS
        .iter()
        .find(|(t, _)| *t == target)
        .map_or(CI_RUNS_DEFAULT, |(_, n)| *n)
}

/// Longest a single input may run before libFuzzer calls it a hang (seconds).
const INPUT_TIMEOUT_S: u64 = 10;
/// Extra time a target gets beyond `--seconds` (loading the corpus, the final merge)
/// before it is killed and failed.
const GRACE: Duration = Duration::from_secs(120);

/// What one target's run produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Inputs executed.
    pub execs: Option<u64>,
    /// Executions per second.
    pub exec_per_sec: Option<u64>,
    /// Code coverage: edges (libFuzzer's `cov:`).
    pub cov: Option<u64>,
    /// Features (libFuzzer's `ft:`).
    pub ft: Option<u64>,
    /// Corpus entries and size, as libFuzzer prints them (`273/34Kb`).
    pub corpus: Option<String>,
    /// The input libFuzzer wrote when it found a crash.
    pub artifact: Option<String>,
}

/// Reads libFuzzer's stderr: the last status line (`#N DONE cov: .. ft: .. corp: ..`),
/// the final stats (`stat::number_of_executed_units: N`) and any crash artifact.
pub fn parse_libfuzzer(log: &str) -> Stats {
    let mut s = Stats::default();
    let field = |line: &str, key: &str| -> Option<String> {
        let mut words = line.split_whitespace();
        words.find(|w| *w == key)?;
        words.next().map(str::to_string)
    };
    for line in log.lines() {
        if line.starts_with('#') && line.contains(" cov: ") {
            s.cov = field(line, "cov:").and_then(|v| v.parse().ok());
            s.ft = field(line, "ft:").and_then(|v| v.parse().ok());
            s.corpus = field(line, "corp:");
            if let Some(n) = line
                .split_whitespace()
                .next()
                .and_then(|w| w.trim_start_matches('#').parse().ok())
            {
                s.execs = Some(n);
            }
            s.exec_per_sec = field(line, "exec/s:").and_then(|v| v.parse().ok());
        } else if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
            s.execs = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("stat::average_exec_per_sec:") {
            s.exec_per_sec = v.trim().parse().ok();
        } else if let Some((_, path)) = line.split_once("Test unit written to ") {
            s.artifact = Some(path.trim().to_string());
        }
    }
    s
}

fn fmt_opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_string(), ToString::to_string)
}

/// The fuzz targets: the files in `fuzz/fuzz_targets/`, sorted.
fn all_targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let mut v: Vec<String> = fs::read_dir(fuzz_dir.join("fuzz_targets"))
        .context("reading fuzz/fuzz_targets")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".rs").map(str::to_string)
        })
        .collect();
    v.sort();
    Ok(v)
}

/// `rustup run nightly <program>`: the nightly toolchain whatever toolchain runs xtask.
fn nightly(program: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", program]);
    // Cargo running xtask points these at the stable toolchain.
    for var in [
        "RUSTC",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTC_WRAPPER",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Fails with a clear message unless `rustup` has a nightly toolchain.
fn check_nightly() -> Result<String> {
    let out = nightly("rustc").arg("-vV").output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let host = text
                .lines()
                .find_map(|l| l.strip_prefix("host: "))
                .context("rustc -vV printed no host")?
                .to_string();
            println!(
                "xtask fuzz: {}",
                text.lines().next().unwrap_or("nightly rustc")
            );
            Ok(host)
        }
        Ok(_) | Err(_) => bail!(
            "the fuzz step needs the nightly toolchain (cargo-fuzz builds with -Zsanitizer), \
             and `rustup run nightly rustc -vV` failed: install it with \
             `rustup toolchain install nightly`"
        ),
    }
}

/// Installs cargo-fuzz from crates.io when `cargo fuzz` does not run.
fn ensure_cargo_fuzz() -> Result<()> {
    let present = nightly("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    let start = Instant::now();
    let mut cmd = Command::new(util::cargo());
    cmd.args(["install", "cargo-fuzz", "--locked"]);
    println!(
        "xtask fuzz: cargo-fuzz is missing: {}",
        util::display_cmd(&cmd)
    );
    util::run(&mut cmd)?;
    println!(
        "xtask fuzz: cargo-fuzz installed in {:.0} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The files in `dir` (none if it does not exist), sorted.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The committed inputs of `target`: its crash inputs in `fuzz/regressions/<target>/`,
/// then its seeds `fuzz/corpus/<target>/seed-*` (not what local fuzzing added there).
fn committed_inputs(fuzz_dir: &Path, target: &str) -> Vec<PathBuf> {
    let mut inputs = files_in(&fuzz_dir.join("regressions").join(target));
    let seeds = files_in(&fuzz_dir.join("corpus").join(target));
    inputs.extend(seeds.into_iter().filter(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
    }));
    inputs
}

/// Runs `cmd` with stderr (and stdout) into `log`; kills it after `limit`. Returns whether
/// it exited 0, and the log.
fn run_logged(cmd: &mut Command, log: &Path, limit: Duration) -> Result<(bool, String)> {
    let file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = cmd
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting `{}`", util::display_cmd(cmd)))?;
    let start = Instant::now();
    let ok = loop {
        if let Some(status) = child.try_wait()? {
            break status.success();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut text = String::new();
    for line in BufReader::new(fs::File::open(log)?).lines() {
        text.push_str(&line.unwrap_or_default());
        text.push('\n');
    }
    Ok((ok, text))
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `cargo xtask fuzz`.
pub fn main(args: Args) -> Result<ExitCode> {
    let root = util::workspace_root();
    let fuzz_dir = root.join("fuzz");
    let known = all_targets(&fuzz_dir)?;
    let targets = if args.targets.is_empty() {
        known.clone()
    } else {
        for t in &args.targets {
            if !known.contains(t) {
                bail!(
                    "no fuzz target {t:?}; the targets are: {}",
                    known.join(", ")
                );
            }
        }
        args.targets.clone()
    };
    let host = check_nightly()?;
    if util::which("c++").is_none() {
        bail!(
            "the fuzz step needs a C++ compiler: libfuzzer-sys builds libFuzzer from source \
             (Debian: apt-get install g++)"
        );
    }
    ensure_cargo_fuzz()?;

    let target_dir = util::cargo_target_dir().join("fuzz");
    let start = Instant::now();
    let mut build = nightly("cargo");
    build
        .current_dir(&root)
        .args(["fuzz", "build", "--target-dir"])
        .arg(&target_dir);
    if !args.targets.is_empty() {
        // cargo-fuzz builds one target or all of them.
        if let [one] = targets.as_slice() {
            build.arg(one);
        }
    }
    println!("xtask fuzz: {}", util::display_cmd(&build));
    util::run(&mut build)?;
    println!(
        "xtask fuzz: built in {:.0} s",
        start.elapsed().as_secs_f64()
    );
    let bin_dir = target_dir.join(&host).join("release");
    let logs = target_dir.join("logs");
    fs::create_dir_all(&logs)?;

    // Every committed input once, under the sanitizer.
    let mut failed = Vec::new();
    for t in &targets {
        let inputs = committed_inputs(&fuzz_dir, t);
        let n_regressions = files_in(&fuzz_dir.join("regressions").join(t)).len();
        if inputs.is_empty() {
            continue;
        }
        let mut cmd = Command::new(bin_dir.join(t));
        cmd.arg(format!("-timeout={INPUT_TIMEOUT_S}")).args(&inputs);
        let log = logs.join(format!("{t}-replay.log"));
        let (ok, text) = run_logged(&mut cmd, &log, GRACE)?;
        println!(
            "xtask fuzz: replay {t}: {n_regressions} regression inputs, {} seeds: {}",
            inputs.len() - n_regressions,
            if ok { "PASS" } else { "FAIL" }
        );
        if !ok {
            println!("{}", tail(&text, 40));
            failed.push(format!("{t} (replay, log {})", log.display()));
        }
    }
    if args.replay || !failed.is_empty() {
        return finish(&failed, start);
    }

    let mut rows = Vec::new();
    for t in &targets {
        let artifacts = fuzz_dir.join("artifacts").join(t);
        fs::create_dir_all(&artifacts)?;
        let mut cmd = Command::new(bin_dir.join(t));
        let seconds = if args.ci {
            // A fresh corpus: the committed inputs, nothing this machine found before.
            let corpus = target_dir.join("ci-corpus").join(t);
            if corpus.exists() {
                fs::remove_dir_all(&corpus)?;
            }
            fs::create_dir_all(&corpus)?;
            for input in committed_inputs(&fuzz_dir, t) {
                let name = input.file_name().context("an input file has a name")?;
                fs::copy(&input, corpus.join(name))?;
            }
            cmd.arg(&corpus)
                .arg(format!("-seed={CI_SEED}"))
                .arg(format!("-runs={}", ci_runs(t)))
                .arg(format!("-max_total_time={CI_MAX_SECONDS}"));
            CI_MAX_SECONDS
        } else {
            let corpus = target_dir.join("corpus").join(t);
            fs::create_dir_all(&corpus)?;
            cmd.arg(&corpus)
                .arg(fuzz_dir.join("corpus").join(t))
                .arg(format!("-max_total_time={}", args.seconds));
            args.seconds
        };
        cmd.arg(format!("-timeout={INPUT_TIMEOUT_S}"))
            .arg("-print_final_stats=1")
            .arg(format!("-artifact_prefix={}/", artifacts.display()));
        let log = logs.join(format!("{t}.log"));
        if args.ci {
            println!(
                "xtask fuzz: {t}: {} runs, seed {CI_SEED} ({})",
                ci_runs(t),
                util::display_cmd(&cmd)
            );
        } else {
            println!("xtask fuzz: {t}: {seconds} s ({})", util::display_cmd(&cmd));
        }
        let started = Instant::now();
        let limit = Duration::from_secs(seconds) + GRACE;
        let (ok, text) = run_logged(&mut cmd, &log, limit)?;
        let secs = started.elapsed().as_secs_f64();
        let stats = parse_libfuzzer(&text);
        if args.ci && ok && stats.execs.is_some_and(|n| n < ci_runs(t)) {
            println!(
                "xtask fuzz: {t}: note: the {CI_MAX_SECONDS} s backstop ended the run after {} of \
                 {} executions; this machine is slower than CI_RUNS in xtask/src/fuzz.rs assumes",
                fmt_opt(&stats.execs),
                ci_runs(t)
            );
        }
        println!("xtask fuzz: {t}: {secs:.0} s");
        let result = if ok { "PASS" } else { "FAIL" };
        println!(
            "xtask fuzz: {t}: {result}: {} execs ({} exec/s), cov {}, ft {}, corpus {}",
            fmt_opt(&stats.execs),
            fmt_opt(&stats.exec_per_sec),
            fmt_opt(&stats.cov),
            fmt_opt(&stats.ft),
            fmt_opt(&stats.corpus)
        );
        if !ok {
            println!("{}", tail(&text, 40));
            let what = match &stats.artifact {
                Some(a) => format!("{t} (crash input {a}; log {})", log.display()),
                None => format!("{t} (log {})", log.display()),
            };
            println!("xtask fuzz: {t}: FAIL: {what}");
            failed.push(what);
        }
        rows.push((t.clone(), stats, result));
    }

    if args.ci {
        println!("xtask fuzz: summary (seed {CI_SEED}, fixed runs, committed inputs only)");
    } else {
        println!("xtask fuzz: summary ({} s per target)", args.seconds);
    }
    println!(
        "  {:<14} {:>10} {:>8} {:>6} {:>7} {:>12}  result",
        "target", "execs", "exec/s", "cov", "ft", "corpus"
    );
    for (t, s, r) in &rows {
        println!(
            "  {:<14} {:>10} {:>8} {:>6} {:>7} {:>12}  {r}",
            t,
            fmt_opt(&s.execs),
            fmt_opt(&s.exec_per_sec),
            fmt_opt(&s.cov),
            fmt_opt(&s.ft),
            fmt_opt(&s.corpus)
        );
    }
    finish(&failed, start)
}

fn finish(failed: &[String], start: Instant) -> Result<ExitCode> {
    let secs = start.elapsed().as_secs_f64();
    if failed.is_empty() {
        println!("xtask fuzz: all targets passed ({secs:.0} s)");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("xtask fuzz: FAILED ({secs:.0} s):");
        for f in failed {
            println!("  {f}");
        }
        println!(
            "xtask fuzz: reproduce with `cargo +nightly fuzz run <target> <input>`; \
             keep the minimized input (`cargo +nightly fuzz tmin <target> <input>`) under \
             fuzz/regressions/<target>/ with the fix"
        );
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_clean_run() {
        let log = "INFO: Seed: 1\n\
            #2\tINITED cov: 100 ft: 120 corp: 4/1Kb exec/s: 0 rss: 40Mb\n\
            #5000\tNEW    cov: 580 ft: 2400 corp: 270/33Kb lim: 178 exec/s: 830 rss: 280Mb L: 9/9\n\
            #13360\tDONE   cov: 590 ft: 2444 corp: 273/34Kb lim: 178 exec/s: 835 rss: 282Mb\n\
            Done 13360 runs in 16 second(s)\n\
            stat::number_of_executed_units: 13360\n\
            stat::average_exec_per_sec:     835\n\
            stat::new_units_added:          269\n";
        let s = parse_libfuzzer(log);
        assert_eq!(s.execs, Some(13360));
        assert_eq!(s.exec_per_sec, Some(835));
        assert_eq!(s.cov, Some(590));
        assert_eq!(s.ft, Some(2444));
        assert_eq!(s.corpus.as_deref(), Some("273/34Kb"));
        assert_eq!(s.artifact, None);
    }

    #[test]
    fn ci_runs_have_a_default_for_new_targets() {
        assert_eq!(ci_runs("virtio_blk"), 8_000);
        assert_eq!(ci_runs("a_target_added_later"), CI_RUNS_DEFAULT);
        // Every listed target exists.
        let known = all_targets(&util::workspace_root().join("fuzz")).unwrap();
        for (t, _) in CI_RUNS {
            assert!(
                known.iter().any(|k| k == t),
                "{t} is not in fuzz/fuzz_targets"
            );
        }
    }

    #[test]
    fn parses_a_crash() {
        let log = "#12\tNEW    cov: 1091 ft: 1594 corp: 9/1965b lim: 302 exec/s: 0 rss: 53Mb\n\
            thread '<unnamed>' panicked at src/logger.rs:43:29:\n\
            ==1== ERROR: libFuzzer: deadly signal\n\
            artifact_prefix='fuzz/artifacts/virtio_blk/'; Test unit written to fuzz/artifacts/virtio_blk/crash-62\n";
        let s = parse_libfuzzer(log);
        assert_eq!(s.execs, Some(12));
        assert_eq!(s.cov, Some(1091));
        assert_eq!(
            s.artifact.as_deref(),
            Some("fuzz/artifacts/virtio_blk/crash-62")
        );
    }
}
