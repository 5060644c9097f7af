//! Typed messages and their frame encoding.
//!
//! Data messages ([`Message::Stdin`], [`Message::Stdout`], [`Message::Stderr`],
//! [`Message::CopyData`]) carry raw bytes, at most [`MAX_DATA_CHUNK`] per frame, and count against
//! the receiver's credit for that channel. Every other message has a JSON body (or none). Unknown
//! JSON fields are ignored, so a minor version can add optional fields.

use std::io::{Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::frame::{encode_frame, read_frame, write_frame, ProtoError, RawFrame, MAX_DATA_CHUNK};

/// Message kinds (the byte at offset 4 of a frame). Stable across versions: a kind is never reused.
pub mod kind {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const REFUSED: u8 = 3;
    pub const PING: u8 = 4;
    pub const PONG: u8 = 5;
    pub const SET_TIME: u8 = 6;
    pub const SHUTDOWN: u8 = 7;
    pub const OK: u8 = 8;
    pub const ERROR: u8 = 9;
    pub const CONFIGURE: u8 = 10;
    pub const EXEC: u8 = 16;
    pub const STARTED: u8 = 17;
    pub const STDIN: u8 = 18;
    pub const STDIN_EOF: u8 = 19;
    pub const STDOUT: u8 = 20;
    pub const STDERR: u8 = 21;
    pub const RESIZE: u8 = 22;
    pub const SIGNAL: u8 = 23;
    pub const EXITED: u8 = 24;
    pub const CREDIT: u8 = 25;
    pub const COPY_IN: u8 = 32;
    pub const COPY_OUT: u8 = 33;
    pub const COPY_DATA: u8 = 34;
    pub const COPY_END: u8 = 35;
    pub const COPY_DONE: u8 = 36;
    pub const WAIT_MAIN: u8 = 40;
    pub const ATTACH_MAIN: u8 = 41;
}

/// First message of the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`Hello::MAGIC`]: tells a kiln peer from something else on the port.
    pub magic: String,
    pub major: u16,
    pub minor: u16,
    /// Free text, e.g. `kiln-manager 0.1.0`, for logs.
    pub software: String,
}

impl Hello {
    pub const MAGIC: &'static str = "kiln-agent-proto";
}

/// The agent's answer to a compatible [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub major: u16,
    /// The minor version this session uses: the smaller of both sides'.
    pub minor: u16,
    pub software: String,
    /// True when the agent is the guest's PID 1.
    pub pid1: bool,
    /// Whether a main process (the image's entrypoint + cmd) is configured.
    pub has_main: bool,
    /// Whether the agent has its configuration for this boot (from [`Message::Configure`] or a
    /// config file). Agents before minor version 1 only had the file: they count as configured.
    #[serde(default = "configured_by_default")]
    pub configured: bool,
}

fn configured_by_default() -> bool {
    true
}

/// The guest's configuration for one boot: what the host sends in [`Message::Configure`] right
/// after the guest came up (or, for an agent under another init, `/etc/kiln/agent.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestConfig {
    /// Hostname to set (PID 1 only).
    #[serde(default)]
    pub hostname: Option<String>,
    /// The image's entrypoint + cmd and how to run it; none: the agent only serves the host.
    #[serde(default)]
    pub main: Option<MainConfig>,
    /// How "power off" is done as PID 1.
    #[serde(default)]
    pub poweroff: PoweroffMethod,
    /// After the main process exits, how long the agent waits (while a host is connected) for the
    /// host to collect the exit and send Shutdown before it powers off by itself.
    #[serde(default = "default_exit_linger_ms")]
    pub exit_linger_ms: u64,
    /// The guest's CLOCK_REALTIME (PID 1 only; a microVM has no battery-backed clock).
    #[serde(default)]
    pub time: Option<Timestamp>,
    /// Written to `/root/.ssh/authorized_keys` (PID 1 only), for `kiln ssh`.
    #[serde(default)]
    pub authorized_keys: Option<String>,
    /// Name servers written to `/etc/resolv.conf` (PID 1 only); empty: the image's file stays.
    #[serde(default)]
    pub nameservers: Vec<String>,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            hostname: None,
            main: None,
            poweroff: PoweroffMethod::default(),
            exit_linger_ms: default_exit_linger_ms(),
            time: None,
            authorized_keys: None,
            nameservers: Vec::new(),
        }
    }
}

fn default_exit_linger_ms() -> u64 {
    3000
}

/// The main process: an exec request (`argv`, `env`, `cwd`, `user`; with `wait_for_attach` also
/// `tty` and `stdin`) plus how it starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MainConfig {
    #[serde(flatten)]
    pub exec: ExecRequest,
    /// Start only when a host attaches (AttachMain) and stream its stdio there, like `docker run`
    /// in the foreground. Otherwise it starts when configured, with stdin /dev/null and its output
    /// on the console.
    #[serde(default)]
    pub wait_for_attach: bool,
}

/// How PID 1 powers the VM off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoweroffMethod {
    /// `reboot(RB_AUTOBOOT)`: a microVM without ACPI power-off (kiln-vmm, Firecracker, QEMU with
    /// `-no-reboot`) ends its VMM on guest reboot (with `reboot=k`/`reboot=t` on the cmdline).
    #[default]
    Reboot,
    /// `reboot(RB_POWER_OFF)`: for machines with ACPI power-off. Without it the kernel only halts.
    Acpi,
}

/// A point in time: seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    /// `time` as a timestamp (the epoch for times before it).
    pub fn of(time: std::time::SystemTime) -> Timestamp {
        let d = time.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Timestamp { secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX), nanos: d.subsec_nanos() }
    }
}

/// The agent's answer to an incompatible or malformed [`Hello`]; the agent then closes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub reason: String,
    pub major: u16,
    pub minor: u16,
}

/// Terminal size for a tty exec and for [`Message::Resize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// Runs a process in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in the `PATH` of `env` (or the default PATH).
    pub argv: Vec<String>,
    /// `KEY=VALUE` strings; the process gets exactly these (plus PATH/HOME/TERM defaults when missing).
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory; `/` when absent (like an OCI image without `WorkingDir`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// `name`, `uid`, `name:group`, `uid:gid` (OCI `User`), resolved with the guest's /etc/passwd and
    /// /etc/group; root when absent.
    #[serde(default)]
    pub user: Option<String>,
    /// Run on a pseudo-terminal of this size (stdout and stderr are then one stream: stdout).
    #[serde(default)]
    pub tty: Option<WindowSize>,
    /// Whether the host will send stdin; without it the process reads /dev/null.
    #[serde(default)]
    pub stdin: bool,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// The code a shell reports: the exit code, or 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// Which flow-controlled channel of a stream a [`Message::Credit`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Stdin,
    Stdout,
    Stderr,
    Copy,
}

/// What a copy carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyFormat {
    /// The bytes of one regular file.
    #[default]
    File,
    /// A tar stream: copy-in unpacks it into the directory `path`; copy-out archives `path`.
    Tar,
}

/// Host → guest copy: followed by [`Message::CopyData`] chunks and [`Message::CopyEnd`]; the agent
/// answers [`Message::CopyDone`] (or [`Message::Error`], at any point).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyIn {
    pub path: String,
    /// Permission bits of a created file (File format); 0o644 when absent.
    #[serde(default)]
    pub mode: Option<u32>,
    #[serde(default)]
    pub format: CopyFormat,
}

/// Guest → host copy: the agent answers [`Message::CopyData`] chunks then [`Message::CopyEnd`] (or
/// [`Message::Error`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyOut {
    pub path: String,
    #[serde(default)]
    pub format: CopyFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownAction {
    Poweroff,
    Reboot,
}

/// Stop every process (SIGTERM, then SIGKILL after `grace_ms`), sync, and power off or reboot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shutdown {
    pub action: ShutdownAction,
    /// How long processes get between SIGTERM and SIGKILL; 10 s when absent.
    #[serde(default)]
    pub grace_ms: Option<u64>,
}

/// One protocol message. See `docs/agent.md` for which side sends what and on which stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Refused(Refused),
    Ping,
    Pong,
    /// Set CLOCK_REALTIME to this time since the Unix epoch.
    SetTime {
        secs: i64,
        nanos: u32,
    },
    Shutdown(Shutdown),
    /// The guest's configuration for this boot (minor version 1); answered with Ok or Error. Sent
    /// once per boot, when the Welcome says the agent is not configured yet.
    Configure(Box<GuestConfig>),
    Ok,
    /// A request failed, or (on stream 0) the connection is being closed; text for the user.
    Error {
        message: String,
    },
    Exec(ExecRequest),
    Started {
        pid: u32,
    },
    Stdin(Vec<u8>),
    StdinEof,
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Resize(WindowSize),
    Signal {
        signal: i32,
    },
    /// The process ended; sent after its last output.
    Exited(ExitStatus),
    /// The receiver consumed `bytes` of `channel` on this stream: the sender may send that much more.
    Credit {
        channel: Channel,
        bytes: u32,
    },
    CopyIn(CopyIn),
    CopyOut(CopyOut),
    CopyData(Vec<u8>),
    CopyEnd,
    CopyDone {
        bytes: u64,
    },
    /// Answered with [`Message::Exited`] when the main process ends (at once if it has ended).
    WaitMain,
    /// Attach this stream to the main process's stdio (starts it when the agent waits for an
    /// attach): answered like an exec without stdin.
    AttachMain,
}

#[derive(Serialize, Deserialize)]
struct SetTimeBody {
    secs: i64,
    nanos: u32,
}
#[derive(Serialize, Deserialize)]
struct ErrorBody {
    message: String,
}
#[derive(Serialize, Deserialize)]
struct StartedBody {
    pid: u32,
}
#[derive(Serialize, Deserialize)]
struct SignalBody {
    signal: i32,
}
#[derive(Serialize, Deserialize)]
struct CreditBody {
    channel: Channel,
    bytes: u32,
}
#[derive(Serialize, Deserialize)]
struct CopyDoneBody {
    bytes: u64,
}

fn json<T: DeserializeOwned>(kind: &'static str, body: &[u8]) -> Result<T, ProtoError> {
    serde_json::from_slice(body).map_err(|source| ProtoError::BadBody { kind, source })
}

fn empty(kind: &'static str, body: &[u8], m: Message) -> Result<Message, ProtoError> {
    if body.is_empty() {
        Ok(m)
    } else {
        Err(ProtoError::UnexpectedBody { kind, len: body.len() })
    }
}

fn data(kind: &'static str, body: &[u8]) -> Result<Vec<u8>, ProtoError> {
    if body.len() > MAX_DATA_CHUNK {
        return Err(ProtoError::DataTooLarge { kind, len: body.len(), max: MAX_DATA_CHUNK });
    }
    Ok(body.to_vec())
}

impl Message {
    /// Short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Refused(_) => "Refused",
            Message::Ping => "Ping",
            Message::Pong => "Pong",
            Message::SetTime { .. } => "SetTime",
            Message::Shutdown(_) => "Shutdown",
            Message::Configure(_) => "Configure",
            Message::Ok => "Ok",
            Message::Error { .. } => "Error",
            Message::Exec(_) => "Exec",
            Message::Started { .. } => "Started",
            Message::Stdin(_) => "Stdin",
            Message::StdinEof => "StdinEof",
            Message::Stdout(_) => "Stdout",
            Message::Stderr(_) => "Stderr",
            Message::Resize(_) => "Resize",
            Message::Signal { .. } => "Signal",
            Message::Exited(_) => "Exited",
            Message::Credit { .. } => "Credit",
            Message::CopyIn(_) => "CopyIn",
            Message::CopyOut(_) => "CopyOut",
            Message::CopyData(_) => "CopyData",
            Message::CopyEnd => "CopyEnd",
            Message::CopyDone { .. } => "CopyDone",
            Message::WaitMain => "WaitMain",
            Message::AttachMain => "AttachMain",
        }
    }

    /// The flow-controlled channel this message's payload counts against, and its length.
    pub fn data_channel(&self) -> Option<(Channel, usize)> {
        match self {
            Message::Stdin(d) => Some((Channel::Stdin, d.len())),
            Message::Stdout(d) => Some((Channel::Stdout, d.len())),
            Message::Stderr(d) => Some((Channel::Stderr, d.len())),
            Message::CopyData(d) => Some((Channel::Copy, d.len())),
            _ => None,
        }
    }

    fn encode_body(&self) -> Result<(u8, Vec<u8>), ProtoError> {
        use kind::*;
        let name = self.name();
        let j =
            |v: serde_json::Result<Vec<u8>>| v.map_err(|source| ProtoError::Encode { kind: name, source });
        Ok(match self {
            Message::Hello(h) => (HELLO, j(serde_json::to_vec(h))?),
            Message::Welcome(w) => (WELCOME, j(serde_json::to_vec(w))?),
            Message::Refused(r) => (REFUSED, j(serde_json::to_vec(r))?),
            Message::Ping => (PING, vec![]),
            Message::Pong => (PONG, vec![]),
            Message::SetTime { secs, nanos } => {
                (SET_TIME, j(serde_json::to_vec(&SetTimeBody { secs: *secs, nanos: *nanos }))?)
            }
            Message::Shutdown(s) => (SHUTDOWN, j(serde_json::to_vec(s))?),
            Message::Configure(c) => (CONFIGURE, j(serde_json::to_vec(c))?),
            Message::Ok => (OK, vec![]),
            Message::Error { message } => {
                (ERROR, j(serde_json::to_vec(&ErrorBody { message: message.clone() }))?)
            }
            Message::Exec(e) => (EXEC, j(serde_json::to_vec(e))?),
            Message::Started { pid } => (STARTED, j(serde_json::to_vec(&StartedBody { pid: *pid }))?),
            Message::Stdin(d) => (STDIN, d.clone()),
            Message::StdinEof => (STDIN_EOF, vec![]),
            Message::Stdout(d) => (STDOUT, d.clone()),
            Message::Stderr(d) => (STDERR, d.clone()),
            Message::Resize(w) => (RESIZE, j(serde_json::to_vec(w))?),
            Message::Signal { signal } => (SIGNAL, j(serde_json::to_vec(&SignalBody { signal: *signal }))?),
            Message::Exited(s) => (EXITED, j(serde_json::to_vec(s))?),
            Message::Credit { channel, bytes } => {
                (CREDIT, j(serde_json::to_vec(&CreditBody { channel: *channel, bytes: *bytes }))?)
            }
            Message::CopyIn(c) => (COPY_IN, j(serde_json::to_vec(c))?),
            Message::CopyOut(c) => (COPY_OUT, j(serde_json::to_vec(c))?),
            Message::CopyData(d) => (COPY_DATA, d.clone()),
            Message::CopyEnd => (COPY_END, vec![]),
            Message::CopyDone { bytes } => {
                (COPY_DONE, j(serde_json::to_vec(&CopyDoneBody { bytes: *bytes }))?)
            }
            Message::WaitMain => (WAIT_MAIN, vec![]),
            Message::AttachMain => (ATTACH_MAIN, vec![]),
        })
    }

    /// Encodes this message on `stream` as one frame. Data messages over [`MAX_DATA_CHUNK`] are refused.
    pub fn encode(&self, stream: u32) -> Result<Vec<u8>, ProtoError> {
        if let Some((_, len)) = self.data_channel() {
            if len > MAX_DATA_CHUNK {
                return Err(ProtoError::DataTooLarge { kind: self.name(), len, max: MAX_DATA_CHUNK });
            }
        }
        let (k, body) = self.encode_body()?;
        encode_frame(k, stream, &body)
    }

    /// Decodes a frame's body. Never panics; every malformed input is an error.
    pub fn decode(frame: &RawFrame) -> Result<Message, ProtoError> {
        use kind::*;
        let b = &frame.body[..];
        Ok(match frame.kind {
            HELLO => Message::Hello(json("Hello", b)?),
            WELCOME => Message::Welcome(json("Welcome", b)?),
            REFUSED => Message::Refused(json("Refused", b)?),
            PING => empty("Ping", b, Message::Ping)?,
            PONG => empty("Pong", b, Message::Pong)?,
            SET_TIME => {
                let t: SetTimeBody = json("SetTime", b)?;
                Message::SetTime { secs: t.secs, nanos: t.nanos }
            }
            SHUTDOWN => Message::Shutdown(json("Shutdown", b)?),
            CONFIGURE => Message::Configure(Box::new(json("Configure", b)?)),
            OK => empty("Ok", b, Message::Ok)?,
            ERROR => Message::Error { message: json::<ErrorBody>("Error", b)?.message },
            EXEC => Message::Exec(json("Exec", b)?),
            STARTED => Message::Started { pid: json::<StartedBody>("Started", b)?.pid },
            STDIN => Message::Stdin(data("Stdin", b)?),
            STDIN_EOF => empty("StdinEof", b, Message::StdinEof)?,
            STDOUT => Message::Stdout(data("Stdout", b)?),
            STDERR => Message::Stderr(data("Stderr", b)?),
            RESIZE => Message::Resize(json("Resize", b)?),
            SIGNAL => Message::Signal { signal: json::<SignalBody>("Signal", b)?.signal },
            EXITED => Message::Exited(json("Exited", b)?),
            CREDIT => {
                let c: CreditBody = json("Credit", b)?;
                Message::Credit { channel: c.channel, bytes: c.bytes }
            }
            COPY_IN => Message::CopyIn(json("CopyIn", b)?),
            COPY_OUT => Message::CopyOut(json("CopyOut", b)?),
            COPY_DATA => Message::CopyData(data("CopyData", b)?),
            COPY_END => empty("CopyEnd", b, Message::CopyEnd)?,
            COPY_DONE => Message::CopyDone { bytes: json::<CopyDoneBody>("CopyDone", b)?.bytes },
            WAIT_MAIN => empty("WaitMain", b, Message::WaitMain)?,
            ATTACH_MAIN => empty("AttachMain", b, Message::AttachMain)?,
            other => return Err(ProtoError::UnknownKind(other)),
        })
    }
}

/// A message and the stream it travels on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub stream: u32,
    pub msg: Message,
}

impl Envelope {
    pub fn new(stream: u32, msg: Message) -> Self {
        Envelope { stream, msg }
    }

    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        self.msg.encode(self.stream)
    }
}

/// Reads and decodes one message; `Ok(None)` at a clean end of file.
pub fn read_envelope(r: &mut impl Read) -> Result<Option<Envelope>, ProtoError> {
    match read_frame(r)? {
        None => Ok(None),
        Some(f) => Ok(Some(Envelope { stream: f.stream, msg: Message::decode(&f)? })),
    }
}

/// Encodes and writes one message.
pub fn write_envelope(w: &mut impl Write, stream: u32, msg: &Message) -> Result<(), ProtoError> {
    let (k, body) = msg.encode_body()?;
    if let Some((_, len)) = msg.data_channel() {
        if len > MAX_DATA_CHUNK {
            return Err(ProtoError::DataTooLarge { kind: msg.name(), len, max: MAX_DATA_CHUNK });
        }
    }
    write_frame(w, k, stream, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello(Hello { magic: Hello::MAGIC.into(), major: 1, minor: 0, software: "t".into() }),
            Message::Welcome(Welcome {
                major: 1,
                minor: 0,
                software: "a".into(),
                pid1: true,
                has_main: false,
                configured: false,
            }),
            Message::Refused(Refused { reason: "no".into(), major: 2, minor: 0 }),
            Message::Ping,
            Message::Pong,
            Message::SetTime { secs: 1_700_000_000, nanos: 5 },
            Message::Shutdown(Shutdown { action: ShutdownAction::Reboot, grace_ms: Some(100) }),
            Message::Configure(Box::new(GuestConfig {
                hostname: Some("vm-1".into()),
                main: Some(MainConfig {
                    exec: ExecRequest { argv: vec!["true".into()], ..Default::default() },
                    wait_for_attach: true,
                }),
                poweroff: PoweroffMethod::Acpi,
                exit_linger_ms: 10,
                time: Some(Timestamp { secs: 1_700_000_000, nanos: 7 }),
                authorized_keys: Some("ssh-ed25519 AAAA k\n".into()),
                nameservers: vec!["10.77.0.1".into()],
            })),
            Message::Configure(Box::default()),
            Message::Ok,
            Message::Error { message: "boom".into() },
            Message::Exec(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: vec!["A=b".into()],
                cwd: Some("/tmp".into()),
                user: Some("1000:1000".into()),
                tty: Some(WindowSize { rows: 24, cols: 80 }),
                stdin: true,
            }),
            Message::Started { pid: 42 },
            Message::Stdin(b"in".to_vec()),
            Message::StdinEof,
            Message::Stdout(vec![0, 255, 10]),
            Message::Stderr(vec![]),
            Message::Resize(WindowSize { rows: 50, cols: 132 }),
            Message::Signal { signal: 15 },
            Message::Exited(ExitStatus::Code(3)),
            Message::Exited(ExitStatus::Signal(9)),
            Message::Credit { channel: Channel::Stderr, bytes: 4096 },
            Message::CopyIn(CopyIn { path: "/f".into(), mode: Some(0o600), format: CopyFormat::File }),
            Message::CopyOut(CopyOut { path: "/d".into(), format: CopyFormat::Tar }),
            Message::CopyData(vec![1; 10]),
            Message::CopyEnd,
            Message::CopyDone { bytes: 10 },
            Message::WaitMain,
            Message::AttachMain,
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for (i, m) in all_messages().into_iter().enumerate() {
            let mut buf = Vec::new();
            write_envelope(&mut buf, i as u32, &m).unwrap();
            let env = read_envelope(&mut &buf[..]).unwrap().unwrap();
            assert_eq!(env, Envelope::new(i as u32, m.clone()), "{}", m.name());
            assert_eq!(Envelope::new(i as u32, m).encode().unwrap(), buf);
        }
    }

    #[test]
    fn exec_json_accepts_missing_optional_and_unknown_fields() {
        let f = RawFrame { kind: kind::EXEC, stream: 1, body: br#"{"argv":["ls"],"future":1}"#.to_vec() };
        let Message::Exec(e) = Message::decode(&f).unwrap() else { panic!() };
        assert_eq!(e.argv, vec!["ls"]);
        assert!(!e.stdin && e.tty.is_none() && e.env.is_empty());
    }

    #[test]
    fn malformed_bodies_are_errors() {
        let cases: Vec<(u8, &[u8])> = vec![
            (kind::EXEC, b"{"),
            (kind::EXEC, b"[]"),
            (kind::EXITED, br#"{"code":"x"}"#),
            (kind::PING, b"x"),
            (kind::CREDIT, br#"{"channel":"nope","bytes":1}"#),
            (kind::CREDIT, br#"{"channel":"stdin","bytes":-1}"#),
            (200, b""),
        ];
        for (k, body) in cases {
            let f = RawFrame { kind: k, stream: 0, body: body.to_vec() };
            assert!(Message::decode(&f).is_err(), "kind {k} body {:?}", String::from_utf8_lossy(body));
        }
        let big = RawFrame { kind: kind::STDOUT, stream: 1, body: vec![0; MAX_DATA_CHUNK + 1] };
        assert!(matches!(Message::decode(&big), Err(ProtoError::DataTooLarge { .. })));
        assert!(Message::Stdout(vec![0; MAX_DATA_CHUNK + 1]).encode(1).is_err());
    }

    #[test]
    fn welcomes_of_agents_before_configure_count_as_configured() {
        let f = RawFrame {
            kind: kind::WELCOME,
            stream: 0,
            body: br#"{"major":1,"minor":0,"software":"old","pid1":true,"has_main":true}"#.to_vec(),
        };
        let Message::Welcome(w) = Message::decode(&f).unwrap() else { panic!() };
        assert!(w.configured);
    }

    #[test]
    fn a_configure_with_only_a_main_gets_the_defaults() {
        let f = RawFrame { kind: kind::CONFIGURE, stream: 1, body: br#"{"main":{"argv":["sh"]}}"#.to_vec() };
        let Message::Configure(c) = Message::decode(&f).unwrap() else { panic!() };
        assert_eq!(
            c.main.as_ref().map(|m| (m.exec.argv.clone(), m.wait_for_attach)),
            Some((vec!["sh".into()], false))
        );
        assert_eq!((c.poweroff, c.exit_linger_ms, c.time), (PoweroffMethod::Reboot, 3000, None));
    }

    #[test]
    fn exit_status_shell_code() {
        assert_eq!(ExitStatus::Code(3).shell_code(), 3);
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
    }
}
