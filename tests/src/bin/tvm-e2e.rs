//! `tvm-e2e`: the real-Linux end-to-end driver.
//!
//! Runs where /dev/kvm is hardware-backed (directly on such a host, or inside the outer
//! QEMU guest `cargo xtask e2e` starts): boots the test guest in the `vmm` binary with the
//! console on pipes and checks real outcomes — the kernel banner, the readiness marker, a
//! command computed in the guest, input typed while the guest prints, a stdin flood that
//! leaves the VMM's RSS flat, and `reboot` ending the VMM with exit code 0. Prints one
//! `E2E PASS|FAIL <check>` line per check, the boot timings, and exits non-zero on failure.
//!
//! `tvm-e2e boot-time` instead boots the same guest in the VMM and in QEMU (`-accel kvm`)
//! a few times each and reports the time from spawn to the readiness marker.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const READY: &str = "TVM-READY uptime=";

/// Everything the guest printed so far, shared with the reader thread.
#[derive(Default)]
struct Console {
    buf: Mutex<Vec<u8>>,
    more: Condvar,
    closed: Mutex<bool>,
}

impl Console {
    fn len(&self) -> usize {
        self.buf.lock().map(|b| b.len()).unwrap_or(0)
    }

    /// Waits until `needle` appears at or after `from`; returns the offset just past it.
    fn wait_for(&self, needle: &str, from: usize, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        let mut buf = self.buf.lock().ok()?;
        loop {
            if let Some(pos) = find(&buf[from.min(buf.len())..], needle.as_bytes()) {
                return Some(from + pos + needle.len());
            }
            let now = Instant::now();
            if now >= deadline || self.closed.lock().map(|c| *c).unwrap_or(true) {
                return None;
            }
            buf = self.more.wait_timeout(buf, deadline - now).ok()?.0;
        }
    }

    fn text_from(&self, from: usize) -> String {
        let buf = self.buf.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&buf[from.min(buf.len())..]).into_owned()
    }

    fn tail(&self, n: usize) -> String {
        let len = self.len();
        self.text_from(len.saturating_sub(n))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn spawn_reader<R: Read + Send + 'static>(mut src: R, console: Arc<Console>, echo: bool) {
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        loop {
            match src.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if echo {
                        let _ = std::io::stderr().write_all(&chunk[..n]);
                    }
                    if let Ok(mut b) = console.buf.lock() {
                        b.extend_from_slice(&chunk[..n]);
                    }
                    console.more.notify_all();
                }
            }
        }
        if let Ok(mut c) = console.closed.lock() {
            *c = true;
        }
        console.more.notify_all();
    });
}

struct Opts {
    vmm: String,
    kernel: String,
    initrd: String,
    qemu: Option<String>,
    runs: usize,
    verbose: bool,
}

fn parse_opts(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        vmm: String::new(),
        kernel: String::new(),
        initrd: String::new(),
        qemu: None,
        runs: 3,
        verbose: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--vmm" => o.vmm = val()?,
            "--kernel" => o.kernel = val()?,
            "--initrd" => o.initrd = val()?,
            "--qemu" => o.qemu = Some(val()?),
            "--runs" => o.runs = val()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--verbose" => o.verbose = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.vmm.is_empty() || o.kernel.is_empty() || o.initrd.is_empty() {
        return Err("usage: tvm-e2e [boot-time] --vmm PATH --kernel PATH --initrd PATH [--qemu PATH] [--runs N] [--verbose]".into());
    }
    Ok(o)
}

struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    console: Arc<Console>,
    stderr: Arc<Console>,
    started: Instant,
}

impl Guest {
    fn spawn(mut cmd: Command, echo: bool) -> Result<Guest, String> {
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
        let console = Arc::new(Console::default());
        let stderr = Arc::new(Console::default());
        let out = child.stdout.take().ok_or("no stdout")?;
        let err = child.stderr.take().ok_or("no stderr")?;
        spawn_reader(out, console.clone(), echo);
        spawn_reader(err, stderr.clone(), echo);
        Ok(Guest {
            stdin: child.stdin.take(),
            child,
            console,
            stderr,
            started,
        })
    }

    fn send(&mut self, text: &[u8]) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        stdin
            .write_all(text)
            .and_then(|_| stdin.flush())
            .map_err(|e| format!("writing to the console: {e}"))
    }

    fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn vmm_command(o: &Opts) -> Command {
    let mut c = Command::new(&o.vmm);
    c.args([
        "--kernel", &o.kernel, "--initrd", &o.initrd, "--memory", "512M",
    ]);
    c
}

struct Report {
    failed: usize,
}

impl Report {
    fn check(&mut self, name: &str, result: Result<String, String>) -> bool {
        match result {
            Ok(detail) => {
                println!(
                    "E2E PASS {name}{}",
                    if detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {detail}")
                    }
                );
                true
            }
            Err(why) => {
                println!("E2E FAIL {name}: {why}");
                self.failed += 1;
                false
            }
        }
    }
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

fn boot_checks(o: &Opts) -> Result<bool, String> {
    let mut r = Report { failed: 0 };
    let mut g = Guest::spawn(vmm_command(o), o.verbose)?;
    let c = g.console.clone();

    let banner = c.wait_for("Linux version", 0, BOOT_TIMEOUT);
    let ok = r.check(
        "kernel-banner",
        banner.map(|_| String::new()).ok_or_else(|| {
            format!(
                "no banner; stderr: {}; console: {}",
                g.stderr.tail(2000),
                c.tail(2000)
            )
        }),
    );
    if !ok {
        return Ok(false);
    }
    let ready = c.wait_for(READY, 0, BOOT_TIMEOUT);
    let boot_to_ready = g.started.elapsed();
    let ok = r.check(
        "readiness-marker",
        ready
            .map(|_| format!("{:.0} ms after spawn", boot_to_ready.as_secs_f64() * 1000.0))
            .ok_or_else(|| format!("no marker; console tail: {}", c.tail(3000))),
    );
    if !ok {
        return Ok(false);
    }
    let mut pos = ready.unwrap_or(0);
    // Wait for the shell prompt before typing.
    if let Some(p) = c.wait_for("# ", pos, STEP_TIMEOUT) {
        pos = p;
    }

    // A command whose answer only the guest computes.
    g.send(b"echo answer=$((6*7))\n")?;
    let answered = c.wait_for("answer=42", pos, STEP_TIMEOUT);
    r.check(
        "serial-input-computed-in-guest",
        answered
            .map(|_| "echo $((6*7)) answered 42".into())
            .ok_or_else(|| format!("no answer; console tail: {}", c.tail(2000))),
    );
    pos = answered.unwrap_or(c.len());

    // uname -r: the guest kernel's version.
    g.send(b"echo release=$(uname -r)\n")?;
    let rel = c
        .wait_for("release=", pos + 20, STEP_TIMEOUT)
        .and_then(|p| c.wait_for("\n", p, STEP_TIMEOUT).map(|e| (p, e)));
    r.check(
        "uname-r",
        rel.map(|(p, e)| c.text_from(p)[..e - p].trim().to_string())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| "no release printed".to_string()),
    );
    pos = c.len();

    // Input typed while the guest is busy printing must not be lost.
    g.send(b"i=0; while [ $i -lt 3000 ]; do echo busy-line-$i; i=$((i+1)); done\n")?;
    let busy = c.wait_for("busy-line-10\r\n", pos, STEP_TIMEOUT);
    g.send(b"echo typed-while-busy-$((40+2))\n")?;
    let got = busy.and_then(|p| c.wait_for("typed-while-busy-42", p, STEP_TIMEOUT));
    r.check(
        "input-while-printing",
        got.map(|_| "typed during 3000 lines of output, executed afterwards".into())
            .ok_or_else(|| format!("typed command lost; console tail: {}", c.tail(1500))),
    );
    pos = c.len();

    // A flood on stdin: the VMM must not buffer it (RSS flat), the guest must get it all.
    let flood_lines: usize = 4096; // 4096 lines x 256 bytes = 1 MiB offered per pass
    let passes = 4;
    g.send(b"stty -echo; cat > /tmp/flood; stty echo; echo flood-bytes=$(wc -c < /tmp/flood)\n")?;
    thread::sleep(Duration::from_millis(500));
    let rss_before = g.rss_kib();
    let line: Vec<u8> = {
        let mut l = vec![b'x'; 255];
        l.push(b'\n');
        l
    };
    let mut stdin = g.stdin.take().ok_or("stdin gone")?;
    let writer = thread::spawn(move || -> Result<ChildStdin, String> {
        for _ in 0..passes * flood_lines {
            stdin.write_all(&line).map_err(|e| e.to_string())?;
        }
        // Ctrl-D ends cat.
        stdin.write_all(&[4]).map_err(|e| e.to_string())?;
        stdin.flush().map_err(|e| e.to_string())?;
        Ok(stdin)
    });
    let mut rss_max = rss_before.unwrap_or(0);
    let flood_deadline = Instant::now() + Duration::from_secs(600);
    let flood_started = Instant::now();
    while !writer.is_finished() && Instant::now() < flood_deadline {
        rss_max = rss_max.max(g.rss_kib().unwrap_or(0));
        thread::sleep(Duration::from_millis(100));
    }
    let total = passes * flood_lines * 256;
    let done = if writer.is_finished() {
        match writer.join() {
            Ok(Ok(stdin)) => {
                g.stdin = Some(stdin);
                c.wait_for(&format!("flood-bytes={total}"), pos, STEP_TIMEOUT)
            }
            _ => None,
        }
    } else {
        None
    };
    let secs = flood_started.elapsed().as_secs_f64();
    let growth = rss_max.saturating_sub(rss_before.unwrap_or(0));
    r.check(
        "stdin-flood",
        match done {
            Some(_) if growth < 4096 => Ok(format!(
                "{} MiB delivered intact in {secs:.1} s ({:.0} KiB/s); VMM RSS {} KiB before, peak {} KiB (+{growth} KiB)",
                total >> 20,
                total as f64 / 1024.0 / secs,
                rss_before.unwrap_or(0),
                rss_max
            )),
            Some(_) => Err(format!("RSS grew by {growth} KiB during the flood")),
            None => Err(format!("flood not delivered; console tail: {}", c.tail(1000))),
        },
    );
    pos = c.len();

    // reboot ends the VMM with exit code 0, within a bound.
    let asked = Instant::now();
    if g.stdin.is_some() {
        g.send(b"reboot\n")?;
    }
    let status = g.wait_exit(Duration::from_secs(60));
    let _ = pos;
    r.check(
        "reboot-exits-0",
        match status {
            Some(s) if s.code() == Some(0) => Ok(format!(
                "exit code 0, {:.0} ms after `reboot`",
                asked.elapsed().as_secs_f64() * 1000.0
            )),
            Some(s) => Err(format!("exit status {s}; stderr: {}", g.stderr.tail(2000))),
            None => Err("still running 60 s after `reboot`".into()),
        },
    );
    // Give the stderr reader a moment to see the final lines.
    thread::sleep(Duration::from_millis(200));
    let stderr = g.stderr.text_from(0);
    let timing = stderr.lines().find(|l| l.starts_with("TVM-BOOT-TIMES "));
    r.check(
        "boot-times-line",
        timing
            .map(|l| l.to_string())
            .ok_or_else(|| format!("no TVM-BOOT-TIMES line in stderr: {stderr}")),
    );
    println!(
        "E2E-TIMING boot_to_ready_ms={:.1}",
        boot_to_ready.as_secs_f64() * 1000.0
    );
    Ok(r.failed == 0)
}

/// Boots `cmd` until the readiness marker; returns spawn-to-marker.
fn time_to_ready(cmd: Command, verbose: bool) -> Result<Duration, String> {
    let g = Guest::spawn(cmd, verbose)?;
    match g.console.wait_for(READY, 0, BOOT_TIMEOUT) {
        Some(_) => Ok(g.started.elapsed()),
        None => Err(format!(
            "no readiness marker; stderr: {} console: {}",
            g.stderr.tail(1000),
            g.console.tail(2000)
        )),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn boot_time(o: &Opts) -> Result<bool, String> {
    let qemu = o.qemu.clone().ok_or("boot-time needs --qemu")?;
    let mut ours = Vec::new();
    let mut peer = Vec::new();
    for run in 0..o.runs {
        // Interleave the two so drift in the machine's speed hits both alike.
        let t = time_to_ready(vmm_command(o), o.verbose)?;
        ours.push(t.as_secs_f64() * 1000.0);
        let mut q = Command::new(&qemu);
        q.args([
            "-M",
            "pc",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "512M",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-kernel",
            &o.kernel,
            "-initrd",
            &o.initrd,
            "-append",
            "console=ttyS0 reboot=k panic=1 pci=conf1",
            "-no-reboot",
        ]);
        let t = time_to_ready(q, o.verbose)?;
        peer.push(t.as_secs_f64() * 1000.0);
        println!(
            "BOOT-TIME run {run}: vmm {:.0} ms, qemu {:.0} ms",
            ours[run], peer[run]
        );
    }
    let (m_ours, m_peer) = (median(&mut ours), median(&mut peer));
    println!(
        "BOOT-TIME median spawn-to-ready: vmm {m_ours:.0} ms, qemu {m_peer:.0} ms, ratio vmm/qemu {:.2} ({} runs each)",
        m_ours / m_peer,
        o.runs
    );
    Ok(true)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, rest) = match args.first().map(String::as_str) {
        Some("boot-time") => ("boot-time", &args[1..]),
        Some("boot") => ("boot", &args[1..]),
        _ => ("boot", &args[..]),
    };
    let result = parse_opts(rest).and_then(|o| match mode {
        "boot-time" => boot_time(&o),
        _ => boot_checks(&o),
    });
    match result {
        Ok(true) => {
            println!("E2E RESULT ok");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("E2E RESULT failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("E2E RESULT error: {e}");
            ExitCode::FAILURE
        }
    }
}
