//! `vsock-bench`: stream throughput over vsock both ways, with one connection and with
//! [`MANY_CONNS`] at once, and the VMM's peak RSS, for our VMM (Firecracker's hybrid vsock:
//! a Unix socket on the host) against QEMU with `vhost-vsock-pci` (the in-kernel vhost
//! device: AF_VSOCK on the host), interleaved `--runs` times.
//!
//! The guest side is `tvm-vsock-guest` in the bench initramfs: `sink` for host-to-guest
//! (the guest counts and answers `count=N`), `blast` for guest-to-host (the host counts and
//! answers). Each direction moves `--vsock-mib` MiB in all, split evenly over the
//! connections. Host-to-guest is timed on the host from the first connect to the last
//! answer; guest-to-host in the guest, from its first connect to the last answer: both
//! include connection set-up, both VMMs are timed the same way.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use super::{
    join_within, keep, peak_rss_kib, print_medians, qemu_command, vmm_command, Guest, MedianRow,
    Opts, Runner,
};

/// The guest's context id, for both VMMs.
const GUEST_CID: u32 = 3;
/// The guest's sink listener.
const SINK_PORT: u32 = 6000;
/// The host's listener for guest-to-host.
const BLAST_PORT: u32 = 6001;
/// The connection count of the many-connection runs.
const MANY_CONNS: u64 = 8;
/// Read and write timeout of every host socket: no call waits longer.
const IO_LIMIT: Duration = Duration::from_secs(60);
/// Limit for one transfer, every connection included.
const TRANSFER_LIMIT: Duration = Duration::from_secs(600);

/// How the host reaches the guest.
#[derive(Clone)]
enum HostSide {
    /// Ours: `CONNECT <port>` on the device's Unix socket; the guest reaches `<uds>_<port>`.
    Hybrid(PathBuf),
    /// vhost-vsock: AF_VSOCK to the guest's CID; the guest reaches our AF_VSOCK listener.
    Vhost,
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value of it.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn vsock_socket() -> Result<OwnedFd, String> {
    // SAFETY: socket(2) takes no pointers; the result is checked before it is owned.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os_err("socket(AF_VSOCK)"));
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

const VM_ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// Read and write timeouts of [`IO_LIMIT`] on any socket.
fn limit_io(f: &File) -> Result<(), String> {
    let tv = libc::timeval {
        tv_sec: IO_LIMIT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: `tv` is a valid timeval of the length given, alive for the call.
        let rc = unsafe {
            libc::setsockopt(
                f.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(os_err("setsockopt"));
        }
    }
    Ok(())
}

fn shutdown_write(f: &File) {
    // SAFETY: shutdown(2) on a descriptor `f` owns; no pointers.
    unsafe { libc::shutdown(f.as_raw_fd(), libc::SHUT_WR) };
}

impl HostSide {
    /// A stream to the guest's listener on `port`.
    fn connect(&self, port: u32) -> Result<File, String> {
        let f = match self {
            HostSide::Hybrid(uds) => {
                let s = UnixStream::connect(uds).map_err(|e| format!("connect {uds:?}: {e}"))?;
                let mut f = File::from(OwnedFd::from(s));
                limit_io(&f)?;
                f.write_all(format!("CONNECT {port}\n").as_bytes())
                    .map_err(|e| format!("CONNECT: {e}"))?;
                // The answer, byte by byte: nothing of the stream may be read with it.
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while line.last() != Some(&b'\n') && line.len() < 32 {
                    match f.read(&mut b) {
                        Ok(1) => line.push(b[0]),
                        _ => break,
                    }
                }
                if !line.starts_with(b"OK ") {
                    return Err(format!(
                        "CONNECT {port}: answered {:?}",
                        String::from_utf8_lossy(&line)
                    ));
                }
                return Ok(f);
            }
            HostSide::Vhost => {
                let sock = vsock_socket()?;
                let addr = vsock_addr(GUEST_CID, port);
                // SAFETY: `addr` is a valid sockaddr_vm of the length given.
                let rc = unsafe {
                    libc::connect(
                        sock.as_raw_fd(),
                        (&addr as *const libc::sockaddr_vm).cast(),
                        VM_ADDR_LEN,
                    )
                };
                if rc < 0 {
                    return Err(os_err(&format!("connect to cid {GUEST_CID} port {port}")));
                }
                File::from(sock)
            }
        };
        limit_io(&f)?;
        Ok(f)
    }

    /// A listener for the guest's connections to the host's `port`.
    fn listen(&self, port: u32) -> Result<Listener, String> {
        match self {
            HostSide::Hybrid(uds) => {
                let mut name = uds.clone().into_os_string();
                name.push(format!("_{port}"));
                let path = PathBuf::from(name);
                let _ = std::fs::remove_file(&path);
                let l = UnixListener::bind(&path).map_err(|e| format!("bind {path:?}: {e}"))?;
                Ok(Listener::Unix(l, path))
            }
            HostSide::Vhost => {
                let sock = vsock_socket()?;
                let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
                // SAFETY: `addr` is a valid sockaddr_vm of the length given.
                let rc = unsafe {
                    libc::bind(
                        sock.as_raw_fd(),
                        (&addr as *const libc::sockaddr_vm).cast(),
                        VM_ADDR_LEN,
                    )
                };
                if rc < 0 {
                    return Err(os_err(&format!("bind vsock port {port}")));
                }
                // SAFETY: listen(2) on a descriptor we own; no pointers.
                if unsafe { libc::listen(sock.as_raw_fd(), 64) } < 0 {
                    return Err(os_err("listen"));
                }
                Ok(Listener::Vsock(sock))
            }
        }
    }
}

/// A host listener; a Unix one removes its socket file when dropped.
enum Listener {
    Unix(UnixListener, PathBuf),
    Vsock(OwnedFd),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Listener {
    /// The next connection, waiting at most `limit`.
    fn accept(&self, limit: Duration) -> Result<File, String> {
        let fd = match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Vsock(s) => s.as_raw_fd(),
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = limit.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `pfd` is one valid pollfd, alive for the call.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            return Err(format!("no connection from the guest within {limit:?}"));
        }
        // SAFETY: accept4(2) with null address pointers is allowed; the result is checked.
        let c = unsafe {
            libc::accept4(
                fd,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            return Err(os_err("accept"));
        }
        // SAFETY: `c` is a new descriptor nothing else owns.
        let f = File::from(unsafe { OwnedFd::from_raw_fd(c) });
        limit_io(&f)?;
        Ok(f)
    }
}

/// Reads `f` to EOF; returns the byte count.
fn drain(f: &mut File) -> Result<u64, String> {
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => n += k as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read after {n} bytes: {e}")),
        }
    }
}

/// Host to guest: `conns` connections to the guest's sink at once, `bytes` each; returns
/// MiB/s from the first connect to the last answer.
fn host_to_guest(host: &HostSide, bytes: u64, conns: u64) -> Result<f64, String> {
    let start = Instant::now();
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            let host = host.clone();
            thread::spawn(move || -> Result<(), String> {
                let mut f = host.connect(SINK_PORT)?;
                let buf = vec![0u8; 256 << 10];
                let mut sent = 0u64;
                while sent < bytes {
                    let n = (bytes - sent).min(buf.len() as u64) as usize;
                    f.write_all(&buf[..n])
                        .map_err(|e| format!("write at {sent}: {e}"))?;
                    sent += n as u64;
                }
                shutdown_write(&f);
                let mut answer = String::new();
                f.read_to_string(&mut answer)
                    .map_err(|e| format!("reading the answer: {e}"))?;
                if answer.trim() != format!("count={bytes}") {
                    return Err(format!(
                        "the guest answered {answer:?}, expected count={bytes}"
                    ));
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        join_within(t, TRANSFER_LIMIT).ok_or("a host-to-guest connection did not finish")??;
    }
    Ok((bytes * conns) as f64 / f64::from(1 << 20) / start.elapsed().as_secs_f64())
}

/// Guest to host: the guest's `blast` with `conns` connections of `bytes` each to our
/// listener; returns MiB/s as the guest timed it.
fn guest_to_host(
    g: &mut Guest,
    host: &HostSide,
    bytes: u64,
    conns: u64,
    pos: usize,
) -> Result<(f64, usize), String> {
    let listener = host.listen(BLAST_PORT)?;
    g.send(format!("tvm-vsock-guest blast {BLAST_PORT} {bytes} {conns}\n").as_bytes())?;
    let server = thread::spawn(move || -> Result<(), String> {
        let mut readers = Vec::new();
        for _ in 0..conns {
            let mut f = listener.accept(Duration::from_secs(60))?;
            readers.push(thread::spawn(move || -> Result<(), String> {
                let n = drain(&mut f)?;
                f.write_all(format!("count={n}").as_bytes())
                    .map_err(|e| format!("answer: {e}"))
            }));
        }
        for r in readers {
            join_within(r, TRANSFER_LIMIT).ok_or("a guest-to-host reader did not finish")??;
        }
        drop(listener);
        Ok(())
    });
    let line = super::vsock::guest_line(g, "VSOCK-BLAST ", pos, TRANSFER_LIMIT);
    let served = join_within(server, Duration::from_secs(30)).ok_or("the host side hung")?;
    let (at, line) = line.map_err(|e| format!("{e} (host side: {served:?})"))?;
    served?;
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_string)
    };
    let ms: f64 = field("ms=")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no ms= in {line:?}"))?;
    let want = vec![format!("count={bytes}"); conns as usize].join(";");
    if field("replies=").as_deref() != Some(want.as_str()) {
        return Err(format!("the host did not count every byte: {line:?}"));
    }
    Ok((
        (bytes * conns) as f64 / f64::from(1 << 20) / (ms / 1000.0),
        at,
    ))
}

/// One guest's figures: host->guest and guest->host MiB/s with 1 and with [`MANY_CONNS`]
/// connections, and peak RSS in KiB.
type VsockFigures = [f64; 5];

fn bench_one(
    cmd: Command,
    runner: Runner,
    host: &HostSide,
    o: &Opts,
) -> Result<VsockFigures, String> {
    let what = runner.name();
    let mut g = Guest::spawn(cmd, runner, o.verbose)?;
    let result = (|| {
        let (_, pos) = g.ready_at_prompt(what)?;
        g.send(format!("tvm-vsock-guest sink {SINK_PORT} &\n").as_bytes())?;
        let (mut pos, _) = super::vsock::guest_line(
            &g,
            &format!("VSOCK-LISTENING port={SINK_PORT}"),
            pos,
            Duration::from_secs(60),
        )
        .map_err(|e| format!("{what}: the sink did not start: {e}"))?;
        let total = o.vsock_mib << 20;
        let mut f = [0.0; 5];
        for (i, conns) in [1, MANY_CONNS].into_iter().enumerate() {
            f[i * 2] = host_to_guest(host, total / conns, conns)
                .map_err(|e| format!("{what}: host to guest, {conns} connection(s): {e}"))?;
            let (rate, at) = guest_to_host(&mut g, host, total / conns, conns, pos)
                .map_err(|e| format!("{what}: guest to host, {conns} connection(s): {e}"))?;
            f[i * 2 + 1] = rate;
            pos = at;
        }
        f[4] = peak_rss_kib(g.child.id()).unwrap_or(0) as f64;
        println!(
            "BENCH-VSOCK {what}: host->guest {:.1} MiB/s, guest->host {:.1} MiB/s; with {MANY_CONNS} connections {:.1} and {:.1} MiB/s; peak RSS {} KiB",
            f[0], f[1], f[2], f[3], f[4]
        );
        Ok(f)
    })();
    if result.is_err() {
        g.print_diag();
    }
    g.reboot_or_kill()?;
    result
}

/// The Unix socket of our VMM's device, unique to this run.
fn uds_path() -> PathBuf {
    std::env::temp_dir().join(format!("tvm-vsock-bench-{}.sock", std::process::id()))
}

fn remove_stale(uds: &Path) {
    let _ = std::fs::remove_file(uds);
}

/// `vsock-bench`: see the module documentation.
pub fn vsock_bench(o: &Opts) -> Result<bool, String> {
    let qemu = o.qemu.clone().ok_or("vsock-bench needs --qemu")?;
    if !Path::new("/dev/vhost-vsock").exists() {
        return Err(
            "/dev/vhost-vsock is missing (load vhost_vsock): QEMU's peer device needs it".into(),
        );
    }
    let uds = uds_path();
    let mut ours = Vec::new();
    let mut peer = Vec::new();
    for run in 0..o.runs {
        println!("BENCH-VSOCK run {run}");
        remove_stale(&uds);
        let mut cmd = vmm_command(o);
        cmd.args(["--vsock", &format!("cid={GUEST_CID},uds={}", uds.display())]);
        keep(
            "BENCH-VSOCK",
            bench_one(cmd, Runner::Vmm, &HostSide::Hybrid(uds.clone()), o),
            &mut ours,
        );
        remove_stale(&uds);
        let mut q = qemu_command(&qemu, o, None)?;
        q.args(["-device", &format!("vhost-vsock-pci,guest-cid={GUEST_CID}")]);
        keep(
            "BENCH-VSOCK",
            bench_one(q, Runner::Qemu, &HostSide::Vhost, o),
            &mut peer,
        );
    }
    if ours.is_empty() || peer.is_empty() {
        return Err("no complete sample for one of the two".into());
    }
    let rows: [MedianRow<VsockFigures>; 5] = [
        ("vsock-host-to-guest-1-conn", "MiB/s", |f| f[0]),
        ("vsock-guest-to-host-1-conn", "MiB/s", |f| f[1]),
        ("vsock-host-to-guest-8-conns", "MiB/s", |f| f[2]),
        ("vsock-guest-to-host-8-conns", "MiB/s", |f| f[3]),
        ("peak-rss", "KiB", |f| f[4]),
    ];
    print_medians("BENCH-VSOCK", &rows, &ours, &peer);
    Ok(true)
}
