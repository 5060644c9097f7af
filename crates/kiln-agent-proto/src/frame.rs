//! Frames: the unit on the wire.
//!
//! ```text
//! offset 0  u32 big-endian  length L of what follows (kind + stream + body), 5 <= L <= MAX_FRAME_LEN - 4
//! offset 4  u8              message kind (see message::kind)
//! offset 5  u32 big-endian  stream id (0: the connection itself)
//! offset 9  L - 5 bytes     body (raw bytes for data messages, JSON for the others)
//! ```
//!
//! The length is checked before anything is allocated, so a peer can make the reader hold at most
//! one frame of [`MAX_FRAME_LEN`] bytes; a truncated frame is an error, never a short message.

use std::io::{self, Read, Write};

/// Largest frame on the wire, length prefix included.
pub const MAX_FRAME_LEN: usize = 1 << 20;
/// Largest payload of one data message (stdin, stdout, stderr, copy data).
pub const MAX_DATA_CHUNK: usize = 64 << 10;
/// Bytes before the body: length, kind, stream.
pub const HEADER_LEN: usize = 9;

/// Errors of the wire format and the handshake.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("agent connection I/O failed")]
    Io(#[from] io::Error),
    #[error("the peer closed the connection in the middle of a frame ({got} of {expected} bytes)")]
    Truncated { expected: usize, got: usize },
    #[error("frame of {len} bytes exceeds the {max}-byte limit (is the peer a kiln agent of a compatible version?)")]
    Oversize { len: usize, max: usize },
    #[error("frame length {0} is shorter than a frame header")]
    Undersize(usize),
    #[error("unknown message kind {0} (is the peer a kiln agent of a compatible version?)")]
    UnknownKind(u8),
    #[error("{kind} data message of {len} bytes exceeds the {max}-byte chunk limit")]
    DataTooLarge { kind: &'static str, len: usize, max: usize },
    #[error("malformed {kind} message")]
    BadBody {
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{kind} message must have an empty body, got {len} bytes")]
    UnexpectedBody { kind: &'static str, len: usize },
    #[error("could not encode a {kind} message")]
    Encode {
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("protocol version mismatch: we speak {ours}, the peer speaks {theirs}; {hint}")]
    Incompatible { ours: String, theirs: String, hint: &'static str },
    #[error("the agent refused the connection: {0}")]
    Refused(String),
    #[error("handshake failed: {0}")]
    Handshake(String),
}

/// One frame as read off the wire: kind, stream id, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub kind: u8,
    pub stream: u32,
    pub body: Vec<u8>,
}

/// Encodes one frame into a single buffer (so a writer behind a mutex writes it in one piece).
/// Fails when the body does not fit in a frame.
pub fn encode_frame(kind: u8, stream: u32, body: &[u8]) -> Result<Vec<u8>, ProtoError> {
    let total = HEADER_LEN + body.len();
    if total > MAX_FRAME_LEN {
        return Err(ProtoError::Oversize { len: total, max: MAX_FRAME_LEN });
    }
    let mut buf = Vec::with_capacity(total);
    // total <= MAX_FRAME_LEN (1 MiB) fits in u32.
    buf.extend_from_slice(&((total - 4) as u32).to_be_bytes());
    buf.push(kind);
    buf.extend_from_slice(&stream.to_be_bytes());
    buf.extend_from_slice(body);
    Ok(buf)
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: u8, stream: u32, body: &[u8]) -> Result<(), ProtoError> {
    w.write_all(&encode_frame(kind, stream, body)?)?;
    Ok(())
}

/// Reads exactly `buf.len()` bytes; returns how many were read before end of file.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads one frame. `Ok(None)` is a clean end of file between frames; anything else short is
/// [`ProtoError::Truncated`]. Allocates at most [`MAX_FRAME_LEN`] bytes, only after the length
/// passed the check, and grows the body as bytes really arrive.
pub fn read_frame(r: &mut impl Read) -> Result<Option<RawFrame>, ProtoError> {
    let mut len_buf = [0u8; 4];
    let got = read_full(r, &mut len_buf)?;
    if got == 0 {
        return Ok(None);
    }
    if got < 4 {
        return Err(ProtoError::Truncated { expected: 4, got });
    }
    let len = u32::from_be_bytes(len_buf) as usize;
    if len < HEADER_LEN - 4 {
        return Err(ProtoError::Undersize(len));
    }
    if len > MAX_FRAME_LEN - 4 {
        return Err(ProtoError::Oversize { len: len + 4, max: MAX_FRAME_LEN });
    }
    let mut head = [0u8; HEADER_LEN - 4];
    let got = read_full(r, &mut head)?;
    if got < head.len() {
        return Err(ProtoError::Truncated { expected: len + 4, got: 4 + got });
    }
    let body_len = len - (HEADER_LEN - 4);
    let mut body = Vec::with_capacity(body_len.min(MAX_DATA_CHUNK));
    let got = r.take(body_len as u64).read_to_end(&mut body)?;
    if got < body_len {
        return Err(ProtoError::Truncated { expected: len + 4, got: HEADER_LEN + got });
    }
    Ok(Some(RawFrame {
        kind: head[0],
        stream: u32::from_be_bytes([head[1], head[2], head[3], head[4]]),
        body,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let buf = encode_frame(20, 7, b"hello").unwrap();
        assert_eq!(buf.len(), HEADER_LEN + 5);
        let f = read_frame(&mut &buf[..]).unwrap().unwrap();
        assert_eq!(f, RawFrame { kind: 20, stream: 7, body: b"hello".to_vec() });
    }

    #[test]
    fn clean_eof_is_none_and_partial_length_is_truncated() {
        assert!(read_frame(&mut &b""[..]).unwrap().is_none());
        assert!(matches!(read_frame(&mut &[0u8, 0][..]), Err(ProtoError::Truncated { got: 2, .. })));
    }

    #[test]
    fn truncated_header_and_body_are_errors() {
        let buf = encode_frame(20, 7, &[1u8; 100]).unwrap();
        for cut in [5, 8, 9, 50, buf.len() - 1] {
            let err = read_frame(&mut &buf[..cut]).unwrap_err();
            assert!(matches!(err, ProtoError::Truncated { .. }), "cut at {cut}: {err}");
        }
    }

    #[test]
    fn oversize_is_refused_before_reading_or_allocating() {
        // Claims 4 GiB; the reader must refuse from the length alone (the rest is never read).
        let mut r = &[0xffu8, 0xff, 0xff, 0xff, 1, 0, 0, 0, 0][..];
        let err = read_frame(&mut r).unwrap_err();
        assert!(matches!(err, ProtoError::Oversize { .. }), "{err}");
        assert!(err.to_string().contains("exceeds"), "{err}");
        // The first length over the limit, and the largest one under it.
        let over = ((MAX_FRAME_LEN - 3) as u32).to_be_bytes();
        assert!(matches!(read_frame(&mut &over[..]), Err(ProtoError::Oversize { .. })));
        assert!(encode_frame(1, 0, &vec![0; MAX_FRAME_LEN - HEADER_LEN + 1]).is_err());
        let max = encode_frame(1, 0, &vec![0; MAX_FRAME_LEN - HEADER_LEN]).unwrap();
        assert_eq!(read_frame(&mut &max[..]).unwrap().unwrap().body.len(), MAX_FRAME_LEN - HEADER_LEN);
    }

    #[test]
    fn a_lying_length_allocates_only_what_arrives() {
        // A frame claiming 1 MiB that then stops: the error comes back and the body buffer only
        // grew with the bytes that came (capacity starts at one data chunk).
        let mut buf = ((MAX_FRAME_LEN - 4) as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(&[20, 0, 0, 0, 1, 9, 9]);
        assert!(matches!(read_frame(&mut &buf[..]), Err(ProtoError::Truncated { .. })));
    }

    #[test]
    fn undersize_is_an_error() {
        let buf = [0u8, 0, 0, 3, 1, 2, 3];
        assert!(matches!(read_frame(&mut &buf[..]), Err(ProtoError::Undersize(3))));
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic fuzz: random bytes (xorshift) must give frames or errors, never panic.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut buf = Vec::new();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = (x % 64) as usize;
            for i in 0..n {
                buf.push((x >> (i % 56)) as u8);
            }
            if buf.len() >= 4 && x.is_multiple_of(3) {
                // Mostly-plausible lengths too.
                let l = ((x >> 8) % 80) as u32;
                buf[..4].copy_from_slice(&l.to_be_bytes());
            }
            let mut r = &buf[..];
            while let Ok(Some(f)) = read_frame(&mut r) {
                let _ = crate::message::Message::decode(&f);
            }
        }
    }
}
