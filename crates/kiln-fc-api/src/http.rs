//! A minimal HTTP/1.1 message layer: just what the Firecracker API needs.
//!
//! Requests: request line + headers + an optional `Content-Length` body (no chunked transfer
//! encoding, as in Firecracker's micro_http). Responses: a status, an optional JSON body.
//! Everything a peer sends is bounded: the head by [`MAX_HEAD_SIZE`], the body by the caller's
//! payload limit, checked against `Content-Length` *before* the body is read.

use std::fmt;
use std::io::{self, Read, Write};

/// Largest accepted request/response head (request line + headers), in bytes.
pub const MAX_HEAD_SIZE: usize = 8 * 1024;

/// Most headers accepted in one message.
pub const MAX_HEADERS: usize = 64;

/// The HTTP methods the Firecracker API uses, plus anything else a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    /// GET.
    Get,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
    /// Any other token (POST, DELETE, ...): parsed so that routing can name it in its error.
    Other(String),
}

impl Method {
    /// The method as sent on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Other(s) => s,
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            other => Method::Other(other.to_string()),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Status codes the API answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusCode {
    /// 100, interim answer to `Expect: 100-continue`.
    Continue,
    /// 200, a GET with a JSON body.
    Ok,
    /// 204, a successful PUT/PATCH.
    NoContent,
    /// 400, anything wrong with the request or refused by the VMM.
    BadRequest,
    /// 404, e.g. `GET /mmds` before any data was put.
    NotFound,
    /// 413, e.g. the MMDS data store limit.
    PayloadTooLarge,
    /// 500, the handler failed unexpectedly.
    InternalServerError,
    /// 501.
    NotImplemented,
    /// 503.
    ServiceUnavailable,
}

impl StatusCode {
    /// Numeric code.
    pub fn as_u16(self) -> u16 {
        match self {
            StatusCode::Continue => 100,
            StatusCode::Ok => 200,
            StatusCode::NoContent => 204,
            StatusCode::BadRequest => 400,
            StatusCode::NotFound => 404,
            StatusCode::PayloadTooLarge => 413,
            StatusCode::InternalServerError => 500,
            StatusCode::NotImplemented => 501,
            StatusCode::ServiceUnavailable => 503,
        }
    }

    /// Reason phrase.
    pub fn reason(self) -> &'static str {
        match self {
            StatusCode::Continue => "Continue",
            StatusCode::Ok => "OK",
            StatusCode::NoContent => "No Content",
            StatusCode::BadRequest => "Bad Request",
            StatusCode::NotFound => "Not Found",
            StatusCode::PayloadTooLarge => "Payload Too Large",
            StatusCode::InternalServerError => "Internal Server Error",
            StatusCode::NotImplemented => "Not Implemented",
            StatusCode::ServiceUnavailable => "Service Unavailable",
        }
    }
}

/// HTTP version of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0: the connection closes after the response unless `Connection: keep-alive`.
    Http10,
    /// HTTP/1.1: keep-alive unless `Connection: close`.
    Http11,
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Method.
    pub method: Method,
    /// Absolute path, query string removed (`http://host/path` forms are reduced to `/path`).
    pub path: String,
    /// Version.
    pub version: Version,
    /// Declared body length (0 when absent).
    pub content_length: usize,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// `Expect: 100-continue` was sent.
    pub expect_continue: bool,
}

/// A complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The head.
    pub head: RequestHead,
    /// The body; `None` when `Content-Length` was absent or 0.
    pub body: Option<Vec<u8>>,
}

/// Why a request could not be read. Every variant except `Io`/`Closed*` gets a 400 answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The peer closed the connection between requests (normal end of a connection).
    #[error("connection closed")]
    Closed,
    /// The peer closed the connection in the middle of a request.
    #[error("connection closed in the middle of a request")]
    ClosedMidRequest,
    /// Reading or writing the socket failed.
    #[error("socket error")]
    Io(#[source] io::Error),
    /// The head is not valid HTTP/1.x.
    #[error("{0}")]
    Malformed(String),
    /// The head exceeds [`MAX_HEAD_SIZE`] or [`MAX_HEADERS`].
    #[error("Request headers are larger than the limit of {MAX_HEAD_SIZE} bytes allowed by server.")]
    HeadTooLarge,
    /// `Content-Length` exceeds the server's payload limit (Firecracker's wording).
    #[error("Request payload with size {size} is larger than the limit of {limit} allowed by server.")]
    PayloadTooLarge {
        /// Declared size.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

impl HttpError {
    /// Whether the peer should get a 400 answer (rather than just being disconnected).
    pub fn is_bad_request(&self) -> bool {
        matches!(self, HttpError::Malformed(_) | HttpError::HeadTooLarge | HttpError::PayloadTooLarge { .. })
    }
}

fn malformed(msg: impl Into<String>) -> HttpError {
    HttpError::Malformed(msg.into())
}

fn is_token_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// Parses a request head (everything before the blank line, without it).
pub fn parse_request_head(head: &[u8], max_payload: usize) -> Result<RequestHead, HttpError> {
    let head = std::str::from_utf8(head).map_err(|_| malformed("Invalid request: not UTF-8."))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && !t.is_empty() => (m, t, v),
        _ => return Err(malformed("Invalid request line.")),
    };
    if !method.bytes().all(is_token_char) {
        return Err(malformed("Invalid HTTP Method."));
    }
    let version = match version {
        "HTTP/1.1" => Version::Http11,
        "HTTP/1.0" => Version::Http10,
        _ => return Err(malformed("Invalid HTTP Version: Unsupported HTTP version.")),
    };
    let path = parse_target(target)?;

    let mut content_length: Option<usize> = None;
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    let mut expect_continue = false;
    for (n, line) in lines.enumerate() {
        if n >= MAX_HEADERS {
            return Err(HttpError::HeadTooLarge);
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            return Err(malformed("Invalid header: folded header lines are not supported."));
        }
        let (name, value) = line.split_once(':').ok_or_else(|| malformed("Invalid header: missing ':'."))?;
        if name.is_empty() || !name.bytes().all(is_token_char) {
            return Err(malformed("Invalid header name."));
        }
        let value = value.trim_matches(|c| c == ' ' || c == '\t');
        if value.bytes().any(|c| c.is_ascii_control() && c != b'\t') {
            return Err(malformed("Invalid header value."));
        }
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                if value.is_empty() || !value.bytes().all(|c| c.is_ascii_digit()) {
                    return Err(malformed("Invalid Content-Length header."));
                }
                // Anything that does not fit in usize is certainly over the limit.
                let len = value.parse::<usize>().unwrap_or(usize::MAX);
                if content_length.is_some_and(|old| old != len) {
                    return Err(malformed("Conflicting Content-Length headers."));
                }
                content_length = Some(len);
            }
            "transfer-encoding" => {
                return Err(malformed(
                    "Transfer-Encoding is not supported; send the body with a Content-Length.",
                ));
            }
            "connection" => {
                for tok in value.split(',') {
                    let tok = tok.trim();
                    if tok.eq_ignore_ascii_case("close") {
                        connection_close = true;
                    } else if tok.eq_ignore_ascii_case("keep-alive") {
                        connection_keep_alive = true;
                    }
                }
            }
            "expect" => {
                if value.eq_ignore_ascii_case("100-continue") {
                    expect_continue = true;
                } else {
                    return Err(malformed("Unsupported Expect header."));
                }
            }
            _ => {}
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > max_payload {
        return Err(HttpError::PayloadTooLarge { size: content_length, limit: max_payload });
    }
    let keep_alive = match version {
        Version::Http11 => !connection_close,
        Version::Http10 => connection_keep_alive && !connection_close,
    };
    Ok(RequestHead {
        method: Method::parse(method),
        path,
        version,
        content_length,
        keep_alive,
        expect_continue,
    })
}

/// Reduces a request target to its absolute path: drops `http://host` and `?query`/`#frag`.
fn parse_target(target: &str) -> Result<String, HttpError> {
    let path = if let Some(rest) = target.strip_prefix("http://").or_else(|| target.strip_prefix("https://"))
    {
        match rest.find('/') {
            Some(i) => &rest[i..],
            None => "/",
        }
    } else {
        target
    };
    if !path.starts_with('/') {
        return Err(malformed("Invalid URI: the path must start with '/'."));
    }
    if path.bytes().any(|c| c.is_ascii_control() || c == b' ') {
        return Err(malformed("Invalid URI."));
    }
    let end = path.find(['?', '#']).unwrap_or(path.len());
    Ok(path[..end].to_string())
}

/// Reads requests from a byte stream, keeping what was read past the current request.
#[derive(Debug)]
pub struct RequestReader {
    buf: Vec<u8>,
    max_payload: usize,
}

impl RequestReader {
    /// A reader refusing bodies over `max_payload` bytes.
    pub fn new(max_payload: usize) -> Self {
        Self { buf: Vec::new(), max_payload }
    }

    fn fill<S: Read>(&mut self, stream: &mut S) -> Result<usize, HttpError> {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(HttpError::Io(e)),
            }
        }
    }

    /// Reads the next complete request. `stream` is also written to, for `100 Continue`.
    pub fn read_request<S: Read + Write>(&mut self, stream: &mut S) -> Result<Request, HttpError> {
        // Head.
        let head_end = loop {
            if let Some(end) = find_head_end(&self.buf) {
                break end;
            }
            if self.buf.len() > MAX_HEAD_SIZE {
                return Err(HttpError::HeadTooLarge);
            }
            if self.fill(stream)? == 0 {
                return Err(if self.buf.is_empty() {
                    HttpError::Closed
                } else {
                    HttpError::ClosedMidRequest
                });
            }
        };
        if head_end > MAX_HEAD_SIZE {
            return Err(HttpError::HeadTooLarge);
        }
        let head = parse_request_head(&self.buf[..head_end], self.max_payload)?;
        self.buf.drain(..head_end + 4);

        // Body.
        let len = head.content_length;
        if len > 0 && self.buf.len() < len && head.expect_continue {
            write_interim_continue(stream).map_err(HttpError::Io)?;
        }
        while self.buf.len() < len {
            if self.fill(stream)? == 0 {
                return Err(HttpError::ClosedMidRequest);
            }
        }
        let body = if len == 0 {
            None
        } else {
            let rest = self.buf.split_off(len);
            Some(std::mem::replace(&mut self.buf, rest))
        };
        Ok(Request { head, body })
    }
}

fn write_interim_continue<W: Write>(w: &mut W) -> io::Result<()> {
    w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    w.flush()
}

/// Serialises a response. `body` is JSON; 204 responses never carry one.
pub fn write_response<W: Write>(
    w: &mut W,
    status: StatusCode,
    body: Option<&[u8]>,
    keep_alive: bool,
) -> io::Result<()> {
    let mut out = Vec::with_capacity(128 + body.map_or(0, <[u8]>::len));
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\nServer: Kiln API\r\nConnection: {}\r\n",
            status.as_u16(),
            status.reason(),
            if keep_alive { "keep-alive" } else { "close" }
        )
        .as_bytes(),
    );
    match body {
        Some(b) if status != StatusCode::NoContent => {
            out.extend_from_slice(
                format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n", b.len()).as_bytes(),
            );
            out.extend_from_slice(b);
        }
        _ if status == StatusCode::NoContent => out.extend_from_slice(b"\r\n"),
        _ => out.extend_from_slice(b"Content-Length: 0\r\n\r\n"),
    }
    w.write_all(&out)?;
    w.flush()
}

/// A response as read by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Body (empty for 204).
    pub body: Vec<u8>,
    /// The server keeps the connection open.
    pub keep_alive: bool,
}

impl RawResponse {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one final response (interim 1xx responses are skipped). `max_body` bounds the body.
pub fn read_response<R: Read>(r: &mut R, max_body: usize) -> Result<RawResponse, HttpError> {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // Head.
        let head_end = loop {
            if let Some(end) = find_head_end(&buf) {
                break end;
            }
            if buf.len() > MAX_HEAD_SIZE {
                return Err(HttpError::HeadTooLarge);
            }
            let n = read_some(r, &mut chunk)?;
            if n == 0 {
                return Err(if buf.is_empty() { HttpError::Closed } else { HttpError::ClosedMidRequest });
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&buf[..head_end])
            .map_err(|_| malformed("response head is not UTF-8"))?
            .to_string();
        buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        if version != "HTTP/1.1" && version != "HTTP/1.0" {
            return Err(malformed(format!("invalid status line `{status_line}`")));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| malformed(format!("invalid status line `{status_line}`")))?;
        let mut content_length: Option<usize> = None;
        let mut keep_alive = version == "HTTP/1.1";
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                return Err(malformed(format!("invalid header line `{line}`")));
            };
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => {
                    content_length =
                        Some(value.parse().map_err(|_| malformed("invalid Content-Length in response"))?)
                }
                "connection" => {
                    if value.eq_ignore_ascii_case("close") {
                        keep_alive = false;
                    } else if value.eq_ignore_ascii_case("keep-alive") {
                        keep_alive = true;
                    }
                }
                "transfer-encoding" => {
                    return Err(malformed("chunked responses are not supported"));
                }
                _ => {}
            }
        }
        if (100..200).contains(&status) {
            continue;
        }
        let body = if status == 204 || status == 304 {
            Vec::new()
        } else if let Some(len) = content_length {
            if len > max_body {
                return Err(HttpError::PayloadTooLarge { size: len, limit: max_body });
            }
            while buf.len() < len {
                let n = read_some(r, &mut chunk)?;
                if n == 0 {
                    return Err(HttpError::ClosedMidRequest);
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.truncate(len);
            std::mem::take(&mut buf)
        } else {
            // No length: the body runs to the end of the connection.
            keep_alive = false;
            loop {
                if buf.len() > max_body {
                    return Err(HttpError::PayloadTooLarge { size: buf.len(), limit: max_body });
                }
                let n = read_some(r, &mut chunk)?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            std::mem::take(&mut buf)
        };
        return Ok(RawResponse { status, body, keep_alive });
    }
}

fn read_some<R: Read>(r: &mut R, chunk: &mut [u8]) -> Result<usize, HttpError> {
    loop {
        match r.read(chunk) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HttpError::Io(e)),
        }
    }
}

/// Serialises a request (used by the client).
pub fn write_request<W: Write>(
    w: &mut W,
    method: &Method,
    path: &str,
    body: Option<&[u8]>,
) -> io::Result<()> {
    let mut out = Vec::with_capacity(128 + body.map_or(0, <[u8]>::len));
    out.extend_from_slice(
        format!("{} {} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n", method.as_str(), path)
            .as_bytes(),
    );
    match body {
        Some(b) => {
            out.extend_from_slice(
                format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n", b.len()).as_bytes(),
            );
            out.extend_from_slice(b);
        }
        None => out.extend_from_slice(b"\r\n"),
    }
    w.write_all(&out)?;
    w.flush()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A duplex test stream: reads from `input`, records writes.
    struct Duplex {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Duplex {
        fn new(input: &[u8]) -> Self {
            Self { input: Cursor::new(input.to_vec()), output: Vec::new() }
        }
    }

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            // Dribble: at most 7 bytes per read, to exercise reassembly.
            let n = buf.len().min(7);
            self.input.read(&mut buf[..n])
        }
    }

    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn head(s: &str) -> Result<RequestHead, HttpError> {
        parse_request_head(s.as_bytes(), 51_200)
    }

    #[test]
    fn parses_request_heads() {
        let h = head("PUT /drives/x?foo=1 HTTP/1.1\r\nContent-Length: 12\r\nHost: localhost").unwrap();
        assert_eq!(h.method, Method::Put);
        assert_eq!(h.path, "/drives/x");
        assert_eq!(h.content_length, 12);
        assert!(h.keep_alive);
        let h = head("GET http://localhost/version HTTP/1.0").unwrap();
        assert_eq!(h.path, "/version");
        assert!(!h.keep_alive);
        let h = head("GET / HTTP/1.0\r\nConnection: Keep-Alive").unwrap();
        assert!(h.keep_alive);
        let h = head("GET / HTTP/1.1\r\nconnection: close").unwrap();
        assert!(!h.keep_alive);
        let h = head("POST / HTTP/1.1").unwrap();
        assert_eq!(h.method, Method::Other("POST".into()));
        let h = head("PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1").unwrap();
        assert!(h.expect_continue);
    }

    #[test]
    fn rejects_malformed_heads() {
        for bad in [
            "",
            "GET",
            "GET /",
            "GET / HTTP/2.0",
            "GET / HTTP/1.1 extra",
            "GET  / HTTP/1.1",
            "GET version HTTP/1.1",
            "G(T / HTTP/1.1",
            "GET / HTTP/1.1\r\nNoColon",
            "GET / HTTP/1.1\r\n: empty-name",
            "GET / HTTP/1.1\r\nBad Name: x",
            "GET / HTTP/1.1\r\nA: b\r\n folded",
            "PUT / HTTP/1.1\r\nContent-Length: -1",
            "PUT / HTTP/1.1\r\nContent-Length: 1x",
            "PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2",
            "PUT / HTTP/1.1\r\nTransfer-Encoding: chunked",
            "PUT / HTTP/1.1\r\nExpect: something",
            "GET /\x01 HTTP/1.1",
        ] {
            let e = head(bad).unwrap_err();
            assert!(e.is_bad_request(), "{bad:?}: {e:?}");
        }
        assert!(parse_request_head(b"GET /\xff HTTP/1.1", 10).is_err());
    }

    #[test]
    fn payload_limit_uses_content_length() {
        let e = head("PUT /mmds HTTP/1.1\r\nContent-Length: 51201").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Request payload with size 51201 is larger than the limit of 51200 allowed by server."
        );
        assert!(head("PUT /mmds HTTP/1.1\r\nContent-Length: 51200").is_ok());
        let e = head("PUT /mmds HTTP/1.1\r\nContent-Length: 99999999999999999999999999").unwrap_err();
        assert!(matches!(e, HttpError::PayloadTooLarge { .. }));
    }

    #[test]
    fn reads_pipelined_requests_in_pieces() {
        let input = b"PUT /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\n\r\nPATCH /c HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        let mut s = Duplex::new(input);
        let mut r = RequestReader::new(100);
        let a = r.read_request(&mut s).unwrap();
        assert_eq!((a.head.path.as_str(), a.body.as_deref()), ("/a", Some(&b"hello"[..])));
        let b = r.read_request(&mut s).unwrap();
        assert_eq!((b.head.path.as_str(), b.body), ("/b", None));
        let c = r.read_request(&mut s).unwrap();
        assert_eq!(c.body.as_deref(), Some(&b"{}"[..]));
        assert!(matches!(r.read_request(&mut s), Err(HttpError::Closed)));
    }

    #[test]
    fn truncated_requests() {
        for input in
            [&b"PUT /a HTTP/1.1\r\nContent-Len"[..], b"PUT /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhel"]
        {
            let mut s = Duplex::new(input);
            let e = RequestReader::new(100).read_request(&mut s).unwrap_err();
            assert!(matches!(e, HttpError::ClosedMidRequest), "{e:?}");
        }
        let mut s = Duplex::new(&[b'a'; MAX_HEAD_SIZE + 100]);
        let e = RequestReader::new(100).read_request(&mut s).unwrap_err();
        assert!(matches!(e, HttpError::HeadTooLarge), "{e:?}");
    }

    #[test]
    fn expect_continue_gets_interim_response() {
        let mut s = Duplex::new(
            b"PUT /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 20\r\n\r\n{\"aaaaaaaaaaaaaa\":1}",
        );
        let req = RequestReader::new(100).read_request(&mut s).unwrap();
        assert_eq!(req.body.as_deref().map(<[u8]>::len), Some(20));
        assert_eq!(s.output, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn responses_round_trip() {
        let one = |status, body: Option<&[u8]>, keep_alive| {
            let mut out = Vec::new();
            write_response(&mut out, status, body, keep_alive).unwrap();
            read_response(&mut Cursor::new(out), 100).unwrap()
        };
        let r = one(StatusCode::NoContent, None, true);
        assert_eq!((r.status, r.body.len(), r.keep_alive), (204, 0, true));
        let r = one(StatusCode::Ok, Some(b"{\"a\":1}"), true);
        assert_eq!((r.status, r.text().as_str()), (200, "{\"a\":1}"));
        let r = one(StatusCode::BadRequest, Some(b"{}"), false);
        assert_eq!((r.status, r.keep_alive), (400, false));
        // Interim responses are skipped.
        let mut c = Cursor::new(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 \r\n\r\n".to_vec());
        assert_eq!(read_response(&mut c, 100).unwrap().status, 204);
    }

    #[test]
    fn request_writer_output_parses() {
        let mut out = Vec::new();
        write_request(&mut out, &Method::Put, "/x", Some(b"{}")).unwrap();
        write_request(&mut out, &Method::Get, "/y", None).unwrap();
        let mut s = Duplex::new(&out);
        let mut r = RequestReader::new(10);
        assert_eq!(r.read_request(&mut s).unwrap().body.as_deref(), Some(&b"{}"[..]));
        assert_eq!(r.read_request(&mut s).unwrap().head.path, "/y");
    }

    /// xorshift64*: deterministic, dependency-free randomness for fuzzing.
    pub(crate) struct Rng(pub(crate) u64);
    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn fuzz_parser_with_random_and_mutated_input() {
        let seeds: &[&[u8]] = &[
            b"PUT /drives/rootfs HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"drive_id\":\"rootfs\",\"is_root_device\":true}",
            b"GET / HTTP/1.1\r\n\r\n",
            b"PATCH /vm HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}",
        ];
        let alphabet = b" \r\n:/0123456789GETPUTHTTP/1.1Content-Length{}\"\x00\xff";
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for i in 0..5_000 {
            let mut input: Vec<u8> = if i % 2 == 0 {
                let len = rng.below(300);
                (0..len)
                    .map(|_| {
                        if rng.below(2) == 0 {
                            alphabet[rng.below(alphabet.len())]
                        } else {
                            rng.next() as u8
                        }
                    })
                    .collect()
            } else {
                seeds[rng.below(seeds.len())].to_vec()
            };
            // Mutate: flip, insert, delete, truncate.
            for _ in 0..rng.below(6) {
                if input.is_empty() {
                    break;
                }
                let at = rng.below(input.len());
                match rng.below(4) {
                    0 => input[at] = rng.next() as u8,
                    1 => input.insert(at, alphabet[rng.below(alphabet.len())]),
                    2 => {
                        input.remove(at);
                    }
                    _ => input.truncate(at),
                }
            }
            let mut s = Duplex::new(&input);
            let mut r = RequestReader::new(64);
            // Must terminate without panicking; every outcome is fine.
            for _ in 0..8 {
                match r.read_request(&mut s) {
                    Ok(req) => {
                        assert!(req.body.as_ref().map_or(0, Vec::len) <= 64);
                        let _ = crate::routing::parse_request(
                            &req.head.method,
                            &req.head.path,
                            req.body.as_deref(),
                        );
                    }
                    Err(_) => break,
                }
            }
            let _ = read_response(&mut Cursor::new(input), 64);
        }
    }
}
