//! The real-Linux boots through Firecracker's interface (`--fc-api`): one configured and
//! started only through the API socket, one from `--config-file` with `--no-api`.
//!
//! Through the socket: the guest (2 vCPUs, the entropy device) reaches its prompt and reads
//! /dev/hwrng; a ticker in the guest stops while the VM is paused and goes on after
//! `Resumed`; a pause longer than the soft-lockup threshold (20 s), with both CPUs busy,
//! adds no soft-lockup or RCU-stall report to the guest's log (without `KVM_KVMCLOCK_CTRL`
//! the RCU stall detector reports the busy CPUs) and its uptime does not go backwards; `SendCtrlAltDel` reboots the
//! guest, which ends the VMM with exit code 0, and the socket file is removed. A drive
//! gets a new medium while the guest runs (`PATCH /drives/data` with a new
//! `path_on_host`): the guest sees the new size and reads the new image, what it wrote
//! before is in the old image, and a path that cannot be opened is refused with the drive
//! left as it was.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use super::{clean_reboot, hwrng_check, reboot_check, Guest, Opts, Report, Runner, STEP_TIMEOUT};

/// How long the long pause lasts: past the guest's soft-lockup threshold (2 x
/// `watchdog_thresh`, 10 s by default).
const LONG_PAUSE: Duration = Duration::from_secs(25);

/// [`tvm_tests::api_request`] that must answer `want`.
fn expect(sock: &Path, method: &str, path: &str, body: &str, want: u16) -> Result<String, String> {
    let (status, reply) = tvm_tests::api_request(sock, method, path, body)?;
    if status != want {
        return Err(format!(
            "{method} {path}: {status} {reply}, expected {want}"
        ));
    }
    Ok(reply)
}

fn state(sock: &Path) -> Result<String, String> {
    let body = expect(sock, "GET", "/", "", 200)?;
    for s in ["Not started", "Running", "Paused"] {
        if body.contains(&format!("\"{s}\"")) {
            return Ok(s.to_string());
        }
    }
    Err(format!("GET /: no state in {body}"))
}

/// The boot arguments both boots give the guest (the main boot's, without a network).
fn boot_args() -> &'static str {
    "console=ttyS0 reboot=k panic=1"
}

/// The JSON both boots describe the VM with.
fn resources(o: &Opts) -> [(&'static str, String); 4] {
    [
        (
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 512}"#.to_string(),
        ),
        (
            "/boot-source",
            format!(
                r#"{{"kernel_image_path": {:?}, "initrd_path": {:?}, "boot_args": {:?}}}"#,
                o.kernel,
                o.initrd,
                boot_args()
            ),
        ),
        ("/entropy", "{}".to_string()),
        (
            "/actions",
            r#"{"action_type": "InstanceStart"}"#.to_string(),
        ),
    ]
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tvm-e2e-{}-{name}", std::process::id()))
}

fn wait_for_path(path: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!("{path:?} did not appear within 20 s"));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Both boots; every check runs even when an earlier one fails.
pub fn fc_api_checks(o: &Opts) -> Result<bool, String> {
    let socket = socket_boot(o);
    let file = config_file_boot(o);
    match (socket, file) {
        (Err(e), _) | (_, Err(e)) => Err(e),
        (Ok(a), Ok(b)) => Ok(a && b),
    }
}

fn socket_boot(o: &Opts) -> Result<bool, String> {
    let sock = scratch("api.sock");
    let _ = std::fs::remove_file(&sock);
    println!("E2E-INFO fc-api: vmm --api-sock {sock:?}, configured and started over the socket");
    let mut cmd = Command::new(&o.vmm);
    cmd.args([
        "--api-sock",
        sock.to_str().unwrap_or_default(),
        "--level",
        "Info",
    ]);
    let mut g = Guest::spawn(cmd, Runner::Vmm, o.verbose)?;
    let mut r = Report { failed: 0 };
    let result = socket_checks(o, &mut g, &sock, &mut r);
    if !matches!(result, Ok(())) || r.failed > 0 {
        g.print_diag();
    }
    result.map(|()| r.failed == 0)
}

fn socket_checks(o: &Opts, g: &mut Guest, sock: &Path, r: &mut Report) -> Result<(), String> {
    wait_for_path(sock)?;
    let media = Media::new()?;
    let configured = (|| {
        let before = state(sock)?;
        expect(
            sock,
            "PUT",
            "/drives/data",
            &media.drive_json(&media.first),
            204,
        )?;
        expect(sock, "PUT", "/metrics", &media.metrics_json(), 204)?;
        for (path, body) in resources(o) {
            expect(sock, "PUT", path, &body, 204)?;
        }
        Ok::<_, String>(format!("{before} -> {}", state(sock)?))
    })();
    let started = configured.is_ok();
    r.check("fc-api-configure-and-start", configured);
    if !started {
        return Ok(());
    }
    let (took, mut pos) = g.ready_at_prompt("fc-api boot")?;
    println!(
        "E2E-INFO fc-api: ready {:.0} ms after spawn",
        took.as_secs_f64() * 1000.0
    );
    let c = g.console.clone();

    pos = hwrng_check(g, r, "fc-api-entropy-device", pos)?;
    pos = media.check(g, r, sock, pos)?;
    r.check("fc-api-metrics", media.metrics_check(sock));

    // A ticker in the guest: one line every 100 ms.
    g.send(b"(i=0; while :; do i=$((i+1)); echo tick-$i; sleep 0.1; done) &\n")?;
    let ticking = c.wait_for("tick-5", pos, STEP_TIMEOUT).is_some();
    let paused = (|| {
        if !ticking {
            return Err(format!(
                "the ticker never ran; console tail: {}",
                c.tail(500)
            ));
        }
        expect(sock, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204)?;
        let now = state(sock)?;
        // What was on its way drains; then nothing may come for 2 s.
        thread::sleep(Duration::from_millis(500));
        let at = c.len();
        thread::sleep(Duration::from_secs(2));
        let more = c.text_from(at);
        if !more.is_empty() {
            return Err(format!("the guest printed {more:?} while paused"));
        }
        expect(sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#, 204)?;
        let after = c.len();
        if c.wait_for("tick-", after, Duration::from_secs(10))
            .is_none()
        {
            return Err("no tick within 10 s of Resumed".into());
        }
        Ok(format!(
            "state {now}, console silent for 2 s, ticking again after Resumed"
        ))
    })();
    r.check("fc-api-pause-stops-the-guest", paused);

    // A pause past the soft-lockup threshold while every CPU is busy (an idle CPU touches
    // the watchdog when it leaves idle, which would hide the pause): kvmclock is told, so
    // the watchdog stays quiet, and time goes on from where it was.
    g.send(
        b"kill $!; taskset -c 0 sh -c 'while :; do :; done' & b0=$!; \
          taskset -c 1 sh -c 'while :; do :; done' & b1=$!; \
          echo up-$((1+1))-$(cut -d' ' -f1 /proc/uptime),$(dmesg | grep -ciE 'soft lockup|rcu.*stall')-end\n",
    )?;
    let before = c.value_until_end("up-2-", pos, STEP_TIMEOUT);
    let long = (|| {
        let Some((e, v)) = before else {
            return Err("no uptime before the pause".to_string());
        };
        let (u1, stalls_before) = v
            .trim()
            .split_once(',')
            .ok_or_else(|| format!("unexpected answer {v:?}"))?;
        let u1: f64 = u1.parse().map_err(|_| format!("uptime {u1:?}"))?;
        expect(sock, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204)?;
        thread::sleep(LONG_PAUSE);
        expect(sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#, 204)?;
        // Let the watchdog run a few periods after the pause.
        thread::sleep(Duration::from_secs(5));
        g.send(
            b"kill $b0 $b1; \
              echo lock-$((1+1))-$(dmesg | grep -ciE 'soft lockup|rcu.*stall'),$(cut -d' ' -f1 /proc/uptime),\
              $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)-end\n",
        )?;
        let Some((_, v)) = c.value_until_end("lock-2-", e, STEP_TIMEOUT) else {
            return Err("no answer after the long pause".into());
        };
        let parts: Vec<&str> = v.trim().split(',').collect();
        let [stalls, u2, clock] = parts[..] else {
            return Err(format!("unexpected answer {v:?}"));
        };
        let u2: f64 = u2.parse().map_err(|_| format!("uptime {u2:?}"))?;
        if stalls != stalls_before {
            return Err(format!(
                "soft-lockup or RCU-stall lines went from {stalls_before} to {stalls} over a \
                 {LONG_PAUSE:?} pause; console tail: {}",
                c.tail(2000)
            ));
        }
        if u2 < u1 {
            return Err(format!("uptime went back from {u1} to {u2}"));
        }
        Ok(format!(
            "{LONG_PAUSE:?} paused with both CPUs busy, no soft lockup or RCU stall \
             reported, uptime {u1:.1} -> {u2:.1} s (clocksource {clock})"
        ))
    })();
    r.check("fc-api-long-pause-no-soft-lockup", long);

    // Ctrl-Alt-Del on the keyboard: Linux reboots, the VMM ends with exit code 0.
    let asked = Instant::now();
    let sent = expect(
        sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
        204,
    );
    let status = sent
        .as_ref()
        .ok()
        .and_then(|_| g.wait_exit(Duration::from_secs(60)));
    thread::sleep(Duration::from_millis(200));
    r.check(
        "fc-api-ctrl-alt-del-reboots",
        sent.and_then(|_| {
            clean_reboot(
                status.map(|s| s.code()),
                &g.console.text_from(0),
                &g.stderr.text_from(0),
            )
        })
        .map(|why| {
            format!(
                "{why}, {:.0} ms after SendCtrlAltDel",
                asked.elapsed().as_secs_f64() * 1000.0
            )
        }),
    );
    r.check(
        "fc-api-socket-removed",
        if sock.exists() {
            Err(format!("{sock:?} is still there"))
        } else {
            Ok(String::new())
        },
    );
    Ok(())
}

/// Two raw images for the media change: the first, 1 MiB, starts with `MEDIA-A`; the
/// second, 2 MiB, with `MEDIA-B`.
struct Media {
    first: PathBuf,
    second: PathBuf,
    /// Where `FlushMetrics` writes.
    metrics: PathBuf,
}

impl Media {
    fn new() -> Result<Self, String> {
        let m = Media {
            first: scratch("media-a.img"),
            second: scratch("media-b.img"),
            metrics: scratch("metrics.json"),
        };
        let _ = std::fs::remove_file(&m.metrics);
        for (path, tag, mib) in [(&m.first, b"MEDIA-A", 1), (&m.second, b"MEDIA-B", 2)] {
            let mut image = vec![0u8; mib << 20];
            image[..tag.len()].copy_from_slice(tag);
            std::fs::write(path, image).map_err(|e| format!("writing {path:?}: {e}"))?;
        }
        Ok(m)
    }

    fn drive_json(&self, path: &Path) -> String {
        format!(
            r#"{{"drive_id": "data", "path_on_host": {:?}, "is_root_device": false, "is_read_only": false}}"#,
            path.to_str().unwrap_or_default()
        )
    }

    fn metrics_json(&self) -> String {
        format!(
            r#"{{"metrics_path": {:?}}}"#,
            self.metrics.to_str().unwrap_or_default()
        )
    }

    fn patch_json(path: &Path) -> String {
        format!(
            r#"{{"drive_id": "data", "path_on_host": {:?}}}"#,
            path.to_str().unwrap_or_default()
        )
    }

    /// Asks the guest for /dev/vda's size in sectors and its first 7 bytes (read past the
    /// page cache), after waiting up to 10 s for the size to be `size`.
    fn look(g: &mut Guest, tag: &str, size: u32, pos: usize) -> Result<(usize, String), String> {
        g.send(
            format!(
                "for i in $(seq 100); do [ $(cat /sys/block/vda/size) = {size} ] && break; sleep 0.1; done; \
                 echo {tag}-$((1+1))-$(cat /sys/block/vda/size),$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c 7)-end\n"
            )
            .as_bytes(),
        )?;
        g.console
            .value_until_end(&format!("{tag}-2-"), pos, STEP_TIMEOUT)
            .map(|(at, v)| (at, v.trim().to_string()))
            .ok_or_else(|| format!("no answer to {tag}; console tail: {}", g.console.tail(800)))
    }

    fn check(
        &self,
        g: &mut Guest,
        r: &mut Report,
        sock: &Path,
        pos: usize,
    ) -> Result<usize, String> {
        let mut end = pos;
        let result = (|| {
            let (at, before) = Self::look(g, "media1", 2048, pos)?;
            end = at;
            if before != "2048,MEDIA-A" {
                return Err(format!("before the change the guest saw {before:?}"));
            }
            // The guest writes to the first image, past the page cache.
            g.send(b"printf GUEST-W | dd of=/dev/vda bs=512 seek=1 conv=sync oflag=direct 2>/dev/null; echo wrote-$((1+1))-ok-end\n")?;
            let (at, _) = g
                .console
                .value_until_end("wrote-2-", end, STEP_TIMEOUT)
                .ok_or("the guest's write did not finish")?;
            end = at;
            let asked = Instant::now();
            expect(
                sock,
                "PATCH",
                "/drives/data",
                &Self::patch_json(&self.second),
                204,
            )?;
            let took = asked.elapsed();
            let (at, after) = Self::look(g, "media2", 4096, end)?;
            end = at;
            if after != "4096,MEDIA-B" {
                return Err(format!("after the change the guest saw {after:?}"));
            }
            let old = std::fs::read(&self.first).map_err(|e| format!("{:?}: {e}", self.first))?;
            if old.get(512..519) != Some(&b"GUEST-W"[..]) {
                return Err("the guest's write is not in the first image".into());
            }
            let config = expect(sock, "GET", "/vm/config", "", 200)?;
            if !config.contains(self.second.to_str().unwrap_or("?")) {
                return Err(format!(
                    "GET /vm/config does not show the new path: {config}"
                ));
            }
            // A path that cannot be opened: refused, the drive keeps its medium.
            let missing = self.second.with_extension("missing");
            let refused = expect(
                sock,
                "PATCH",
                "/drives/data",
                &Self::patch_json(&missing),
                400,
            )?;
            let (at, still) = Self::look(g, "media3", 4096, end)?;
            end = at;
            if still != "4096,MEDIA-B" {
                return Err(format!("after a refused change the guest saw {still:?}"));
            }
            Ok(format!(
                "2048 sectors MEDIA-A -> 4096 sectors MEDIA-B (PATCH answered in {:.0} ms), \
                 the guest's write is in the first image, a missing path refused: {}",
                took.as_secs_f64() * 1000.0,
                refused.trim()
            ))
        })();
        r.check("fc-api-drive-media-change", result);
        for p in [&self.first, &self.second] {
            let _ = std::fs::remove_file(p);
        }
        Ok(end)
    }
}

impl Media {
    /// After the media change (and the hwrng read): one `FlushMetrics` line, whose counters
    /// show the guest's reads and write on the drive, its entropy, and vCPU exits.
    fn metrics_check(&self, sock: &Path) -> Result<String, String> {
        expect(
            sock,
            "PUT",
            "/actions",
            r#"{"action_type": "FlushMetrics"}"#,
            204,
        )?;
        let text = std::fs::read_to_string(&self.metrics)
            .map_err(|e| format!("{:?}: {e}", self.metrics))?;
        let _ = std::fs::remove_file(&self.metrics);
        let line: serde_json::Value = text
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .ok_or_else(|| format!("no metrics line in {text:?}"))?;
        let get = |section: &str, name: &str| line[section][name].as_u64().unwrap_or(0);
        let (reads, writes) = (
            get("block_data", "read_count"),
            get("block_data", "write_count"),
        );
        let entropy = get("entropy", "entropy_bytes");
        let exits = get("vcpu", "exit_mmio_write") + get("vcpu", "exit_io_out");
        if reads < 3
            || writes < 1
            || entropy == 0
            || exits == 0
            || get("block", "read_count") != reads
        {
            return Err(format!("unexpected counters: {line}"));
        }
        Ok(format!(
            "block_data: {reads} reads ({} bytes), {writes} writes; entropy {entropy} bytes; {exits} mmio-write and io-out exits",
            get("block_data", "read_bytes")
        ))
    }
}

fn config_file_boot(o: &Opts) -> Result<bool, String> {
    let [machine, boot, _, _] = resources(o);
    let cfg = scratch("vm.json");
    let json = format!(
        r#"{{"boot-source": {}, "machine-config": {}, "entropy": {{}}, "drives": []}}"#,
        boot.1, machine.1
    );
    std::fs::write(&cfg, json).map_err(|e| format!("writing {cfg:?}: {e}"))?;
    println!("E2E-INFO fc-api: vmm --no-api --config-file {cfg:?}");
    let mut cmd = Command::new(&o.vmm);
    cmd.args([
        "--no-api",
        "--config-file",
        cfg.to_str().unwrap_or_default(),
    ]);
    let mut g = Guest::spawn(cmd, Runner::Vmm, o.verbose)?;
    let mut r = Report { failed: 0 };
    let result = (|| {
        let (took, pos) = g.ready_at_prompt("config-file boot")?;
        g.send(b"echo n-$((1+1))-$(nproc)-end\n")?;
        let n = g.console.value_until_end("n-2-", pos, STEP_TIMEOUT);
        r.check(
            "fc-config-file-boot",
            match n {
                Some((_, v)) if v.trim() == "2" => Ok(format!(
                    "ready {:.0} ms after spawn, nproc 2",
                    took.as_secs_f64() * 1000.0
                )),
                other => Err(format!("nproc answer {other:?}")),
            },
        );
        reboot_check(
            &mut g,
            &mut r,
            "fc-config-file-reboot",
            "reboot",
            "`reboot`",
        )
    })();
    if !matches!(result, Ok(())) || r.failed > 0 {
        g.print_diag();
    }
    result.map(|()| r.failed == 0)
}
