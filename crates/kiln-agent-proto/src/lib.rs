//! The host ↔ guest protocol between Kiln and `kiln-agent`.
//!
//! Owns: the wire format (length-prefixed frames with a hard size limit, [`frame`]), the typed
//! messages ([`message`]: exec, stdin/stdout/stderr, resize, signal, exit, file copy, shutdown, clock,
//! ping, errors), the version handshake ([`handshake`]), the credit-based flow control both ends use
//! ([`window`]), and the host-side client ([`client`]) that `kiln-manager` and `kiln-agent client`
//! drive over (a) Firecracker-style vsock (a Unix socket plus a `CONNECT <port>\n` line) or (b) a
//! plain stream (QEMU virtio-serial chardev socket). Must not: block or allocate without bound on
//! what the peer sends (every frame is checked against [`MAX_FRAME_LEN`] before anything is
//! allocated; data is accepted only within the credit the receiver granted), or know how the agent
//! runs processes.
//!
//! # Multiplexing
//!
//! One connection carries many *streams*: every request (an exec, a copy, a ping) is sent on a fresh
//! stream id chosen by the host, and everything about it (stdio, resize, signals, its exit, errors)
//! travels on that id. Streams rather than one connection per session because the QEMU transport, a
//! virtio-serial port, is a single byte stream that cannot be opened twice; and with vsock it saves
//! a `CONNECT` round trip and a guest socket per `exec`. Flow control is per stream and per channel
//! (stdin, stdout, stderr, copy data), so one slow reader never stalls the other streams.
//!
//! See `docs/agent.md` for the frame layout, message table and version rules.

pub mod client;
pub mod frame;
pub mod handshake;
pub mod message;
pub mod window;

pub use client::{Client, ClientError, Output, Process};
pub use frame::{ProtoError, MAX_DATA_CHUNK, MAX_FRAME_LEN};
pub use message::{
    Channel, CopyFormat, CopyIn, CopyOut, Envelope, ExecRequest, ExitStatus, GuestConfig, MainConfig,
    Message, PoweroffMethod, ShutdownAction, Timestamp, WindowSize,
};

/// Major protocol version: peers with different majors refuse each other in the handshake.
pub const PROTOCOL_MAJOR: u16 = 1;
/// Minor protocol version: additions only; the session uses the smaller of the two minors.
pub const PROTOCOL_MINOR: u16 = 1;

/// AF_VSOCK port the agent listens on in the guest (host side: `CONNECT 1024\n`).
pub const VSOCK_PORT: u32 = 1024;
/// Name of the virtio-serial port the agent opens (`/sys/class/virtio-ports/*/name`), e.g. QEMU
/// `-device virtserialport,name=kiln.agent`.
pub const VIRTIO_PORT_NAME: &str = "kiln.agent";

/// Credit each receiver grants per channel when a stream starts; the sender never has more than
/// this many unacknowledged bytes in flight on one channel.
pub const INITIAL_WINDOW: u32 = 256 << 10;
/// Concurrent streams one connection may have open on the agent.
pub const MAX_STREAMS: usize = 256;
