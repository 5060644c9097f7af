//! `kiln-bench probe`: runs inside the lab, around one VMM process. It spawns the VMM with its
//! stdout (the guest's serial console) and stderr on pipes, timestamps the moment the guest's
//! marker line arrives on the console, optionally samples `/proc/<pid>/smaps` while the guest is up,
//! waits for the VMM to exit, and prints one JSON line ([`ProbeResult`]) on stdout.
//!
//! Every VMM is measured by the same code in the same way, so the numbers compare fairly: the clock
//! starts just before `spawn` (so fork/exec and dynamic linking count for all) and stops when a
//! reader thread blocked on the console pipe receives the end of the marker line.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::smaps::{self, MemSample};

/// How much of the console and of the VMM's stderr a result carries (the tails).
const TAIL_BYTES: usize = 64 * 1024;

/// Options of one probe.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// The line the guest prints when its init runs.
    pub marker: String,
    /// Sample smaps this long after the marker (None: no memory sample).
    pub mem_sample_after: Option<Duration>,
    /// Guest memory size, to tell the guest RAM mapping apart.
    pub guest_mem_mib: u64,
    /// Kill the VMM after this long.
    pub timeout: Duration,
    /// Also copy the program's stderr to ours as it arrives (a lab step shows it live).
    pub echo_stderr: bool,
    /// Program and arguments.
    pub command: Vec<String>,
}

/// What one probe measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeResult {
    /// Exit code of the VMM (None if killed by a signal).
    pub exit_code: Option<i32>,
    /// Set when the probe had to kill the VMM.
    pub timed_out: bool,
    /// spawn → exit, µs.
    pub wall_us: u64,
    /// spawn → marker line on the console, µs.
    pub marker_us: Option<u64>,
    /// The smaps sample, when one was asked for and the guest RAM could be identified.
    pub mem: Option<MemSample>,
    /// Why there is no memory sample although one was asked for.
    pub mem_error: Option<String>,
    /// The mappings the sample saw, largest Rss first (for the report's diagnostics).
    pub top_mappings: Vec<(String, u64, u64)>,
    /// Last bytes of the console (guest serial output).
    pub console_tail: String,
    /// Last bytes of the VMM's stderr (its log).
    pub stderr_tail: String,
}

fn tail(buf: &[u8]) -> String {
    let start = buf.len().saturating_sub(TAIL_BYTES);
    String::from_utf8_lossy(&buf[start..]).into_owned()
}

/// Finds `marker` followed by a line end in `buf`.
fn has_marker_line(buf: &[u8], marker: &[u8]) -> bool {
    buf.windows(marker.len() + 1)
        .any(|w| w.starts_with(marker) && matches!(w.get(marker.len()), Some(b'\r' | b'\n')))
}

/// Runs one probe.
pub fn run(opts: &ProbeOptions) -> Result<ProbeResult> {
    let Some((prog, args)) = opts.command.split_first() else { bail!("probe: no command given") };
    let mut cmd = Command::new(prog);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());

    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawning {prog}"))?;
    let pid = child.id();
    let mut stdout = child.stdout.take().context("no stdout pipe")?;
    let mut stderr = child.stderr.take().context("no stderr pipe")?;

    // Console reader: timestamps the marker line the moment its bytes arrive.
    let (marker_tx, marker_rx) = mpsc::channel::<Instant>();
    let marker = opts.marker.clone().into_bytes();
    let console = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut seen = false;
        let mut chunk = [0u8; 4096];
        loop {
            match stdout.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let now = Instant::now();
                    let from = all.len().saturating_sub(marker.len() + 1);
                    all.extend_from_slice(&chunk[..n]);
                    if !seen && has_marker_line(&all[from..], &marker) {
                        seen = true;
                        let _ = marker_tx.send(now);
                    }
                }
            }
        }
        all
    });
    let echo = opts.echo_stderr;
    let log = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match stderr.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if echo {
                        let _ = std::io::Write::write_all(&mut std::io::stderr(), &chunk[..n]);
                    }
                    all.extend_from_slice(&chunk[..n]);
                }
            }
        }
        all
    });
    let (exit_tx, exit_rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        let _ = exit_tx.send(Instant::now());
        status
    });

    let deadline = t0 + opts.timeout;
    let remaining = || deadline.saturating_duration_since(Instant::now());
    let mut marker_at = None;
    let mut mem = None;
    let mut mem_error = None;
    let mut top_mappings = Vec::new();
    if let Some(after) = opts.mem_sample_after {
        match marker_rx.recv_timeout(remaining()) {
            Ok(at) => {
                marker_at = Some(at);
                std::thread::sleep(after);
                if exit_rx.try_recv().is_ok() {
                    // Cannot happen unless the guest exited early; report instead of sampling a
                    // reaped pid.
                    mem_error = Some("the VMM exited before the memory sample".into());
                } else {
                    let path = format!("/proc/{pid}/smaps");
                    match std::fs::read_to_string(&path) {
                        Ok(text) => {
                            let mut maps = smaps::parse(&text);
                            mem = smaps::overhead(&maps, opts.guest_mem_mib * 1024);
                            if mem.is_none() {
                                mem_error = Some(format!(
                                    "no anonymous mapping of {} KiB (the guest RAM) in {path}",
                                    opts.guest_mem_mib * 1024
                                ));
                            }
                            maps.sort_by_key(|m| std::cmp::Reverse(m.rss_kib));
                            top_mappings = maps
                                .iter()
                                .take(12)
                                .map(|m| {
                                    let p =
                                        if m.path.is_empty() { "[anon]".to_string() } else { m.path.clone() };
                                    (p, m.size_kib, m.rss_kib)
                                })
                                .collect();
                        }
                        Err(e) => mem_error = Some(format!("reading {path}: {e}")),
                    }
                }
            }
            Err(_) => mem_error = Some("the marker never came, so no memory sample".into()),
        }
    }

    let mut timed_out = false;
    let exit_at = match exit_rx.recv_timeout(remaining()) {
        Ok(at) => at,
        Err(_) => {
            timed_out = true;
            let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped (the waiter
            // has not reported), so the pid cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            exit_rx.recv().context("waiter thread vanished")?
        }
    };
    let status = waiter.join().map_err(|_| anyhow::anyhow!("waiter thread panicked"))??;
    let console = console.join().map_err(|_| anyhow::anyhow!("console reader panicked"))?;
    let log = log.join().map_err(|_| anyhow::anyhow!("stderr reader panicked"))?;
    if marker_at.is_none() {
        marker_at = marker_rx.try_recv().ok();
    }
    let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    Ok(ProbeResult {
        exit_code: status.code(),
        timed_out,
        wall_us: us(exit_at.duration_since(t0)),
        marker_us: marker_at.map(|at| us(at.duration_since(t0))),
        mem,
        mem_error,
        top_mappings,
        console_tail: tail(&console),
        stderr_tail: tail(&log),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_needs_line_end() {
        assert!(has_marker_line(b"x\nKILN-GUEST-READY\r\n", b"KILN-GUEST-READY"));
        assert!(has_marker_line(b"KILN-GUEST-READY\n", b"KILN-GUEST-READY"));
        assert!(!has_marker_line(b"KILN-GUEST-READY", b"KILN-GUEST-READY"));
        assert!(!has_marker_line(b"KILN-GUEST-READ\n", b"KILN-GUEST-READY"));
    }

    #[test]
    fn probes_a_process() {
        let opts = ProbeOptions {
            marker: "READY".into(),
            mem_sample_after: None,
            guest_mem_mib: 1,
            timeout: Duration::from_secs(20),
            echo_stderr: false,
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo boot; sleep 0.1; echo READY; sleep 0.1; echo err >&2".into(),
            ],
        };
        let r = run(&opts).expect("probe runs");
        assert_eq!(r.exit_code, Some(0));
        let m = r.marker_us.expect("marker seen");
        assert!(m >= 100_000 && m < r.wall_us, "{r:?}");
        assert!(r.console_tail.contains("READY"));
        assert_eq!(r.stderr_tail, "err\n");
    }

    #[test]
    fn kills_on_timeout() {
        let opts = ProbeOptions {
            marker: "READY".into(),
            mem_sample_after: Some(Duration::from_millis(10)),
            guest_mem_mib: 1,
            timeout: Duration::from_millis(300),
            echo_stderr: false,
            command: vec!["sleep".into(), "30".into()],
        };
        let r = run(&opts).expect("probe runs");
        assert!(r.timed_out);
        assert_eq!(r.exit_code, None);
        assert!(r.marker_us.is_none() && r.mem_error.is_some());
    }
}
