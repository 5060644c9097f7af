//! The HTTP/1.x server the guest reaches at the MMDS address, with Firecracker's rules:
//!
//! - `GET <path>`: the value at that JSON pointer. `Accept: application/json` gets JSON; any
//!   other or no `Accept` gets IMDS text (an object lists its keys, `key/` for objects; a string
//!   is itself; other types answer 501). With `imds_compat` it is always IMDS text. A missing
//!   key, or nothing stored yet, is a 404.
//! - `PUT /latest/api/token` with `X-metadata-token-ttl-seconds` (or
//!   `X-aws-ec2-metadata-token-ttl-seconds`) of 1..=21600: a session token as `text/plain`,
//!   the TTL header echoed. Refused (400) with `X-Forwarded-For`, without or with a bad TTL;
//!   other PUT paths are 404.
//! - V2: a GET without a valid `X-metadata-token` (or `X-aws-ec2-metadata-token`) is a 401.
//!   V1 takes GETs with or without a token.
//! - Any other method: 405 with `Allow: GET, PUT`. Chunked bodies: 501. Malformed requests:
//!   400 and the connection closes.
//!
//! [`serve`] parses one request from the start of a byte buffer (bounded by the caller) and
//! builds its answer; it never panics and never allocates more than the answer it builds.

use std::sync::Mutex;
use std::time::Instant;

use crate::store::{GetError, Mmds, MmdsVersion, OutputFormat};
use crate::token::TokenError;

/// The only path a PUT may target.
pub const TOKEN_PATH: &str = "/latest/api/token";
/// Most header lines a request may carry.
pub const MAX_HEADERS: usize = 64;

const TOKEN_HEADERS: [&str; 2] = ["x-metadata-token", "x-aws-ec2-metadata-token"];
const TTL_HEADERS: [&str; 2] = ["x-metadata-token-ttl-seconds", "x-aws-ec2-metadata-token-ttl-seconds"];

/// What [`serve`] made of the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No complete request yet: wait for more bytes.
    Incomplete,
    /// One request (the first `consumed` bytes) was answered with `response`; close the
    /// connection after sending it when `close` is set.
    Respond { consumed: usize, response: Vec<u8>, close: bool },
}

struct Request<'a> {
    method: &'a str,
    path: &'a str,
    http10: bool,
    headers: Vec<(&'a str, &'a str)>,
}

impl Request<'_> {
    fn header(&self, names: &[&str]) -> Option<(&str, &str)> {
        self.headers.iter().copied().find(|(n, _)| names.iter().any(|w| n.eq_ignore_ascii_case(w)))
    }

    fn wants_close(&self) -> bool {
        match self.header(&["connection"]) {
            Some((_, v)) if v.eq_ignore_ascii_case("close") => true,
            Some((_, v)) if v.eq_ignore_ascii_case("keep-alive") => false,
            _ => self.http10,
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        501 => "Not Implemented",
        _ => "Internal Server Error",
    }
}

/// An answer before it is serialised.
struct Answer {
    status: u16,
    json: bool,
    body: String,
    extra: Vec<(&'static str, String)>,
}

impl Answer {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self { status, json: false, body: body.into(), extra: Vec::new() }
    }
}

fn render(http10: bool, answer: &Answer, close: bool) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.{} {} {}\r\nServer: kiln-vmm MMDS\r\nConnection: {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
        if http10 { 0 } else { 1 },
        answer.status,
        reason(answer.status),
        if close { "close" } else { "keep-alive" },
        if answer.json { "application/json" } else { "text/plain" },
        answer.body.len()
    );
    for (name, value) in &answer.extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(answer.body.as_bytes());
    out
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// The request line and headers, or the 400/501 message for a malformed one.
fn parse_head(head: &str) -> Result<Request<'_>, Answer> {
    let bad = |why: &str| Answer::text(400, why.to_string());
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("Invalid request line: expected METHOD PATH HTTP/1.x."));
    };
    let http10 = match version {
        "HTTP/1.0" => true,
        "HTTP/1.1" => false,
        _ => return Err(bad("Unsupported HTTP version: use HTTP/1.0 or HTTP/1.1.")),
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(bad("Invalid HTTP method."));
    }
    // An absolute URI (`http://169.254.169.254/path`) names the path after the host.
    let target = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("", |i| &rest[i..]),
        None => target,
    };
    let path = target.split(['?', '#']).next().unwrap_or_default();
    if !path.starts_with('/') {
        return Err(bad("Invalid URI."));
    }
    let mut headers = Vec::new();
    for line in lines {
        if headers.len() == MAX_HEADERS {
            return Err(bad("Too many headers."));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad("Invalid header line: expected Name: value."));
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("Invalid header name."));
        }
        headers.push((name, value.trim()));
    }
    Ok(Request { method, path, http10, headers })
}

fn get(store: &Mmds, req: &Request<'_>, now: Instant) -> Answer {
    if store.version() == MmdsVersion::V2 {
        let Some((_, token)) = req.header(&TOKEN_HEADERS) else {
            return Answer::text(
                401,
                "No MMDS token provided. Use `X-metadata-token` or `X-aws-ec2-metadata-token` header to \
                 specify the session token.",
            );
        };
        if !store.is_valid_token(token, now) {
            return Answer::text(401, "MMDS token not valid.");
        }
    }
    let wants_json = !store.imds_compat()
        && req.header(&["accept"]).is_some_and(|(_, v)| v.to_ascii_lowercase().contains("application/json"));
    let format = if wants_json { OutputFormat::Json } else { OutputFormat::Imds };
    match store.get(req.path, format) {
        Ok(body) => Answer { status: 200, json: wants_json, body, extra: Vec::new() },
        Err(GetError::NotFound) => Answer::text(404, format!("Resource not found: {}.", req.path)),
        Err(GetError::UnsupportedValueType) => {
            Answer::text(501, "Cannot retrieve value. The value has an unsupported type.")
        }
    }
}

fn put_token(store: &mut Mmds, req: &Request<'_>, now: Instant) -> Answer {
    if let Some((name, _)) = req.header(&["x-forwarded-for"]) {
        return Answer::text(400, format!("Invalid header. Reason: Unsupported header name. Key: {name}"));
    }
    if crate::store::normalise_path(req.path) != TOKEN_PATH {
        return Answer::text(404, format!("Resource not found: {}.", req.path));
    }
    let Some((name, value)) = req.header(&TTL_HEADERS) else {
        return Answer::text(
            400,
            "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or \
             `X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime.",
        );
    };
    let Ok(ttl) = value.parse::<u32>() else {
        return Answer::text(
            400,
            format!("Invalid header. Reason: Invalid value. Key:{name}; Value:{value}"),
        );
    };
    match store.generate_token(ttl, now) {
        Ok(token) => {
            Answer { status: 200, json: false, body: token, extra: vec![(canonical(name), ttl.to_string())] }
        }
        Err(e @ TokenError::InvalidTtl(_)) => Answer::text(400, e.to_string()),
        Err(e @ TokenError::Random(_)) => Answer::text(500, e.to_string()),
    }
}

fn canonical(ttl_header: &str) -> &'static str {
    if ttl_header.eq_ignore_ascii_case(TTL_HEADERS[1]) {
        "X-aws-ec2-metadata-token-ttl-seconds"
    } else {
        "X-metadata-token-ttl-seconds"
    }
}

/// Answers the first request in `buf`. `capacity` is the most the caller will buffer: a request
/// that cannot complete within it is refused (400) and the connection closed.
pub fn serve(store: &Mutex<Mmds>, buf: &[u8], capacity: usize, now: Instant) -> Outcome {
    let refuse = |http10: bool, consumed: usize, answer: Answer| Outcome::Respond {
        consumed,
        response: render(http10, &answer, true),
        close: true,
    };
    let Some(head_end) = find_head_end(buf) else {
        if buf.len() >= capacity {
            return refuse(false, buf.len(), Answer::text(400, "Request too large."));
        }
        return Outcome::Incomplete;
    };
    let Ok(head) = std::str::from_utf8(&buf[..head_end]) else {
        return refuse(false, buf.len(), Answer::text(400, "The request is not valid UTF-8."));
    };
    let req = match parse_head(head) {
        Ok(r) => r,
        Err(answer) => return refuse(false, buf.len(), answer),
    };
    if req.header(&["transfer-encoding"]).is_some() {
        return refuse(
            req.http10,
            buf.len(),
            Answer::text(501, "Chunked transfer encoding is not supported."),
        );
    }
    let body_len = match req.header(&["content-length"]) {
        None => 0,
        Some((_, v)) => match v.parse::<usize>() {
            Ok(n) => n,
            Err(_) => return refuse(req.http10, buf.len(), Answer::text(400, "Invalid Content-Length.")),
        },
    };
    let total = head_end + 4 + body_len;
    if total > capacity {
        return refuse(req.http10, buf.len(), Answer::text(400, "Request too large."));
    }
    if buf.len() < total {
        return Outcome::Incomplete;
    }
    let close = req.wants_close();
    let answer = {
        let mut store = match store.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        match req.method {
            "GET" => get(&store, &req, now),
            "PUT" => put_token(&mut store, &req, now),
            _ => Answer {
                status: 405,
                json: false,
                body: "Not allowed HTTP method.".into(),
                extra: vec![("Allow", "GET, PUT".into())],
            },
        }
    };
    Outcome::Respond { consumed: total, response: render(req.http10, &answer, close), close }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    const CAP: usize = 4096;

    fn store(version: MmdsVersion) -> Mutex<Mmds> {
        let mut m = Mmds::default();
        m.put(json!({"latest": {"meta-data": {"ami-id": "ami-1", "n": 3}}, "top": "t"})).unwrap();
        m.set_version(version);
        Mutex::new(m)
    }

    /// (status, headers text, body, close, consumed)
    fn ask(s: &Mutex<Mmds>, req: &str) -> (u16, String, String, bool, usize) {
        match serve(s, req.as_bytes(), CAP, Instant::now()) {
            Outcome::Respond { consumed, response, close } => {
                let text = String::from_utf8(response).unwrap();
                let (head, body) = text.split_once("\r\n\r\n").unwrap();
                let status = head.split(' ').nth(1).unwrap().parse().unwrap();
                let len: usize =
                    head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).unwrap().parse().unwrap();
                assert_eq!(len, body.len(), "Content-Length matches the body");
                (status, head.to_string(), body.to_string(), close, consumed)
            }
            Outcome::Incomplete => panic!("incomplete: {req:?}"),
        }
    }

    fn token(s: &Mutex<Mmds>) -> String {
        let (st, head, body, _, _) =
            ask(s, "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n");
        assert_eq!(st, 200, "{body}");
        assert!(head.contains("X-metadata-token-ttl-seconds: 60"), "{head}");
        assert!(head.contains("Content-Type: text/plain"), "{head}");
        body
    }

    #[test]
    fn v1_get_in_imds_and_json() {
        let s = store(MmdsVersion::V1);
        let (st, head, body, close, _) = ask(&s, "GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n");
        assert_eq!((st, body.as_str(), close), (200, "ami-1", false));
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && head.contains("text/plain"), "{head}");
        let (st, head, body, ..) =
            ask(&s, "GET /latest/meta-data HTTP/1.1\r\nAccept: application/json\r\n\r\n");
        assert_eq!((st, body.as_str()), (200, r#"{"ami-id":"ami-1","n":3}"#));
        assert!(head.contains("Content-Type: application/json"), "{head}");
        let (st, _, body, ..) = ask(&s, "GET / HTTP/1.1\r\n\r\n");
        assert_eq!((st, body.as_str()), (200, "latest/\ntop"));
        let (st, _, body, ..) = ask(&s, "GET http://169.254.169.254/top HTTP/1.0\r\n\r\n");
        assert_eq!((st, body.as_str()), (200, "t"));
        // Tokens are optional in V1 (a bad one is ignored), and can still be had.
        let (st, ..) = ask(&s, "GET /top HTTP/1.1\r\nX-metadata-token: junk\r\n\r\n");
        assert_eq!(st, 200);
        token(&s);
    }

    #[test]
    fn errors_have_firecracker_codes() {
        let s = store(MmdsVersion::V1);
        let (st, _, body, ..) = ask(&s, "GET /nope HTTP/1.1\r\n\r\n");
        assert_eq!((st, body.as_str()), (404, "Resource not found: /nope."));
        let (st, ..) = ask(&s, "GET /latest/meta-data/n HTTP/1.1\r\n\r\n");
        assert_eq!(st, 501, "a number has no IMDS text form");
        let (st, _, body, ..) =
            ask(&s, "GET /latest/meta-data/n HTTP/1.1\r\nAccept: application/json\r\n\r\n");
        assert_eq!((st, body.as_str()), (200, "3"));
        for m in ["POST", "PATCH", "DELETE", "HEAD"] {
            let (st, head, ..) = ask(&s, &format!("{m} /top HTTP/1.1\r\n\r\n"));
            assert_eq!(st, 405, "{m}");
            assert!(head.contains("Allow: GET, PUT"), "{head}");
        }
        let (st, ..) = ask(&s, "PUT /top HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n");
        assert_eq!(st, 404, "PUT only mints tokens");
        let (st, _, body, ..) = ask(&s, "PUT /latest/api/token HTTP/1.1\r\n\r\n");
        assert_eq!(st, 400);
        assert!(body.contains("X-metadata-token-ttl-seconds"), "{body}");
        for ttl in ["0", "21601", "-1", "abc", "99999999999"] {
            let (st, ..) = ask(
                &s,
                &format!("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: {ttl}\r\n\r\n"),
            );
            assert_eq!(st, 400, "ttl {ttl}");
        }
        let (st, ..) = ask(
            &s,
            "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 5\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
        );
        assert_eq!(st, 400);
        let (st, head, ..) =
            ask(&s, "PUT //latest//api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 5\r\n\r\n");
        assert_eq!(st, 200);
        assert!(head.contains("X-aws-ec2-metadata-token-ttl-seconds: 5"), "{head}");
        let (st, ..) = ask(&s, "GET /top HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(st, 501);
    }

    #[test]
    fn v2_needs_a_valid_token() {
        let s = store(MmdsVersion::V2);
        let (st, _, body, ..) = ask(&s, "GET /top HTTP/1.1\r\n\r\n");
        assert_eq!(st, 401);
        assert!(body.starts_with("No MMDS token provided"), "{body}");
        let (st, _, body, ..) = ask(&s, "GET /top HTTP/1.1\r\nX-metadata-token: forged\r\n\r\n");
        assert_eq!((st, body.as_str()), (401, "MMDS token not valid."));
        let tok = token(&s);
        let (st, _, body, ..) = ask(&s, &format!("GET /top HTTP/1.1\r\nx-METADATA-token: {tok}\r\n\r\n"));
        assert_eq!((st, body.as_str()), (200, "t"));
        let (st, ..) = ask(&s, &format!("GET /top HTTP/1.1\r\nX-aws-ec2-metadata-token: {tok}\r\n\r\n"));
        assert_eq!(st, 200);
        // Expired tokens are refused.
        let late = Instant::now() + Duration::from_secs(61);
        match serve(&s, format!("GET /top HTTP/1.1\r\nX-metadata-token: {tok}\r\n\r\n").as_bytes(), CAP, late)
        {
            Outcome::Respond { response, .. } => assert!(response.starts_with(b"HTTP/1.1 401")),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn imds_compat_ignores_accept() {
        let s = store(MmdsVersion::V1);
        s.lock().unwrap().set_imds_compat(true);
        let (st, head, body, ..) = ask(&s, "GET /latest HTTP/1.1\r\nAccept: application/json\r\n\r\n");
        assert_eq!((st, body.as_str()), (200, "meta-data/"));
        assert!(head.contains("text/plain"), "{head}");
    }

    #[test]
    fn empty_store_answers_404() {
        let s = Mutex::new(Mmds::default());
        for p in ["/", "/latest"] {
            let (st, ..) = ask(&s, &format!("GET {p} HTTP/1.1\r\n\r\n"));
            assert_eq!(st, 404, "{p}");
        }
    }

    #[test]
    fn connection_handling_and_pipelining() {
        let s = store(MmdsVersion::V1);
        let (_, head, _, close, _) = ask(&s, "GET /top HTTP/1.0\r\n\r\n");
        assert!(close && head.starts_with("HTTP/1.0 200"), "{head}");
        let (_, _, _, close, _) = ask(&s, "GET /top HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(!close);
        let (_, head, _, close, _) = ask(&s, "GET /top HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(close && head.contains("Connection: close"), "{head}");
        // Two requests back to back: the first is consumed exactly, body included.
        let two = "GET /top HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /x HTTP/1.1\r\n\r\n";
        let (_, _, _, _, consumed) = ask(&s, two);
        assert_eq!(&two[consumed..], "GET /x HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn partial_and_malformed_requests() {
        let s = store(MmdsVersion::V1);
        let now = Instant::now();
        for partial in
            ["", "GET", "GET /top HTTP/1.1\r\n", "GET /top HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"]
        {
            assert_eq!(serve(&s, partial.as_bytes(), CAP, now), Outcome::Incomplete, "{partial:?}");
        }
        for bad in [
            "GET\r\n\r\n",
            "GET /top\r\n\r\n",
            "GET /top HTTP/2.0\r\n\r\n",
            "GET  /top HTTP/1.1\r\n\r\n",
            "get /top HTTP/1.1\r\n\r\n",
            "GET top HTTP/1.1\r\n\r\n",
            "GET http://169.254.169.254 HTTP/1.1\r\n\r\n",
            "GET /top HTTP/1.1\r\nNoColon\r\n\r\n",
            "GET /top HTTP/1.1\r\n: v\r\n\r\n",
            "GET /top HTTP/1.1\r\nBad Name: v\r\n\r\n",
            "GET /top HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            "GET /top HTTP/1.1\r\nContent-Length: 99999\r\n\r\n",
        ] {
            let (st, _, _, close, consumed) = ask(&s, bad);
            assert_eq!((st, close, consumed), (400, true, bad.len()), "{bad:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("H{i}: v\r\n")).collect();
        let (st, ..) = ask(&s, &format!("GET /top HTTP/1.1\r\n{many}\r\n"));
        assert_eq!(st, 400);
        // No end of headers within the capacity: refused, not waited for forever.
        let junk = vec![b'a'; CAP];
        match serve(&s, &junk, CAP, now) {
            Outcome::Respond { close: true, response, .. } => assert!(response.starts_with(b"HTTP/1.1 400")),
            o => panic!("{o:?}"),
        }
        assert!(matches!(serve(&s, &[0xff; 100], CAP, now), Outcome::Incomplete));
        match serve(&s, b"GET /\xff HTTP/1.1\r\n\r\n", CAP, now) {
            Outcome::Respond { close: true, response, .. } => assert!(response.starts_with(b"HTTP/1.1 400")),
            o => panic!("{o:?}"),
        }
    }
}
