//! The lab QEMU's human monitor (HMP) on a Unix socket: read-only questions about the lab's own
//! vCPUs, asked when a run times out, so a hang report says where the lab's CPUs were.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// The monitor's prompt, which ends every answer.
const PROMPT: &[u8] = b"(qemu) ";
/// How long one monitor answer may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound on one answer, so a confused monitor cannot grow the report without end.
const ANSWER_LIMIT: usize = 256 * 1024;

/// Asks the monitor each command in turn and returns a report with every answer; a failure is
/// reported in the text (this only ever feeds an error message).
pub(crate) fn ask(socket: &Path, commands: &[String]) -> String {
    match try_ask(socket, commands) {
        Ok(report) => report,
        Err(e) => format!("(the lab's monitor at {} did not answer: {e})\n", socket.display()),
    }
}

fn try_ask(socket: &Path, commands: &[String]) -> std::io::Result<String> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    read_answer(&mut stream)?; // the greeting
    let mut report = String::new();
    for command in commands {
        stream.write_all(command.as_bytes())?;
        stream.write_all(b"\n")?;
        let answer = read_answer(&mut stream)?;
        report.push_str(&format!("--- (qemu) {command}\n"));
        report.push_str(&clean(&answer, command));
    }
    Ok(report)
}

/// Reads until the prompt; the answer without it.
fn read_answer(stream: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.ends_with(PROMPT) {
        if Instant::now() > deadline || answer.len() > ANSWER_LIMIT {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no prompt"));
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "monitor closed"));
        }
        answer.extend_from_slice(&buf[..n]);
    }
    answer.truncate(answer.len() - PROMPT.len());
    Ok(answer)
}

/// The answer as text: without the echoed command line and terminal control sequences.
fn clean(answer: &[u8], command: &str) -> String {
    let text = String::from_utf8_lossy(answer);
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte.
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            out.push(c);
        }
    }
    let mut lines: Vec<&str> = out.lines().collect();
    if lines.first().is_some_and(|l| l.trim_end().ends_with(command)) {
        lines.remove(0);
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

/// The questions asked when a run times out: every vCPU's registers and local APIC (timer,
/// pending and in-service interrupts), and the interrupt counters.
pub(crate) fn hang_questions(cpus: u32) -> Vec<String> {
    let mut q = vec!["info registers -a".to_string()];
    for cpu in 0..cpus {
        q.push(format!("cpu {cpu}"));
        q.push("info lapic".to_string());
    }
    q.push("info irq".to_string());
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_lose_the_echo_and_terminal_escapes() {
        let raw = b"info lapic\r\n\x1b[K\x1b[Dapic id: 00\r\nLVT0\t 0x00010700\r\n";
        assert_eq!(clean(raw, "info lapic"), "apic id: 00\nLVT0\t 0x00010700\n");
    }

    #[test]
    fn every_cpu_is_asked_for_its_apic() {
        let q = hang_questions(2);
        assert_eq!(q, ["info registers -a", "cpu 0", "info lapic", "cpu 1", "info lapic", "info irq"]);
    }

    #[test]
    fn a_missing_monitor_is_reported_not_fatal() {
        let report = ask(Path::new("/nonexistent/monitor.sock"), &hang_questions(1));
        assert!(report.contains("did not answer"), "{report}");
    }
}
