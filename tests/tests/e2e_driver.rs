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
