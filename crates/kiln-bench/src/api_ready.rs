//! On the host: process start → the control socket answering its first request.
//!
//! kiln-vmm (and Firecracker when `FIRECRACKER_BIN` is set) are started with `--api-sock` and asked
//! `GET /` until a complete `HTTP/1.1 200` response arrives. QEMU is the peer that is always there:
//! `-qmp unix:…` with `-S` (no guest runs), its first answer being the reply to `qmp_capabilities`
//! after the greeting. The clock starts just before `spawn` (fork, exec and dynamic linking count)
//! and stops when the answer is read; the process is then killed. Runs are interleaved and the
//! order rotates each round, so drift hits every program alike.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::stats::{summarize, Summary};

/// A program whose control socket is timed.
#[derive(Debug, Clone)]
pub enum Peer {
    /// A Firecracker-API VMM (kiln-vmm, Firecracker): `--api-sock PATH`, then `GET /`.
    FirecrackerApi { label: String, bin: PathBuf },
    /// QEMU with a QMP socket: greeting, `qmp_capabilities`, `{"return": {}}`.
    Qmp { bin: PathBuf },
}

impl Peer {
    pub fn label(&self) -> &str {
        match self {
            Peer::FirecrackerApi { label, .. } => label,
            Peer::Qmp { .. } => "QEMU (QMP)",
        }
    }

    /// The command line, socket path substituted.
    pub fn command(&self, sock: &Path) -> Vec<String> {
        let sock = sock.to_string_lossy().into_owned();
        match self {
            Peer::FirecrackerApi { bin, .. } => {
                vec![bin.to_string_lossy().into_owned(), "--api-sock".into(), sock]
            }
            Peer::Qmp { bin } => vec![
                bin.to_string_lossy().into_owned(),
                "-M".into(),
                "microvm".into(),
                "-accel".into(),
                "tcg".into(),
                "-S".into(),
                "-nodefaults".into(),
                "-no-user-config".into(),
                "-nographic".into(),
                "-display".into(),
                "none".into(),
                "-qmp".into(),
                format!("unix:{sock},server=on,wait=off"),
            ],
        }
    }
}

/// Kills and reaps the child when dropped, so a failed run leaves nothing behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads until `done(buffer)` holds, the peer closes, or the deadline passes.
fn read_until(s: &mut UnixStream, deadline: Instant, done: impl Fn(&[u8]) -> bool) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !done(&buf) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no complete answer before the deadline (got {:?})", String::from_utf8_lossy(&buf));
        }
        s.set_read_timeout(Some(left)).context("setting a read timeout")?;
        let n = s.read(&mut chunk).context("reading the answer")?;
        if n == 0 {
            bail!("the socket closed after {:?}", String::from_utf8_lossy(&buf));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf)
}

/// A complete HTTP response: headers ended and `Content-Length` bytes of body read.
fn http_response_complete(buf: &[u8]) -> bool {
    let text = String::from_utf8_lossy(buf);
    let Some((head, body)) = text.split_once("\r\n\r\n") else { return false };
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    body.len() >= len
}

/// Asks the peer its first question on a connected socket; `Ok` once it answered well.
fn ask(peer: &Peer, s: &mut UnixStream, deadline: Instant) -> Result<()> {
    match peer {
        Peer::FirecrackerApi { .. } => {
            s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n")
                .context("sending GET /")?;
            let r = read_until(s, deadline, http_response_complete)?;
            if !r.starts_with(b"HTTP/1.1 200") {
                bail!("GET / answered {:?}", String::from_utf8_lossy(&r));
            }
        }
        Peer::Qmp { .. } => {
            let nl = |b: &[u8]| b.contains(&b'\n');
            let greeting = read_until(s, deadline, nl)?;
            if !greeting.starts_with(b"{\"QMP\"") {
                bail!("unexpected QMP greeting {:?}", String::from_utf8_lossy(&greeting));
            }
            s.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").context("sending qmp_capabilities")?;
            let r = read_until(s, deadline, nl)?;
            if !String::from_utf8_lossy(&r).contains("\"return\"") {
                bail!("qmp_capabilities answered {:?}", String::from_utf8_lossy(&r));
            }
        }
    }
    Ok(())
}

/// One run: spawn → answered, in µs.
fn one_run(peer: &Peer, dir: &Path, timeout: Duration) -> Result<f64> {
    let sock = dir.join(format!("{}.sock", peer.label().split_whitespace().next().unwrap_or("vmm")));
    let _ = std::fs::remove_file(&sock);
    let cmd = peer.command(&sock);
    let start = Instant::now();
    let child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", cmd[0]))?;
    let mut child = Reaped(child);
    let deadline = start + timeout;
    loop {
        match UnixStream::connect(&sock) {
            Ok(mut s) => {
                ask(peer, &mut s, deadline)?;
                let us = start.elapsed().as_secs_f64() * 1e6;
                return Ok(us);
            }
            Err(_) if Instant::now() < deadline => {
                if let Ok(Some(st)) = child.0.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = child.0.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    bail!("{} exited ({st}) before answering: {}", peer.label(), err.trim());
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(e) => bail!("{} did not open {} within {timeout:?}: {e}", peer.label(), sock.display()),
        }
    }
}

/// The per-peer results.
#[derive(Debug, Clone)]
pub struct PeerResult {
    pub label: String,
    pub command: String,
    pub summary: Option<Summary>,
    pub failures: Vec<String>,
}

/// Runs `runs` rounds over `peers` (interleaved, rotating order).
pub fn run(peers: &[Peer], runs: usize) -> Result<Vec<PeerResult>> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); peers.len()];
    let mut failures: Vec<Vec<String>> = vec![Vec::new(); peers.len()];
    // One untimed warm-up each: page cache, dynamic loader caches.
    for p in peers {
        let _ = one_run(p, dir.path(), Duration::from_secs(10));
    }
    for round in 0..runs {
        for k in 0..peers.len() {
            let i = (round + k) % peers.len();
            match one_run(&peers[i], dir.path(), Duration::from_secs(10)) {
                Ok(us) => times[i].push(us),
                Err(e) => failures[i].push(format!("{e:#}")),
            }
        }
    }
    Ok(peers
        .iter()
        .zip(times.iter().zip(failures))
        .map(|(p, (t, f))| PeerResult {
            label: p.label().to_string(),
            command: p.command(Path::new("API.sock")).join(" "),
            summary: summarize(t),
            failures: f,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_completeness_follows_content_length() {
        assert!(!http_response_complete(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n"));
        assert!(!http_response_complete(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab"));
        assert!(http_response_complete(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nabcd"));
        assert!(http_response_complete(b"HTTP/1.1 204 No Content\r\n\r\n"));
    }
}
