//! A small blocking QMP (QEMU Machine Protocol) client over a Unix socket.
//!
//! QMP is one JSON object per line. On connect QEMU sends a greeting (`{"QMP": {...}}`); the client
//! must send `qmp_capabilities` before any other command. Each command gets exactly one reply,
//! `{"return": ...}` or `{"error": {"class", "desc"}}`, carrying back the command's `id`;
//! asynchronous events (`{"event", "data", "timestamp"}`) may arrive at any point in between and
//! are queued. QEMU serves one QMP client per socket at a time, so callers should not keep a
//! connection open longer than they need it.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

/// Longest line accepted from QEMU (replies to the commands used here are far shorter).
pub const MAX_LINE: usize = 1024 * 1024;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached.
    #[error("cannot connect to the QMP socket {path}")]
    Connect {
        /// Socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading or writing failed (a timeout included).
    #[error("QMP I/O failed")]
    Io(#[from] io::Error),
    /// QEMU closed the connection (it exited, or another client holds the monitor).
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// QEMU sent something that is not QMP.
    #[error("unexpected QMP message: {0}")]
    Protocol(String),
    /// A line longer than [`MAX_LINE`].
    #[error("QMP message longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// QEMU answered a command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// Command.
        command: String,
        /// Error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QmpEvent {
    /// Name (`STOP`, `RESUME`, `SHUTDOWN`, ...).
    pub event: String,
    /// Event data (`null` when absent).
    #[serde(default)]
    pub data: Value,
    /// When QEMU emitted it.
    #[serde(default)]
    pub timestamp: Option<QmpTimestamp>,
}

/// An event's timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct QmpTimestamp {
    /// Seconds since the epoch.
    pub seconds: i64,
    /// Microseconds.
    pub microseconds: i64,
}

/// `query-status` reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct QmpStatus {
    /// Run state: `prelaunch` (started with `-S`), `running`, `paused`, `shutdown`, ...
    pub status: String,
    /// Whether vCPUs run.
    pub running: bool,
}

/// The QEMU version from the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct QemuVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
}

/// A connected QMP session in command mode.
#[derive(Debug)]
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<QmpEvent>,
    version: QemuVersion,
    next_id: u64,
}

impl QmpClient {
    /// Connects to `path`, reads the greeting and enters command mode. `timeout` bounds each read
    /// and write.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let connect_err = |source| QmpError::Connect { path: path.to_path_buf(), source };
        let stream = UnixStream::connect(path).map_err(connect_err)?;
        stream.set_read_timeout(Some(timeout)).map_err(connect_err)?;
        stream.set_write_timeout(Some(timeout)).map_err(connect_err)?;
        let writer = stream.try_clone().map_err(connect_err)?;
        let mut client = Self {
            reader: BufReader::new(stream),
            writer,
            events: VecDeque::new(),
            version: QemuVersion { major: 0, minor: 0, micro: 0 },
            next_id: 1,
        };
        let greeting = client.read_message()?;
        client.version = greeting
            .get("QMP")
            .and_then(|q| q.get("version"))
            .and_then(|v| v.get("qemu"))
            .and_then(|v| QemuVersion::deserialize(v).ok())
            .ok_or_else(|| QmpError::Protocol(format!("expected the QMP greeting, got {greeting}")))?;
        client.execute("qmp_capabilities", None)?;
        Ok(client)
    }

    /// The QEMU version from the greeting.
    pub fn version(&self) -> QemuVersion {
        self.version
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut self.reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            if line.last() != Some(&b'\n') {
                return Err(if line.len() > MAX_LINE { QmpError::LineTooLong } else { QmpError::Closed });
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return serde_json::from_slice(&line)
                .map_err(|e| QmpError::Protocol(format!("{e}: {}", String::from_utf8_lossy(&line).trim())));
        }
    }

    /// Runs `command` with `arguments` and returns its `return` value; events that arrive in the
    /// meantime are queued for [`QmpClient::next_event`].
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| QmpError::Protocol(e.to_string()))?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes)?;
        loop {
            let reply = self.read_message()?;
            if reply.get("event").is_some() {
                let event = QmpEvent::deserialize(&reply)
                    .map_err(|e| QmpError::Protocol(format!("bad event {reply}: {e}")))?;
                self.events.push_back(event);
                continue;
            }
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                return Err(QmpError::Protocol(format!("reply {reply} does not answer {command} (id {id})")));
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Protocol(format!("reply {reply} has neither return nor error")));
        }
    }

    /// The next event: a queued one, or one read within `timeout`. `Ok(None)` on timeout. (QEMU
    /// writes each message in one go; a timeout in the middle of a line would lose that line.)
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<QmpEvent>, QmpError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        let saved = self.reader.get_ref().read_timeout()?;
        self.reader.get_ref().set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let result = match self.read_message() {
            Ok(msg) if msg.get("event").is_some() => {
                QmpEvent::deserialize(&msg).map(Some).map_err(|e| QmpError::Protocol(e.to_string()))
            }
            Ok(msg) => Err(QmpError::Protocol(format!("unsolicited reply {msg}"))),
            Err(QmpError::Io(e))
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        };
        self.reader.get_ref().set_read_timeout(saved)?;
        result
    }

    /// `query-status`.
    pub fn query_status(&mut self) -> Result<QmpStatus, QmpError> {
        let v = self.execute("query-status", None)?;
        QmpStatus::deserialize(&v).map_err(|e| QmpError::Protocol(format!("query-status returned {v}: {e}")))
    }

    /// `stop`: pauses the vCPUs.
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None).map(drop)
    }

    /// `cont`: starts (from `-S`) or resumes the vCPUs.
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).map(drop)
    }

    /// `system_reset`.
    pub fn system_reset(&mut self) -> Result<(), QmpError> {
        self.execute("system_reset", None).map(drop)
    }

    /// `system_powerdown` (ACPI power button; does nothing on a machine without ACPI).
    pub fn system_powerdown(&mut self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).map(drop)
    }

    /// `send-key` Ctrl-Alt-Delete (needs a keyboard: the i8042 the QEMU backend adds).
    pub fn send_ctrl_alt_delete(&mut self) -> Result<(), QmpError> {
        let key = |k: &str| json!({ "type": "qcode", "data": k });
        self.execute("send-key", Some(json!({ "keys": [key("ctrl"), key("alt"), key("delete")] }))).map(drop)
    }

    /// `quit`: QEMU exits at once (0). A connection closed before the reply also counts as done.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread::JoinHandle;

    /// A fake QEMU monitor: sends the greeting, then answers each command line with `respond`
    /// (which returns the lines to send back; `{id}` is replaced by the command's id), and closes
    /// the connection after `quit`. Returns the commands it got.
    pub(crate) fn fake_qmp(
        path: &Path,
        connections: usize,
        respond: impl Fn(&str) -> Vec<String> + Send + 'static,
    ) -> JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let mut commands = Vec::new();
            for _ in 0..connections {
                serve_one(&listener, &respond, &mut commands);
            }
            commands
        })
    }

    fn serve_one(
        listener: &UnixListener,
        respond: &impl Fn(&str) -> Vec<String>,
        commands: &mut Vec<String>,
    ) {
        {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(
                b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n",
            )
            .unwrap();
            for line in BufReader::new(s.try_clone().unwrap()).lines() {
                let Ok(line) = line else { break };
                let msg: Value = serde_json::from_str(&line).unwrap();
                let cmd = msg["execute"].as_str().unwrap().to_string();
                let id = msg["id"].to_string();
                for reply in respond(&cmd) {
                    if s.write_all(format!("{}\r\n", reply.replace("{id}", &id)).as_bytes()).is_err() {
                        break;
                    }
                }
                let quit = cmd == "quit";
                commands.push(match msg.get("arguments") {
                    Some(a) => format!("{cmd} {a}"),
                    None => cmd,
                });
                if quit {
                    break; // QEMU exits: the connection closes
                }
            }
        }
    }

    fn ok() -> Vec<String> {
        vec![r#"{"return": {}, "id": {id}}"#.to_string()]
    }

    #[test]
    fn commands_get_their_replies_and_events_in_between_are_queued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let server = fake_qmp(&path, 1, |cmd| match cmd {
            "query-status" => vec![
                r#"{"return": {"status": "prelaunch", "singlestep": false, "running": false}, "id": {id}}"#
                    .into(),
            ],
            "cont" => vec![
                r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}"#.into(),
                r#"{"return": {}, "id": {id}}"#.into(),
            ],
            _ => ok(),
        });
        let mut c = QmpClient::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(c.version(), QemuVersion { major: 7, minor: 2, micro: 22 });
        assert_eq!(c.query_status().unwrap(), QmpStatus { status: "prelaunch".into(), running: false });
        c.cont().unwrap();
        c.send_ctrl_alt_delete().unwrap();
        let e = c.next_event(Duration::from_secs(1)).unwrap().unwrap();
        assert_eq!(e.event, "RESUME");
        assert_eq!(e.timestamp, Some(QmpTimestamp { seconds: 1, microseconds: 2 }));
        assert_eq!(c.next_event(Duration::from_millis(50)).unwrap(), None);
        drop(c);
        let cmds = server.join().unwrap();
        assert_eq!(cmds[..3], ["qmp_capabilities", "query-status", "cont"]);
        assert_eq!(
            cmds[3],
            r#"send-key {"keys":[{"data":"ctrl","type":"qcode"},{"data":"alt","type":"qcode"},{"data":"delete","type":"qcode"}]}"#
        );
    }

    #[test]
    fn errors_carry_the_class_and_description() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let _server = fake_qmp(&path, 1, |cmd| match cmd {
            "stop" => vec![r#"{"error": {"class": "GenericError", "desc": "nope"}, "id": {id}}"#.into()],
            _ => ok(),
        });
        let mut c = QmpClient::connect(&path, Duration::from_secs(5)).unwrap();
        let err = c.stop().unwrap_err().to_string();
        assert_eq!(err, "QMP command stop failed: GenericError: nope");
    }

    #[test]
    fn quit_counts_a_closed_connection_as_done() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let server = fake_qmp(&path, 1, |cmd| match cmd {
            "quit" => vec![],
            _ => ok(),
        });
        let mut c = QmpClient::connect(&path, Duration::from_secs(5)).unwrap();
        c.quit().unwrap();
        assert_eq!(server.join().unwrap(), ["qmp_capabilities", "quit"]);
    }

    #[test]
    fn garbage_and_oversized_lines_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"not json\n").unwrap();
            let (mut s2, _) = listener.accept().unwrap();
            let _ = s2.write_all(&vec![b'x'; MAX_LINE + 10]);
            drop(s);
        });
        let err = QmpClient::connect(&path, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, QmpError::Protocol(_)), "{err}");
        let err = QmpClient::connect(&path, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, QmpError::LineTooLong), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn a_connection_closed_by_qemu_is_reported_as_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || drop(listener.accept().unwrap()));
        let err = QmpClient::connect(&path, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, QmpError::Closed), "{err}");
        server.join().unwrap();
    }
}
