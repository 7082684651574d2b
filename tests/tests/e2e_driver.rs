//! The real-Linux e2e driver (`tvm-e2e`) against fake VMMs: shell scripts that print what
//! a guest would and then hang. No KVM, no guest, a few seconds: they check that the driver
//! ends a run that hangs, shows the console that led there, and leaves no VMM behind.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A fake VMM in a fresh directory: `body` is the script (it ignores the VMM options).
fn fake_vmm(name: &str, body: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tvm-e2e-driver-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vmm");
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn driver(vmm: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tvm-e2e"));
    cmd.args([
        "--vmm",
        vmm.to_str().unwrap(),
        "--kernel",
        "k",
        "--initrd",
        "i",
    ])
    .args(extra);
    cmd
}

fn alive(pid: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // A zombie (state Z) is dead, waiting for its parent (gone: init reaps it).
    stat.rsplit(')')
        .next()
        .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
}

/// A guest that prints its banner and then nothing: without `--timeout` the driver would
/// wait out its 120 s boot limit. With `--timeout 3` it ends after 3 s with a failure that
/// shows the console and the VMM's stderr, and the VMM is gone.
#[test]
fn the_run_limit_ends_a_hung_run_with_its_console() {
    let pidfile = std::env::temp_dir().join(format!("tvm-e2e-driver-{}.pid", std::process::id()));
    let vmm = fake_vmm(
        "hang",
        &format!(
            "echo $$ > {}\necho 'Linux version 6.1.0-fake'\necho 'last words before the hang'\n\
             echo 'vmm log line' >&2\nexec sleep 600\n",
            pidfile.display()
        ),
    );
    let started = Instant::now();
    let out = driver(&vmm, &["--timeout", "3"]).output().unwrap();
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(took < Duration::from_secs(30), "took {took:?}: {text}");
    assert!(text.contains("E2E PASS kernel-banner"), "{text}");
    assert!(text.contains("E2E FAIL run-time-limit"), "{text}");
    assert!(
        text.contains("E2E-DIAG console: last words before the hang"),
        "{text}"
    );
    assert!(text.contains("E2E-DIAG vmm stderr: vmm log line"), "{text}");
    assert!(text.contains("E2E RESULT error: run-time limit"), "{text}");
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid.trim()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !alive(pid.trim()),
        "the fake VMM {} outlived the driver",
        pid.trim()
    );
    let _ = std::fs::remove_file(&pidfile);
    let _ = std::fs::remove_dir_all(vmm.parent().unwrap());
}

/// When the driver itself is SIGKILLed (what xtask does at its own limit), its VMM dies
/// with it (PR_SET_PDEATHSIG).
#[test]
fn the_vmm_dies_with_a_killed_driver() {
    let pidfile = std::env::temp_dir().join(format!("tvm-e2e-driver-{}-k.pid", std::process::id()));
    let vmm = fake_vmm(
        "killed",
        &format!(
            "echo $$ > {}\necho 'Linux version 6.1.0-fake'\nexec sleep 600\n",
            pidfile.display()
        ),
    );
    let mut child = driver(&vmm, &[])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pidfile.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    assert!(alive(pid.trim()));
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid.trim()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !alive(pid.trim()),
        "the fake VMM {} outlived the driver",
        pid.trim()
    );
    let _ = std::fs::remove_file(&pidfile);
    let _ = std::fs::remove_dir_all(vmm.parent().unwrap());
}

/// Waits up to 5 s for process `pid` to be gone.
fn gone(pid: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    !alive(pid)
}

/// A fake VMM that runs `after_banner` after its banner and then hangs, and does with
/// SIGUSR2 what `on_usr2` says (a `trap` action); the driver runs it with `--timeout 3`.
/// Returns the driver's stdout, how long it took, and whether the fake is gone afterwards.
fn hang_with_usr2(name: &str, on_usr2: &str, after_banner: &str) -> (String, Duration, bool) {
    let pidfile =
        std::env::temp_dir().join(format!("tvm-e2e-driver-{}-{name}.pid", std::process::id()));
    // The shell waits in `wait`, which a trapped signal interrupts (an `exec sleep` would
    // take SIGUSR2's default action and die); each sleep is short and off the pipes, so
    // none outlives the fake for long or holds its stdout.
    let vmm = fake_vmm(
        name,
        &format!(
            "echo $$ > {}\ntrap '{on_usr2}' USR2\necho 'Linux version 6.1.0-fake'\n\
             echo 'last words before the hang'\necho 'vmm log line' >&2\n{after_banner}\n\
             while :; do sleep 1 </dev/null >/dev/null 2>&1 & wait $!; done\n",
            pidfile.display()
        ),
    );
    let started = Instant::now();
    let out = driver(&vmm, &["--timeout", "3"]).output().unwrap();
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let gone = gone(pid.trim());
    let _ = std::fs::remove_file(&pidfile);
    let _ = std::fs::remove_dir_all(vmm.parent().unwrap());
    (text, took, gone)
}

/// What the fake VMMs below log on SIGUSR2: the shape of a real dump.
const FAKE_DUMP: &str = "echo \"[  3.000001] WARN  tvm_vmm::vmm: dump 1: state of the vm on SIGUSR2 (1 vcpu(s)); the guest keeps running\" >&2; \
     echo \"[  3.000002] WARN  tvm_vmm::vcpu: dump 1: vcpu0: rip 0xffffffff8880dfeb <fake_idle+0x1b>, halted\" >&2; \
     echo \"[  3.000003] WARN  tvm_vmm::vmm: dump 1: end\" >&2";

/// Checks that `text` shows the console, then the stderr before the dump, then
/// [`FAKE_DUMP`] as `E2E-DIAG vmm dump:` lines, once, then the result.
fn shows_the_dump(text: &str) {
    let at = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} in:\n{text}"))
    };
    let console = at("E2E-DIAG console: last words before the hang");
    let stderr = at("E2E-DIAG vmm stderr: vmm log line");
    let first = at("E2E-DIAG vmm dump: [  3.000001] WARN  tvm_vmm::vmm: dump 1: state of the vm");
    let vcpu = at(
        "E2E-DIAG vmm dump: [  3.000002] WARN  tvm_vmm::vcpu: dump 1: vcpu0: rip \
                   0xffffffff8880dfeb <fake_idle+0x1b>, halted",
    );
    let end = at("E2E-DIAG vmm dump: [  3.000003] WARN  tvm_vmm::vmm: dump 1: end");
    let result = at("E2E RESULT");
    assert!(
        console < stderr && stderr < first && first < vcpu && vcpu < end && end < result,
        "{text}"
    );
    // The dump is shown once, as the dump, not again as stderr.
    assert_eq!(text.matches("dump 1: end").count(), 1, "{text}");
    assert!(!text.contains("no `dump N: end`"), "{text}");
}

/// Before the watchdog kills a VMM that still runs, it asks it for its state dump
/// (SIGUSR2) and shows the dump as `E2E-DIAG vmm dump:` lines, after the console and the
/// stderr logged before it; then the VMM is killed as before.
#[test]
fn the_run_limit_shows_the_vmm_state_dump() {
    let (text, took, gone) = hang_with_usr2("dump", FAKE_DUMP, "");
    assert!(took < Duration::from_secs(30), "took {took:?}: {text}");
    assert!(text.contains("E2E FAIL run-time-limit"), "{text}");
    shows_the_dump(&text);
    assert!(text.contains("E2E RESULT error: run-time limit"), "{text}");
    assert!(gone, "the fake VMM outlived the driver:\n{text}");
}

/// A failing check gives up on a VMM that still runs the same way: here the console closes
/// after the banner (the fake closes its stdout and hangs), so `readiness-marker` fails at
/// once, and the failure's diagnostics include the dump.
#[test]
fn a_failing_check_shows_the_vmm_state_dump() {
    let (text, took, gone) = hang_with_usr2("check", FAKE_DUMP, "exec >&-");
    assert!(took < Duration::from_secs(30), "took {took:?}: {text}");
    assert!(text.contains("E2E FAIL readiness-marker"), "{text}");
    assert!(text.contains("E2E-DIAG vmm status: None"), "{text}");
    shows_the_dump(&text);
    assert!(!text.contains("run-time-limit"), "{text}");
    assert!(gone, "the fake VMM outlived the driver:\n{text}");
}

/// A VMM that has exited is not asked for a dump, and costs no wait.
#[test]
fn a_vmm_that_has_exited_is_not_asked_for_a_dump() {
    let (text, took, _) = hang_with_usr2("exited", FAKE_DUMP, "exit 3");
    assert!(took < Duration::from_secs(30), "took {took:?}: {text}");
    assert!(text.contains("E2E FAIL readiness-marker"), "{text}");
    assert!(text.contains("E2E-DIAG vmm status: Some("), "{text}");
    assert!(text.contains("E2E-DIAG vmm stderr: vmm log line"), "{text}");
    assert!(!text.contains("E2E-DIAG vmm dump"), "{text}");
}

/// A VMM that does not answer SIGUSR2 costs the watchdog at most its 2 s wait, and the
/// output says there was no dump.
#[test]
fn a_vmm_that_does_not_dump_is_waited_for_two_seconds_at_most() {
    let (text, took, gone) = hang_with_usr2("nodump", "", "");
    assert!(took < Duration::from_secs(30), "took {took:?}: {text}");
    assert!(text.contains("E2E FAIL run-time-limit"), "{text}");
    assert!(
        text.contains(
            "E2E-DIAG vmm dump: no `dump N: end` within 2000 ms of SIGUSR2 (vmm still running)"
        ),
        "{text}"
    );
    assert!(text.contains("E2E-DIAG vmm stderr: vmm log line"), "{text}");
    assert!(gone, "the fake VMM outlived the driver:\n{text}");
}
