// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The server end to end: a real socket in a temporary directory, the server on a thread
//! stopped through a socket pair, std `UnixStream` clients. Every wait is bounded.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vmm_sys_util::tempdir::TempDir;

use super::*;

/// Upper bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

type Item = std::result::Result<Request, RequestError>;
type Log = Arc<Mutex<Vec<Item>>>;

fn echo(item: &Item) -> Response {
    match item {
        Ok(req) => {
            let mut body = format!("{} {} ", req.method, req.path).into_bytes();
            body.extend_from_slice(&req.body);
            Response::json(200, body)
        }
        Err(e) => Response::from_error(e),
    }
}

struct Harness {
    dir: TempDir,
    path: PathBuf,
    stop: UnixStream,
    done: Receiver<(Server, Result<()>)>,
    log: Log,
}

impl Harness {
    fn start(limits: Limits) -> Harness {
        Harness::with_handler(limits, echo)
    }

    fn with_handler(limits: Limits, mut f: impl FnMut(&Item) -> Response + Send + 'static) -> Self {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("api.sock");
        let mut server = Server::bind(&path, limits).unwrap();
        let (stop, stop_rx) = UnixStream::pair().unwrap();
        let log: Log = Arc::default();
        let thread_log = log.clone();
        let (tx, done) = mpsc::channel();
        thread::spawn(move || {
            let mut handler = |item: Item| {
                let response = f(&item);
                thread_log.lock().unwrap().push(item);
                response
            };
            let result = server.serve(&mut handler, &stop_rx);
            let _ = tx.send((server, result));
        });
        Harness {
            dir,
            path,
            stop,
            done,
            log,
        }
    }

    fn client(&self) -> Client {
        Client::connect(&self.path)
    }

    fn log(&self) -> Vec<Item> {
        self.log.lock().unwrap().clone()
    }

    /// Stops the server and returns it, failing if `serve` does not return within `within`.
    fn stop_within(&self, within: Duration) -> Server {
        (&self.stop).write_all(&[1]).unwrap();
        let (server, result) = self
            .done
            .recv_timeout(within)
            .expect("serve did not return after the stop fd became readable");
        result.unwrap();
        server
    }

    fn stop(&self) -> Server {
        self.stop_within(WAIT)
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(path: &std::path::Path) -> Client {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_write_timeout(Some(WAIT)).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// A parsed reply from what is buffered, if a whole one is there.
    fn parse(&mut self) -> Option<Reply> {
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut fields);
        let httparse::Status::Complete(head_len) = resp.parse(&self.buf).unwrap() else {
            return None;
        };
        let status = resp.code.unwrap();
        let headers: Vec<(String, String)> = resp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8(h.value.to_vec()).unwrap(),
                )
            })
            .collect();
        let mut reply = Reply {
            status,
            headers,
            body: Vec::new(),
        };
        let len: usize = reply
            .header("content-length")
            .map(|v| v.parse().unwrap())
            .unwrap_or(0);
        if self.buf.len() < head_len + len {
            return None;
        }
        reply.body = self.buf[head_len..head_len + len].to_vec();
        self.buf.drain(..head_len + len);
        Some(reply)
    }

    /// Reads one whole reply, interim ones included.
    fn reply(&mut self) -> Reply {
        loop {
            if let Some(reply) = self.parse() {
                return reply;
            }
            let mut chunk = [0u8; 16384];
            let n = self
                .stream
                .read(&mut chunk)
                .expect("no reply within the timeout");
            assert!(
                n > 0,
                "connection closed before a whole reply: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Asserts that the server closed the connection with nothing more to read.
    fn assert_closed(&mut self) {
        assert!(self.buf.is_empty(), "unread bytes: {:?}", self.buf);
        let mut chunk = [0u8; 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => {}
            // The server closed without reading all we sent.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Ok(n) => panic!(
                "unexpected bytes {:?}",
                String::from_utf8_lossy(&chunk[..n])
            ),
            Err(e) => panic!("connection still open: {e}"),
        }
    }

    /// True when the server has neither closed the connection nor sent anything.
    fn is_open_and_quiet(&self) -> bool {
        self.stream.set_nonblocking(true).unwrap();
        let mut chunk = [0u8; 1];
        let result = (&self.stream).read(&mut chunk);
        self.stream.set_nonblocking(false).unwrap();
        matches!(result, Err(e) if e.kind() == ErrorKind::WouldBlock)
    }
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").into_bytes()
}

fn put(path: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

fn short_timeouts(request_timeout: Duration) -> Limits {
    Limits {
        request_timeout,
        ..Limits::default()
    }
}

#[test]
fn get_and_put_with_a_body() {
    let h = Harness::start(Limits::default());
    let mut c = h.client();
    c.send(b"GET /machine-config HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n");
    let r = c.reply();
    assert_eq!(r.status, 200);
    assert_eq!(r.body_str(), "GET /machine-config ");
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert_eq!(r.header("Connection"), Some("keep-alive"));

    let body = br#"{"drive_id": "rootfs", "is_read_only": false}"#;
    c.send(&put("/drives/rootfs?x=1", body));
    let r = c.reply();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        [b"PUT /drives/rootfs?x=1 ".as_slice(), body.as_slice()].concat()
    );
    assert_eq!(r.header("Content-Length"), Some("68"));

    h.stop();
    let log = h.log();
    assert_eq!(log.len(), 2);
    let req = log[1].as_ref().unwrap();
    assert_eq!(req.method, "PUT");
    assert_eq!(req.path, "/drives/rootfs?x=1");
    assert_eq!(req.body, body);
    assert_eq!(req.header("host"), Some("localhost"));
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(req.headers.len(), 3);
}

#[test]
fn keep_alive_serves_two_requests_on_one_connection() {
    let h = Harness::start(Limits::default());
    let mut c = h.client();
    c.send(&get("/one"));
    assert_eq!(c.reply().body_str(), "GET /one ");
    c.send(&put("/two", b"{}"));
    assert_eq!(c.reply().body_str(), "PUT /two {}");
    assert!(c.is_open_and_quiet());
    let server = h.stop();
    assert_eq!(server.connection_count(), 1);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let h = Harness::start(Limits::default());
    let mut c = h.client();
    let mut all = get("/a");
    all.extend(put("/b", b"{\"b\":1}"));
    all.extend(get("/c"));
    all.extend(put("/d", b""));
    c.send(&all);
    let bodies: Vec<String> = (0..4).map(|_| c.reply().body_str().to_string()).collect();
    assert_eq!(
        bodies,
        ["GET /a ", "PUT /b {\"b\":1}", "GET /c ", "PUT /d "]
    );
    h.stop();
    let paths: Vec<String> = h.log().into_iter().map(|item| item.unwrap().path).collect();
    assert_eq!(paths, ["/a", "/b", "/c", "/d"]);
}

#[test]
fn requests_from_several_clients_are_handled_in_arrival_order() {
    let h = Harness::with_handler(Limits::default(), |item| {
        if item.as_ref().is_ok_and(|req| req.path == "/slow") {
            thread::sleep(Duration::from_millis(500));
        }
        echo(item)
    });
    let mut clients: Vec<Client> = ["/b0", "/c0", "/d0"]
        .iter()
        .map(|path| {
            let mut c = h.client();
            c.send(&get(path));
            assert_eq!(c.reply().status, 200);
            c
        })
        .collect();
    let mut a = h.client();
    a.send(&get("/slow"));
    thread::sleep(Duration::from_millis(100));
    // Sent while the handler is busy, in the opposite order of the connections.
    for (c, path) in clients.iter_mut().rev().zip(["/d", "/c", "/b"]) {
        c.send(&get(path));
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(a.reply().status, 200);
    for c in &mut clients {
        assert_eq!(c.reply().status, 200);
    }
    h.stop();
    let paths: Vec<String> = h.log().into_iter().map(|item| item.unwrap().path).collect();
    assert_eq!(paths, ["/b0", "/c0", "/d0", "/slow", "/d", "/c", "/b"]);
}

#[test]
fn connection_close_is_honoured() {
    let h = Harness::with_handler(Limits::default(), |item| {
        let req = item.as_ref().unwrap();
        if req.path == "/bye" {
            Response::no_content().with_close()
        } else {
            echo(item)
        }
    });
    // Asked by the client; what follows on the connection is ignored.
    let mut c = h.client();
    let mut req = b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec();
    req.extend(get("/ignored"));
    c.send(&req);
    let r = c.reply();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Connection"), Some("close"));
    c.assert_closed();

    // HTTP/1.0 closes unless asked otherwise.
    let mut c = h.client();
    c.send(b"GET /old HTTP/1.0\r\n\r\n");
    assert_eq!(c.reply().header("Connection"), Some("close"));
    c.assert_closed();
    let mut c = h.client();
    c.send(b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(c.reply().header("Connection"), Some("keep-alive"));
    assert!(c.is_open_and_quiet());

    // Asked by the handler.
    let mut c = h.client();
    c.send(&get("/bye"));
    let r = c.reply();
    assert_eq!(r.status, 204);
    assert_eq!(r.header("Connection"), Some("close"));
    c.assert_closed();

    h.stop();
    let paths: Vec<String> = h.log().into_iter().map(|item| item.unwrap().path).collect();
    assert_eq!(paths, ["/x", "/old", "/old", "/bye"]);
}

#[test]
fn no_content_has_no_length_and_keeps_the_connection() {
    let h = Harness::with_handler(Limits::default(), |item| match item {
        Ok(req) if req.method == "PUT" => Response::no_content(),
        other => echo(other),
    });
    let mut c = h.client();
    c.send(&put("/actions", br#"{"action_type": "InstanceStart"}"#));
    let r = c.reply();
    assert_eq!(r.status, 204);
    assert_eq!(r.header("Content-Length"), None);
    assert_eq!(r.header("Content-Type"), None);
    assert!(r.body.is_empty());
    // Framing is intact: the next reply parses right after it.
    c.send(&get("/"));
    assert_eq!(c.reply().body_str(), "GET / ");
    h.stop();
}

#[test]
fn body_of_exactly_max_body_and_one_byte_more() {
    let limits = Limits::default();
    assert_eq!(limits.max_body, 51_200);
    let h = Harness::start(limits);

    let mut c = h.client();
    let body = vec![b'x'; 51_200];
    c.send(&put("/full", &body));
    let r = c.reply();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), "PUT /full ".len() + 51_200);

    let mut c = h.client();
    c.send(&put("/over", &vec![b'x'; 51_201]));
    let r = c.reply();
    assert_eq!(r.status, 413);
    assert_eq!(r.header("Connection"), Some("close"));
    assert!(r.body_str().contains("51201"), "{}", r.body_str());
    c.assert_closed();

    h.stop();
    let log = h.log();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].as_ref().unwrap().body.len(), 51_200);
    assert_eq!(
        log[1],
        Err(RequestError::BodyTooLarge {
            length: 51_201,
            limit: 51_200
        })
    );
}

#[test]
fn one_mib_body_is_refused_and_the_server_survives() {
    let h = Harness::start(Limits::default());
    let mut c = h.client();
    c.send(b"PUT /drives/big HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n");
    let writer = c.stream.try_clone().unwrap();
    // The server stops reading, so this write fails or blocks until the server closes.
    let sender = thread::spawn(move || (&writer).write_all(&vec![b'y'; 1 << 20]).is_ok());
    let r = c.reply();
    assert_eq!(r.status, 413);
    c.assert_closed();
    assert!(!sender.join().unwrap(), "the server read the whole body");

    // With Expect: 100-continue the refusal comes instead of the 100.
    let mut c = h.client();
    c.send(b"PUT /x HTTP/1.1\r\nContent-Length: 1048576\r\nExpect: 100-continue\r\n\r\n");
    assert_eq!(c.reply().status, 413);
    c.assert_closed();

    let mut c = h.client();
    c.send(&get("/after"));
    assert_eq!(c.reply().body_str(), "GET /after ");
    h.stop();
    assert!(matches!(
        h.log()[..],
        [
            Err(RequestError::BodyTooLarge {
                length: 1_048_576,
                ..
            }),
            Err(RequestError::BodyTooLarge {
                length: 1_048_576,
                ..
            }),
            Ok(_)
        ]
    ));
}

#[test]
fn headers_too_large() {
    // A long timeout: the refusal must not wait for it.
    let h = Harness::start(short_timeouts(Duration::from_secs(60)));
    let mut c = h.client();
    let req = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(9000));
    c.send(req.as_bytes());
    let r = c.reply();
    assert_eq!(r.status, 431);
    c.assert_closed();

    // Never finished: refused as soon as the limit is passed.
    let mut c = h.client();
    c.send(format!("GET / HTTP/1.1\r\nX-Big: {}", "a".repeat(8200)).as_bytes());
    assert_eq!(c.reply().status, 431);
    c.assert_closed();

    let mut c = h.client();
    c.send(&get("/after"));
    assert_eq!(c.reply().status, 200);
    h.stop();
    let log = h.log();
    assert_eq!(log[0], Err(RequestError::HeadersTooLarge { limit: 8192 }));
    assert_eq!(log[1], Err(RequestError::HeadersTooLarge { limit: 8192 }));
}

#[test]
fn stalled_request_is_closed_while_others_are_served() {
    let timeout = Duration::from_millis(1500);
    let h = Harness::start(short_timeouts(timeout));

    let mut idle = h.client();
    idle.send(&get("/idle"));
    assert_eq!(idle.reply().status, 200);

    let start = Instant::now();
    let mut stalled = h.client();
    stalled.send(b"PUT /drives/a HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc");
    let mut headers_only = h.client();
    headers_only.send(b"GET / HTTP/1.1\r\nHost: localh");

    // Others are served meanwhile.
    let mut other = h.client();
    other.send(&get("/other"));
    assert_eq!(other.reply().body_str(), "GET /other ");
    assert!(
        start.elapsed() < timeout,
        "another client waited {:?} for the stalled ones",
        start.elapsed()
    );
    assert!(stalled.is_open_and_quiet());

    for client in [&mut stalled, &mut headers_only] {
        let r = client.reply();
        assert_eq!(r.status, 408);
        client.assert_closed();
    }
    let elapsed = start.elapsed();
    assert!(elapsed >= timeout, "closed after {elapsed:?}");
    assert!(elapsed < timeout + Duration::from_secs(5), "{elapsed:?}");

    // An idle keep-alive connection outlives the request timeout.
    idle.send(&get("/idle-again"));
    assert_eq!(idle.reply().body_str(), "GET /idle-again ");

    h.stop();
    let timeouts = h
        .log()
        .iter()
        .filter(|i| **i == Err(RequestError::Timeout(timeout)))
        .count();
    assert_eq!(timeouts, 2);
}

#[test]
fn idle_timeout_closes_idle_connections() {
    let limits = Limits {
        idle_timeout: Some(Duration::from_millis(300)),
        ..Limits::default()
    };
    let h = Harness::start(limits);
    let mut c = h.client();
    c.send(&get("/"));
    assert_eq!(c.reply().status, 200);
    // Closed without a reply once idle long enough (bounded by the read timeout).
    c.assert_closed();
    h.stop();
}

#[test]
fn client_disconnecting_mid_request_is_forgotten() {
    let h = Harness::start(Limits::default());
    let mut gone = h.client();
    gone.send(b"PUT /drives/a HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"partial\":");
    drop(gone);
    let mut gone = h.client();
    gone.send(b"GET /half");
    drop(gone);

    let mut c = h.client();
    c.send(b"GET /next HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(c.reply().body_str(), "GET /next ");
    c.assert_closed();

    let server = h.stop();
    assert_eq!(server.connection_count(), 0);
    let log = h.log();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].as_ref().unwrap().path, "/next");
}

#[test]
fn half_closed_client_still_gets_its_replies() {
    let h = Harness::start(Limits::default());
    let mut c = h.client();
    let mut reqs = get("/a");
    reqs.extend(put("/b", b"1"));
    c.send(&reqs);
    c.stream.shutdown(Shutdown::Write).unwrap();
    assert_eq!(c.reply().body_str(), "GET /a ");
    assert_eq!(c.reply().body_str(), "PUT /b 1");
    c.assert_closed();
    h.stop();
}

#[test]
fn expect_100_continue() {
    let h = Harness::start(Limits::default());
    let mut c = h.client();
    c.send(
        b"PUT /drives/a HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\
          Expect: 100-continue\r\n\r\n",
    );
    let r = c.reply();
    assert_eq!(r.status, 100);
    assert!(r.headers.is_empty());
    c.send(b"hello");
    let r = c.reply();
    assert_eq!(r.status, 200);
    assert_eq!(r.body_str(), "PUT /drives/a hello");
    // No 100 without a body.
    c.send(b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n");
    assert_eq!(c.reply().status, 200);
    h.stop();
}

#[test]
fn chunked_bodies_are_refused() {
    let h = Harness::start(Limits::default());
    let mut c = h.client();
    c.send(b"PUT /drives/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    let r = c.reply();
    assert_eq!(r.status, 411);
    assert_eq!(r.header("Connection"), Some("close"));
    c.assert_closed();
    h.stop();
    assert_eq!(h.log(), [Err(RequestError::TransferEncoding)]);
}

#[test]
fn malformed_requests_and_versions() {
    let h = Harness::start(Limits::default());
    let cases: [(&[u8], u16); 4] = [
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
        (b"GET / HTTP/1.1\r\nBad Header: 1\r\n\r\n", 400),
        (b"PUT / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n", 400),
    ];
    for (req, status) in cases {
        let mut c = h.client();
        c.send(req);
        assert_eq!(
            c.reply().status,
            status,
            "{:?}",
            String::from_utf8_lossy(req)
        );
        c.assert_closed();
    }
    h.stop();
    let log = h.log();
    assert_eq!(log.len(), 4);
    assert!(log.iter().all(|item| item.is_err()), "{log:?}");
}

#[test]
fn head_gets_the_length_without_the_body() {
    let h = Harness::start(Limits::default());
    let mut c = h.client();
    c.send(b"HEAD /x HTTP/1.1\r\n\r\n");
    // Read the head only: a HEAD reply announces a length it does not send.
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(c.stream.read(&mut byte).unwrap(), 1);
        got.push(byte[0]);
    }
    let head = String::from_utf8(got).unwrap();
    assert!(head.contains("Content-Length: 8\r\n"), "{head}");
    c.send(&get("/y"));
    assert_eq!(c.reply().body_str(), "GET /y ");
    h.stop();
}

#[test]
fn many_clients_at_once() {
    let h = Harness::start(Limits::default());
    let clients: Vec<_> = (0..40)
        .map(|i| {
            let path = h.path.clone();
            thread::spawn(move || {
                let mut c = Client::connect(&path);
                for j in 0..5 {
                    let body = format!("{{\"client\":{i},\"n\":{j}}}");
                    c.send(&put(&format!("/c{i}"), body.as_bytes()));
                    let r = c.reply();
                    assert_eq!(r.status, 200);
                    assert_eq!(r.body_str(), format!("PUT /c{i} {body}"));
                }
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    h.stop();
    assert_eq!(h.log().len(), 200);
}

#[test]
fn full_server_evicts_idle_connections_then_refuses() {
    let limits = Limits {
        max_connections: 2,
        ..Limits::default()
    };
    let h = Harness::start(limits);
    let mut a = h.client();
    a.send(&get("/a"));
    assert_eq!(a.reply().status, 200);
    let mut b = h.client();
    b.send(&get("/b"));
    assert_eq!(b.reply().status, 200);

    // A third client takes the slot of the longest idle one.
    let mut c = h.client();
    c.send(&get("/c"));
    assert_eq!(c.reply().status, 200);
    a.assert_closed();
    b.send(&get("/b2"));
    assert_eq!(b.reply().status, 200);

    // Both busy with a request in progress: refused.
    b.send(b"GET /b3 HTTP/1.1\r\n");
    c.send(b"GET /c2 HTTP/1.1\r\n");
    let mut d = h.client();
    let r = d.reply();
    assert_eq!(r.status, 503);
    d.assert_closed();

    b.send(b"\r\n");
    assert_eq!(b.reply().body_str(), "GET /b3 ");
    let server = h.stop();
    assert_eq!(server.connection_count(), 2);
    assert!(h.log().contains(&Err(RequestError::TooManyConnections)));
}

#[test]
fn client_that_never_reads_is_bounded_and_dropped() {
    let timeout = Duration::from_millis(500);
    let big = 2 << 20;
    let h = Harness::with_handler(short_timeouts(timeout), move |item| match item {
        Ok(req) if req.path == "/big" => Response::json(200, vec![b'z'; big]),
        other => echo(other),
    });
    let mut c = h.client();
    let flood: Vec<u8> = get("/big").repeat(20_000);
    let writer = c.stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let _ = (&writer).write_all(&flood);
    });

    // Others are served meanwhile.
    thread::sleep(timeout / 2);
    let mut other = h.client();
    other.send(&get("/other"));
    assert_eq!(other.reply().status, 200);

    // Dropped after the timeout, with only part of the output ever queued.
    thread::sleep(timeout * 3);
    let mut received = 0;
    loop {
        let mut chunk = [0u8; 65536];
        match c.stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                received += n;
                if received >= 2 * big {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("connection still open: {e}"),
        }
    }
    sender.join().unwrap();
    assert!(received < big, "received {received} bytes");
    let server = h.stop();
    let handled = h.log().len();
    // The first /big, maybe a second if the first fit the socket buffer, and /other.
    assert!(handled <= 3, "handler called {handled} times");
    assert_eq!(server.connection_count(), 1);
}

#[test]
fn stop_fd_ends_serve_promptly() {
    let h = Harness::start(Limits::default());
    let mut busy = h.client();
    busy.send(b"PUT /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n");
    let mut idle = h.client();
    idle.send(&get("/"));
    assert_eq!(idle.reply().status, 200);
    let start = Instant::now();
    let server = h.stop_within(Duration::from_secs(2));
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(server.connection_count(), 2);
    // A stop fd that is already readable returns at once.
    let mut server = server;
    let (stop, stop_rx) = UnixStream::pair().unwrap();
    (&stop).write_all(&[1]).unwrap();
    let mut handler = |item: Item| echo(&item);
    server.serve(&mut handler, &stop_rx).unwrap();
}

#[test]
fn socket_file_mode_and_removal() {
    let h = Harness::start(Limits::default());
    let meta = std::fs::symlink_metadata(&h.path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    // A second server on the same path is refused, naming it.
    let err = Server::bind(&h.path, Limits::default()).unwrap_err();
    assert!(matches!(err, Error::PathExists(_)));
    assert!(err.to_string().contains(h.path.to_str().unwrap()));
    let server = h.stop();
    assert_eq!(server.path(), h.path);
    assert!(h.path.exists());
    drop(server);
    assert!(
        std::fs::symlink_metadata(&h.path).is_err(),
        "socket left behind"
    );
    assert!(std::fs::read_dir(h.dir.as_path()).unwrap().next().is_none());
}

#[test]
fn invalid_limits_are_refused() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("api.sock");
    for limits in [
        Limits {
            max_connections: 0,
            ..Limits::default()
        },
        Limits {
            max_header_bytes: 10,
            ..Limits::default()
        },
        Limits {
            max_body: usize::MAX,
            ..Limits::default()
        },
        Limits {
            request_timeout: Duration::ZERO,
            ..Limits::default()
        },
    ] {
        assert!(matches!(
            Server::bind(&path, limits),
            Err(Error::InvalidLimits(_))
        ));
        assert!(!path.exists());
    }
}
