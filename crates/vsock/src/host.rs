// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The host side's Unix sockets: the listener at `uds_path` (bound, made non-blocking,
//! removed on drop), the `CONNECT <port>` line host processes send it, and the
//! non-blocking connect to `<uds_path>_<port>` for guest-initiated connections.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::{debug, warn};

use crate::{Error, Result};

/// Most bytes of a `CONNECT <port>\n` line, newline included; a longer line closes the
/// host connection.
pub const MAX_CONNECT_LINE: usize = 32;

/// Bytes of `sun_path` a path may use (108 with the terminating NUL, as std requires).
const MAX_SUN_PATH: usize = 107;

/// Longest suffix `_<port>` added to `uds_path` for a guest-initiated connection.
const MAX_PORT_SUFFIX: usize = "_4294967295".len();

/// Longest `uds_path` accepted, in bytes: every `<uds_path>_<port>` must fit a
/// `sockaddr_un`.
pub const MAX_UDS_PATH_LEN: usize = MAX_SUN_PATH - MAX_PORT_SUFFIX;

/// The path a guest connect to host port `port` goes to: `<base>_<port>`.
pub(crate) fn port_path(base: &Path, port: u32) -> PathBuf {
    let mut s = OsString::from(base.as_os_str());
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Parses a host connection's first line, `CONNECT <port>\n` (the word in any case, one or
/// more spaces or tabs, a decimal `u32`, an optional `\r` before the newline).
pub(crate) fn parse_connect(line: &[u8]) -> std::result::Result<u32, &'static str> {
    let line = line
        .strip_suffix(b"\n")
        .ok_or("the line does not end with a newline")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = std::str::from_utf8(line).map_err(|_| "the line is not text")?;
    let mut words = line.split([' ', '\t']).filter(|w| !w.is_empty());
    if !words
        .next()
        .is_some_and(|w| w.eq_ignore_ascii_case("CONNECT"))
    {
        return Err("the line does not start with CONNECT");
    }
    let port = words.next().ok_or("no port after CONNECT")?;
    if words.next().is_some() {
        return Err("more than a port after CONNECT");
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err("the port is not a decimal number");
    }
    port.parse().map_err(|_| "the port is above 4294967295")
}

/// Connects a non-blocking stream socket to the Unix socket at `path`. For a Unix socket
/// the connect completes or fails at once: EAGAIN when the listener's backlog is full,
/// ECONNREFUSED or ENOENT when nobody listens. It never blocks the caller.
pub(crate) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    if bytes.is_empty() || bytes.len() > MAX_SUN_PATH || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // Family, path, terminating NUL: at most the size of sockaddr_un.
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2): an open descriptor nothing else owns or
    // closes.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is an initialised sockaddr_un that lives until connect(2) returns,
    // `len` is at most its size, and connect(2) only reads it; `sock` is an open socket.
    let ret = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(sock))
}

/// The listening socket at `uds_path`, removed from the filesystem when dropped (if it is
/// still the one we bound).
#[derive(Debug)]
pub(crate) struct UdsHost {
    path: PathBuf,
    listener: UnixListener,
    /// Device and inode of the socket file we created.
    ident: (u64, u64),
}

impl UdsHost {
    /// Binds a non-blocking listener at `path`, which must not exist.
    ///
    /// # Errors
    ///
    /// [`Error::UdsPathTooLong`], [`Error::UdsPathExists`] (never removed: it may be
    /// someone else's), [`Error::BindUds`].
    pub(crate) fn bind(path: &Path) -> Result<UdsHost> {
        let len = path.as_os_str().len();
        if len == 0 || len > MAX_UDS_PATH_LEN {
            return Err(Error::UdsPathTooLong {
                path: path.to_path_buf(),
                len,
            });
        }
        if path.symlink_metadata().is_ok() {
            return Err(Error::UdsPathExists(path.to_path_buf()));
        }
        let listener = UnixListener::bind(path).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                Error::UdsPathExists(path.to_path_buf())
            } else {
                Error::BindUds(path.to_path_buf(), e)
            }
        })?;
        let ident = match path.symlink_metadata() {
            Ok(m) => (m.dev(), m.ino()),
            Err(e) => {
                // Ours, just created: not left behind.
                if let Err(e) = std::fs::remove_file(path) {
                    debug!("vsock: failed to remove {}: {e}", path.display());
                }
                return Err(Error::BindUds(path.to_path_buf(), e));
            }
        };
        // From here on, dropping `host` removes the file.
        let host = UdsHost {
            path: path.to_path_buf(),
            listener,
            ident,
        };
        host.listener
            .set_nonblocking(true)
            .map_err(|e| Error::BindUds(path.to_path_buf(), e))?;
        Ok(host)
    }

    /// The listener's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The listener.
    pub(crate) fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Connects to the host listener for port `port`, `<uds_path>_<port>`.
    pub(crate) fn connect(&self, port: u32) -> io::Result<UnixStream> {
        connect_nonblocking(&port_path(&self.path, port))
    }
}

impl Drop for UdsHost {
    fn drop(&mut self) {
        match self.path.symlink_metadata() {
            Ok(m) if (m.dev(), m.ino()) == self.ident => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!("vsock: failed to remove {}: {e}", self.path.display());
                }
            }
            Ok(_) => debug!(
                "vsock: {} was replaced by another file: left alone",
                self.path.display()
            ),
            Err(e) => debug!("vsock: {} is already gone: {e}", self.path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::{Read, Write};

    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52\n"), Ok(52));
        assert_eq!(parse_connect(b"connect   1234\r\n"), Ok(1234));
        assert_eq!(parse_connect(b"CONNECT 4294967295\n"), Ok(u32::MAX));
        assert_eq!(parse_connect(b"Connect\t0\n"), Ok(0));
        for bad in [
            &b"CONNECT 52"[..],
            b"CONNECT\n",
            b"CONNECT 4294967296\n",
            b"CONNECT -1\n",
            b"CONNECT +1\n",
            b"CONNECT 0x10\n",
            b"CONNECT 1 2\n",
            b"CONNECTX 1\n",
            b"LISTEN 1\n",
            b"\n",
            b"CONNECT \xff\n",
        ] {
            assert!(parse_connect(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn port_paths() {
        assert_eq!(
            port_path(Path::new("/run/v.sock"), 52),
            Path::new("/run/v.sock_52")
        );
    }

    #[test]
    fn bind_refuses_an_existing_path_and_cleans_up_its_own() {
        let dir = TempDir::new_with_prefix("/tmp/tvm-vsock-host").unwrap();
        let path = dir.as_path().join("v.sock");
        let host = UdsHost::bind(&path).unwrap();
        assert!(path.exists());
        assert!(matches!(
            UdsHost::bind(&path),
            Err(Error::UdsPathExists(p)) if p == path
        ));
        drop(host);
        assert!(!path.exists());
        // Someone else's file is left alone.
        std::fs::write(&path, b"mine").unwrap();
        let e = UdsHost::bind(&path).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"mine");
        // A socket we bound but someone replaced is not removed either.
        std::fs::remove_file(&path).unwrap();
        let host = UdsHost::bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"new").unwrap();
        drop(host);
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        // Too long for a port suffix.
        let long = dir.as_path().join("x".repeat(MAX_UDS_PATH_LEN));
        assert!(matches!(
            UdsHost::bind(&long),
            Err(Error::UdsPathTooLong { .. })
        ));
    }

    #[test]
    fn nonblocking_connect_succeeds_or_fails_at_once() {
        let dir = TempDir::new_with_prefix("/tmp/tvm-vsock-host").unwrap();
        let base = dir.as_path().join("v.sock");
        let e = connect_nonblocking(&port_path(&base, 52)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let listener = UnixListener::bind(port_path(&base, 52)).unwrap();
        let mut s = connect_nonblocking(&port_path(&base, 52)).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        s.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        peer.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        // Non-blocking: nothing to read is EAGAIN, not a wait.
        let e = s.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        // Nobody listening any more.
        drop(listener);
        let e = connect_nonblocking(&port_path(&base, 52)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        assert!(connect_nonblocking(Path::new("")).is_err());
    }
}
