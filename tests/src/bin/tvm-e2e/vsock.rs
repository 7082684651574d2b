//! The vsock checks of the main boot, which has `--vsock cid=3,uds=PATH` ([`uds_path`]).
//!
//! The guest side is `tvm-vsock-guest` (tests/src/bin/tvm-vsock-guest.rs, in the checks'
//! initramfs as /bin/tvm-vsock-guest); the host side is Firecracker's hybrid vsock on the
//! Unix socket PATH. Host-initiated: connect to PATH, write `CONNECT <port>\n`, read
//! `OK <host port>\n`, then the stream is the guest listener's connection. Guest-initiated:
//! the guest's `connect(CID 2, port P)` reaches the Unix socket `PATH_P`, which this driver
//! binds beforehand. Both sides agree on the data without sharing it:
//! [`tvm_tests::stream_byte`] from some offset, compared by [`tvm_tests::fnv1a`].
//!
//! A stream that ends is expected to end one direction at a time: the host's
//! `shutdown(Write)` reaches the guest as the end of what it reads while it can still
//! write back, and the guest's `shutdown(SHUT_WR)` reaches the host as EOF while the host
//! can still answer.
//!
//! Every wait has a limit: sockets have read and write timeouts of [`IO_SLICE`], and the
//! loops around them give up at their deadline (or when cancelled).

use std::ffi::OsString;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tvm_tests::{fnv1a, stream_byte, FNV_START};

use super::{join_within, Guest, Report, STEP_TIMEOUT};

/// The guest's context id in the main boot.
pub const GUEST_CID: u32 = 3;
/// The guest's echo listener for most checks.
const ECHO_PORT: u32 = 5000;
/// The host listener (`PATH_5001`) the guest sends 64 MiB to.
const SEND_PORT: u32 = 5001;
/// The guest's echo listener after the driver reload.
const RELOAD_PORT: u32 = 5002;
/// A guest port nothing listens on.
const NO_GUEST_LISTENER: u32 = 5999;
/// A host port nothing listens on (`PATH_5998` is never bound).
const NO_HOST_LISTENER: u32 = 5998;

/// The size of the two big transfers.
const BIG: u64 = 64 << 20;
/// Limit for a big transfer (about a minute under nested TCG).
const BIG_LIMIT: Duration = Duration::from_secs(180);
/// How many connections run at once in `vsock-32-connections`.
const MANY: u64 = 32;
/// What each of them sends.
const MANY_BYTES: u64 = 256 << 10;
/// What the host writes to a connection it does not read at first.
const SLOW_BYTES: u64 = 16 << 20;
/// How long it does not read.
const SLOW_PAUSE: Duration = Duration::from_secs(10);
/// Limit for the whole slow-reader transfer, the pause included.
const SLOW_LIMIT: Duration = Duration::from_secs(120);
/// How much the VMM's RSS may grow while the host does not read: half of [`SLOW_BYTES`],
/// so that a VMM buffering all that the guest echoes (all of it but what the host socket
/// and the guest hold, a few hundred KiB) fails.
const RSS_GROWTH_LIMIT_KIB: u64 = (SLOW_BYTES >> 10) / 2;
/// What is echoed through the listener started after the driver reload.
const RELOAD_BYTES: u64 = 1 << 20;
/// Limit for the VMM's answer to `CONNECT`.
const ANSWER_LIMIT: Duration = Duration::from_secs(30);
/// How long a refused host-initiated connection may stay open.
const REFUSED_LIMIT: Duration = Duration::from_secs(10);
/// Limit for unloading the transport (the guest retries `rmmod` for 30 s).
const RMMOD_LIMIT: Duration = Duration::from_secs(90);
/// The read and write timeout of every socket: no single call waits longer; the loops
/// around the calls check their deadline in between.
const IO_SLICE: Duration = Duration::from_secs(1);
/// How much the host moves per call.
const CHUNK: usize = 64 << 10;
/// What the guest program prints, instead of its line, when it fails.
const GUEST_ERROR: &str = "VSOCK-ERROR";

/// The Unix socket of the main boot's vsock device: in the temp dir, unique to this run.
pub fn uds_path() -> PathBuf {
    std::env::temp_dir().join(format!("tvm-e2e-{}-vsock.sock", std::process::id()))
}

/// The `--vsock` value of the main boot.
pub fn vmm_arg(uds: &Path) -> String {
    format!("cid={GUEST_CID},uds={}", uds.display())
}

/// Where the VMM connects a guest's connection to host port `port`: `<uds>_<port>`.
fn listener_path(uds: &Path, port: u32) -> PathBuf {
    let mut p: OsString = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// A deadline that another thread can also cut short.
#[derive(Clone)]
struct Limit {
    deadline: Instant,
    stop: Arc<AtomicBool>,
}

impl Limit {
    fn new(limit: Duration) -> Self {
        Limit {
            deadline: Instant::now() + limit,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    fn cancel(&self) {
        self.stop.store(true, Relaxed);
    }

    /// Why `what` must give up now, if it must.
    fn over(&self, what: &str) -> Result<(), String> {
        if self.stop.load(Relaxed) {
            Err(format!("{what}: given up"))
        } else if Instant::now() >= self.deadline {
            Err(format!("{what}: time limit reached"))
        } else {
            Ok(())
        }
    }
}

/// A socket call that only ran out of its [`IO_SLICE`] (or was interrupted): try again.
fn again(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

fn set_timeouts(s: &UnixStream) -> Result<(), String> {
    s.set_read_timeout(Some(IO_SLICE))
        .and_then(|()| s.set_write_timeout(Some(IO_SLICE)))
        .map_err(|e| format!("setting socket timeouts: {e}"))
}

/// Fills `buf` with the test stream from `offset`.
fn fill(buf: &mut [u8], offset: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = stream_byte(offset + i as u64);
    }
}

/// The FNV-1a of `len` bytes of the test stream from `offset`.
fn pattern_hash(offset: u64, len: u64) -> u64 {
    let mut buf = vec![0u8; CHUNK];
    let mut hash = FNV_START;
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        fill(&mut buf[..n], offset + done);
        hash = fnv1a(hash, &buf[..n]);
        done += n as u64;
    }
    hash
}

/// Writes `len` bytes of the test stream from `offset` to `s`, counting them in
/// `progress`, then shuts down the write side. Returns their FNV-1a.
fn write_pattern(
    s: &mut UnixStream,
    offset: u64,
    len: u64,
    limit: &Limit,
    progress: &AtomicU64,
) -> Result<u64, String> {
    let mut buf = vec![0u8; CHUNK];
    let mut hash = FNV_START;
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        fill(&mut buf[..n], offset + done);
        hash = fnv1a(hash, &buf[..n]);
        let mut off = 0;
        while off < n {
            let at = done + off as u64;
            limit
                .over("writing")
                .map_err(|e| format!("{e} after {at} bytes"))?;
            match s.write(&buf[off..n]) {
                Ok(0) => return Err(format!("write returned 0 after {at} bytes")),
                Ok(k) => {
                    off += k;
                    progress.fetch_add(k as u64, Relaxed);
                }
                Err(e) if again(&e) => {}
                Err(e) => return Err(format!("write after {at} bytes: {e}")),
            }
        }
        done += n as u64;
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown(Write) after {len} bytes: {e}"))?;
    Ok(hash)
}

/// Reads `s` to EOF; returns the byte count and their FNV-1a.
fn read_to_eof(s: &mut UnixStream, limit: &Limit) -> Result<(u64, u64), String> {
    let mut buf = vec![0u8; CHUNK];
    let mut hash = FNV_START;
    let mut len = 0u64;
    loop {
        limit
            .over("reading")
            .map_err(|e| format!("{e} after {len} bytes"))?;
        match s.read(&mut buf) {
            Ok(0) => return Ok((len, hash)),
            Ok(n) => {
                hash = fnv1a(hash, &buf[..n]);
                len += n as u64;
            }
            Err(e) if again(&e) => {}
            Err(e) => return Err(format!("read after {len} bytes: {e}")),
        }
    }
}

/// What the VMM said after `CONNECT <port>`.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// A whole line (without its newline), or 256 bytes without one.
    Line(String),
    /// The stream ended (how, and any partial line before).
    Closed(String, String),
    /// Neither within the limit (any partial line).
    Silent(String),
}

/// Reads one line byte by byte (what follows it is the connection's data) within
/// `within`.
fn read_answer(s: &mut UnixStream, within: Duration) -> Answer {
    let deadline = Instant::now() + within;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let text = |l: &[u8]| String::from_utf8_lossy(l).into_owned();
    loop {
        if Instant::now() >= deadline {
            return Answer::Silent(text(&line));
        }
        match s.read(&mut byte) {
            Ok(0) => return Answer::Closed("EOF".into(), text(&line)),
            Ok(_) if byte[0] == b'\n' => return Answer::Line(text(&line)),
            Ok(_) => {
                line.push(byte[0]);
                if line.len() >= 256 {
                    return Answer::Line(text(&line));
                }
            }
            Err(e) if again(&e) => {}
            Err(e) => return Answer::Closed(e.to_string(), text(&line)),
        }
    }
}

/// `OK <host port>`.
fn is_ok_line(line: &str) -> bool {
    line.strip_prefix("OK ")
        .is_some_and(|p| p.trim().parse::<u32>().is_ok())
}

/// Connects to the VMM's socket and asks for the guest's `port`; returns the stream and
/// the `OK <host port>` line.
fn connect_guest(uds: &Path, port: u32) -> Result<(UnixStream, String), String> {
    let mut s = UnixStream::connect(uds).map_err(|e| format!("connect {uds:?}: {e}"))?;
    set_timeouts(&s)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("writing CONNECT {port}: {e}"))?;
    match read_answer(&mut s, ANSWER_LIMIT) {
        Answer::Line(l) if is_ok_line(&l) => Ok((s, l)),
        Answer::Line(l) => Err(format!("CONNECT {port} answered {l:?}, not OK <port>")),
        Answer::Closed(how, partial) => Err(format!(
            "CONNECT {port}: the stream ended ({how}) instead of OK (partial answer {partial:?})"
        )),
        Answer::Silent(partial) => Err(format!(
            "CONNECT {port}: no answer within {} s (partial answer {partial:?})",
            ANSWER_LIMIT.as_secs()
        )),
    }
}

/// A host-initiated echo that came back whole.
struct Echoed {
    /// The VMM's `OK <host port>` line.
    answer: String,
    hash: u64,
    /// From the connect to the echo's EOF.
    secs: f64,
}

/// Connects to the guest's echo listener on `port`, writes `len` bytes of the test stream
/// from `offset` from a thread and shuts down the write side, while this thread reads the
/// echo to EOF; both must be the same bytes. `before_reading` runs once the writer has
/// started, before the first read (it gets the writer's byte count so far). All of it
/// gives up after `limit`.
fn echo_once(
    uds: &Path,
    port: u32,
    offset: u64,
    len: u64,
    limit: Duration,
    before_reading: impl FnOnce(&AtomicU64),
) -> Result<Echoed, String> {
    let started = Instant::now();
    let (mut s, answer) = connect_guest(uds, port)?;
    let limit = Limit::new(limit);
    let mut w = s
        .try_clone()
        .map_err(|e| format!("cloning the stream: {e}"))?;
    let progress = Arc::new(AtomicU64::new(0));
    let writer = {
        let (limit, progress) = (limit.clone(), progress.clone());
        thread::spawn(move || write_pattern(&mut w, offset, len, &limit, &progress))
    };
    before_reading(&progress);
    let read = read_to_eof(&mut s, &limit);
    if !matches!(read, Ok((n, _)) if n == len) {
        // The writer may be blocked on a stream that goes nowhere: end it.
        limit.cancel();
        let _ = s.shutdown(Shutdown::Both);
    }
    let wrote = join_within(writer, Duration::from_secs(10))
        .unwrap_or_else(|| Err("the writer thread did not end within 10 s".into()));
    let secs = started.elapsed().as_secs_f64();
    match (read, wrote) {
        (Ok((got, got_hash)), Ok(sent_hash)) if got == len && got_hash == sent_hash => Ok(Echoed {
            answer,
            hash: sent_hash,
            secs,
        }),
        (Ok((got, got_hash)), Ok(sent_hash)) => Err(format!(
            "{answer}: sent {len} bytes (FNV-1a {sent_hash:016x}), the echo was {got} bytes \
             (FNV-1a {got_hash:016x})"
        )),
        (read, wrote) => Err(format!(
            "{answer}: writing {len} bytes: {}; reading the echo: {}",
            wrote.map_or_else(|e| e, |_| "done".into()),
            read.map_or_else(|e| e, |(n, _)| format!("{n} bytes, then EOF"))
        )),
    }
}

/// Waits for the line the guest program prints after console position `from`, which
/// starts with `prefix` and ends in ` end` (or for its `VSOCK-ERROR ... end`, an error);
/// returns the position after it and the text between `prefix` and ` end`.
pub fn guest_line(
    g: &Guest,
    prefix: &str,
    from: usize,
    timeout: Duration,
) -> Result<(usize, String), String> {
    let c = &g.console;
    let seen = c.wait_until(from, timeout, |t| {
        t.contains(prefix) || t.contains(GUEST_ERROR)
    });
    let text = c.text_from(from);
    let first = [prefix, GUEST_ERROR]
        .into_iter()
        .filter_map(|m| text.find(m).map(|at| (at, m)))
        .min();
    let Some((_, marker)) = first.filter(|_| seen) else {
        return Err(format!(
            "no `{prefix}` line within {} s; console tail: {}",
            timeout.as_secs(),
            c.tail(1000)
        ));
    };
    let line = c
        .wait_for(marker, from, STEP_TIMEOUT)
        .and_then(|p| c.wait_for(" end", p, STEP_TIMEOUT).map(|e| (p, e)));
    let Some((p, e)) = line else {
        return Err(format!(
            "`{marker}` without its ` end`; console tail: {}",
            c.tail(1000)
        ));
    };
    let value = c.text_between(p, e - " end".len());
    if marker == GUEST_ERROR {
        return Err(format!("the guest program failed: {GUEST_ERROR}{value}"));
    }
    Ok((e, value))
}

/// The value of `key=` among the words of `text` (the first `=` splits).
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split_whitespace()
        .find_map(|w| w.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
}

/// All the vsock checks, after console position `pos`; returns the position after them.
pub fn vsock_checks(
    g: &mut Guest,
    r: &mut Report,
    uds: &Path,
    mut pos: usize,
) -> Result<usize, String> {
    println!("E2E-INFO vsock: guest CID {GUEST_CID}, host socket {uds:?}");
    let c = g.console.clone();

    // The guest's echo listener, in the background; `$vs` keeps its pid.
    g.send(format!("tvm-vsock-guest echo {ECHO_PORT} & vs=$!\n").as_bytes())?;
    let listening = guest_line(
        g,
        &format!("VSOCK-LISTENING port={ECHO_PORT}"),
        pos,
        STEP_TIMEOUT,
    );
    pos = listening.as_ref().map_or_else(|_| c.len(), |(e, _)| *e);
    r.check(
        "vsock-guest-listener",
        listening.map(|_| format!("tvm-vsock-guest listens on port {ECHO_PORT} in the guest")),
    );

    r.check("vsock-host-to-guest-64mib", host_to_guest(uds));

    let (result, p) = guest_to_host(g, uds, pos)?;
    pos = p;
    r.check("vsock-guest-to-host-64mib", result);

    r.check("vsock-32-connections", many_connections(uds));

    r.check("vsock-slow-reader-bounded", slow_reader(g, uds));

    let (result, p) = refused(g, uds, pos)?;
    pos = p;
    r.check("vsock-refused-both-ways", result);

    let (result, p) = reload(g, uds, pos)?;
    pos = p;
    r.check("vsock-driver-reload", result);

    // The listener started last is not needed any more.
    g.send(b"kill $vs 2>/dev/null\n")?;
    for port in [SEND_PORT, NO_HOST_LISTENER] {
        let _ = std::fs::remove_file(listener_path(uds, port));
    }
    Ok(pos)
}

/// `vsock-host-to-guest-64mib`: 64 MiB through the guest's echo listener.
fn host_to_guest(uds: &Path) -> Result<String, String> {
    let e = echo_once(uds, ECHO_PORT, 0, BIG, BIG_LIMIT, |_| {})?;
    let rate = (BIG >> 20) as f64 / e.secs;
    println!(
        "E2E-INFO vsock: host -> guest -> host echo: 64 MiB each way in {:.1} s, {rate:.1} MiB/s",
        e.secs
    );
    Ok(format!(
        "{}: 64 MiB sent to port {ECHO_PORT} came back intact (FNV-1a {:016x}) in {:.1} s",
        e.answer, e.hash, e.secs
    ))
}

/// What the host listener of `vsock-guest-to-host-64mib` received.
struct Served {
    len: u64,
    hash: u64,
    secs: f64,
}

/// Accepts one connection on `listener`, reads it to EOF, answers `hash=<FNV-1a>` and
/// closes it.
fn serve_one(listener: &UnixListener, limit: &Limit) -> Result<Served, String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener: {e}"))?;
    let mut s = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if again(&e) => {
                limit.over("waiting for the guest's connection")?;
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    let started = Instant::now();
    s.set_nonblocking(false)
        .map_err(|e| format!("accepted stream: {e}"))?;
    set_timeouts(&s)?;
    let (len, hash) = read_to_eof(&mut s, limit)?;
    let secs = started.elapsed().as_secs_f64();
    s.write_all(format!("hash={hash:016x}").as_bytes())
        .map_err(|e| format!("writing the answer after {len} bytes: {e}"))?;
    Ok(Served { len, hash, secs })
}

/// `vsock-guest-to-host-64mib`: the guest connects to the host's `PATH_5001` and sends
/// 64 MiB; the host answers with the hash of what it got. Returns the check's result and
/// the console position after the guest's line.
fn guest_to_host(
    g: &mut Guest,
    uds: &Path,
    pos: usize,
) -> Result<(Result<String, String>, usize), String> {
    let path = listener_path(uds, SEND_PORT);
    let _ = std::fs::remove_file(&path);
    let want = pattern_hash(0, BIG);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => return Ok((Err(format!("bind {path:?}: {e}")), pos)),
    };
    let limit = Limit::new(BIG_LIMIT);
    let server = {
        let limit = limit.clone();
        thread::spawn(move || serve_one(&listener, &limit))
    };
    if let Err(e) = g.send(format!("tvm-vsock-guest send {SEND_PORT} {BIG}\n").as_bytes()) {
        limit.cancel();
        return Err(e);
    }
    let line = guest_line(g, &format!("VSOCK-SEND port={SEND_PORT}"), pos, BIG_LIMIT);
    if line.is_err() {
        limit.cancel();
    }
    let served = join_within(server, STEP_TIMEOUT)
        .unwrap_or_else(|| Err("the host listener's thread did not end".into()));
    let _ = std::fs::remove_file(&path);
    let end = line.as_ref().map_or_else(|_| g.console.len(), |(e, _)| *e);
    let result = (|| {
        let (_, v) = line?;
        let served = served?;
        let want_hex = format!("{want:016x}");
        let (bytes, hash, reply, ms) = (
            field(&v, "bytes").unwrap_or(""),
            field(&v, "hash").unwrap_or(""),
            field(&v, "reply").unwrap_or(""),
            field(&v, "ms").unwrap_or(""),
        );
        if served.len != BIG || served.hash != want {
            return Err(format!(
                "the host received {} bytes with FNV-1a {:016x}; 64 MiB of the stream hash \
                 to {want_hex} (guest: {v:?})",
                served.len, served.hash
            ));
        }
        if bytes != BIG.to_string() || hash != want_hex || reply != format!("hash={want_hex}") {
            return Err(format!(
                "the guest reports bytes={bytes} hash={hash} reply={reply}; expected \
                 bytes={BIG} hash={want_hex} reply=hash={want_hex}"
            ));
        }
        let guest_secs = ms.parse::<f64>().map(|m| m / 1000.0).unwrap_or(f64::NAN);
        println!(
            "E2E-INFO vsock: guest -> host: 64 MiB in {guest_secs:.1} s by the guest's count \
             ({:.1} MiB/s), {:.1} s from accept to EOF on the host ({:.1} MiB/s)",
            (BIG >> 20) as f64 / guest_secs,
            served.secs,
            (BIG >> 20) as f64 / served.secs
        );
        Ok(format!(
            "the guest sent 64 MiB to {path:?}; the host received them with FNV-1a {want_hex}, \
             as the guest computed, and its answer reached the guest"
        ))
    })();
    Ok((result, end))
}

/// `vsock-32-connections`: 32 echoes at once, each from its own offset of the stream.
fn many_connections(uds: &Path) -> Result<String, String> {
    let started = Instant::now();
    let handles: Vec<_> = (0..MANY)
        .map(|i| {
            let uds = uds.to_path_buf();
            thread::spawn(move || {
                echo_once(&uds, ECHO_PORT, i << 20, MANY_BYTES, BIG_LIMIT, |_| {})
            })
        })
        .collect();
    // Each echo gives up on its own: the connect's limit, the transfer's and the writer's.
    let deadline = started + ANSWER_LIMIT + BIG_LIMIT + Duration::from_secs(20);
    let mut failed = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        match join_within(h, deadline.saturating_duration_since(Instant::now())) {
            Some(Ok(_)) => {}
            Some(Err(e)) => failed.push(format!("#{i}: {e}")),
            None => failed.push(format!("#{i}: did not end")),
        }
    }
    if !failed.is_empty() {
        return Err(format!(
            "{} of {MANY} connections failed: {}",
            failed.len(),
            failed.join("; ")
        ));
    }
    Ok(format!(
        "{MANY} connections to port {ECHO_PORT} at once, {} KiB each from its own offset, \
         every echo intact, {:.1} s in all",
        MANY_BYTES >> 10,
        started.elapsed().as_secs_f64()
    ))
}

/// `vsock-slow-reader-bounded`: the host writes 16 MiB and does not read the echo for
/// [`SLOW_PAUSE`]; the VMM must not buffer what the guest echoes meanwhile.
fn slow_reader(g: &Guest, uds: &Path) -> Result<String, String> {
    let before = g.rss_kib().ok_or("the VMM's VmRSS is unreadable")?;
    let (mut peak, mut at_end, mut accepted) = (before, 0, 0);
    let e = echo_once(
        uds,
        ECHO_PORT,
        7 << 20,
        SLOW_BYTES,
        SLOW_LIMIT,
        |progress| {
            let until = Instant::now() + SLOW_PAUSE;
            while Instant::now() < until {
                peak = peak.max(g.rss_kib().unwrap_or(0));
                thread::sleep(Duration::from_millis(250));
            }
            at_end = g.rss_kib().unwrap_or(0);
            peak = peak.max(at_end);
            accepted = progress.load(Relaxed);
        },
    )?;
    println!(
        "E2E-INFO vsock: slow reader: VmRSS {before} KiB before, {at_end} KiB after {} s of not \
         reading (peak {peak} KiB); the host got {} KiB of its {} MiB written meanwhile",
        SLOW_PAUSE.as_secs(),
        accepted >> 10,
        SLOW_BYTES >> 20
    );
    let grew = peak.saturating_sub(before);
    if grew >= RSS_GROWTH_LIMIT_KIB {
        return Err(format!(
            "the VMM's RSS grew by {grew} KiB ({before} -> peak {peak} KiB) while the host did \
             not read; limit {RSS_GROWTH_LIMIT_KIB} KiB"
        ));
    }
    Ok(format!(
        "{}: {} MiB echoed intact after {} s without reading; VmRSS {before} -> {at_end} KiB \
         (peak {peak}, +{grew} KiB, limit {RSS_GROWTH_LIMIT_KIB})",
        e.answer,
        SLOW_BYTES >> 20,
        SLOW_PAUSE.as_secs()
    ))
}

/// The host half of `vsock-refused-both-ways`: `CONNECT` to a guest port nothing listens
/// on must not be answered `OK`, and the stream must end.
fn refused_host(uds: &Path) -> Result<String, String> {
    let started = Instant::now();
    let mut s = UnixStream::connect(uds).map_err(|e| format!("connect {uds:?}: {e}"))?;
    set_timeouts(&s)?;
    s.write_all(format!("CONNECT {NO_GUEST_LISTENER}\n").as_bytes())
        .map_err(|e| format!("writing CONNECT {NO_GUEST_LISTENER}: {e}"))?;
    let mut lines = Vec::new();
    loop {
        let left = (started + REFUSED_LIMIT).saturating_duration_since(Instant::now());
        match read_answer(&mut s, left) {
            Answer::Line(l) | Answer::Closed(_, l) if l.starts_with("OK") => {
                return Err(format!(
                    "CONNECT {NO_GUEST_LISTENER} answered {l:?}, though nothing listens there"
                ))
            }
            Answer::Line(l) => lines.push(l),
            Answer::Closed(how, _) => {
                return Ok(format!(
                    "CONNECT {NO_GUEST_LISTENER}: no OK, the stream ended ({how}) after {:.0} ms{}",
                    started.elapsed().as_secs_f64() * 1000.0,
                    if lines.is_empty() {
                        String::new()
                    } else {
                        format!(", after {lines:?}")
                    }
                ))
            }
            Answer::Silent(_) => {
                return Err(format!(
                    "CONNECT {NO_GUEST_LISTENER}: the stream was still open after {} s \
                     (lines {lines:?})",
                    REFUSED_LIMIT.as_secs()
                ))
            }
        }
    }
}

/// `vsock-refused-both-ways`: [`refused_host`], and the guest's connect to a host port
/// nobody listens on fails with ECONNRESET or ECONNREFUSED.
fn refused(
    g: &mut Guest,
    uds: &Path,
    pos: usize,
) -> Result<(Result<String, String>, usize), String> {
    let host = refused_host(uds);
    let _ = std::fs::remove_file(listener_path(uds, NO_HOST_LISTENER));
    g.send(format!("tvm-vsock-guest connect {NO_HOST_LISTENER}\n").as_bytes())?;
    let line = guest_line(
        g,
        &format!("VSOCK-CONNECT port={NO_HOST_LISTENER} result="),
        pos,
        STEP_TIMEOUT,
    );
    let end = line.as_ref().map_or_else(|_| g.console.len(), |(e, _)| *e);
    let guest = line.and_then(|(_, v)| match v.trim() {
        r @ ("errno=104" | "errno=111") => Ok(format!(
            "the guest's connect to host port {NO_HOST_LISTENER} failed with {r}"
        )),
        other => Err(format!(
            "the guest's connect to host port {NO_HOST_LISTENER} (nothing bound at its \
             socket) gave {other:?}, not errno=104 or errno=111"
        )),
    });
    let result = match (host, guest) {
        (Ok(h), Ok(gu)) => Ok(format!("{h}; {gu}")),
        (h, gu) => Err(format!(
            "host-initiated: {}; guest-initiated: {}",
            h.unwrap_or_else(|e| format!("FAILED: {e}")),
            gu.unwrap_or_else(|e| format!("FAILED: {e}"))
        )),
    };
    Ok((result, end))
}

/// `vsock-driver-reload`: the guest's virtio transport unloaded (the echo listener killed
/// first) and loaded again; a new listener works.
fn reload(
    g: &mut Guest,
    uds: &Path,
    pos: usize,
) -> Result<(Result<String, String>, usize), String> {
    let c = g.console.clone();
    // Closed sockets may linger in the guest for a few seconds (the close handshake has a
    // timeout): rmmod is retried.
    g.send(
        b"[ -n \"$vs\" ] && kill $vs && wait $vs 2>/dev/null; \
          for i in $(seq 30); do rmmod vmw_vsock_virtio_transport 2>/dev/null && break; sleep 1; done; \
          echo vsrm-$((1+1))-$(grep -c '^vmw_vsock_virtio_transport ' /proc/modules)-end\n",
    )?;
    let Some((p, loaded)) = c.value_until_end("vsrm-2-", pos, RMMOD_LIMIT) else {
        return Ok((
            Err(format!(
                "no answer to the rmmod; console tail: {}",
                c.tail(1000)
            )),
            c.len(),
        ));
    };
    if loaded.trim() != "0" {
        return Ok((
            Err(format!(
                "vmw_vsock_virtio_transport still loaded after 30 rmmod tries; console tail: {}",
                c.tail(1000)
            )),
            p,
        ));
    }
    g.send(
        b"insmod /lib/modules/$(uname -r)/kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko; rc=$?; \
          echo vsins-$((1+1))-$rc,$(grep -c '^vmw_vsock_virtio_transport ' /proc/modules)-end\n",
    )?;
    let Some((p, inserted)) = c.value_until_end("vsins-2-", p, STEP_TIMEOUT) else {
        return Ok((
            Err(format!(
                "no answer to the insmod; console tail: {}",
                c.tail(1000)
            )),
            c.len(),
        ));
    };
    if inserted.trim() != "0,1" {
        return Ok((
            Err(format!(
                "insmod: exit status and loaded count {:?}, expected \"0,1\"; console tail: {}",
                inserted.trim(),
                c.tail(1000)
            )),
            p,
        ));
    }
    g.send(format!("tvm-vsock-guest echo {RELOAD_PORT} & vs=$!\n").as_bytes())?;
    let (p, _) = match guest_line(
        g,
        &format!("VSOCK-LISTENING port={RELOAD_PORT}"),
        p,
        STEP_TIMEOUT,
    ) {
        Ok(l) => l,
        Err(e) => return Ok((Err(format!("after the reload: {e}")), c.len())),
    };
    let result = echo_once(
        uds,
        RELOAD_PORT,
        3 << 20,
        RELOAD_BYTES,
        STEP_TIMEOUT,
        |_| {},
    )
    .map(|e| {
        format!(
            "rmmod and insmod of vmw_vsock_virtio_transport, then {}: 1 MiB echoed intact \
             through port {RELOAD_PORT}",
            e.answer
        )
    })
    .map_err(|e| format!("after the reload: {e}"));
    Ok((result, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for the VMM's side of a host-initiated connection: answers `CONNECT`
    /// with `OK 1073741824` and echoes until EOF, then shuts down its write side; or, with
    /// `refuse`, closes after the request.
    fn fake_vmm(refuse: bool) -> (PathBuf, thread::JoinHandle<()>) {
        let path = std::env::temp_dir().join(format!(
            "tvm-e2e-vsock-test-{}-{refuse}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        let h = thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while s.read(&mut b).expect("read") == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            assert!(line.starts_with(b"CONNECT "));
            if refuse {
                return;
            }
            s.write_all(b"OK 1073741824\n").expect("write");
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).expect("read") {
                    0 => break,
                    n => s.write_all(&buf[..n]).expect("write"),
                }
            }
            s.shutdown(Shutdown::Write).expect("shutdown");
        });
        (path, h)
    }

    #[test]
    fn an_echo_through_a_fake_vmm_matches() {
        let (path, h) = fake_vmm(false);
        let e = echo_once(
            &path,
            5000,
            1 << 20,
            1 << 20,
            Duration::from_secs(30),
            |_| {},
        )
        .expect("echo");
        assert_eq!(e.answer, "OK 1073741824");
        assert_eq!(e.hash, pattern_hash(1 << 20, 1 << 20));
        h.join().expect("fake vmm");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_refused_connect_is_seen() {
        let (path, h) = fake_vmm(true);
        let why = refused_host(&path).expect("refused");
        assert!(why.contains("no OK"), "{why}");
        h.join().expect("fake vmm");
        let (path2, h) = fake_vmm(true);
        let e = connect_guest(&path2, 7).expect_err("no OK");
        assert!(e.contains("ended"), "{e}");
        h.join().expect("fake vmm");
        for p in [path, path2] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn answers_and_fields() {
        assert!(is_ok_line("OK 1024"));
        assert!(!is_ok_line("OK"));
        assert!(!is_ok_line("ERR 1"));
        let v = " bytes=67108864 hash=00ff reply=hash=00ff ms=12 ";
        assert_eq!(field(v, "hash"), Some("00ff"));
        assert_eq!(field(v, "reply"), Some("hash=00ff"));
        assert_eq!(field(v, "bytes"), Some("67108864"));
        assert_eq!(field(v, "nope"), None);
        assert_eq!(
            listener_path(Path::new("/tmp/v.sock"), 5001),
            PathBuf::from("/tmp/v.sock_5001")
        );
        assert_eq!(vmm_arg(Path::new("/tmp/v.sock")), "cid=3,uds=/tmp/v.sock");
    }

    #[test]
    fn the_pattern_hash_is_that_of_the_stream() {
        let bytes: Vec<u8> = (5..5 + 200_000).map(stream_byte).collect();
        assert_eq!(pattern_hash(5, 200_000), fnv1a(FNV_START, &bytes));
    }
}
