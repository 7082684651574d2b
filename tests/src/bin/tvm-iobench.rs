//! `tvm-iobench`: block-device throughput and IOPS, run inside the test guest by
//! `cargo xtask bench` (busybox has no fio).
//!
//! ```text
//! tvm-iobench seq-write DEV MIB              write MIB MiB in 1 MiB blocks, then fdatasync
//! tvm-iobench seq-read  DEV MIB              read MIB MiB in 1 MiB blocks
//! tvm-iobench rand-read DEV SECONDS [JOBS]   4 KiB reads at random 4 KiB-aligned offsets
//! tvm-iobench tcp-send ADDR PORT MIB         send MIB MiB of zeros over TCP, 64 KiB writes
//! tvm-iobench tcp-recv ADDR PORT             read a TCP connection to its end, 64 KiB reads
//! ```
//!
//! `tcp-send` and `tcp-recv` are the guest's end of the network benchmark (busybox `nc`
//! moves 1 KiB per system call, which measures small segments, not bulk transfer). Each
//! connects to ADDR:PORT and prints `IOBENCH op=tcp-send|tcp-recv bytes=<n> ms=<t>
//! mib_s=<x> end` (the host's end times the transfer too).
//!
//! Every access is `O_DIRECT` (no guest page cache) and synchronous. The sequential runs and
//! `rand-read` with one job (the default) keep one request in flight (queue depth 1), the
//! same for every VMM measured. `rand-read` with `JOBS` > 1 runs that many threads, each
//! with its own generator of offsets and one synchronous read at a time, all started
//! together and stopped at the same deadline: up to `JOBS` requests in flight (queue depth
//! `JOBS` at the device, as fio's `--numjobs=JOBS --iodepth=1 --ioengine=psync` would give);
//! the IOPS are the sum over the threads.
//!
//! Each run prints one line, `IOBENCH op=<op> bytes=<n> ios=<n> ms=<t> mib_s=<x> iops=<y>
//! lat_us=<z> end` (`op` is `rand-read` for one job, `rand-read-qd<JOBS>` otherwise; `lat_us`
//! is the mean time one request took as its thread saw it, for the sequential runs the run's
//! time over its requests, fdatasync included), or `IOBENCH error: <why> end` and exits 1.
//! The line also carries, for information, `reqs=<n>`: the requests the device completed
//! during the run (from `/sys/block/<dev>/stat`: how the guest's block layer split the
//! 1 MiB accesses), and `irqs=<n>`: the virtio interrupts the guest took meanwhile (from
//! `/proc/interrupts`); `-1` where either could not be read.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::ExitCode;
use std::sync::{Barrier, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

const ALIGN: usize = 4096;
const MIB: usize = 1 << 20;

/// A zeroed buffer of `len` bytes aligned for O_DIRECT, carved out of a larger Vec.
struct Aligned {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + ALIGN];
        let start = storage.as_ptr().align_offset(ALIGN);
        Aligned {
            storage,
            start,
            len,
        }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

fn open(dev: &str, write: bool) -> Result<(File, u64), String> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .map_err(|e| format!("open {dev}: {e}"))?;
    let size = f
        .seek(SeekFrom::End(0))
        .map_err(|e| format!("size of {dev}: {e}"))?;
    Ok((f, size))
}

/// What the guest's kernel counted around one run: requests the device completed and
/// virtio interrupts taken.
#[derive(Clone, Copy)]
struct Counters {
    reqs: Option<u64>,
    irqs: Option<u64>,
}

impl Counters {
    fn read(dev: &str) -> Counters {
        // /sys/block/<name>/stat: reads completed is field 0, writes completed field 4.
        let name = dev.rsplit('/').next().unwrap_or(dev);
        let reqs = std::fs::read_to_string(format!("/sys/block/{name}/stat"))
            .ok()
            .and_then(|s| {
                let v: Vec<u64> = s
                    .split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .collect();
                Some(v.first()? + v.get(4)?)
            });
        // /proc/interrupts: the per-CPU counts of every line that names a virtio device.
        let irqs = std::fs::read_to_string("/proc/interrupts").ok().map(|s| {
            s.lines()
                .filter(|l| l.contains("virtio"))
                .flat_map(|l| {
                    l.split_whitespace()
                        .skip(1)
                        .map_while(|w| w.parse::<u64>().ok())
                })
                .sum()
        });
        Counters { reqs, irqs }
    }

    /// `after - self` of each counter, -1 where either reading failed.
    fn since(self, after: Counters) -> (i64, i64) {
        let d = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => i64::try_from(b.saturating_sub(a)).unwrap_or(i64::MAX),
            _ => -1,
        };
        (d(self.reqs, after.reqs), d(self.irqs, after.irqs))
    }
}

/// Prints the result line; `busy` is the time the requests took, summed over the threads
/// (for one thread, about `took`); `(reqs, irqs)` what [`Counters::since`] gave.
fn report(
    op: &str,
    bytes: u64,
    ios: u64,
    took: Duration,
    busy: Duration,
    (reqs, irqs): (i64, i64),
) {
    let secs = took.as_secs_f64().max(1e-9);
    println!(
        "IOBENCH op={op} bytes={bytes} ios={ios} ms={:.0} mib_s={:.1} iops={:.0} lat_us={:.1} \
         reqs={reqs} irqs={irqs} end",
        secs * 1000.0,
        bytes as f64 / MIB as f64 / secs,
        ios as f64 / secs,
        busy.as_secs_f64() * 1e6 / ios.max(1) as f64
    );
}

fn sequential(dev: &str, mib: u64, write: bool) -> Result<(), String> {
    let (f, size) = open(dev, write)?;
    if mib * MIB as u64 > size {
        return Err(format!("{dev} has {size} bytes, fewer than {mib} MiB"));
    }
    let mut block = Aligned::new(MIB);
    for (i, b) in block.buf().iter_mut().enumerate() {
        *b = (i * 7 + 13) as u8;
    }
    let before = Counters::read(dev);
    let start = Instant::now();
    for i in 0..mib {
        let off = i * MIB as u64;
        let res = if write {
            f.write_all_at(block.buf(), off)
        } else {
            f.read_exact_at(block.buf(), off)
        };
        res.map_err(|e| format!("{} at {off}: {e}", if write { "write" } else { "read" }))?;
    }
    if write {
        f.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
    }
    let op = if write { "seq-write" } else { "seq-read" };
    let took = start.elapsed();
    report(
        op,
        mib * MIB as u64,
        mib,
        took,
        took,
        before.since(Counters::read(dev)),
    );
    Ok(())
}

/// Most threads `rand-read` starts (a guard against a typo, not a device limit: requests
/// the virtqueue cannot take wait in the guest's block layer).
const MAX_JOBS: u64 = 256;
/// The first thread's xorshift seed (the single-job run's since the first version).
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
/// What sets the other threads' seeds apart (thread `j` starts at `SEED ^ j * SEED_STEP`).
const SEED_STEP: u64 = 0xbf58_476d_1ce4_e5b9;

/// One `rand-read` thread: 4 KiB reads of `f` (`blocks` blocks of 4 KiB) at offsets from a
/// xorshift generator seeded with `seed`, until `deadline`. Returns the reads done and the
/// time they took.
fn random_job(
    f: &File,
    blocks: u64,
    seed: u64,
    deadline: Instant,
) -> Result<(u64, Duration), String> {
    let mut buf = Aligned::new(ALIGN);
    // xorshift64 must not start at 0.
    let mut x = seed.max(1);
    let mut ios = 0u64;
    let mut busy = Duration::ZERO;
    loop {
        let t = Instant::now();
        if t >= deadline {
            return Ok((ios, busy));
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % blocks) * ALIGN as u64;
        f.read_exact_at(buf.buf(), off)
            .map_err(|e| format!("read at {off}: {e}"))?;
        busy += t.elapsed();
        ios += 1;
    }
}

fn random_read(dev: &str, seconds: u64, jobs: u64) -> Result<(), String> {
    if !(1..=MAX_JOBS).contains(&jobs) {
        return Err(format!("JOBS must be 1 to {MAX_JOBS}, not {jobs}"));
    }
    let (f, size) = open(dev, false)?;
    let blocks = size / ALIGN as u64;
    if blocks == 0 {
        return Err(format!("{dev} is smaller than {ALIGN} bytes"));
    }
    let limit = Duration::from_secs(seconds);
    // The threads start together: each waits at the barrier, which opens once this thread
    // has set the common deadline.
    let barrier = Barrier::new(jobs as usize + 1);
    let before = Counters::read(dev);
    let deadline = OnceLock::new();
    let (results, took) = thread::scope(|s| {
        let (f, barrier, deadline) = (&f, &barrier, &deadline);
        let handles: Vec<_> = (0..jobs)
            .map(|j| {
                s.spawn(move || {
                    barrier.wait();
                    let deadline = *deadline.get().expect("set before the barrier opens");
                    // One generator per thread; thread 0 reads the offsets that the
                    // single-job run always read.
                    random_job(f, blocks, SEED ^ j.wrapping_mul(SEED_STEP), deadline)
                })
            })
            .collect();
        let start = Instant::now();
        let _ = deadline.set(start + limit);
        barrier.wait();
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a reader thread panicked".into()))
            })
            .collect();
        (results, start.elapsed())
    });
    let (mut ios, mut busy) = (0u64, Duration::ZERO);
    for r in results {
        let (n, t) = r?;
        ios += n;
        busy += t;
    }
    let op = if jobs == 1 {
        "rand-read".to_string()
    } else {
        format!("rand-read-qd{jobs}")
    };
    report(
        &op,
        ios * ALIGN as u64,
        ios,
        took,
        busy,
        before.since(Counters::read(dev)),
    );
    Ok(())
}

/// The size of one `tcp-send` write or `tcp-recv` read.
const TCP_CHUNK: usize = 64 << 10;

/// Reads `s` through `buf` until the peer closes; the number of bytes read.
fn read_to_end(s: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<u64> {
    let mut bytes = 0u64;
    loop {
        match s.read(buf) {
            Ok(0) => return Ok(bytes),
            Ok(n) => bytes += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// `tcp-send` (`mib` MiB of zeros, then the write side shut) or `tcp-recv` (`mib` None:
/// everything until the peer closes) on a connection to `addr:port`.
fn tcp(addr: &str, port: &str, mib: Option<u64>) -> Result<(), String> {
    use std::io::Write;
    let port: u16 = port.parse().map_err(|_| format!("bad port {port}"))?;
    let mut s = std::net::TcpStream::connect((addr, port))
        .map_err(|e| format!("connect {addr}:{port}: {e}"))?;
    let mut buf = vec![0u8; TCP_CHUNK];
    let start = Instant::now();
    let mut bytes = 0u64;
    let op = match mib {
        Some(mib) => {
            let total = mib * MIB as u64;
            while bytes < total {
                let n = (total - bytes).min(TCP_CHUNK as u64) as usize;
                s.write_all(&buf[..n]).map_err(|e| format!("send: {e}"))?;
                bytes += n as u64;
            }
            s.shutdown(std::net::Shutdown::Write)
                .map_err(|e| format!("shutdown: {e}"))?;
            // Until the peer has read everything and closed.
            read_to_end(&mut s, &mut buf).map_err(|e| format!("drain: {e}"))?;
            "tcp-send"
        }
        None => {
            bytes = read_to_end(&mut s, &mut buf).map_err(|e| format!("recv: {e}"))?;
            "tcp-recv"
        }
    };
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    println!(
        "IOBENCH op={op} bytes={bytes} ms={:.0} mib_s={:.2} end",
        secs * 1000.0,
        bytes as f64 / MIB as f64 / secs
    );
    Ok(())
}

fn run(args: &[String]) -> Result<(), String> {
    let usage = "usage: tvm-iobench seq-write|seq-read DEV MIB | rand-read DEV SECONDS [JOBS] \
                 | tcp-send ADDR PORT MIB | tcp-recv ADDR PORT";
    match args {
        [op, addr, port, mib] if op == "tcp-send" => {
            let mib = mib.parse().map_err(|_| usage.to_string())?;
            return tcp(addr, port, Some(mib));
        }
        [op, addr, port] if op == "tcp-recv" => return tcp(addr, port, None),
        _ => {}
    }
    let (op, dev, n, jobs) = match args {
        [op, dev, n] => (op, dev, n, None),
        [op, dev, n, jobs] if op == "rand-read" => (op, dev, n, Some(jobs)),
        _ => return Err(usage.into()),
    };
    let n: u64 = n.parse().map_err(|_| usage.to_string())?;
    let jobs: u64 = match jobs {
        Some(j) => j.parse().map_err(|_| usage.to_string())?,
        None => 1,
    };
    match op.as_str() {
        "seq-write" => sequential(dev, n, true),
        "seq-read" => sequential(dev, n, false),
        "rand-read" => random_read(dev, n, jobs),
        _ => Err(usage.into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("IOBENCH error: {e} end");
            ExitCode::FAILURE
        }
    }
}
