//! `tvm-vsock-guest`: the guest side of the vsock checks, run inside the test guest by the
//! e2e driver (busybox has no AF_VSOCK). Built static and appended to the initramfs by
//! xtask, like `tvm-iobench`.
//!
//! ```text
//! tvm-vsock-guest echo PORT         listen on PORT; every connection gets back what it
//!                                   sends, then EOF once it sent EOF (one thread each)
//! tvm-vsock-guest send PORT BYTES   connect to the host (CID 2) on PORT, send BYTES of
//!                                   tvm_tests::stream_byte, shut down the write side, read
//!                                   the host's answer to EOF
//! tvm-vsock-guest connect PORT      connect to the host on PORT and report the outcome
//! tvm-vsock-guest sink PORT         listen on PORT; every connection is read to EOF, then
//!                                   answered `count=<bytes>` and closed (one thread each)
//! tvm-vsock-guest blast PORT BYTES CONNS
//!                                   CONNS connections to the host on PORT at once, each
//!                                   sending BYTES zero bytes, shutting down its write side
//!                                   and reading the answer to EOF (for benchmarks)
//! ```
//!
//! Each command prints one line ending in ` end`: `VSOCK-LISTENING port=P end` once
//! listening; `VSOCK-SEND port=P bytes=N hash=H reply=TEXT ms=T end`;
//! `VSOCK-CONNECT port=P result=ok|errno=E end`; `VSOCK-BLAST port=P bytes=N conns=C
//! ms=T replies=R end` (T from the first connect to the last answer, R the answers joined
//! by `;`); or `VSOCK-ERROR <why> end` (exit 1).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::Instant;

use tvm_tests::{fnv1a, stream_byte, FNV_START};

/// The host's context id.
const HOST_CID: u32 = 2;

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value of it.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn vsock_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the result is checked before it is owned.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(ret: libc::c_int) -> std::io::Result<()> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn addr_len() -> libc::socklen_t {
    std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t
}

fn connect(port: u32) -> std::io::Result<File> {
    let sock = vsock_socket()?;
    let addr = vsock_addr(HOST_CID, port);
    use std::os::fd::AsRawFd;
    // SAFETY: `addr` is a valid sockaddr_vm of the length given, alive for the call.
    check(unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            addr_len(),
        )
    })?;
    Ok(File::from(sock))
}

fn shutdown_write(f: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown(2) on a descriptor `f` owns; no pointers.
    check(unsafe { libc::shutdown(f.as_raw_fd(), libc::SHUT_WR) })
}

/// Copies what the peer sends back to it until EOF, then shuts down the write side.
fn echo_one(mut conn: File) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    let _ = shutdown_write(&conn);
}

/// Reads to EOF, answers `count=<bytes>` and closes.
fn sink_one(mut conn: File) {
    let mut buf = vec![0u8; 64 << 10];
    let mut count = 0u64;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => count += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    let _ = conn.write_all(format!("count={count}").as_bytes());
}

/// `count` connections at once to the host's `port`, each sending `bytes` zero bytes.
fn blast(port: u32, bytes: u64, conns: u64) -> Result<String, String> {
    let start = Instant::now();
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            std::thread::spawn(move || -> Result<String, String> {
                let mut conn = connect(port).map_err(|e| format!("connect to port {port}: {e}"))?;
                let buf = vec![0u8; 64 << 10];
                let mut sent = 0u64;
                while sent < bytes {
                    let n = (bytes - sent).min(buf.len() as u64) as usize;
                    conn.write_all(&buf[..n])
                        .map_err(|e| format!("write at {sent}: {e}"))?;
                    sent += n as u64;
                }
                shutdown_write(&conn).map_err(|e| format!("shutdown: {e}"))?;
                let mut reply = String::new();
                conn.read_to_string(&mut reply)
                    .map_err(|e| format!("reading the reply: {e}"))?;
                Ok(reply.trim().to_string())
            })
        })
        .collect();
    let mut replies = Vec::new();
    for t in threads {
        replies.push(t.join().map_err(|_| "a sender panicked".to_string())??);
    }
    Ok(format!(
        "VSOCK-BLAST port={port} bytes={bytes} conns={conns} ms={} replies={} end",
        start.elapsed().as_millis(),
        replies.join(";")
    ))
}

fn echo(port: u32) -> Result<(), String> {
    serve(port, echo_one)
}

fn sink(port: u32) -> Result<(), String> {
    serve(port, sink_one)
}

/// Listens on `port` and hands every connection to `handle` on a thread of its own.
fn serve(port: u32, handle: fn(File)) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let sock = vsock_socket().map_err(|e| format!("socket: {e}"))?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: `addr` is a valid sockaddr_vm of the length given, alive for the call.
    check(unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            addr_len(),
        )
    })
    .map_err(|e| format!("bind port {port}: {e}"))?;
    // SAFETY: listen(2) on a descriptor we own; no pointers.
    check(unsafe { libc::listen(sock.as_raw_fd(), 128) }).map_err(|e| format!("listen: {e}"))?;
    println!("VSOCK-LISTENING port={port} end");
    loop {
        // SAFETY: accept4(2) with null address pointers is allowed; the result is checked.
        let fd = unsafe {
            libc::accept4(
                sock.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("accept: {e}"));
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let conn = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        std::thread::spawn(move || handle(conn));
    }
}

fn send(port: u32, bytes: u64) -> Result<String, String> {
    let start = Instant::now();
    let mut conn = connect(port).map_err(|e| format!("connect to port {port}: {e}"))?;
    let mut hash = FNV_START;
    let mut buf = vec![0u8; 64 << 10];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(buf.len() as u64) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = stream_byte(sent + i as u64);
        }
        hash = fnv1a(hash, &buf[..n]);
        conn.write_all(&buf[..n])
            .map_err(|e| format!("write at {sent}: {e}"))?;
        sent += n as u64;
    }
    shutdown_write(&conn).map_err(|e| format!("shutdown: {e}"))?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply)
        .map_err(|e| format!("reading the reply: {e}"))?;
    Ok(format!(
        "VSOCK-SEND port={port} bytes={bytes} hash={hash:016x} reply={} ms={} end",
        reply.trim(),
        start.elapsed().as_millis()
    ))
}

fn try_connect(port: u32) -> String {
    let result = match connect(port) {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("errno={}", e.raw_os_error().unwrap_or(0)),
    };
    format!("VSOCK-CONNECT port={port} result={result} end")
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize| -> Result<u64, String> {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("argument {i} is not a number"))
    };
    let port = |i: usize| num(i).and_then(|p| u32::try_from(p).map_err(|e| e.to_string()));
    let result = match args.first().map(String::as_str) {
        Some("echo") => port(1).and_then(echo).map(|()| String::new()),
        Some("send") => port(1).and_then(|p| send(p, num(2)?)),
        Some("connect") => port(1).map(try_connect),
        Some("sink") => port(1).and_then(sink).map(|()| String::new()),
        Some("blast") => port(1).and_then(|p| blast(p, num(2)?, num(3)?)),
        _ => Err(
            "usage: tvm-vsock-guest echo PORT | send PORT BYTES | connect PORT | sink PORT | \
             blast PORT BYTES CONNS"
                .into(),
        ),
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            println!("VSOCK-ERROR {why} end");
            ExitCode::from(1)
        }
    }
}
