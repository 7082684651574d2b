//! The outer QEMU guest: where real-Linux runs happen when this host's /dev/kvm cannot
//! boot Linux (PVM, see TESTBED.md) or is missing.
//!
//! QEMU (TCG, `-cpu max`, which emulates AMD SVM) boots the same Debian kernel as the
//! test guest with `target/guest/outer/base.cpio` plus a per-run cpio holding
//! `/payload.sh` and the caller's files under `/tvm/`. The outer /init loads
//! irqbypass/kvm/kvm_amd/tun, checks /dev/kvm, runs `/payload.sh` on the console
//! (ttyS0, its controlling terminal), writes `TVM-OUTER-EXIT <code>` to ttyS1 and powers
//! off. ttyS1 goes to a host file, which also receives a `.` every second as a heartbeat.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::cpio::Archive;
use crate::guest::{self, GuestImages};
use crate::util;

/// Guest directory where [`OuterRun::files`] with relative guest paths are placed.
pub const GUEST_FILES_DIR: &str = "/tvm";

/// If the heartbeat stops for this long, the outer guest is considered frozen.
const HEARTBEAT_STALL: Duration = Duration::from_secs(45);

/// Whether /dev/kvm on this host can run a real Linux guest: it exists, we can open it,
/// and it is not PVM (`kvm_pvm` cannot run an unmodified kernel, see TESTBED.md).
pub fn kvm_is_usable_directly() -> bool {
    Path::new("/dev/kvm").exists()
        && fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
        && !Path::new("/sys/module/kvm_pvm").exists()
}

/// Builds `bin` of `package` as a static x86_64 binary (it goes into initramfs images,
/// which have no libc) and returns its path.
///
/// `--target` keeps `RUSTFLAGS` off build scripts and proc macros, which cannot be static.
pub fn build_static(package: &str, bin: &str) -> Result<PathBuf> {
    const TARGET: &str = "x86_64-unknown-linux-gnu";
    let mut cmd = Command::new(util::cargo());
    cmd.current_dir(util::workspace_root())
        .args([
            "build",
            "--release",
            "-p",
            package,
            "--bin",
            bin,
            "--target",
            TARGET,
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    println!("xtask: building static {bin}: {}", util::display_cmd(&cmd));
    util::run(&mut cmd)?;
    let path = util::cargo_target_dir()
        .join(TARGET)
        .join("release")
        .join(bin);
    if !path.is_file() {
        bail!("cargo built no {}", path.display());
    }
    Ok(path)
}

/// Prefix for payload commands that run a VMM: keep it on outer vCPU 1. The outer guest's
/// TSCs disagree between its TCG vCPUs, and an inner guest whose vCPU thread migrates
/// between them sees its clock stall or jump, and dies at random.
pub const PIN_TO_ONE_CPU: &str = "taskset -c 1";

/// Shell lines (for a payload) that stop the outer guest from writing dirty pages of
/// `devices` (`vdc`, ...) back on its own, so that they reach the drives' host files only
/// when a process flushes them (fsync, fdatasync, sync, the last close of the device):
/// no periodic flusher (`dirty_writeback_centisecs=0`), nothing expires for an hour, and
/// each device gets a reserved share of the background threshold (`min_ratio` 20%, about
/// 30 MiB or more here). Without the reserve, a device that has written nothing yet has a
/// share of 0, and its first dirty pages start background writeback at once (seen: the
/// first 1 MiB of an unflushed 4 MiB reached the host file). A step that fails prints
/// `E2E FAIL durability-setup` and sets `rc=1`.
pub fn no_writeback_script(devices: &[&str]) -> String {
    format!(
        "echo 0 >/proc/sys/vm/dirty_writeback_centisecs || rc=1\n\
         echo 360000 >/proc/sys/vm/dirty_expire_centisecs || rc=1\n\
         for d in {}; do\n\
         \x20   echo 20 >/sys/class/bdi/$(cat /sys/block/$d/dev)/min_ratio || rc=1\n\
         done\n\
         [ $rc -eq 0 ] || echo \"E2E FAIL durability-setup: cannot stop the outer writeback\"\n",
        devices.join(" ")
    )
}

/// The outer guest's CPU model (`TVM_OUTER_CPU` overrides it).
const OUTER_CPU: &str = "max";

/// One boot of the outer QEMU guest running a payload script.
#[derive(Debug, Clone)]
pub struct OuterRun {
    /// Host files to carry: (host path, guest path). A relative guest path lands under
    /// `/tvm/`. File permission bits are kept (so executables stay executable).
    pub files: Vec<(PathBuf, String)>,
    /// The payload, run by `sh` with `/tvm` as working directory and the console as
    /// stdin/stdout/stderr and controlling terminal. Its exit status is the outcome's.
    pub script: String,
    /// Console on this terminal (raw; Ctrl-C and Ctrl-A go to the guest) instead of
    /// being captured.
    pub interactive: bool,
    /// Limit for the whole boot (not enforced when interactive).
    pub timeout: Duration,
    /// Do not echo the captured console to stdout (non-interactive runs only).
    pub quiet: bool,
    /// Host image files attached to the outer guest as virtio disks, in order: the first
    /// is the outer guest's /dev/vda, the second /dev/vdb, ... ([`outer_disk_path`]).
    /// Unlike carried files, what the payload writes to them lands in the host file.
    pub drives: Vec<Drive>,
    /// Kill QEMU (SIGKILL: a power cut of the outer guest) the moment this text appears on
    /// its console; the outcome then has `power_cut` set and no exit code. What the outer
    /// guest wrote to a drive but kept in its page cache is lost, as on a real power cut.
    pub kill_on: Option<String>,
}

/// A host image attached to the outer guest (see [`OuterRun::drives`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drive {
    /// Host path of the image.
    pub path: PathBuf,
    /// Attach read-only.
    pub read_only: bool,
}

/// The outer guest's device node of drive `index` (`/dev/vda`, `/dev/vdb`, ...).
pub fn outer_disk_path(index: usize) -> String {
    let letter = char::from(b'a' + u8::try_from(index % 26).unwrap_or(0));
    format!("/dev/vd{letter}")
}

/// What an [`OuterRun`] ended with.
#[derive(Debug, Clone)]
pub struct OuterOutcome {
    /// The payload's exit status; `None` if it did not finish (timed out).
    pub exit_code: Option<i32>,
    /// Everything the outer guest wrote to its console (empty when interactive).
    pub console_output: String,
    /// The payload ran past the timeout while the outer guest was alive.
    pub timed_out: bool,
    /// Outer boots it took (2 when the first froze or crashed).
    pub attempts: u32,
    /// Wall time of the last attempt, QEMU start to exit.
    pub elapsed: Duration,
    /// QEMU was killed because [`OuterRun::kill_on`] appeared on the console.
    pub power_cut: bool,
}

/// How one attempt ended.
enum Attempt {
    Done(OuterOutcome),
    /// The outer guest itself failed (froze, crashed): worth one retry.
    OuterFailed(String, String),
}

impl OuterRun {
    /// A non-interactive run of `script` with a 10-minute limit and no extra files.
    pub fn new(script: impl Into<String>) -> Self {
        Self {
            files: Vec::new(),
            script: script.into(),
            interactive: false,
            timeout: Duration::from_secs(600),
            quiet: false,
            drives: Vec::new(),
            kill_on: None,
        }
    }

    /// Attaches a host image as the outer guest's next virtio disk and returns its device
    /// node there.
    pub fn drive(&mut self, host: impl Into<PathBuf>, read_only: bool) -> String {
        self.drives.push(Drive {
            path: host.into(),
            read_only,
        });
        outer_disk_path(self.drives.len() - 1)
    }

    /// Adds a host file at `guest_path` (relative paths go under `/tvm/`).
    pub fn file(mut self, host: impl Into<PathBuf>, guest_path: impl Into<String>) -> Self {
        self.files.push((host.into(), guest_path.into()));
        self
    }

    /// Adds the test guest's kernel and initramfs as `/tvm/vmlinuz` and
    /// `/tvm/initramfs.cpio.gz`.
    pub fn with_test_guest(self, images: &GuestImages) -> Self {
        self.file(&images.vmlinuz, "vmlinuz")
            .file(&images.initramfs, "initramfs.cpio.gz")
    }

    /// Boots the outer guest (preparing `target/guest/` first if needed) and runs the
    /// payload. Retries the whole boot once if the outer guest itself freezes or crashes;
    /// a payload that fails or times out is not retried.
    pub fn run(&self) -> Result<OuterOutcome> {
        let images = guest::ensure_prepared()?;
        if util::which("qemu-system-x86_64").is_none() {
            guest::ensure_host_tools()?;
        }
        let work = images.dir.join("outer").join(format!(
            "run-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .subsec_nanos()
        ));
        fs::create_dir_all(&work)?;
        let result = self.run_in(&images, &work);
        let _ = fs::remove_dir_all(&work);
        result
    }

    fn run_in(&self, images: &GuestImages, work: &Path) -> Result<OuterOutcome> {
        let initrd = work.join("initrd.cpio");
        self.write_initrd(images, &initrd)?;
        if self.interactive {
            println!(
                "note: /dev/kvm here is PVM (or missing); running the VMM inside a QEMU TCG \
                 outer guest"
            );
            return self.run_interactive(images, &initrd, work);
        }
        let mut first_failure = None;
        for attempt in 1..=2 {
            match self.attempt(images, &initrd, work)? {
                Attempt::Done(mut outcome) => {
                    outcome.attempts = attempt;
                    return Ok(outcome);
                }
                Attempt::OuterFailed(why, console) => {
                    eprintln!("xtask: outer QEMU guest failed (attempt {attempt} of 2): {why}");
                    if first_failure.is_some() {
                        bail!(
                            "the outer QEMU guest failed twice: {}; then: {why}\n\
                             last console output:\n{}",
                            first_failure.unwrap_or_default(),
                            tail(&console, 40)
                        );
                    }
                    first_failure = Some(why);
                }
            }
        }
        unreachable!("the loop returns or bails on its second attempt")
    }

    /// base.cpio followed by a second newc archive with /payload.sh and the files (the
    /// kernel unpacks concatenated archives in order). Uncompressed: the outer guest
    /// would spend seconds of emulated CPU on inflating.
    fn write_initrd(&self, images: &GuestImages, path: &Path) -> Result<()> {
        let mut payload = Archive::new();
        payload.dir(GUEST_FILES_DIR, 0o755)?;
        payload.file("payload.sh", 0o755, self.script.clone().into_bytes())?;
        for (host, guest_path) in &self.files {
            let data = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
            let perm = fs::metadata(host)?.permissions().mode() & 0o7777;
            let guest_path = if guest_path.starts_with('/') {
                guest_path.clone()
            } else {
                format!("{GUEST_FILES_DIR}/{guest_path}")
            };
            payload.file(&guest_path, perm, data)?;
        }
        let mut out = fs::File::create(path)?;
        out.write_all(&fs::read(&images.outer_base)?)?;
        payload.write(&mut std::io::BufWriter::new(&mut out))?;
        Ok(())
    }

    fn qemu_command(&self, images: &GuestImages, initrd: &Path, exit_file: &Path) -> Command {
        let mut cmd = Command::new("qemu-system-x86_64");
        let cpu = std::env::var("TVM_OUTER_CPU").unwrap_or_else(|_| OUTER_CPU.to_string());
        cmd.args(["-M", "pc", "-accel", "tcg,thread=multi", "-cpu", &cpu])
            // Two outer vCPUs: a busy inner vCPU can starve a single one (no heartbeat).
            // Payloads that run a VMM pin it to vCPU 1 (see `PIN_TO_ONE_CPU`).
            .args(["-smp", "2", "-m", "3072"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-kernel")
            .arg(&images.vmlinuz)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", "console=ttyS0 reboot=t panic=-1 quiet"])
            .args(["-no-reboot"])
            .args([
                "-chardev",
                "stdio,id=con,signal=off",
                "-serial",
                "chardev:con",
            ])
            .arg("-chardev")
            .arg(format!(
                "file,id=exit,path={}",
                exit_file.to_string_lossy().replace(',', ",,")
            ))
            .args(["-serial", "chardev:exit"]);
        for d in &self.drives {
            // cache=writeback (the default): the payload's flushes reach the host file
            // through QEMU's fdatasync; what is written is in the host page cache either way.
            cmd.arg("-drive").arg(format!(
                "file={},if=virtio,format=raw,discard=unmap{}",
                d.path.to_string_lossy().replace(',', ",,"),
                if d.read_only { ",readonly=on" } else { "" }
            ));
        }
        cmd
    }

    fn run_interactive(
        &self,
        images: &GuestImages,
        initrd: &Path,
        work: &Path,
    ) -> Result<OuterOutcome> {
        let exit_file = work.join("exit");
        let start = Instant::now();
        let status = self
            .qemu_command(images, initrd, &exit_file)
            .status()
            .context("starting qemu-system-x86_64")?;
        let elapsed = start.elapsed();
        let marks = fs::read_to_string(&exit_file).unwrap_or_default();
        if marks.contains("TVM-OUTER-NOKVM") {
            bail!("the outer guest has no /dev/kvm (kvm_amd did not load)");
        }
        let exit_code = parse_exit(&marks);
        if exit_code.is_none() {
            bail!("the outer QEMU guest stopped without reporting an exit status (QEMU: {status})");
        }
        Ok(OuterOutcome {
            exit_code,
            console_output: String::new(),
            timed_out: false,
            attempts: 1,
            elapsed,
            power_cut: false,
        })
    }

    fn attempt(&self, images: &GuestImages, initrd: &Path, work: &Path) -> Result<Attempt> {
        let exit_file = work.join("exit");
        let _ = fs::remove_file(&exit_file);
        let start = Instant::now();
        let child = self
            .qemu_command(images, initrd, &exit_file)
            .stdin(Stdio::piped()) // held open and silent
            .stdout(Stdio::piped())
            .spawn()
            .context("starting qemu-system-x86_64")?;
        // Shared with the console reader, which kills QEMU itself the moment the
        // `kill_on` text appears (no polling delay between the mark and the power cut).
        let child = Arc::new(Mutex::new(child));
        let cut = Arc::new(AtomicBool::new(false));
        let console = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let mut stdout = lock(&child)
                .stdout
                .take()
                .ok_or_else(|| anyhow!("QEMU's stdout is not piped"))?;
            let console = Arc::clone(&console);
            let quiet = self.quiet;
            let kill_on = self.kill_on.clone();
            let (child, cut) = (Arc::clone(&child), Arc::clone(&cut));
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stdout.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if !quiet {
                        let mut out = std::io::stdout().lock();
                        let _ = out.write_all(&buf[..n]);
                        let _ = out.flush();
                    }
                    let Ok(mut c) = console.lock() else { continue };
                    let before = c.len();
                    c.extend_from_slice(&buf[..n]);
                    if let Some(mark) = &kill_on {
                        // Look at the new bytes and enough of the old ones to catch a mark
                        // split between two reads.
                        let from = before.saturating_sub(mark.len());
                        if !cut.load(Ordering::SeqCst) && contains(&c[from..], mark.as_bytes()) {
                            let _ = lock(&child).kill();
                            cut.store(true, Ordering::SeqCst);
                        }
                    }
                }
            })
        };

        let mut last_len = 0;
        let mut last_beat = start;
        let end = loop {
            if let Some(status) = lock(&child).try_wait()? {
                break Ok(status);
            }
            let len = fs::metadata(&exit_file).map(|m| m.len()).unwrap_or(0);
            if len != last_len {
                last_len = len;
                last_beat = Instant::now();
            }
            if last_beat.elapsed() > HEARTBEAT_STALL {
                break Err(format!(
                    "no heartbeat for {} s (outer guest frozen{})",
                    HEARTBEAT_STALL.as_secs(),
                    if last_len == 0 { " while booting" } else { "" }
                ));
            }
            if start.elapsed() > self.timeout {
                break Err("timeout".to_string());
            }
            thread::sleep(Duration::from_millis(100));
        };
        if end.is_err() {
            kill(&mut lock(&child));
        }
        drop(lock(&child).stdin.take());
        // QEMU is gone, so its stdout is at EOF and the reader ends; never wait for ever.
        let join_deadline = Instant::now() + Duration::from_secs(10);
        while !reader.is_finished() && Instant::now() < join_deadline {
            thread::sleep(Duration::from_millis(20));
        }
        if reader.is_finished() {
            let _ = reader.join();
        } else {
            eprintln!("xtask: the console reader did not end within 10 s of QEMU's exit");
        }
        let power_cut = cut.load(Ordering::SeqCst);
        let elapsed = start.elapsed();
        let console = console
            .lock()
            .map(|c| String::from_utf8_lossy(&c).into_owned())
            .map_err(|_| anyhow!("console reader panicked"))?;
        let marks = fs::read_to_string(&exit_file).unwrap_or_default();
        if marks.contains("TVM-OUTER-NOKVM") {
            bail!(
                "the outer guest has no /dev/kvm (kvm_amd did not load)\n{}",
                tail(&console, 40)
            );
        }
        let payload_started = marks.contains("TVM-OUTER-PAYLOAD");
        let outcome = |exit_code, timed_out| OuterOutcome {
            exit_code,
            console_output: console.clone(),
            timed_out,
            attempts: 1,
            elapsed,
            power_cut,
        };
        if power_cut {
            // Killed on purpose: the payload's outcome is in the console.
            return Ok(Attempt::Done(outcome(None, false)));
        }
        match end {
            Ok(status) => match parse_exit(&marks) {
                Some(code) => Ok(Attempt::Done(outcome(Some(code), false))),
                None => Ok(Attempt::OuterFailed(
                    format!(
                        "QEMU exited ({status}) without an exit status from the guest{}",
                        if payload_started {
                            " (outer kernel crashed?)"
                        } else {
                            " (during boot)"
                        }
                    ),
                    console,
                )),
            },
            Err(why) if why == "timeout" && payload_started => {
                eprintln!(
                    "xtask: payload timed out after {} s (the outer guest was alive; not retried)",
                    self.timeout.as_secs()
                );
                Ok(Attempt::Done(outcome(None, true)))
            }
            Err(why) if why == "timeout" => Ok(Attempt::OuterFailed(
                format!(
                    "timed out after {} s before the payload started",
                    self.timeout.as_secs()
                ),
                console,
            )),
            Err(why) => Ok(Attempt::OuterFailed(why, console)),
        }
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Locks `m`, also when a thread panicked while holding it (the child handle stays usable).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The status in a `TVM-OUTER-EXIT <code>` line (heartbeat dots may precede it).
fn parse_exit(marks: &str) -> Option<i32> {
    let rest = &marks[marks.rfind("TVM-OUTER-EXIT ")? + "TVM-OUTER-EXIT ".len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// The last `n` lines of `s`.
fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exit_marks() {
        assert_eq!(
            parse_exit("..TVM-OUTER-PAYLOAD\n...TVM-OUTER-EXIT 3\n."),
            Some(3)
        );
        assert_eq!(parse_exit("TVM-OUTER-EXIT 0\n"), Some(0));
        assert_eq!(parse_exit("....TVM-OUTER-PAYLOAD\n"), None);
        assert_eq!(parse_exit("TVM-OUTER-EXIT \n"), None);
    }

    #[test]
    fn kill_marks_are_found() {
        assert!(contains(b"xx E2E-POWER-CUT-NOW\r\n", b"E2E-POWER-CUT-NOW"));
        assert!(!contains(b"E2E-POWER-CUT-NO", b"E2E-POWER-CUT-NOW"));
        assert!(!contains(b"abc", b""));
    }

    #[test]
    fn tails() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }

    /// A payload that outlives the timeout is reported, not retried.
    #[test]
    #[ignore = "boots QEMU (about 30 s); cargo test -p xtask -- --ignored"]
    fn outer_payload_timeout() {
        let mut run = OuterRun::new("echo sleeping; sleep 600\n");
        run.timeout = Duration::from_secs(20);
        let out = run.run().unwrap();
        assert_eq!(
            (out.exit_code, out.timed_out, out.attempts),
            (None, true, 1)
        );
        assert!(out.console_output.contains("sleeping"));
    }

    /// A stopped heartbeat looks like a frozen outer guest: retried once, then an error.
    #[test]
    #[ignore = "boots QEMU twice (about 2 minutes); cargo test -p xtask -- --ignored"]
    fn outer_freeze_is_retried() {
        let mut run = OuterRun::new("kill $(cat /run/heartbeat.pid); sleep 600\n");
        run.timeout = Duration::from_secs(300);
        let err = run.run().unwrap_err();
        assert!(format!("{err:#}").contains("failed twice"), "{err:#}");
    }

    /// The power cut behind the e2e's durability check, without our VMM: with the outer
    /// guest's writeback off, 1 MiB written to /dev/vda and left in the outer page cache is
    /// lost when QEMU is killed on the mark, and the same write to /dev/vdb followed by an
    /// fsync (`dd conv=fsync`) is not. fds 3 and 4 keep both devices open, as the VMM does,
    /// because the last close of a block device writes its dirty pages back.
    #[test]
    #[ignore = "boots QEMU (about a minute); cargo test -p xtask -- --ignored"]
    fn outer_power_cut_loses_only_unflushed_writes() {
        let dir = guest::ensure_prepared().unwrap().dir;
        let images: Vec<PathBuf> = ["lost", "kept"]
            .iter()
            .map(|n| dir.join(format!("power-cut-test-{}-{n}.img", std::process::id())))
            .collect();
        let mut run = OuterRun::new(format!(
            "rc=0\n{}[ $rc -eq 0 ] || exit 1\n\
             exec 3</dev/vda 4</dev/vdb\n\
             yes tvm-power-cut | head -c 1048576 >/tmp/data\n\
             dd if=/tmp/data of=/dev/vda bs=1M 2>/dev/null\n\
             dd if=/tmp/data of=/dev/vdb bs=1M conv=fsync 2>/dev/null\n\
             echo CUT-THE-POWER-NOW\n\
             sleep 600\n",
            no_writeback_script(&["vda", "vdb"])
        ));
        for image in &images {
            fs::write(image, vec![0u8; 4 << 20]).unwrap();
            run.drive(image, false);
        }
        run.kill_on = Some("CUT-THE-POWER-NOW".into());
        run.timeout = Duration::from_secs(300);
        let out = run.run().unwrap();
        let data: Vec<Vec<u8>> = images.iter().map(|i| fs::read(i).unwrap()).collect();
        for image in &images {
            let _ = fs::remove_file(image);
        }
        assert!(out.power_cut, "{}", out.console_output);
        assert!(
            data[0].iter().all(|&b| b == 0),
            "the unflushed write reached the host file"
        );
        assert!(
            data[1].starts_with(b"tvm-power-cut\n"),
            "the fsync'ed write is not in the host file"
        );
    }

    /// Boots the outer guest with a payload that does not need the VMM.
    #[test]
    #[ignore = "downloads the guest and boots QEMU (about a minute); cargo test -p xtask -- --ignored"]
    fn outer_boot_smoke() {
        let run = OuterRun::new(
            "cat /proc/uptime; ls -l /dev/kvm; grep -c svm /proc/cpuinfo; ls -l /tvm; exit 3\n",
        )
        .file("/etc/hostname", "hello");
        let out = run.run().unwrap();
        assert_eq!(out.exit_code, Some(3), "{}", out.console_output);
        assert!(out.console_output.contains("/dev/kvm"));
        assert!(out.console_output.contains("hello"));
        assert!(!out.console_output.contains("No such file"));
    }
}
