// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Responses and their HTTP/1.1 wire form.

use std::io::Write;

use log::debug;

use crate::RequestError;

/// The `Content-Type` of a JSON body.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// The `Content-Type` of a plain-text body.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; charset=utf-8";

/// The interim response sent to a client that asked for `Expect: 100-continue`.
pub(crate) const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Header fields the server writes itself; the same names in [`Response::headers`] are
/// dropped.
const RESERVED_HEADERS: [&str; 4] = [
    "content-length",
    "content-type",
    "connection",
    "transfer-encoding",
];

/// A response from the handler.
///
/// The server always writes `Connection` and, except for 204 and 304, `Content-Length`; it
/// writes `Content-Type` when [`Response::content_type`] is set and the status may carry a
/// body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code, 200..=599; anything else is sent as 500.
    pub status: u16,
    /// The `Content-Type` header, for example [`CONTENT_TYPE_JSON`].
    pub content_type: Option<&'static str>,
    /// Extra header fields (`Allow`, `Deprecation`, ...). Fields with a name that is not an
    /// HTTP token, a value containing control characters, or a name the server writes itself
    /// are dropped.
    pub headers: Vec<(String, String)>,
    /// The body; ignored for 204 and 304, and not sent in answer to `HEAD`.
    pub body: Vec<u8>,
    /// Close the connection after this response.
    pub close: bool,
}

impl Response {
    /// A response with `status` and no body.
    pub fn new(status: u16) -> Self {
        Response {
            status,
            content_type: None,
            headers: Vec::new(),
            body: Vec::new(),
            close: false,
        }
    }

    /// `204 No Content`, what Firecracker answers to a successful `PUT`/`PATCH`.
    pub fn no_content() -> Self {
        Response::new(204)
    }

    /// A response with a JSON body (`Content-Type: application/json`).
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response {
            content_type: Some(CONTENT_TYPE_JSON),
            body: body.into(),
            ..Response::new(status)
        }
    }

    /// A response with a plain-text body.
    pub fn text(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response {
            content_type: Some(CONTENT_TYPE_TEXT),
            body: body.into(),
            ..Response::new(status)
        }
    }

    /// The suggested status of `err` with its message as a plain-text body, for callers that
    /// do not render errors themselves.
    pub fn from_error(err: &RequestError) -> Self {
        Response::text(err.status(), err.to_string())
    }

    /// Adds a header field.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Asks for the connection to be closed after this response.
    pub fn with_close(mut self) -> Self {
        self.close = true;
        self
    }
}

/// The standard reason phrase of `status` (RFC 9110 section 15), empty when unknown.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_field_value(s: &str) -> bool {
    s.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// Appends the wire form of `resp` to `out`.
///
/// `head_request`: the request was `HEAD`, so the body is left out (its length is still
/// announced). `keep_alive`: the connection stays open afterwards.
pub(crate) fn serialize(resp: &Response, head_request: bool, keep_alive: bool, out: &mut Vec<u8>) {
    let status = if (200..=599).contains(&resp.status) {
        resp.status
    } else {
        debug!("handler returned status {}, sending 500", resp.status);
        500
    };
    // RFC 9110 8.6 and 15.3.5: no Content-Length and no content in a 204 or 304.
    let has_body = !matches!(status, 204 | 304);
    let reason = if status == resp.status {
        reason_phrase(status)
    } else {
        reason_phrase(500)
    };
    // Writing to a Vec cannot fail.
    let _ = write!(out, "HTTP/1.1 {status} {reason}\r\n");
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let _ = write!(out, "Connection: {connection}\r\n");
    if has_body && status == resp.status {
        if let Some(content_type) = resp.content_type.filter(|c| is_field_value(c)) {
            let _ = write!(out, "Content-Type: {content_type}\r\n");
        }
    }
    for (name, value) in &resp.headers {
        let reserved = RESERVED_HEADERS
            .iter()
            .any(|r| r.eq_ignore_ascii_case(name));
        if reserved || !is_token(name) || !is_field_value(value) {
            debug!("dropping response header {name:?}");
            continue;
        }
        let _ = write!(out, "{name}: {value}\r\n");
    }
    let body: &[u8] = if has_body && status == resp.status {
        &resp.body
    } else {
        &[]
    };
    if has_body {
        let _ = write!(out, "Content-Length: {}\r\n", body.len());
    } else if !resp.body.is_empty() {
        debug!(
            "dropping the {} byte body of a {status} response",
            resp.body.len()
        );
    }
    out.extend_from_slice(b"\r\n");
    if !head_request {
        out.extend_from_slice(body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(resp: &Response, head: bool, keep_alive: bool) -> String {
        let mut out = Vec::new();
        serialize(resp, head, keep_alive, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_ok() {
        let resp = Response::json(200, r#"{"a":1}"#);
        assert_eq!(
            wire(&resp, false, true),
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Type: application/json\r\n\
             Content-Length: 7\r\n\r\n{\"a\":1}"
        );
    }

    #[test]
    fn no_content_has_no_length_and_no_body() {
        let mut resp = Response::no_content();
        resp.body = b"ignored".to_vec();
        resp.content_type = Some(CONTENT_TYPE_JSON);
        assert_eq!(
            wire(&resp, false, true),
            "HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n"
        );
    }

    #[test]
    fn empty_body_has_zero_length_and_close() {
        assert_eq!(
            wire(&Response::new(400), false, false),
            "HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        );
    }

    #[test]
    fn head_announces_the_length_without_the_body() {
        let resp = Response::text(200, "hello");
        let w = wire(&resp, true, true);
        assert!(w.ends_with("Content-Length: 5\r\n\r\n"), "{w}");
    }

    #[test]
    fn bad_status_becomes_500() {
        let resp = Response::json(99, "x");
        assert_eq!(
            wire(&resp, false, true),
            "HTTP/1.1 500 Internal Server Error\r\nConnection: keep-alive\r\n\
             Content-Length: 0\r\n\r\n"
        );
    }

    #[test]
    fn extra_headers_are_checked() {
        let resp = Response::new(200)
            .with_header("Deprecation", "true")
            .with_header("X-Evil", "a\r\nSet-Cookie: b")
            .with_header("Bad Name", "x")
            .with_header("content-length", "99");
        assert_eq!(
            wire(&resp, false, true),
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nDeprecation: true\r\n\
             Content-Length: 0\r\n\r\n"
        );
    }

    #[test]
    fn error_response_and_reasons() {
        let resp = Response::from_error(&RequestError::TransferEncoding);
        assert_eq!(resp.status, 411);
        assert_eq!(resp.content_type, Some(CONTENT_TYPE_TEXT));
        assert!(!resp.body.is_empty());
        assert_eq!(reason_phrase(413), "Content Too Large");
        assert_eq!(reason_phrase(599), "");
        let w = wire(&Response::new(599), false, true);
        assert!(w.starts_with("HTTP/1.1 599 \r\n"), "{w}");
        assert!(Response::new(200).with_close().close);
    }
}
