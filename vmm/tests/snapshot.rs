//! Snapshots end to end through the `vmm` binary: a tiny guest saved mid-run goes on
//! counting in a new process (needs /dev/kvm; PVM is enough), and state files that are
//! not snapshots this VMM can restore are refused with their own error before KVM is
//! touched.

#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tvm_tests::{elf_image, Asm};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tvm-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A child's output, collected by a thread as it comes.
#[derive(Clone, Default)]
struct Collected(Arc<Mutex<(Vec<u8>, bool)>>);

impl Collected {
    fn start(mut from: impl Read + Send + 'static) -> Self {
        let c = Collected::default();
        let sink = c.0.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sink.lock().unwrap().0.extend_from_slice(&buf[..n]),
                }
            }
            sink.lock().unwrap().1 = true;
        });
        c
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap().0).into_owned()
    }

    /// All of it, once the child has closed its end (within 10 s).
    fn all(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.0.lock().unwrap().1 {
            assert!(Instant::now() < deadline, "the output never ended");
            std::thread::sleep(Duration::from_millis(5));
        }
        self.text()
    }

    /// Waits up to `secs` for `pred` to hold on the text so far.
    fn wait_for(&self, secs: u64, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let t = self.text();
            if pred(&t) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {secs} s: {t:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn spawn(args: &[&str]) -> (Child, Collected, Collected) {
    let mut child = tvm_tests::vmm_command(VMM)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Collected::start(child.stdout.take().unwrap());
    let err = Collected::start(child.stderr.take().unwrap());
    (child, out, err)
}

fn wait_exit(child: &mut Child, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("vmm did not exit within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where the counting guest keeps its letter: guest RAM, so that a restore that lost
/// memory would start again at 'A' (or print garbage).
const COUNTER: u64 = 0x20_0000;

/// Prints 'A' to 'Z' on COM1, about 60 ms apart (by the TSC), the current letter kept in
/// memory; then a newline, and resets through the i8042 (a clean exit of the vmm).
fn counting_guest() -> Vec<u8> {
    let spin = |a: Asm| {
        a.tsc_to_rax()
            .mov_r8_rax()
            .label("spin")
            .pause()
            .tsc_to_rax()
            .sub_rax_r8()
            .shr_rax(20)
            .cmp_eax(120)
            .jb("spin")
    };
    let a = Asm::new()
        .mov_rdi(COUNTER)
        .store16_at_rdi(u16::from(b'A'))
        .label("next")
        .mov_rdi(COUNTER)
        .load8_from_rdi()
        .mov_dx(0x3f8)
        .out_dx_al()
        .cmp_eax(u32::from(b'Z'))
        .je("done")
        .inc16_at_rdi();
    spin(a)
        .jmp("next")
        .label("done")
        .print(0x3f8, b"\n")
        .i8042_reset()
        .finish()
}

#[test]
#[ignore = "needs /dev/kvm"]
fn kvm_a_guest_saved_mid_run_goes_on_counting_in_a_new_process() {
    let kernel = scratch("count.elf");
    std::fs::write(&kernel, elf_image(&counting_guest())).unwrap();
    let snap = scratch("count.snap");
    let (mut first, out, err) = spawn(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64M",
        "--snapshot-on-signal",
        snap.to_str().unwrap(),
    ]);
    out.wait_for(20, "'C' from the guest", |t| t.contains('C'));
    // SAFETY: kill(2) on a child we spawned, with a valid signal number.
    assert_eq!(unsafe { libc::kill(first.id() as i32, libc::SIGUSR1) }, 0);
    err.wait_for(20, "the snapshot line", |t| {
        t.contains("snapshot on SIGUSR1 written") || t.contains("snapshot on SIGUSR1 failed")
    });
    assert!(
        err.text().contains("snapshot on SIGUSR1 written"),
        "{}",
        err.text()
    );
    first.kill().unwrap();
    first.wait().unwrap();
    let before = out.text();
    assert!(
        !before.contains('Z'),
        "the guest finished before the snapshot: {before:?}"
    );

    // The memory file holds 64 MiB of guest RAM, and only the pages that are not zeros.
    let mem = std::fs::metadata(format!("{}.mem", snap.display())).unwrap();
    assert_eq!(mem.len(), 64 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(
        mem.blocks() * 512 < 8 << 20,
        "{} bytes allocated",
        mem.blocks() * 512
    );

    let (mut second, out2, err2) = spawn(&["--restore", snap.to_str().unwrap()]);
    let status = wait_exit(&mut second, 30);
    let after = out2.all();
    assert_eq!(
        status.code(),
        Some(0),
        "stdout {after:?}, stderr {}",
        err2.all()
    );
    assert!(after.ends_with("Z\n"), "{after:?}");
    let letters = after.trim_end();
    let first_letter = letters.as_bytes()[0];
    // It went on from where it was saved: not from 'A', right after a letter the first
    // run had printed, and without a gap.
    assert!(first_letter > b'A', "started again: {after:?}");
    assert!(
        before.as_bytes().contains(&(first_letter - 1)),
        "the restored run starts at {:?}, the first run printed {before:?}",
        first_letter as char
    );
    let expected: String = (first_letter..=b'Z').map(char::from).collect();
    assert_eq!(letters, expected);
}

fn refused(state: &[u8]) -> String {
    let snap = scratch(&format!("bad-{}.snap", state.len()));
    std::fs::write(&snap, state).unwrap();
    std::fs::write(format!("{}.mem", snap.display()), b"").unwrap();
    let (mut child, _out, err) = spawn(&["--restore", snap.to_str().unwrap()]);
    let status = wait_exit(&mut child, 10);
    let text = err.all();
    assert_eq!(status.code(), Some(1), "{text}");
    assert_eq!(text.matches("vmm: error:").count(), 1, "{text}");
    text
}

#[test]
fn damaged_truncated_and_foreign_state_files_each_get_their_error() {
    let good = tvm_snapshot::encode(&tvm_snapshot::Snapshot::example()).unwrap();

    let mut damaged = good.clone();
    let last = damaged.len() - 3;
    damaged[last] ^= 1;
    assert!(refused(&damaged).contains("damaged"));

    assert!(refused(&good[..good.len() / 2]).contains("truncated"));

    let mut other = good.clone();
    other[8..12].copy_from_slice(&7u32.to_le_bytes());
    assert!(refused(&other).contains("format version 7 is not supported"));

    assert!(refused(b"#!/bin/sh\necho hello\n").contains("not a tvm snapshot"));

    // A file larger than any state file is refused before it is read (a sparse one here).
    let huge = scratch("huge.snap");
    let f = std::fs::File::create(&huge).unwrap();
    f.set_len(tvm_snapshot::HEADER_LEN as u64 + tvm_snapshot::MAX_PAYLOAD + 1)
        .unwrap();
    let (mut child, _out, err) = spawn(&["--restore", huge.to_str().unwrap()]);
    let status = wait_exit(&mut child, 10);
    let text = err.all();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("larger than the limit"), "{text}");
    std::fs::remove_file(&huge).unwrap();
}

#[test]
fn restore_and_a_kernel_or_machine_options_do_not_go_together() {
    let (mut child, _out, err) = spawn(&["--restore", "/nonexistent", "--memory", "1G"]);
    let status = wait_exit(&mut child, 10);
    let text = err.all();
    assert_eq!(status.code(), Some(2), "{text}");
    assert!(text.contains("cannot be used with"), "{text}");
    let (mut child, _out, err) = spawn(&["--restore", "/nonexistent/x.snap"]);
    let status = wait_exit(&mut child, 10);
    let text = err.all();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("cannot open the snapshot file"), "{text}");
}

fn wait_for_path(p: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{p:?} never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn api(sock: &std::path::Path, method: &str, path: &str, body: &str) -> (u16, String) {
    tvm_tests::api_request(sock, method, path, body).unwrap()
}

fn spawn_api(sock: &std::path::Path) -> (Child, Collected, Collected) {
    let _ = std::fs::remove_file(sock);
    let r = spawn(&["--api-sock", sock.to_str().unwrap()]);
    wait_for_path(sock);
    r
}

#[test]
#[ignore = "needs /dev/kvm"]
fn kvm_the_firecracker_api_snapshots_a_paused_guest_and_loads_it_in_a_new_process() {
    let kernel = scratch("api-count.elf");
    std::fs::write(&kernel, elf_image(&counting_guest())).unwrap();
    let (snap, mem) = (scratch("api.snap"), scratch("api.mem"));
    let sock = scratch("api1.sock");
    let (mut first, out, _err) = spawn_api(&sock);
    let kernel_json = format!(r#"{{"kernel_image_path": {:?}}}"#, kernel.to_str().unwrap());
    let create = format!(
        r#"{{"snapshot_type": "Full", "snapshot_path": {:?}, "mem_file_path": {:?}}}"#,
        snap.to_str().unwrap(),
        mem.to_str().unwrap()
    );
    // A drive the guest never drives, and a second vCPU that never starts (it waits for
    // INIT and SIPI): both come back with the restore. Read-only: the copies below run at
    // once, and a writable image is locked by the first VMM that opens it.
    let image = scratch("api-drive.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let drive_json = format!(
        r#"{{"drive_id": "data", "path_on_host": {:?}, "is_root_device": false, "is_read_only": true}}"#,
        image.to_str().unwrap()
    );
    for (method, path, body) in [
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 64, "track_dirty_pages": true}"#,
        ),
        ("PUT", "/drives/data", drive_json.as_str()),
        ("PUT", "/boot-source", kernel_json.as_str()),
        ("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
    ] {
        let (status, reply) = api(&sock, method, path, body);
        assert_eq!(status, 204, "{method} {path}: {reply}");
    }
    out.wait_for(20, "'C' from the guest", |t| t.contains('C'));
    // Not while it runs.
    let (status, reply) = api(&sock, "PUT", "/snapshot/create", &create);
    assert_eq!(status, 400, "{reply}");
    assert!(reply.contains("pause it first"), "{reply}");
    let (status, reply) = api(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(status, 204, "{reply}");
    let (status, reply) = api(&sock, "PUT", "/snapshot/create", &create);
    assert_eq!(status, 204, "{reply}");
    let printed = out.text();

    // One more letter (the guest writes its counter's page), then a diff: about that one
    // page, where the kernel tracks dirty pages; refused with the reason where it does
    // not (this machine's own kernel has no CONFIG_MEM_SOFT_DIRTY).
    let (status, reply) = api(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert_eq!(status, 204, "{reply}");
    let n = printed.len();
    out.wait_for(20, "one more letter", |t| t.len() > n);
    let (status, reply) = api(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(status, 204, "{reply}");
    let (dsnap, dmem) = (scratch("api-diff.snap"), scratch("api-diff.mem"));
    let _ = std::fs::remove_file(&dmem);
    let diff = format!(
        r#"{{"snapshot_type": "Diff", "snapshot_path": {:?}, "mem_file_path": {:?}}}"#,
        dsnap.to_str().unwrap(),
        dmem.to_str().unwrap()
    );
    let (status, reply) = api(&sock, "PUT", "/snapshot/create", &diff);
    if status == 204 {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&dmem).unwrap();
        assert_eq!(m.len(), 64 << 20);
        // The counter's page, and the few the CPU marks (accessed and dirty bits in the
        // guest's page tables): a handful, not the guest's 64 MiB.
        assert!(
            m.blocks() * 512 <= 64 << 10,
            "a diff after one letter took {} bytes",
            m.blocks() * 512
        );
    } else {
        assert_eq!(status, 400, "{reply}");
        assert!(reply.contains("soft-dirty"), "{reply}");
    }
    first.kill().unwrap();
    first.wait().unwrap();

    // Loaded without resume_vm: paused, nothing printed until resumed.
    let sock2 = scratch("api2.sock");
    let (mut second, out2, err2) = spawn_api(&sock2);
    let load = format!(
        r#"{{"snapshot_path": {:?}, "mem_backend": {{"backend_type": "File", "backend_path": {:?}}}}}"#,
        snap.to_str().unwrap(),
        mem.to_str().unwrap()
    );
    let (status, reply) = api(&sock2, "PUT", "/snapshot/load", &load);
    assert_eq!(status, 204, "{reply} {}", err2.text());
    let (status, info) = api(&sock2, "GET", "/", "");
    assert_eq!(status, 200);
    assert!(info.contains("\"Paused\""), "{info}");
    let (_, machine) = api(&sock2, "GET", "/machine-config", "");
    assert!(
        machine.contains("\"mem_size_mib\":64") && machine.contains("\"vcpu_count\":2"),
        "{machine}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(out2.text(), "", "the paused guest printed");
    let (status, reply) = api(&sock2, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert_eq!(status, 204, "{reply}");
    let status = wait_exit(&mut second, 30);
    let after = out2.all();
    assert_eq!(status.code(), Some(0), "{after:?} {}", err2.all());
    let first_letter = after.as_bytes()[0];
    // The snapshot was taken after the last letter the first run printed.
    assert_eq!(
        printed.as_bytes().last().copied(),
        Some(first_letter - 1),
        "first run {printed:?}, restored {after:?}"
    );
    assert!(after.ends_with("Z\n"), "{after:?}");

    // The same snapshot loaded twice more, at once, resumed by the load itself.
    let runs: Vec<_> = (0..2)
        .map(|i| {
            let sock = scratch(&format!("api-clone{i}.sock"));
            let (child, out, err) = spawn_api(&sock);
            let load = format!(
                r#"{{"snapshot_path": {:?}, "mem_file_path": {:?}, "resume_vm": true}}"#,
                snap.to_str().unwrap(),
                mem.to_str().unwrap()
            );
            let (status, reply) = api(&sock, "PUT", "/snapshot/load", &load);
            assert_eq!(status, 204, "{reply} {}", err.text());
            (child, out)
        })
        .collect();
    for (mut child, out) in runs {
        let status = wait_exit(&mut child, 30);
        assert_eq!(status.code(), Some(0));
        assert!(out.all().ends_with("Z\n"));
    }
}
