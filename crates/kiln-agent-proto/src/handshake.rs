//! The version handshake: the host sends [`Hello`] on stream 0; the agent answers [`Welcome`] when
//! the major versions match (the session then uses the smaller minor) or [`Refused`] with the reason,
//! and closes. Both sides turn a mismatch into [`ProtoError::Incompatible`] that names both versions.

use std::io::{Read, Write};

use crate::frame::ProtoError;
use crate::message::{read_envelope, write_envelope, Hello, Message, Refused, Welcome};
use crate::{PROTOCOL_MAJOR, PROTOCOL_MINOR};

const UPGRADE_HINT: &str = "use a kiln-agent built from the same Kiln release as the host \
    (rebuild it with scripts/build-agent and inject it into the guest again)";

/// Frames of an earlier session a client skips while waiting for its Welcome.
const MAX_STALE_FRAMES: usize = 4096;

fn version(major: u16, minor: u16) -> String {
    format!("{major}.{minor}")
}

/// Our [`Hello`].
pub fn hello(software: &str) -> Hello {
    Hello {
        magic: Hello::MAGIC.to_string(),
        major: PROTOCOL_MAJOR,
        minor: PROTOCOL_MINOR,
        software: software.to_string(),
    }
}

/// Agent side: checks a received Hello. `Ok(minor)` is the session's minor version; `Err` is the
/// [`Refused`] to send back (its reason says what to do).
pub fn check_hello(h: &Hello) -> Result<u16, Refused> {
    let refuse = |reason: String| Refused { reason, major: PROTOCOL_MAJOR, minor: PROTOCOL_MINOR };
    if h.magic != Hello::MAGIC {
        return Err(refuse(format!("bad magic {:?}: the peer is not a kiln agent client", h.magic)));
    }
    if h.major != PROTOCOL_MAJOR {
        return Err(refuse(format!(
            "protocol version mismatch: agent speaks {}, host ({}) speaks {}; {UPGRADE_HINT}",
            version(PROTOCOL_MAJOR, PROTOCOL_MINOR),
            h.software,
            version(h.major, h.minor)
        )));
    }
    Ok(negotiate_minor(h.minor, PROTOCOL_MINOR))
}

/// The minor version a session uses: the older side's.
pub fn negotiate_minor(theirs: u16, ours: u16) -> u16 {
    theirs.min(ours)
}

/// Agent side: reads the host's Hello and answers it. `welcome` is filled with the negotiated
/// version. Returns the Hello, or the error after a [`Refused`] was sent.
pub fn serve_handshake(
    io: &mut (impl Read + Write),
    mut welcome: Welcome,
) -> Result<(Hello, Welcome), ProtoError> {
    let env = read_envelope(io)?
        .ok_or_else(|| ProtoError::Handshake("the host closed the connection before its Hello".into()))?;
    let Message::Hello(h) = env.msg else {
        let reason = format!("expected Hello as the first message, got {}", env.msg.name());
        let r = Refused { reason: reason.clone(), major: PROTOCOL_MAJOR, minor: PROTOCOL_MINOR };
        write_envelope(io, 0, &Message::Refused(r))?;
        return Err(ProtoError::Handshake(reason));
    };
    match check_hello(&h) {
        Ok(minor) => {
            welcome.major = PROTOCOL_MAJOR;
            welcome.minor = minor;
            write_envelope(io, 0, &Message::Welcome(welcome.clone()))?;
            io.flush()?;
            Ok((h, welcome))
        }
        Err(r) => {
            write_envelope(io, 0, &Message::Refused(r.clone()))?;
            io.flush()?;
            if h.magic != Hello::MAGIC {
                Err(ProtoError::Handshake(r.reason))
            } else {
                Err(ProtoError::Incompatible {
                    ours: version(PROTOCOL_MAJOR, PROTOCOL_MINOR),
                    theirs: version(h.major, h.minor),
                    hint: "the host must be upgraded or downgraded to match this agent",
                })
            }
        }
    }
}

/// Host side: sends `hello` and reads the agent's answer.
pub fn client_handshake(io: &mut (impl Read + Write), hello: &Hello) -> Result<Welcome, ProtoError> {
    write_envelope(io, 0, &Message::Hello(hello.clone()))?;
    io.flush()?;
    // On a virtio-serial port, frames of an earlier host's session may still be on their way:
    // they are on streams other than 0 and are skipped (a bounded number of them).
    let mut stale = 0;
    let env = loop {
        let env = read_envelope(io)?.ok_or_else(|| {
            ProtoError::Handshake("the agent closed the connection without answering our Hello".into())
        })?;
        if env.stream == 0 {
            break env;
        }
        stale += 1;
        if stale > MAX_STALE_FRAMES {
            return Err(ProtoError::Handshake(format!(
                "no Welcome after {MAX_STALE_FRAMES} frames of earlier sessions"
            )));
        }
    };
    match env.msg {
        Message::Welcome(w) if w.major == hello.major && w.minor <= hello.minor => Ok(w),
        Message::Welcome(w) => Err(ProtoError::Incompatible {
            ours: version(hello.major, hello.minor),
            theirs: version(w.major, w.minor),
            hint: UPGRADE_HINT,
        }),
        Message::Refused(r) if r.major != hello.major => Err(ProtoError::Incompatible {
            ours: version(hello.major, hello.minor),
            theirs: version(r.major, r.minor),
            hint: UPGRADE_HINT,
        }),
        Message::Refused(r) => Err(ProtoError::Refused(r.reason)),
        other => Err(ProtoError::Handshake(format!("expected Welcome, got {}", other.name()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn welcome() -> Welcome {
        Welcome {
            major: 0,
            minor: 0,
            software: "agent".into(),
            pid1: false,
            has_main: false,
            configured: true,
        }
    }

    fn run(h: Hello) -> (Result<Welcome, ProtoError>, Result<(Hello, Welcome), ProtoError>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || serve_handshake(&mut b, welcome()));
        let host = client_handshake(&mut a, &h);
        (host, agent.join().unwrap())
    }

    #[test]
    fn compatible_versions_agree_on_the_smaller_minor() {
        let (host, agent) = run(hello("test"));
        let w = host.unwrap();
        assert_eq!((w.major, w.minor), (PROTOCOL_MAJOR, PROTOCOL_MINOR));
        assert_eq!(agent.unwrap().0.software, "test");
        // A newer minor on the host is fine: the session uses ours.
        let mut h = hello("newer");
        h.minor = PROTOCOL_MINOR + 5;
        assert_eq!(check_hello(&h).unwrap(), PROTOCOL_MINOR);
    }

    #[test]
    fn a_different_major_is_refused_on_both_sides_with_both_versions() {
        let mut h = hello("kiln 9");
        h.major = PROTOCOL_MAJOR + 1;
        let (host, agent) = run(h);
        let host_err = host.unwrap_err().to_string();
        let agent_err = agent.unwrap_err().to_string();
        let ours = format!("{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}");
        let theirs = format!("{}.{PROTOCOL_MINOR}", PROTOCOL_MAJOR + 1);
        for e in [&host_err, &agent_err] {
            assert!(e.contains("version mismatch") && e.contains(&ours) && e.contains(&theirs), "{e}");
        }
    }

    #[test]
    fn bad_magic_and_wrong_first_message_are_refused() {
        let mut h = hello("x");
        h.magic = "http".into();
        let (host, agent) = run(h);
        assert!(host.unwrap_err().to_string().contains("bad magic"));
        assert!(agent.is_err());

        let (mut a, mut b) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || serve_handshake(&mut b, welcome()));
        write_envelope(&mut a, 0, &Message::Ping).unwrap();
        let reply = read_envelope(&mut a).unwrap().unwrap();
        assert!(matches!(reply.msg, Message::Refused(ref r) if r.reason.contains("expected Hello")));
        assert!(agent.join().unwrap().is_err());
    }

    #[test]
    fn frames_of_an_earlier_session_before_the_welcome_are_skipped() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || {
            // What a virtio-serial port may still carry from the previous host's session.
            write_envelope(&mut b, 3, &Message::Stdout(b"old".to_vec())).unwrap();
            write_envelope(&mut b, 1, &Message::Exited(crate::ExitStatus::Code(0))).unwrap();
            serve_handshake(&mut b, welcome())
        });
        client_handshake(&mut a, &hello("t")).unwrap();
        agent.join().unwrap().unwrap();
    }

    #[test]
    fn garbage_instead_of_a_hello_is_an_error_not_a_hang() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || serve_handshake(&mut b, welcome()));
        a.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        drop(a);
        let err = agent.join().unwrap().unwrap_err();
        assert!(matches!(err, ProtoError::Oversize { .. } | ProtoError::Truncated { .. }), "{err}");
    }
}
