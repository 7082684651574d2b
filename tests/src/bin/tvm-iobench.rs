//! `tvm-iobench`: block-device throughput and IOPS, run inside the test guest by
//! `cargo xtask bench` (busybox has no fio).
//!
//! ```text
//! tvm-iobench seq-write DEV MIB      write MIB MiB in 1 MiB blocks, then fdatasync
//! tvm-iobench seq-read  DEV MIB      read MIB MiB in 1 MiB blocks
//! tvm-iobench rand-read DEV SECONDS  4 KiB reads at random 4 KiB-aligned offsets
//! ```
//!
//! Every access is `O_DIRECT` (no guest page cache) and synchronous: one request in
//! flight (queue depth 1), the same for every VMM measured. Each run prints one line,
//! `IOBENCH op=<op> bytes=<n> ios=<n> ms=<t> mib_s=<x> iops=<y> end`, or
//! `IOBENCH error: <why> end` and exits 1.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::ExitCode;
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

fn report(op: &str, bytes: u64, ios: u64, took: Duration) {
    let secs = took.as_secs_f64().max(1e-9);
    println!(
        "IOBENCH op={op} bytes={bytes} ios={ios} ms={:.0} mib_s={:.1} iops={:.0} end",
        secs * 1000.0,
        bytes as f64 / MIB as f64 / secs,
        ios as f64 / secs
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
    report(op, mib * MIB as u64, mib, start.elapsed());
    Ok(())
}

fn random_read(dev: &str, seconds: u64) -> Result<(), String> {
    let (f, size) = open(dev, false)?;
    let blocks = size / ALIGN as u64;
    if blocks == 0 {
        return Err(format!("{dev} is smaller than {ALIGN} bytes"));
    }
    let mut buf = Aligned::new(ALIGN);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let limit = Duration::from_secs(seconds);
    let start = Instant::now();
    let mut ios = 0u64;
    while start.elapsed() < limit {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % blocks) * ALIGN as u64;
        f.read_exact_at(buf.buf(), off)
            .map_err(|e| format!("read at {off}: {e}"))?;
        ios += 1;
    }
    report("rand-read", ios * ALIGN as u64, ios, start.elapsed());
    Ok(())
}

fn run(args: &[String]) -> Result<(), String> {
    let usage = "usage: tvm-iobench seq-write|seq-read DEV MIB | rand-read DEV SECONDS";
    let [op, dev, n] = args else {
        return Err(usage.into());
    };
    let n: u64 = n.parse().map_err(|_| usage.to_string())?;
    match op.as_str() {
        "seq-write" => sequential(dev, n, true),
        "seq-read" => sequential(dev, n, false),
        "rand-read" => random_read(dev, n),
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
