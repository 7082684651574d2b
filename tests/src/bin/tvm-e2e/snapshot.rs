//! Snapshot and restore of the real Linux guest (`--snapshot`).
//!
//! The guest boots with a data disk and eth0 on the TAP, mounts a tmpfs, writes a file of
//! random data there and starts a counter that writes its value to the tmpfs ten times a
//! second. SIGUSR1 has the VMM (`--snapshot-on-signal`, `--track-dirty-pages`) write a
//! full snapshot; the guest then writes a second file, and a second SIGUSR1 writes a diff
//! snapshot into the same files: only the pages written since the first (checked: far
//! fewer bytes than the full one, and at least the second file's). The VMM is then
//! SIGKILLed, and after a gap the snapshot is restored in a new process (`vmm
//! --restore`), twice, one after the other: first on the TAP it was saved with, then moved
//! to another TAP (`--net tap=...`). Each copy must go on from the diff snapshot: the
//! counter goes on from where it was (it does not start again), both tmpfs files have
//! their CRCs (the second came through the diff only),
//! the guest's clock is the host's (it advanced over the gap), the disk takes a write that
//! the host then reads in the image, and the network works both ways (ping, and a TCP
//! transfer with its CRC checked on both ends). Snapshot and restore figures are printed
//! as `E2E-INFO` (information only).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{
    cmdline, host_ping, tap_up, tcp_peer, Guest, Opts, Report, Runner, GUEST_IP, HOST_IP,
    STEP_TIMEOUT,
};

/// The TAP the second copy is moved to.
const SECOND_TAP: &str = "tvm-e2e1";
/// Guest memory of the snapshot boot (its memory file holds this much, sparsely).
const MEM: &str = "256M";
/// Time between the snapshot and the first restore: a guest clock that did not advance
/// over it would be this far behind.
const GAP: Duration = Duration::from_secs(8);
/// How far the guest's clock may be from the host's after a restore.
const CLOCK_SLACK_SECS: i64 = 4;
/// Sector of the data disk each copy writes its marker to (copy 1 at this one, copy 2 at
/// the next).
const MARK_SECTOR: u64 = 2048;

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tvm-e2e-{}-{name}", std::process::id()))
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What the guest showed before the snapshot.
struct Warm {
    /// CRC-32 of the tmpfs file written before the full snapshot.
    crc: String,
    /// CRC-32 of the one written between the full and the diff snapshot.
    crc2: String,
    /// The counter's value a moment before the diff snapshot.
    count: u64,
}

/// Sends SIGUSR1 to `g` and waits for the VMM's line about the snapshot; returns the line
/// and the driver's time from the signal to it.
fn signal_snapshot(g: &mut Guest) -> Result<(String, Duration), String> {
    let from = g.stderr.len();
    let pid = i32::try_from(g.child.id()).map_err(|e| e.to_string())?;
    let asked = Instant::now();
    // SAFETY: kill has no memory effects; `pid` is our running child.
    if unsafe { libc::kill(pid, libc::SIGUSR1) } != 0 {
        return Err(format!("SIGUSR1: {}", std::io::Error::last_os_error()));
    }
    let said = g.stderr.wait_until(from, Duration::from_secs(120), |t| {
        t.contains("snapshot on SIGUSR1 written") || t.contains("snapshot on SIGUSR1 failed")
    });
    let log = g.stderr.text_from(from);
    let line = log
        .lines()
        .find(|l| l.contains("snapshot on SIGUSR1"))
        .unwrap_or("")
        .to_string();
    if said && line.contains("written") {
        Ok((line, asked.elapsed()))
    } else {
        Err(format!("no snapshot: {log}"))
    }
}

/// The memory bytes of a `snapshot on SIGUSR1 written: ..., memory N bytes ...` line.
fn memory_bytes(line: &str) -> Option<u64> {
    line.split("memory ")
        .nth(1)?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// The boot, the snapshot, then both restores; every restore runs even when the other
/// fails.
pub fn snapshot_checks(o: &Opts) -> Result<bool, String> {
    let tap = o
        .tap
        .clone()
        .ok_or("--snapshot needs --tap (the restored copies' network is checked)")?;
    let disk = scratch("snap-disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).map_err(|e| format!("{disk:?}: {e}"))?;
    let state = scratch("snap.state");
    let mut r = Report { failed: 0 };
    let warm = match save(o, &tap, &disk, &state, &mut r) {
        Ok(Some(w)) => w,
        Ok(None) => return Ok(false),
        Err(e) => {
            r.check("snapshot-create", Err(e));
            return Ok(false);
        }
    };
    thread::sleep(GAP);
    for (copy, moved_to) in [(1u64, None), (2, Some(SECOND_TAP))] {
        let result = restore(o, &state, copy, moved_to, &tap, &warm, &mut r);
        if let Err(e) = result {
            r.check(&format!("snapshot-restore-{copy}"), Err(e));
        }
    }
    // Each copy's disk write, read in the image on the host.
    let image = std::fs::read(&disk).map_err(|e| format!("{disk:?}: {e}"))?;
    for copy in [1u64, 2] {
        let at = ((MARK_SECTOR + copy - 1) * 512) as usize;
        let want = format!("SNAP-COPY-{copy}");
        let got = image.get(at..at + want.len()).unwrap_or_default();
        r.check(
            &format!("snapshot-copy-{copy}-disk-write-on-host"),
            if got == want.as_bytes() {
                Ok(format!("{want:?} at byte {at} of the image"))
            } else {
                Err(format!(
                    "{:?} at byte {at} of the image, {want:?} expected",
                    String::from_utf8_lossy(got)
                ))
            },
        );
    }
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_file(&state);
    let _ = std::fs::remove_file(format!("{}.mem", state.display()));
    Ok(r.failed == 0)
}

/// Boots, warms the guest up, has the VMM write a full snapshot, then a diff one after
/// a second file, and kills it.
fn save(
    o: &Opts,
    tap: &str,
    disk: &Path,
    state: &Path,
    r: &mut Report,
) -> Result<Option<Warm>, String> {
    let mut cmd = Command::new(&o.vmm);
    cmd.args([
        "--kernel", &o.kernel, "--initrd", &o.initrd, "--memory", MEM,
    ])
    .args(["--log-level", "info", "--cmdline", &cmdline(o)])
    .arg("--disk")
    .arg(disk)
    .args(["--net", &format!("tap={tap}")])
    .arg("--snapshot-on-signal")
    .arg(state)
    .arg("--track-dirty-pages");
    println!("E2E-INFO snapshot: booting the guest to snapshot ({MEM}, a disk, eth0 on {tap})");
    let mut g = Guest::spawn(cmd, Runner::Vmm, o.verbose)?;
    if let Err(e) = tap_up(tap) {
        g.print_diag();
        return Err(format!("{e}; vmm stderr: {}", g.stderr.tail(3000)));
    }
    let (_, pos) = g.ready_at_prompt("snapshot boot")?;
    let c = g.console.clone();
    g.send(
        b"mkdir -p /t; mount -t tmpfs tmpfs /t; dd if=/dev/urandom of=/t/f bs=64k count=16 \
          2>/dev/null; (i=0; while :; do i=$((i+1)); echo $i >/t/count; sleep 0.1; done) & \
          sleep 2; echo warm-$((1+1))-$(crc32 /t/f | cut -d' ' -f1)-end\n",
    )?;
    let Some((e, crc)) = c.value_until_end("warm-2-", pos, STEP_TIMEOUT) else {
        g.print_diag();
        return Err(format!(
            "the guest did not warm up; console tail: {}",
            c.tail(2000)
        ));
    };
    let crc = crc.trim().to_string();
    let full = signal_snapshot(&mut g);
    let full_bytes = full.as_ref().ok().and_then(|(l, _)| memory_bytes(l));
    let created = r.check(
        "snapshot-create",
        full.map(|(line, took)| {
            format!(
                "{} ({:.0} ms after SIGUSR1, seen by the driver)",
                line.split("written: ").nth(1).unwrap_or(&line),
                took.as_secs_f64() * 1000.0
            )
        }),
    );
    if !created {
        return Ok(None);
    }
    // A second file, 256 KiB, after the full snapshot: it reaches the copies only through
    // the diff.
    g.send(
        b"dd if=/dev/urandom of=/t/g bs=64k count=4 2>/dev/null; \
          echo more-$((1+1))-$(crc32 /t/g | cut -d' ' -f1),$(cat /t/count)-end\n",
    )?;
    let Some((_, v)) = c.value_until_end("more-2-", e, STEP_TIMEOUT) else {
        g.print_diag();
        return Err(format!("no second file; console tail: {}", c.tail(2000)));
    };
    let (crc2, count) = v
        .trim()
        .split_once(',')
        .ok_or_else(|| format!("unexpected answer {v:?}"))?;
    let count: u64 = count.parse().map_err(|_| format!("count {count:?}"))?;
    let warm = Warm {
        crc,
        crc2: crc2.to_string(),
        count,
    };
    let diff = signal_snapshot(&mut g);
    let created = r.check(
        "snapshot-create-diff",
        diff.and_then(|(line, took)| {
            let bytes = memory_bytes(&line).ok_or(format!("no byte count in {line:?}"))?;
            let full = full_bytes.unwrap_or(0);
            // At least the new file's 256 KiB; far less than everything.
            if bytes >= 256 << 10 && bytes * 4 < full {
                Ok(format!(
                    "{bytes} bytes of page data against {full} for the full snapshot ({:.0} \
                     ms after SIGUSR1)",
                    took.as_secs_f64() * 1000.0
                ))
            } else {
                Err(format!(
                    "{bytes} bytes of page data for the diff, {full} for the full snapshot"
                ))
            }
        }),
    );
    let mem = std::fs::metadata(format!("{}.mem", state.display()));
    if let Ok(m) = &mem {
        use std::os::unix::fs::MetadataExt;
        println!(
            "E2E-INFO snapshot: memory file {} MiB long, {} MiB allocated (sparse); state file {} bytes",
            m.len() >> 20,
            (m.blocks() * 512) >> 20,
            std::fs::metadata(state).map(|s| s.len()).unwrap_or(0)
        );
    }
    // The original goes away the hard way: nothing it does after this counts.
    let _ = g.child.kill();
    let _ = g.wait_exit(Duration::from_secs(10));
    Ok(created.then_some(warm))
}

/// One guest command whose answer is `NAME-2-VALUE-end`; returns the value.
fn ask(g: &mut Guest, name: &str, command: &str, pos: &mut usize) -> Result<String, String> {
    let c = g.console.clone();
    g.send(format!("echo {name}-$((1+1))-{command}-end\n").as_bytes())?;
    let marker = format!("{name}-2-");
    match c.value_until_end(&marker, *pos, STEP_TIMEOUT) {
        Some((e, v)) => {
            *pos = e;
            Ok(v.trim().to_string())
        }
        None => Err(format!(
            "no answer to {name}; console tail: {}",
            c.tail(1500)
        )),
    }
}

/// Restores copy `copy` (on the saved TAP, or moved to `moved_to`) and checks it.
fn restore(
    o: &Opts,
    state: &Path,
    copy: u64,
    moved_to: Option<&str>,
    saved_tap: &str,
    warm: &Warm,
    r: &mut Report,
) -> Result<(), String> {
    let tap = moved_to.unwrap_or(saved_tap);
    let name = |what: &str| format!("snapshot-copy-{copy}-{what}");
    let mut cmd = Command::new(&o.vmm);
    cmd.arg("--restore")
        .arg(state)
        .args(["--log-level", "info"]);
    if let Some(t) = moved_to {
        cmd.args(["--net", &format!("tap={t}")]);
    }
    println!("E2E-INFO snapshot: restoring copy {copy} with eth0 on {tap}");
    let started = Instant::now();
    let mut g = Guest::spawn(cmd, Runner::Vmm, o.verbose)?;
    if let Err(e) = tap_up(tap) {
        g.print_diag();
        let status = g.wait_exit(Duration::ZERO);
        return Err(format!(
            "{e}; vmm {status:?}, stderr: {}",
            g.stderr.tail(3000)
        ));
    }
    let mut pos = 0;
    // The first answer: the counter, the file, the clock.
    let first = ask(
        &mut g,
        "r",
        "$(cat /t/count),$(crc32 /t/f | cut -d' ' -f1),$(date +%s)",
        &mut pos,
    );
    let answered = started.elapsed();
    let host_now = now_secs();
    let first = match first {
        Ok(v) => v,
        Err(e) => {
            g.print_diag();
            return Err(format!("{e}; vmm stderr: {}", g.stderr.tail(2000)));
        }
    };
    let boot_line = g
        .stderr
        .text_from(0)
        .lines()
        .find(|l| l.contains("vm restored"))
        .map(|l| l.trim().to_string())
        .unwrap_or_default();
    println!(
        "E2E-INFO snapshot: copy {copy} answered its first command {:.0} ms after spawn ({boot_line})",
        answered.as_secs_f64() * 1000.0
    );
    let parts: Vec<&str> = first.split(',').collect();
    let [count, crc, date] = parts[..] else {
        return Err(format!("unexpected answer {first:?}"));
    };
    let crc2 = ask(&mut g, "g", "$(crc32 /t/g | cut -d' ' -f1)", &mut pos);
    let count: u64 = count.parse().map_err(|_| format!("count {count:?}"))?;
    let date: i64 = date.parse().map_err(|_| format!("date {date:?}"))?;
    // Counting on: two seconds later, further along.
    thread::sleep(Duration::from_secs(2));
    let later = ask(&mut g, "c", "$(cat /t/count)", &mut pos)
        .and_then(|v| v.parse::<u64>().map_err(|_| format!("count {v:?}")));
    r.check(
        &name("process-goes-on-counting"),
        match later {
            Ok(later) if count >= warm.count && later > count => Ok(format!(
                "{} before the snapshot, {count} at restore, {later} two seconds later",
                warm.count
            )),
            Ok(later) => Err(format!(
                "{} before the snapshot, {count} at restore, {later} two seconds later: not \
                 the same process going on",
                warm.count
            )),
            Err(e) => Err(e),
        },
    );
    r.check(
        &name("tmpfs-files-intact"),
        match crc2 {
            Ok(crc2) if crc == warm.crc && crc2 == warm.crc2 => Ok(format!(
                "crc32 {crc} (written before the full snapshot) and {crc2} (before the diff) \
                 before and after"
            )),
            Ok(crc2) => Err(format!(
                "crc32 {} and {} before, {crc} and {crc2} after",
                warm.crc, warm.crc2
            )),
            Err(e) => Err(e),
        },
    );
    let skew = date - host_now;
    r.check(
        &name("guest-clock-right"),
        if skew.abs() <= CLOCK_SLACK_SECS {
            Ok(format!(
                "guest date {date}, host {host_now} ({skew:+} s) after a {} s gap",
                GAP.as_secs()
            ))
        } else {
            Err(format!(
                "guest date {date}, host {host_now}: {skew:+} s off after a {} s gap",
                GAP.as_secs()
            ))
        },
    );
    // The disk: a marker written past the page cache and read back.
    let sector = MARK_SECTOR + copy - 1;
    let disk_answer = ask(
        &mut g,
        "d",
        &format!(
            "$(printf SNAP-COPY-{copy} | dd of=/dev/vda bs=512 seek={sector} conv=fsync \
             2>/dev/null; dd if=/dev/vda bs=512 skip={sector} count=1 iflag=direct \
             2>/dev/null | head -c 11)"
        ),
        &mut pos,
    );
    r.check(
        &name("disk-works"),
        match disk_answer {
            Ok(v) if v == format!("SNAP-COPY-{copy}") => Ok(format!(
                "wrote and read back {v:?} at sector {sector} of /dev/vda"
            )),
            Ok(v) => Err(format!("read back {v:?}")),
            Err(e) => Err(e),
        },
    );
    // The network: the TAP is new (another MAC on the host side), so the guest forgets
    // the neighbour it knew before it pings.
    let ping = ask(
        &mut g,
        "p",
        &format!(
            "$(ip neigh flush dev eth0 >/dev/null 2>&1; ping -c 3 -W 5 {HOST_IP} >/dev/null && echo ok || echo failed)"
        ),
        &mut pos,
    );
    r.check(
        &name("ping-guest-to-host"),
        match ping {
            Ok(v) if v == "ok" => Ok(format!("the guest pinged {HOST_IP} over {tap}")),
            Ok(v) => Err(format!("ping {v}")),
            Err(e) => Err(e),
        },
    );
    r.check(&name("ping-host-to-guest"), host_ping(GUEST_IP));
    let port = 5010 + copy as u16;
    let tcp = (|| {
        let peer = tcp_peer(port, 2)?;
        let got = ask(
            &mut g,
            "n",
            &format!("$(nc {HOST_IP} {port} </dev/null | crc32 | cut -d' ' -f1)"),
            &mut pos,
        );
        let sent = peer.finish(if got.is_ok() {
            STEP_TIMEOUT
        } else {
            Duration::ZERO
        })?;
        let got = got?;
        if format!("{:08x}", sent.1) == got {
            Ok(format!(
                "{} bytes host to guest, crc32 {got} on both ends",
                sent.0
            ))
        } else {
            Err(format!("sent crc32 {:08x}, the guest got {got}", sent.1))
        }
    })();
    r.check(&name("tcp-host-to-guest"), tcp);
    // A reboot ends it cleanly.
    g.reboot_or_kill()?;
    Ok(())
}

/// The guest sizes `snapshot-bench` measures.
const BENCH_MEMS: [&str; 2] = ["256M", "2G"];
/// How often [`answer_ms`] types its command again.
const ASK_EVERY: Duration = Duration::from_millis(250);

/// When the VMM had the VM restored, in ms since it started: the timestamp of its
/// `vm restored` log line (`[  0.160299] INFO ...`).
fn restored_at_ms(stderr: &str) -> Option<f64> {
    let line = stderr.lines().find(|l| l.contains("vm restored"))?;
    let secs: f64 = line
        .trim_start()
        .strip_prefix('[')?
        .split(']')
        .next()?
        .trim()
        .parse()
        .ok()?;
    Some(secs * 1000.0)
}

/// The fresh boot and the save of one VMM, in ms and bytes.
struct Saved {
    boot_ms: f64,
    create_ms: f64,
    /// (what, bytes) of the snapshot's files as they take room on disk.
    sizes: String,
}

/// Sends a command to the guest at once, and again every [`ASK_EVERY`] until it answers
/// (a shell that has just printed its prompt may take the first bytes as the answer to
/// its cursor-position query); returns the time from spawn to the first answer (the
/// restore benchmark's "running again").
fn answer_ms(g: &mut Guest, spawned: Instant) -> Result<f64, String> {
    let deadline = spawned + Duration::from_secs(120);
    loop {
        g.send(b"echo bench-$((1+1))-ok-end\n")?;
        if g.console.wait_for("bench-2-ok-end", 0, ASK_EVERY).is_some() {
            return Ok(spawned.elapsed().as_secs_f64() * 1000.0);
        }
        if Instant::now() > deadline {
            g.print_diag();
            return Err(format!(
                "no answer within 120 s; console tail: {}",
                g.console.tail(1000)
            ));
        }
    }
}

/// The warm-up of [`save`], for the benchmark: a tmpfs with a file, a counter.
fn warm_up(g: &mut Guest, pos: usize) -> Result<(), String> {
    g.send(
        b"mkdir -p /t; mount -t tmpfs tmpfs /t; dd if=/dev/urandom of=/t/f bs=64k count=16 \
          2>/dev/null; (i=0; while :; do i=$((i+1)); echo $i >/t/count; sleep 0.1; done) & \
          sleep 1; echo warm-$((1+1))-done-end\n",
    )?;
    g.console
        .value_until_end("warm-2-", pos, STEP_TIMEOUT)
        .map(|_| ())
        .ok_or_else(|| format!("no warm-up; console tail: {}", g.console.tail(1000)))
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Ours: boot with `mem`, warm up, snapshot on SIGUSR1 (timed from the signal to the
/// VMM's line, the pause and resume included), kill.
fn bench_save_ours(o: &Opts, mem: &str, state: &Path) -> Result<Saved, String> {
    let mut cmd = Command::new(&o.vmm);
    cmd.args([
        "--kernel", &o.kernel, "--initrd", &o.initrd, "--memory", mem,
    ])
    .args(["--log-level", "info", "--cmdline", &cmdline(o)])
    .arg("--snapshot-on-signal")
    .arg(state);
    let mut g = Guest::spawn(cmd, Runner::Vmm, o.verbose)?;
    let (boot, pos) = g.ready_at_prompt("vmm boot")?;
    warm_up(&mut g, pos)?;
    let from = g.stderr.len();
    let pid = i32::try_from(g.child.id()).map_err(|e| e.to_string())?;
    let asked = Instant::now();
    // SAFETY: kill has no memory effects; `pid` is our running child.
    if unsafe { libc::kill(pid, libc::SIGUSR1) } != 0 {
        return Err(format!("SIGUSR1: {}", std::io::Error::last_os_error()));
    }
    if !g.stderr.wait_until(from, Duration::from_secs(300), |t| {
        t.contains("snapshot on SIGUSR1 written")
    }) {
        return Err(format!("no snapshot: {}", g.stderr.text_from(from)));
    }
    let create_ms = asked.elapsed().as_secs_f64() * 1000.0;
    let _ = g.child.kill();
    let _ = g.wait_exit(Duration::from_secs(10));
    let mem_file = PathBuf::from(format!("{}.mem", state.display()));
    Ok(Saved {
        boot_ms: boot.as_secs_f64() * 1000.0,
        create_ms,
        sizes: format!(
            "state {} KiB, memory file {} MiB on disk of {} MiB",
            std::fs::metadata(state).map(|m| m.len()).unwrap_or(0) >> 10,
            allocated(&mem_file) >> 20,
            std::fs::metadata(&mem_file).map(|m| m.len()).unwrap_or(0) >> 20
        ),
    })
}

/// One HMP command on QEMU's monitor socket; returns what it printed before the next
/// prompt.
fn hmp(s: &mut std::os::unix::net::UnixStream, command: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    if !command.is_empty() {
        s.write_all(format!("{command}\n").as_bytes())
            .map_err(|e| format!("monitor: {e}"))?;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.ends_with(b"(qemu) ") {
        if Instant::now() > deadline {
            return Err(format!(
                "monitor: no prompt after {command:?}: {}",
                String::from_utf8_lossy(&out)
            ));
        }
        match s.read(&mut buf) {
            Ok(0) => return Err("monitor: closed".into()),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(format!("monitor: {e}")),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// QEMU: boot with `mem`, warm up, migrate to `file` (`exec:cat`, timed from the command
/// to `completed`), kill.
fn bench_save_qemu(o: &Opts, qemu: &str, mem: &str, file: &Path) -> Result<Saved, String> {
    let mon = scratch(&format!("qemu-{mem}.mon"));
    let _ = std::fs::remove_file(&mon);
    let mut cmd = super::qemu_command_mem(qemu, o, None, mem)?;
    cmd.arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", mon.display()));
    let mut g = Guest::spawn(cmd, Runner::Qemu, o.verbose)?;
    let (boot, pos) = g.ready_at_prompt("qemu boot")?;
    warm_up(&mut g, pos)?;
    let mut s = std::os::unix::net::UnixStream::connect(&mon)
        .map_err(|e| format!("monitor {mon:?}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    hmp(&mut s, "")?;
    let asked = Instant::now();
    hmp(
        &mut s,
        &format!("migrate -d \"exec:cat > {}\"", file.display()),
    )?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let info = hmp(&mut s, "info migrate")?;
        if info.contains("Migration status: completed") {
            break;
        }
        if info.contains("Migration status: failed") || Instant::now() > deadline {
            return Err(format!("the migration did not complete: {info}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
    let create_ms = asked.elapsed().as_secs_f64() * 1000.0;
    let _ = g.child.kill();
    let _ = g.wait_exit(Duration::from_secs(10));
    let _ = std::fs::remove_file(&mon);
    Ok(Saved {
        boot_ms: boot.as_secs_f64() * 1000.0,
        create_ms,
        sizes: format!("migration file {} MiB", allocated(file) >> 20),
    })
}

/// `tvm-e2e snapshot-bench`: for a 256 MiB and a 2 GiB guest, our snapshot against QEMU's
/// migration to a file (`migrate exec:cat > FILE`, restored with `-incoming exec:cat
/// FILE`): create time and size (once each), and restore time, spawn to the guest's
/// first answer on the console (`--runs` times each, interleaved), next to each one's
/// fresh boot (spawn to the readiness marker).
pub fn snapshot_bench(o: &Opts) -> Result<bool, String> {
    let qemu = o.qemu.clone().ok_or("snapshot-bench needs --qemu")?;
    for mem in BENCH_MEMS {
        let state = scratch(&format!("bench-{mem}.snap"));
        let qfile = scratch(&format!("bench-{mem}.qemu"));
        let ours = bench_save_ours(o, mem, &state)?;
        let peer = bench_save_qemu(o, &qemu, mem, &qfile)?;
        println!(
            "BENCH snapshot create mem={mem} (one run each): vmm {:.0} ms ({}), qemu {:.0} ms \
             ({}); fresh boot to ready: vmm {:.0} ms, qemu {:.0} ms",
            ours.create_ms, ours.sizes, peer.create_ms, peer.sizes, ours.boot_ms, peer.boot_ms
        );
        let (mut r_ours, mut r_peer, mut built) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..o.runs {
            let mut cmd = Command::new(&o.vmm);
            cmd.arg("--restore")
                .arg(&state)
                .args(["--log-level", "info"]);
            let spawned = Instant::now();
            let mut g = Guest::spawn(cmd, Runner::Vmm, o.verbose)?;
            r_ours.push(answer_ms(&mut g, spawned)?);
            built.push(restored_at_ms(&g.stderr.text_from(0)).unwrap_or(f64::NAN));
            drop(g);
            let mut cmd = super::qemu_command_mem(&qemu, o, None, mem)?;
            cmd.arg("-incoming")
                .arg(format!("exec:cat {}", qfile.display()));
            let spawned = Instant::now();
            let mut g = Guest::spawn(cmd, Runner::Qemu, o.verbose)?;
            r_peer.push(answer_ms(&mut g, spawned)?);
            drop(g);
            println!(
                "BENCH snapshot mem={mem} run {run}: restore, spawn to the guest's answer: vmm \
                 {:.0} ms, qemu {:.0} ms; the vmm had the vm restored {:.1} ms after its start",
                r_ours[run], r_peer[run], built[run]
            );
        }
        let (m_ours, m_peer) = (super::median(&mut r_ours), super::median(&mut r_peer));
        let m_built = super::median(&mut built);
        println!(
            "BENCH snapshot median restore mem={mem}, spawn to the guest's answer: vmm \
             {m_ours:.0} ms, qemu {m_peer:.0} ms, ratio vmm/qemu {:.2} ({} runs each); vmm \
             restore / vmm fresh boot {:.2}; the vmm's own restore (start to the vm \
             restored) {m_built:.1} ms",
            m_ours / m_peer,
            o.runs,
            m_ours / ours.boot_ms
        );
        for f in [
            state.clone(),
            PathBuf::from(format!("{}.mem", state.display())),
            qfile,
        ] {
            let _ = std::fs::remove_file(f);
        }
    }
    Ok(true)
}
