// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Requests, the protocol errors found while reading them, and the parsing of a request head
//! (request line and header fields) with `httparse`.

use std::time::Duration;

use crate::Limits;

/// Most header fields accepted in one request; more count as [`RequestError::HeadersTooLarge`].
pub(crate) const MAX_HEADERS: usize = 64;

/// A complete HTTP request, as handed to the handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method as sent (`GET`, `PUT`, `PATCH`, ...); methods are case-sensitive.
    pub method: String,
    /// The request target as sent, query string included (`/drives/rootfs?x=1`).
    pub path: String,
    /// The header fields in the order sent, values with surrounding blanks trimmed.
    pub headers: Vec<(String, String)>,
    /// The body: exactly `Content-Length` bytes, empty when there is none.
    pub body: Vec<u8>,
}

impl Request {
    /// The value of the first header field called `name` (compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Why bytes received on a connection could not become a [`Request`].
///
/// The server hands these to the handler instead of a request so that the caller renders the
/// error body; [`RequestError::status`] is the status this crate suggests. After any of them
/// the connection is closed once the response is written, because the server no longer knows
/// where the next request would start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The request line or a header field is not valid HTTP/1.x.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The request line names an HTTP version other than 1.0 and 1.1.
    #[error("unsupported http version {0}")]
    UnsupportedVersion(String),
    /// The request line and header fields are longer than [`Limits::max_header_bytes`] or
    /// there are more than 64 header fields.
    #[error("request headers exceed the limit of {limit} bytes or 64 fields")]
    HeadersTooLarge {
        /// [`Limits::max_header_bytes`].
        limit: usize,
    },
    /// `Content-Length` is larger than [`Limits::max_body`]; the body was not read.
    #[error("request payload with size {length} is larger than the limit of {limit} bytes")]
    BodyTooLarge {
        /// The announced `Content-Length`.
        length: u64,
        /// [`Limits::max_body`].
        limit: usize,
    },
    /// `Content-Length` is not a decimal number, or is sent twice with different values.
    #[error("invalid content-length header")]
    InvalidContentLength,
    /// The request has a `Transfer-Encoding` header (chunked bodies are not supported).
    #[error("transfer-encoding is not supported, send the body with a content-length")]
    TransferEncoding,
    /// The request was not complete within [`Limits::request_timeout`] of its first byte.
    #[error("request not completed within {0:?}")]
    Timeout(Duration),
    /// A client connected while [`Limits::max_connections`] busy connections were open.
    #[error("too many open connections")]
    TooManyConnections,
}

impl RequestError {
    /// The HTTP status this crate suggests for the error: 400 malformed or invalid
    /// `Content-Length`, 505 version, 431 headers, 413 body, 411 `Transfer-Encoding`,
    /// 408 timeout, 503 too many connections.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::Malformed(_) | RequestError::InvalidContentLength => 400,
            RequestError::UnsupportedVersion(_) => 505,
            RequestError::HeadersTooLarge { .. } => 431,
            RequestError::BodyTooLarge { .. } => 413,
            RequestError::TransferEncoding => 411,
            RequestError::Timeout(_) => 408,
            RequestError::TooManyConnections => 503,
        }
    }
}

/// The head of a request whose body may still be on its way.
#[derive(Debug)]
pub(crate) struct Head {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// Bytes taken by the request line and the header fields, final empty line included.
    pub header_len: usize,
    /// Body length from `Content-Length`, at most [`Limits::max_body`].
    pub content_length: usize,
    /// HTTP/1.1 with `Expect: 100-continue`.
    pub expect_continue: bool,
    /// Whether the connection stays open after the response (version and `Connection`).
    pub keep_alive: bool,
}

/// The result of looking for a complete head at the start of a buffer.
#[derive(Debug)]
pub(crate) enum HeadStatus {
    /// More bytes are needed.
    Partial,
    /// A head was found.
    Complete(Head),
}

/// Parses the request head at the start of `buf`.
pub(crate) fn parse_head(buf: &[u8], limits: &Limits) -> Result<HeadStatus, RequestError> {
    let too_large = RequestError::HeadersTooLarge {
        limit: limits.max_header_bytes,
    };
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let header_len = match req.parse(buf) {
        Ok(httparse::Status::Partial) => {
            if buf.len() > limits.max_header_bytes {
                return Err(too_large);
            }
            return Ok(HeadStatus::Partial);
        }
        Ok(httparse::Status::Complete(len)) => len,
        Err(httparse::Error::TooManyHeaders) => return Err(too_large),
        Err(httparse::Error::Version) => return Err(version_error(buf)),
        Err(e) => return Err(RequestError::Malformed(e.to_string())),
    };
    if header_len > limits.max_header_bytes {
        return Err(too_large);
    }
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Err(RequestError::Malformed("incomplete request line".into()));
    };

    let mut headers = Vec::with_capacity(req.headers.len());
    let mut content_length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    let mut expect_continue = false;
    for field in req.headers.iter() {
        let value = std::str::from_utf8(field.value)
            .map_err(|_| {
                RequestError::Malformed(format!("header {} is not valid utf-8", field.name))
            })?
            .trim_matches([' ', '\t']);
        let name = field.name;
        if name.eq_ignore_ascii_case("content-length") {
            let len = parse_content_length(value)?;
            if content_length.is_some_and(|prev| prev != len) {
                return Err(RequestError::InvalidContentLength);
            }
            content_length = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(|t| t.trim_matches([' ', '\t'])) {
                conn_close |= token.eq_ignore_ascii_case("close");
                conn_keep_alive |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue |= value.eq_ignore_ascii_case("100-continue");
        }
        headers.push((name.to_string(), value.to_string()));
    }
    if transfer_encoding {
        return Err(RequestError::TransferEncoding);
    }
    let length = content_length.unwrap_or(0);
    let content_length = match usize::try_from(length) {
        Ok(len) if len <= limits.max_body => len,
        _ => {
            return Err(RequestError::BodyTooLarge {
                length,
                limit: limits.max_body,
            })
        }
    };
    let http11 = version == 1;
    Ok(HeadStatus::Complete(Head {
        method: method.to_string(),
        path: path.to_string(),
        headers,
        header_len,
        content_length,
        // RFC 9110 10.1.1: a server ignores 100-continue from an HTTP/1.0 client.
        expect_continue: http11 && expect_continue,
        keep_alive: !conn_close && (http11 || conn_keep_alive),
    }))
}

/// `1*DIGIT`, nothing else (no sign, no blanks inside, no list).
fn parse_content_length(value: &str) -> Result<u64, RequestError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RequestError::InvalidContentLength);
    }
    value
        .parse::<u64>()
        .map_err(|_| RequestError::InvalidContentLength)
}

/// httparse reports any odd third token of the request line as a version error: tell a real
/// but unsupported `HTTP/x.y` (505) from a request line that is simply malformed (400).
fn version_error(buf: &[u8]) -> RequestError {
    let line_end = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
    let line = String::from_utf8_lossy(&buf[..line_end]);
    let line = line.trim_start_matches(['\r', '\n']).trim_end_matches('\r');
    let parts: Vec<&str> = line.split(' ').collect();
    if let [_, _, version] = parts.as_slice() {
        if let Some(number) = version.strip_prefix("HTTP/") {
            let well_formed = number.starts_with(|c: char| c.is_ascii_digit())
                && number.chars().all(|c| c.is_ascii_digit() || c == '.');
            if well_formed {
                return RequestError::UnsupportedVersion((*version).to_string());
            }
        }
    }
    RequestError::Malformed("invalid http version".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_body: 100,
            max_header_bytes: 200,
            ..Limits::default()
        }
    }

    fn head(buf: &[u8]) -> Result<Head, RequestError> {
        match parse_head(buf, &limits())? {
            HeadStatus::Complete(head) => Ok(head),
            HeadStatus::Partial => panic!("partial"),
        }
    }

    #[test]
    fn parses_a_put_head() {
        let h = head(b"PUT /drives/a?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length:  5 \r\n\r\nhello")
            .unwrap();
        assert_eq!(h.method, "PUT");
        assert_eq!(h.path, "/drives/a?x=1");
        assert_eq!(h.content_length, 5);
        assert_eq!(h.header_len, 60);
        assert!(h.keep_alive);
        assert!(!h.expect_continue);
        assert_eq!(
            h.headers,
            vec![
                ("Host".to_string(), "x".to_string()),
                ("Content-Length".to_string(), "5".to_string())
            ]
        );
    }

    #[test]
    fn partial_until_the_empty_line() {
        let l = limits();
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n", &l),
            Ok(HeadStatus::Partial)
        ));
        assert!(matches!(parse_head(b"GE", &l), Ok(HeadStatus::Partial)));
    }

    #[test]
    fn connection_header_and_version_decide_keep_alive() {
        assert!(
            !head(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n")
                .unwrap()
                .keep_alive
        );
        assert!(!head(b"GET / HTTP/1.0\r\n\r\n").unwrap().keep_alive);
        assert!(
            head(b"GET / HTTP/1.0\r\nConnection: foo, Keep-Alive\r\n\r\n")
                .unwrap()
                .keep_alive
        );
    }

    #[test]
    fn expect_continue_only_for_http11() {
        let h = head(b"PUT / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n");
        assert!(h.unwrap().expect_continue);
        let h = head(b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
        assert!(!h.unwrap().expect_continue);
    }

    #[test]
    fn content_length_errors() {
        for bad in ["-1", "+1", "1 2", "0x10", "", "99999999999999999999999"] {
            let req = format!("PUT / HTTP/1.1\r\nContent-Length: {bad}\r\n\r\n");
            assert_eq!(
                head(req.as_bytes()).unwrap_err(),
                RequestError::InvalidContentLength,
                "{bad:?}"
            );
        }
        let two = b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(head(two).unwrap_err(), RequestError::InvalidContentLength);
        let same = b"PUT / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(head(same).unwrap().content_length, 2);
    }

    #[test]
    fn body_limit_is_inclusive() {
        let ok = head(b"PUT / HTTP/1.1\r\nContent-Length: 100\r\n\r\n").unwrap();
        assert_eq!(ok.content_length, 100);
        assert_eq!(
            head(b"PUT / HTTP/1.1\r\nContent-Length: 101\r\n\r\n").unwrap_err(),
            RequestError::BodyTooLarge {
                length: 101,
                limit: 100
            }
        );
    }

    #[test]
    fn transfer_encoding_refused() {
        let req = b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(head(req).unwrap_err(), RequestError::TransferEncoding);
    }

    #[test]
    fn versions() {
        assert_eq!(
            head(b"GET / HTTP/2.0\r\n\r\n").unwrap_err(),
            RequestError::UnsupportedVersion("HTTP/2.0".into())
        );
        assert!(matches!(
            head(b"GET /a b HTTP/1.1\r\n\r\n").unwrap_err(),
            RequestError::Malformed(_)
        ));
        assert!(matches!(
            head(b"GET / FOO/1.1\r\n\r\n").unwrap_err(),
            RequestError::Malformed(_)
        ));
    }

    #[test]
    fn malformed_and_too_large() {
        assert!(matches!(
            head(b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n").unwrap_err(),
            RequestError::Malformed(_)
        ));
        assert!(matches!(
            head(b"GET / HTTP/1.1\r\nX: \xff\xfe\r\n\r\n").unwrap_err(),
            RequestError::Malformed(_)
        ));
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(200));
        assert_eq!(
            head(long.as_bytes()).unwrap_err(),
            RequestError::HeadersTooLarge { limit: 200 }
        );
        // Still incomplete but already over the limit.
        let partial = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(200));
        assert_eq!(
            parse_head(partial.as_bytes(), &limits()).unwrap_err(),
            RequestError::HeadersTooLarge { limit: 200 }
        );
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("H{i}: v\r\n"));
        }
        many.push_str("\r\n");
        let big = Limits {
            max_header_bytes: 8192,
            ..limits()
        };
        assert_eq!(
            parse_head(many.as_bytes(), &big).unwrap_err(),
            RequestError::HeadersTooLarge { limit: 8192 }
        );
    }

    #[test]
    fn header_lookup_is_case_insensitive() {
        let req = Request {
            method: "GET".into(),
            path: "/".into(),
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: Vec::new(),
        };
        assert_eq!(req.header("content-type"), Some("application/json"));
        assert_eq!(req.header("accept"), None);
    }

    #[test]
    fn suggested_statuses() {
        assert_eq!(RequestError::Malformed(String::new()).status(), 400);
        assert_eq!(RequestError::InvalidContentLength.status(), 400);
        assert_eq!(
            RequestError::UnsupportedVersion(String::new()).status(),
            505
        );
        assert_eq!(RequestError::HeadersTooLarge { limit: 1 }.status(), 431);
        assert_eq!(
            RequestError::BodyTooLarge {
                length: 2,
                limit: 1
            }
            .status(),
            413
        );
        assert_eq!(RequestError::TransferEncoding.status(), 411);
        assert_eq!(RequestError::Timeout(Duration::from_secs(1)).status(), 408);
        assert_eq!(RequestError::TooManyConnections.status(), 503);
    }
}
