// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A small, bounded HTTP/1.1 server over a Unix domain socket, for a VMM's
//! Firecracker-compatible control API.
//!
//! What it does:
//! - [`Server::bind`] creates the socket file with mode 0600 from the start, refuses a path
//!   that exists, and removes the socket again when the [`Server`] is dropped.
//! - [`Server::serve`] runs a single-threaded epoll loop over the listener, a stop fd and
//!   every connection, all non-blocking, and hands each complete [`Request`] to a handler,
//!   one at a time in arrival order, then writes the handler's [`Response`]. Keep-alive,
//!   pipelining, `Connection: close` and `Expect: 100-continue` work as curl and the
//!   Firecracker Go and Python SDKs expect.
//! - Protocol errors ([`RequestError`]: malformed request, headers or body too large,
//!   `Transfer-Encoding`, unsupported version, a request that stalls, too many connections)
//!   reach the same handler as `Err`, so the caller renders them in its own error format.
//! - Every connection is bounded: at most [`Limits::max_header_bytes`] +
//!   [`Limits::max_body`] bytes buffered, at most one response waiting to be written, and
//!   [`Limits::request_timeout`] for a request to arrive or a response to be taken.
//!
//! What it does not do: JSON, routing, chunked bodies, TLS, HTTP/2, or threads. Request
//! line and header fields are parsed by [`httparse`].
//!
//! # Example
//!
//! ```
//! use std::io::{Read, Write};
//! use std::os::unix::net::UnixStream;
//!
//! use tvm_http::{Limits, Response, Server};
//!
//! # let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
//! # let path = dir.as_path().join("api.sock");
//! let mut server = Server::bind(&path, Limits::default()).unwrap();
//! let (stop, stop_rx) = UnixStream::pair().unwrap();
//! let thread = std::thread::spawn(move || {
//!     let mut handler = |req: Result<tvm_http::Request, tvm_http::RequestError>| match req {
//!         Ok(req) if req.method == "GET" => Response::json(200, r#"{"state":"Running"}"#),
//!         Ok(_) => Response::no_content(),
//!         Err(e) => Response::from_error(&e),
//!     };
//!     server.serve(&mut handler, &stop_rx).unwrap();
//! });
//!
//! let mut client = UnixStream::connect(&path).unwrap();
//! client
//!     .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
//!     .unwrap();
//! let mut answer = String::new();
//! client.read_to_string(&mut answer).unwrap();
//! assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"));
//! assert!(answer.ends_with(r#"{"state":"Running"}"#));
//!
//! (&stop).write_all(&[1]).unwrap();
//! thread.join().unwrap();
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::io;
use std::path::PathBuf;
use std::time::Duration;

mod conn;
mod request;
mod response;
mod server;
mod socket;

pub use request::{Request, RequestError};
pub use response::{reason_phrase, Response, CONTENT_TYPE_JSON, CONTENT_TYPE_TEXT};
pub use server::{Handler, Server};

/// Default [`Limits::max_body`]: Firecracker's `--http-api-max-payload-size` default.
pub const DEFAULT_MAX_BODY: usize = 51_200;

/// Default [`Limits::max_header_bytes`].
pub const DEFAULT_MAX_HEADER_BYTES: usize = 8 * 1024;

/// Default [`Limits::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Default [`Limits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;

/// Smallest accepted [`Limits::max_header_bytes`].
pub const MIN_HEADER_BYTES: usize = 64;

/// What one client may cost the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted `Content-Length`; a larger one is answered with
    /// [`RequestError::BodyTooLarge`] before any of the body is read.
    pub max_body: usize,
    /// Largest request line plus header fields, final empty line included.
    pub max_header_bytes: usize,
    /// How long a request may take from its first byte to its last, and how long pending
    /// output may wait for the client to read it. A stalled request is answered with
    /// [`RequestError::Timeout`] and the connection closed; a client that does not read is
    /// dropped.
    pub request_timeout: Duration,
    /// How long a keep-alive connection with nothing in flight may stay open; `None` keeps
    /// it until the client closes it or its slot is needed for a new client.
    pub idle_timeout: Option<Duration>,
    /// Most open connections. When all are in use, a new client takes the slot of the one
    /// idle longest, or is answered with [`RequestError::TooManyConnections`] when none is
    /// idle.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: DEFAULT_MAX_BODY,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            idle_timeout: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl Limits {
    fn validate(&self) -> Result<()> {
        if self.max_header_bytes < MIN_HEADER_BYTES {
            return Err(Error::InvalidLimits("max_header_bytes is below 64"));
        }
        if self.max_header_bytes.checked_add(self.max_body).is_none() {
            return Err(Error::InvalidLimits(
                "max_header_bytes + max_body overflows usize",
            ));
        }
        if self.max_connections == 0 {
            return Err(Error::InvalidLimits("max_connections is 0"));
        }
        if self.request_timeout.is_zero() {
            return Err(Error::InvalidLimits("request_timeout is 0"));
        }
        Ok(())
    }

    /// Most bytes buffered for one connection: one full request.
    pub(crate) fn read_cap(&self) -> usize {
        self.max_header_bytes.saturating_add(self.max_body)
    }
}

/// Errors of [`Server::bind`] and [`Server::serve`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something already exists at the socket path.
    #[error("socket path {} already exists", .0.display())]
    PathExists(PathBuf),
    /// The socket path is longer than the 107 bytes `sun_path` holds.
    #[error("socket path {} is longer than 107 bytes", .0.display())]
    PathTooLong(PathBuf),
    /// The socket path has no file name (`/` or ending in `..`).
    #[error("socket path {} has no file name", .0.display())]
    InvalidPath(PathBuf),
    /// Looking at the socket path failed.
    #[error("failed to inspect {}", path.display())]
    StatPath {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Creating the private directory the socket is bound in failed.
    #[error("failed to create a private directory in {}", path.display())]
    CreateTempDir {
        /// The directory it was to be created in.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Binding the socket failed.
    #[error("failed to bind the socket for {}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Setting mode 0600 on the socket failed.
    #[error("failed to set mode 0600 on the socket for {}", path.display())]
    SetPermissions {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Moving the socket to its path failed.
    #[error("failed to move the socket to {}", path.display())]
    Publish {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Making the listening socket non-blocking failed.
    #[error("failed to configure the listening socket")]
    ConfigureListener(#[source] io::Error),
    /// A limit is unusable.
    #[error("invalid http limits: {0}")]
    InvalidLimits(&'static str),
    /// Creating the epoll set or adding a descriptor to it failed.
    #[error("failed to set up epoll")]
    Epoll(#[source] io::Error),
    /// `epoll_wait` failed.
    #[error("failed to wait for http events")]
    Wait(#[source] io::Error),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
