//! The state dump on SIGUSR2, end to end in the `vmm` binary: a tiny guest that spins
//! in a loop without ever leaving the guest is asked, twice, to explain itself, and keeps
//! running (needs /dev/kvm; PVM is enough).

#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tvm_tests::{elf_image, Asm, GUEST_ENTRY};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tvm-dump-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Collects a child's stderr on a thread.
fn collect_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let mut stderr = child.stderr.take().unwrap();
    let sink = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}

/// Waits up to 20 s for `needle` in `text`; gives up early when `child` has exited
/// (unless `needle` is what it prints last).
fn wait_for(child: &mut Child, text: &Mutex<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut exited_at = None;
    loop {
        let t = text.lock().unwrap().clone();
        if t.contains(needle) {
            return t;
        }
        if exited_at.is_none() && child.try_wait().unwrap().is_some() {
            exited_at = Some(Instant::now());
        }
        // Give the stderr reader a moment to catch up with an exited child.
        let gone = exited_at.is_some_and(|at| at.elapsed() > Duration::from_secs(1));
        assert!(
            Instant::now() < deadline && !gone,
            "no {needle:?} (vmm exited: {}) in {t}",
            exited_at.is_some()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) with a pid we spawned and a valid signal number has no memory effects.
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0);
}

/// The `field` of the first line of `text` that starts with `prefix` (after the log
/// header), as the words after `field `.
fn line_with<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find(|l| l.contains(prefix))
        .unwrap_or_else(|| panic!("no line with {prefix:?} in {text}"))
}

#[test]
#[ignore = "needs /dev/kvm"]
fn kvm_sigusr2_dumps_a_spinning_guest_and_it_keeps_running() {
    // Three exits to port 0x80, then a jump to itself: from then on the vCPU never leaves
    // the guest on its own, so the dump has to kick it out of KVM_RUN.
    let mut asm = Asm::new().print(0x3f8, b"spin\n");
    for _ in 0..3 {
        asm = asm.out_al(0x80);
    }
    let spin = GUEST_ENTRY + asm.len() as u64;
    let code = asm.label("spin").jmp("spin").finish();
    let kernel = scratch("spin.elf");
    std::fs::write(&kernel, elf_image(&code)).unwrap();
    let map = scratch("System.map");
    std::fs::write(
        &map,
        format!("{GUEST_ENTRY:016x} T tiny_start\n{spin:016x} t tiny_spin\n"),
    )
    .unwrap();
    // A disk the guest never touches: its queue shows up as not enabled.
    let disk = scratch("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();

    let mut child = tvm_tests::vmm_command(VMM)
        .args(["--kernel", kernel.to_str().unwrap(), "--memory", "64M"])
        .args(["--system-map", map.to_str().unwrap()])
        .args(["--disk", disk.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = collect_stderr(&mut child);
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = [0u8; 5];
    stdout.read_exact(&mut seen).unwrap();
    assert_eq!(&seen, b"spin\n");
    // Let it spin a little.
    std::thread::sleep(Duration::from_millis(200));

    signal(&child, libc::SIGUSR2);
    let text = wait_for(&mut child, &stderr, "dump 1: end");
    // At the default log level (warn).
    assert!(
        line_with(&text, "dump 1: state of the vm on SIGUSR2").contains(" WARN "),
        "{text}"
    );
    let cpu = line_with(&text, "dump 1: vcpu0: rip ");
    assert!(
        cpu.contains(&format!("rip {spin:#x} <tiny_spin+0x0>")),
        "{cpu}"
    );
    assert!(cpu.contains("runnable"), "{cpu}");
    assert!(line_with(&text, "dump 1: vcpu0: events: ").contains("lapic tpr"));
    let exits = line_with(&text, "dump 1: vcpu0: exits ");
    // 5 bytes printed and 3 writes to 0x80; the kick shows as an interrupted KVM_RUN.
    assert!(exits.contains("io-out 8"), "{exits}");
    assert!(exits.contains("interrupted"), "{exits}");
    assert!(exits.contains("io-out 0x80 x3, io-out 0x3f8 x5"), "{exits}");
    assert!(line_with(&text, "dump 1: serial: ier ").contains("rx fifo 0 of 64 bytes"));
    assert!(line_with(&text, "dump 1: virtio-blk ").contains("not active"));
    assert!(line_with(&text, ": queue 0: not enabled").contains("dump 1: "));

    // Still running, and a second dump finds it in the same loop.
    assert!(child.try_wait().unwrap().is_none(), "{text}");
    signal(&child, libc::SIGUSR2);
    let text = wait_for(&mut child, &stderr, "dump 2: end");
    assert!(line_with(&text, "dump 2: vcpu0: rip ").contains(&format!("rip {spin:#x}")));
    assert!(child.try_wait().unwrap().is_none(), "{text}");

    signal(&child, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "vmm did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = wait_for(&mut child, &stderr, "TVM-BOOT-TIMES ");
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(text.contains("exit_reason=signal"), "{text}");
    // Nothing else was wrong: every warning is part of a dump.
    for l in text.lines().filter(|l| l.contains(" WARN ")) {
        assert!(l.contains(": dump "), "unexpected warning {l}");
    }
}
