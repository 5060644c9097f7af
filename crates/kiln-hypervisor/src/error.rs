//! The crate's error type.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::process::VmExit;
use crate::qmp::QmpError;
use crate::BackendKind;

/// Why a hypervisor operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The backend cannot run VMs on this host (binary missing, no usable KVM, ...).
    #[error("the {backend} backend cannot run VMs on this host: {reason}")]
    Unusable {
        /// Backend.
        backend: BackendKind,
        /// Why, and what to do instead.
        reason: String,
    },
    /// The spec asks for something impossible.
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    /// The state directory or a file in it could not be prepared.
    #[error("cannot prepare {path}: check that the state directory is writable")]
    StateDir {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The VMM process could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// Program.
        program: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The VMM exited before it was ready to be configured.
    #[error("{backend} exited while starting ({status}); the end of its log {log}:\n{log_tail}")]
    ExitedWhileStarting {
        /// Backend.
        backend: BackendKind,
        /// How it ended.
        status: VmExit,
        /// Its log file.
        log: PathBuf,
        /// The last lines of that log.
        log_tail: String,
    },
    /// The VMM did not open its control socket in time.
    #[error(
        "{backend} (pid {pid}) did not answer on {socket} within {waited:?}; it was stopped. \
         The end of its log {log}:\n{log_tail}"
    )]
    NotReady {
        /// Backend.
        backend: BackendKind,
        /// VMM pid.
        pid: i32,
        /// Control socket.
        socket: PathBuf,
        /// How long we waited.
        waited: Duration,
        /// Its log file.
        log: PathBuf,
        /// The last lines of that log.
        log_tail: String,
    },
    /// A Firecracker API call to kiln-vmm failed.
    #[error("VM {name}: kiln-vmm refused or failed a request")]
    Api {
        /// VM name.
        name: String,
        /// Cause.
        #[source]
        source: kiln_fc_api::ClientError,
    },
    /// A QMP command to QEMU failed.
    #[error("VM {name}: QEMU refused or failed a QMP command")]
    Qmp {
        /// VM name.
        name: String,
        /// Cause.
        #[source]
        source: QmpError,
    },
    /// The operation needs a running VMM, and it has exited.
    #[error("VM {name} has exited ({status}); create it again to run it")]
    Exited {
        /// VM name.
        name: String,
        /// How it ended.
        status: VmExit,
    },
    /// Signalling or watching the VMM process failed.
    #[error("VM {name}: cannot {action} its VMM process (pid {pid})")]
    Process {
        /// VM name.
        name: String,
        /// What was attempted.
        action: &'static str,
        /// VMM pid.
        pid: i32,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A VM record could not be read.
    #[error("cannot read the VM record {path}")]
    RecordRead {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A VM record is not valid JSON of the expected shape.
    #[error("the VM record {path} is damaged or was written by an incompatible Kiln version")]
    RecordParse {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// A VM record has a format this version does not read.
    #[error("the VM record {path} has format {found}; this Kiln reads format {expected}")]
    RecordFormat {
        /// Path.
        path: PathBuf,
        /// Format found.
        found: u32,
        /// Format supported.
        expected: u32,
    },
    /// A VM record could not be written.
    #[error("cannot write the VM record {path}")]
    RecordWrite {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A record was handed to a backend that did not create it.
    #[error("VM {name} was created by the {found} backend; attach it with that backend, not {expected}")]
    WrongBackend {
        /// VM name.
        name: String,
        /// Backend asked.
        expected: BackendKind,
        /// Backend in the record.
        found: BackendKind,
    },
}
