//! The many-vCPU boot (`--smp-cpus SPEC`): the test guest in the VMM with `--cpus SPEC` and
//! no `--memory`, and checks that Linux sees and uses every vCPU the way the flags say:
//! the CPU count, the topology in sysfs, a task pinned to each CPU running there, a local
//! timer on every CPU, a parallel job, the last CPU taken offline and back, the default
//! 1 GiB of RAM, one seccomp filter on every vCPU thread, and `reboot` from a task pinned
//! to the last CPU ending the VMM with exit code 0. With `--smp-disk PATH`, that raw disk
//! is the guest's /dev/vda with `cache=none` and the default queues (one per vCPU): blk-mq
//! must show one hardware queue per vCPU, and a write from every CPU at once (O_DIRECT)
//! must read back intact.

use super::{reboot_check, seccomp_of_threads, Guest, Opts, Report, Runner, STEP_TIMEOUT};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// The parallel job: one busy shell loop per CPU, each this many iterations (about a
/// second or more per CPU under nested TCG, hundreds of local-timer ticks).
const JOB_ITERATIONS: u32 = 20_000;
/// Limit for the parallel job (every CPU's loop and the counts around it).
const JOB_TIMEOUT: Duration = Duration::from_secs(240);
/// MiB of `--smp-disk` each vCPU writes (at its own offset) and reads back.
pub const DISK_MIB: u32 = 4;

/// A vCPU topology as `--cpus` states it: threads per core, cores per socket, sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    pub threads: u32,
    pub cores: u32,
    pub sockets: u32,
}

impl Topology {
    /// Reads `N[,threads=T][,cores=C][,sockets=S]` with the VMM's defaults (one thread per
    /// core, one socket, cores = N / (threads x sockets)).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut parts = spec.split(',');
        let n: u32 = parts
            .next()
            .unwrap_or("")
            .trim()
            .parse()
            .map_err(|e| format!("--smp-cpus {spec:?}: {e}"))?;
        let (mut threads, mut cores, mut sockets) = (1, None, 1);
        for part in parts {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("--smp-cpus {spec:?}: {part:?} is not key=value"))?;
            let value: u32 = value
                .parse()
                .map_err(|e| format!("--smp-cpus {spec:?}: {key}: {e}"))?;
            match key {
                "threads" => threads = value,
                "cores" => cores = Some(value),
                "sockets" => sockets = value,
                _ => return Err(format!("--smp-cpus {spec:?}: unknown key {key:?}")),
            }
        }
        let cores = cores.unwrap_or(n / (threads * sockets).max(1));
        if n == 0 || threads * cores * sockets != n {
            return Err(format!(
                "--smp-cpus {spec:?}: {threads} x {cores} x {sockets} is not {n}"
            ));
        }
        Ok(Topology {
            threads,
            cores,
            sockets,
        })
    }

    pub fn cpus(&self) -> u32 {
        self.threads * self.cores * self.sockets
    }

    /// What Linux should show in `/sys/devices/system/cpu/cpuI/topology` for CPU `i`:
    /// `physical_package_id,core_id,thread_siblings_list,core_siblings_list`. Linux
    /// numbers CPUs in MADT order, which is the vCPU index: threads first, then cores,
    /// then sockets; its core_id is the core field of the APIC id.
    pub fn sysfs_of(&self, i: u32) -> String {
        let per_socket = self.threads * self.cores;
        let (socket, core) = (i / per_socket, (i / self.threads) % self.cores);
        let first_thread = i - i % self.threads;
        let first_in_socket = socket * per_socket;
        format!(
            "{socket},{core},{},{}",
            cpu_list(first_thread, self.threads),
            cpu_list(first_in_socket, per_socket)
        )
    }
}

/// A list of `--cpus` specs separated by commas: a part with `=` belongs to the spec
/// before it (`1,2,4,sockets=2` is `1`, `2` and `4,sockets=2`).
pub fn split_specs(list: &str) -> Vec<String> {
    let mut specs: Vec<String> = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match specs.last_mut() {
            Some(last) if part.contains('=') => {
                last.push(',');
                last.push_str(part);
            }
            _ => specs.push(part.to_string()),
        }
    }
    specs
}

/// Linux's cpulist format for `count` consecutive CPUs from `first`.
fn cpu_list(first: u32, count: u32) -> String {
    if count <= 1 {
        first.to_string()
    } else {
        format!("{first}-{}", first + count - 1)
    }
}

/// The numbers after `LOC:` on a /proc/interrupts line, one per online CPU.
fn local_timer_counts(line: &str, cpus: usize) -> Option<Vec<u64>> {
    let rest = &line[line.find("LOC:")? + 4..];
    let counts: Vec<u64> = rest
        .split_whitespace()
        .take(cpus)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    (counts.len() == cpus).then_some(counts)
}

/// Every CPU's local-timer count went up between the two `LOC:` lines.
fn every_cpu_ticked(before: &str, after: &str, cpus: usize) -> Result<String, String> {
    let (Some(b), Some(a)) = (
        local_timer_counts(before, cpus),
        local_timer_counts(after, cpus),
    ) else {
        return Err(format!(
            "no {cpus} counts on the LOC lines {before:?} / {after:?}"
        ));
    };
    let idle: Vec<usize> = (0..cpus).filter(|&i| a[i] <= b[i]).collect();
    if !idle.is_empty() {
        return Err(format!(
            "no local-timer interrupt on CPU(s) {idle:?} during the job: {b:?} -> {a:?}"
        ));
    }
    let gained: Vec<u64> = (0..cpus).map(|i| a[i] - b[i]).collect();
    Ok(format!(
        "local-timer interrupts gained per CPU during the job: {gained:?}"
    ))
}

/// `I:VALUE` pairs (space separated) whose values must equal `want(I)` for I in 0..n.
fn pairs_match(text: &str, n: u32, want: impl Fn(u32) -> String) -> Result<String, String> {
    let mut seen = vec![None; n as usize];
    for pair in text.split_whitespace() {
        let (i, v) = pair
            .split_once(':')
            .ok_or_else(|| format!("{pair:?} in {text:?} is not I:VALUE"))?;
        let i: u32 = i.parse().map_err(|e| format!("{pair:?}: {e}"))?;
        let slot = seen
            .get_mut(i as usize)
            .ok_or_else(|| format!("CPU {i} listed, but there are {n}"))?;
        *slot = Some(v.to_string());
    }
    for (i, got) in seen.iter().enumerate() {
        let want = want(i as u32);
        match got {
            Some(g) if *g == want => {}
            Some(g) => return Err(format!("CPU {i}: {g:?}, expected {want:?} (all: {text})")),
            None => return Err(format!("CPU {i} missing from {text:?}")),
        }
    }
    Ok(text.trim().to_string())
}

fn smp_command(o: &Opts, spec: &str) -> Command {
    let mut c = Command::new(&o.vmm);
    let mut line = "console=ttyS0 reboot=k panic=1 pci=conf1 quiet".to_string();
    if !o.append.is_empty() {
        line.push(' ');
        line.push_str(&o.append);
    }
    c.args([
        "--kernel",
        &o.kernel,
        "--initrd",
        &o.initrd,
        "--cpus",
        spec,
        "--log-level",
        "info",
        "--cmdline",
        &line,
    ]);
    if let Some(map) = &o.system_map {
        c.args(["--system-map", map]);
    }
    if let Some(disk) = &o.smp_disk {
        c.args(["--disk", &format!("{disk},cache=none")]);
    }
    c
}

/// The many-vCPU boot and its checks; `Ok(true)` when every check passed.
pub fn smp_checks(o: &Opts, spec: &str) -> Result<bool, String> {
    let topo = Topology::parse(spec)?;
    println!("E2E-INFO smp: booting with --cpus {spec} and no --memory");
    let mut g = Guest::spawn(smp_command(o, spec), Runner::Vmm, o.verbose)?;
    let result = checks_on(&mut g, topo, o.smp_disk.is_some());
    if !matches!(result, Ok(true)) {
        thread::sleep(Duration::from_millis(300));
        println!(
            "E2E-DIAG vmm status: {:?}",
            g.child.try_wait().ok().flatten()
        );
        g.print_diag();
    }
    result
}

fn checks_on(g: &mut Guest, topo: Topology, disk: bool) -> Result<bool, String> {
    let mut r = Report { failed: 0 };
    let c = g.console.clone();
    let n = topo.cpus();
    let last = n - 1;
    let (took, mut pos) = g.ready_at_prompt("smp boot")?;
    println!(
        "E2E-INFO smp: {n} vCPUs at the readiness marker {:.0} ms after spawn",
        took.as_secs_f64() * 1000.0
    );
    // Each answer is computed in the guest (`$((1+1))`), so the echo of the typed command
    // cannot match its marker.
    let mut ask = |g: &mut Guest, cmd: String, marker: &str, limit: Duration| {
        g.send(cmd.as_bytes())?;
        let got = c.value_until_end(marker, pos, limit);
        if let Some((end, _)) = &got {
            pos = *end;
        }
        Ok::<_, String>(got.map(|(_, v)| v.trim().to_string()))
    };

    let counts = ask(
        g,
        "echo cpus-$((1+1))-$(nproc),$(grep -c ^processor /proc/cpuinfo)-end\n".into(),
        "cpus-2-",
        STEP_TIMEOUT,
    )?;
    r.check(
        &format!("cpus{n}-nproc-cpuinfo"),
        match counts {
            Some(v) if v == format!("{n},{n}") => {
                Ok(format!("nproc and /proc/cpuinfo both show {n}"))
            }
            other => Err(format!("nproc,cpuinfo = {other:?}, expected {n},{n}")),
        },
    );

    let mem = ask(
        g,
        "echo mem-$((1+1))-$(awk '/^MemTotal/{print $2}' /proc/meminfo)-end\n".into(),
        "mem-2-",
        STEP_TIMEOUT,
    )?;
    r.check(
        "memtotal-default",
        match mem.as_deref().map(str::parse::<u64>) {
            // 1 GiB less what the kernel keeps for itself (its image, reserved ranges).
            Some(Ok(kib)) if (800 * 1024..=1024 * 1024).contains(&kib) => Ok(format!(
                "no --memory: MemTotal {} MiB (the default is 1 GiB)",
                kib / 1024
            )),
            other => Err(format!("MemTotal {other:?} kB, expected about 1 GiB")),
        },
    );

    let sysfs = ask(
        g,
        "echo topo-$((1+1))-$(for d in /sys/devices/system/cpu/cpu[0-9]*; do t=$d/topology; \
         printf '%s:%s,%s,%s,%s ' ${d##*cpu} $(cat $t/physical_package_id $t/core_id \
         $t/thread_siblings_list $t/core_siblings_list); done)-end\n"
            .into(),
        "topo-2-",
        STEP_TIMEOUT,
    )?;
    r.check(
        "topology-sysfs",
        sysfs
            .ok_or_else(|| format!("no answer; console tail: {}", c.tail(1000)))
            .and_then(|t| pairs_match(&t, n, |i| topo.sysfs_of(i)))
            .map(|t| {
                format!(
                    "{} thread(s) x {} core(s) x {} socket(s): cpu:package,core,threads,package-cpus {t}",
                    topo.threads, topo.cores, topo.sockets
                )
            }),
    );

    // Field 39 of /proc/self/stat: the CPU the task last ran on.
    let pinned = ask(
        g,
        format!(
            "echo pin-$((1+1))-$(for i in $(seq 0 {last}); do printf '%s:%s ' $i \
             $(taskset -c $i cut -d' ' -f39 /proc/self/stat); done)-end\n"
        ),
        "pin-2-",
        STEP_TIMEOUT,
    )?;
    r.check(
        "pinned-tasks",
        pinned
            .ok_or_else(|| format!("no answer; console tail: {}", c.tail(1000)))
            .and_then(|t| pairs_match(&t, n, |i| i.to_string()))
            .map(|t| format!("a task pinned to each CPU ran there (cpu:ran-on {t})")),
    );

    // One busy loop per CPU at once; the local-timer counts before and after.
    let started = Instant::now();
    let job = ask(
        g,
        format!(
            "a=$(grep LOC: /proc/interrupts); for i in $(seq 0 {last}); do \
             taskset -c $i sh -c 'x=0; while [ $x -lt {JOB_ITERATIONS} ]; do x=$((x+1)); done; \
             echo job-$((1+1))-$(cut -d\" \" -f39 /proc/self/stat)-done' & done; wait; \
             echo job-$((2+1))-$a=$(grep LOC: /proc/interrupts)-end\n"
        ),
        "job-3-",
        JOB_TIMEOUT,
    )?;
    let secs = started.elapsed().as_secs_f64();
    let console = c.text_from(0);
    let finished: Vec<u32> = (0..n)
        .filter(|i| console.contains(&format!("job-2-{i}-done")))
        .collect();
    r.check(
        "parallel-job",
        if job.is_some() && finished.len() == n as usize {
            Ok(format!(
                "{n} busy loops of {JOB_ITERATIONS} iterations, one pinned to each CPU, all \
                 finished on their CPU ({secs:.1} s for the job)"
            ))
        } else {
            Err(format!(
                "finished on CPUs {finished:?} of {n}; console tail: {}",
                c.tail(1500)
            ))
        },
    );
    r.check(
        "local-timer-every-cpu",
        match job.as_deref().and_then(|j| j.split_once('=')) {
            Some((before, after)) => every_cpu_ticked(before, after, n as usize),
            None => Err(format!("no LOC lines; console tail: {}", c.tail(1000))),
        },
    );

    // Hot-unplug and re-plug of the last CPU, and a task pinned to it afterwards.
    let online = format!("/sys/devices/system/cpu/cpu{last}/online");
    let off = ask(
        g,
        format!(
            "echo 0 > {online}; echo off-$((1+1))-$(cat {online}),$(nproc),\
             $(grep -c ^processor /proc/cpuinfo)-end\n"
        ),
        "off-2-",
        STEP_TIMEOUT,
    )?;
    let on = ask(
        g,
        format!(
            "echo 1 > {online}; echo on-$((1+1))-$(cat {online}),$(nproc),\
             $(taskset -c {last} cut -d' ' -f39 /proc/self/stat)-end\n"
        ),
        "on-2-",
        STEP_TIMEOUT,
    )?;
    let (want_off, want_on) = (format!("0,{last},{last}"), format!("1,{n},{last}"));
    r.check(
        "last-cpu-offline-online",
        match (&off, &on) {
            (Some(f), Some(o)) if *f == want_off && *o == want_on => Ok(format!(
                "cpu{last} offline: {last} CPUs in nproc and cpuinfo; online again: {n}, a \
                 pinned task ran on it"
            )),
            _ => Err(format!(
                "offline online,nproc,cpuinfo = {off:?} (want {want_off}), online \
                 online,nproc,ran-on = {on:?} (want {want_on}); console tail: {}",
                c.tail(1000)
            )),
        },
    );

    if disk {
        // blk-mq's hardware queues: one directory each under mq/.
        let queues = ask(
            g,
            "echo mq-$((1+1))-$(ls /sys/block/vda/mq | wc -l)-end\n".into(),
            "mq-2-",
            STEP_TIMEOUT,
        )?;
        r.check(
            &format!("disk-{n}-queues"),
            match queues.as_deref().map(str::parse::<u32>) {
                Some(Ok(q)) if q == n => Ok(format!(
                    "--disk ...,cache=none with the default queues: blk-mq has {q} hardware \
                     queues for {n} vCPUs"
                )),
                other => Err(format!(
                    "{other:?} hardware queues in /sys/block/vda/mq, expected {n}; console \
                     tail: {}",
                    c.tail(1000)
                )),
            },
        );
        // Every CPU writes its own DISK_MIB MiB at once, O_DIRECT (the host side is
        // O_DIRECT too); then all of it is read back around the guest's page cache.
        let total = DISK_MIB * n;
        let io = ask(
            g,
            format!(
                "dd if=/dev/urandom of=/tmp/mq bs=1M count={total} 2>/dev/null; \
                 for i in $(seq 0 {last}); do taskset -c $i dd if=/tmp/mq of=/dev/vda bs=1M \
                 skip=$((i*{DISK_MIB})) seek=$((i*{DISK_MIB})) count={DISK_MIB} oflag=direct \
                 conv=notrunc 2>/dev/null & done; wait; \
                 echo mqio-$((1+1))-$(md5sum < /tmp/mq | cut -c1-32),$(dd if=/dev/vda bs=1M \
                 count={total} iflag=direct 2>/dev/null | md5sum | cut -c1-32)-end\n"
            ),
            "mqio-2-",
            JOB_TIMEOUT,
        )?;
        r.check(
            "disk-parallel-writes-read-back",
            match io.as_deref().and_then(|v| v.split_once(',')) {
                Some((want, got)) if want == got && want.len() == 32 => Ok(format!(
                    "{n} CPUs each wrote {DISK_MIB} MiB at once with O_DIRECT; md5 {want} read \
                     back"
                )),
                _ => Err(format!(
                    "written,read md5 = {io:?}; console tail: {}",
                    c.tail(1000)
                )),
            },
        );
    }

    r.check("seccomp-on-every-thread", seccomp_of_threads(g.child.id()));

    // `reboot -f` calls reboot(2) itself, from the pinned task (plain `reboot` would ask
    // init, which runs wherever it likes).
    reboot_check(
        g,
        &mut r,
        "reboot-from-last-cpu",
        &format!("sync; taskset -c {last} reboot -f"),
        &format!("`reboot -f` pinned to cpu{last}"),
    )?;
    Ok(r.failed == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_specs_read_like_the_vmm() {
        let t = Topology::parse("4,sockets=2").expect("a valid spec");
        assert_eq!((t.threads, t.cores, t.sockets, t.cpus()), (1, 2, 2, 4));
        let t = Topology::parse("8,threads=2,cores=2,sockets=2").expect("a valid spec");
        assert_eq!((t.threads, t.cores, t.sockets), (2, 2, 2));
        assert_eq!(Topology::parse("2").expect("a valid spec").cores, 2);
        for bad in [
            "0",
            "x",
            "4,threads=3",
            "4,cores=3",
            "4,dies=2",
            "4,sockets",
        ] {
            assert!(Topology::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn spec_lists_keep_each_topology_with_its_count() {
        assert_eq!(split_specs("1,2,4"), ["1", "2", "4"]);
        assert_eq!(
            split_specs("1,4,sockets=2,8,threads=2,cores=2,sockets=2"),
            ["1", "4,sockets=2", "8,threads=2,cores=2,sockets=2"]
        );
        assert!(split_specs("").is_empty());
    }

    #[test]
    fn sysfs_expectations_follow_linux_numbering() {
        let t = Topology::parse("4,sockets=2").expect("a valid spec");
        let all: Vec<String> = (0..4).map(|i| t.sysfs_of(i)).collect();
        assert_eq!(all, ["0,0,0,0-1", "0,1,1,0-1", "1,0,2,2-3", "1,1,3,2-3"]);
        let t = Topology::parse("8,threads=2,sockets=2").expect("a valid spec");
        assert_eq!(t.sysfs_of(5), "1,0,4-5,4-7");
        assert_eq!(
            Topology::parse("1").expect("a valid spec").sysfs_of(0),
            "0,0,0,0"
        );
    }

    #[test]
    fn pairs_must_cover_every_cpu_with_the_right_value() {
        let same = |i: u32| i.to_string();
        assert!(pairs_match("0:0 1:1 ", 2, same).is_ok());
        assert!(pairs_match("1:1 0:0", 2, same).is_ok());
        assert!(pairs_match("0:0 1:0", 2, same).is_err());
        assert!(pairs_match("0:0", 2, same).is_err());
        assert!(pairs_match("0:0 1:1 2:2", 2, same).is_err());
        assert!(pairs_match("garbage", 1, same).is_err());
    }

    #[test]
    fn local_timer_counts_must_all_rise() {
        let before = "LOC:   100   200   300   Local timer interrupts";
        let after = "LOC:   150   201   400   Local timer interrupts";
        assert!(every_cpu_ticked(before, after, 3).is_ok());
        let stuck = "LOC:   150   200   400   Local timer interrupts";
        let err = every_cpu_ticked(before, stuck, 3).expect_err("cpu 1 did not tick");
        assert!(err.contains("[1]"), "{err}");
        assert!(every_cpu_ticked(before, after, 4).is_err());
        assert!(every_cpu_ticked("nothing", after, 3).is_err());
    }
}
