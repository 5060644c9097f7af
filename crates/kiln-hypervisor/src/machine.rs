//! What both backends share: launching the detached VMM until its control socket answers, and the
//! [`Vm`] handle built on a backend's control protocol plus the process it controls.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::agent::AgentChannel;
use crate::detach::{spawn_detached, DetachError, DetachedCommand};
use crate::error::HypervisorError;
use crate::host::{Accelerator, Capabilities};
use crate::process::{VmExit, VmmProcess};
use crate::record::{unix_now, StatePaths, VmRecord, RECORD_FORMAT};
use crate::spec::VmSpec;
use crate::{BackendKind, Stopped, Vm, VmState};

/// How long `kill` waits for the VMM to be gone after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Lines of the VMM log quoted in errors.
const LOG_TAIL_LINES: usize = 20;

/// The guest's run state as the VMM reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunState {
    Created,
    Running,
    Paused,
}

/// A backend's control protocol (kiln-vmm API, QMP).
pub(crate) trait Control: Send {
    fn start(&mut self) -> Result<(), HypervisorError>;
    fn pause(&mut self) -> Result<(), HypervisorError>;
    fn resume(&mut self) -> Result<(), HypervisorError>;
    /// Asks the guest to shut down (Ctrl-Alt-Del).
    fn request_shutdown(&mut self) -> Result<(), HypervisorError>;
    fn run_state(&mut self) -> Result<RunState, HypervisorError>;
}

/// The binary of a usable backend; logs its notice (e.g. TCG is slow). `Unusable` says why not.
pub(crate) fn usable_binary(caps: &Capabilities) -> Result<PathBuf, HypervisorError> {
    match (&caps.binary, caps.usable) {
        (Some(binary), true) => {
            if let Some(notice) = &caps.notice {
                tracing::warn!("{notice}");
            }
            Ok(binary.clone())
        }
        _ => Err(HypervisorError::Unusable {
            backend: caps.backend,
            reason: caps.reason.clone().unwrap_or_else(|| "no binary found".into()),
        }),
    }
}

/// Refuses a record another backend created.
pub(crate) fn expect_backend(record: &VmRecord, kind: BackendKind) -> Result<(), HypervisorError> {
    if record.backend == kind {
        return Ok(());
    }
    Err(HypervisorError::WrongBackend { name: record.name.clone(), expected: kind, found: record.backend })
}

/// The last lines of `log`, or a note that it could not be read.
pub(crate) fn log_tail(log: &Path) -> String {
    match std::fs::read(log) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        }
        Err(e) => format!("(cannot read it: {e})"),
    }
}

/// A VMM being launched: what to run and where its output goes.
pub(crate) struct Launch<'a> {
    pub backend: BackendKind,
    pub binary: &'a Path,
    pub args: &'a [OsString],
    /// The VMM's stdout (kiln-vmm: the serial console; QEMU: its log).
    pub stdout: &'a Path,
    pub vmm_log: &'a Path,
    pub exit_file: &'a Path,
    pub control_socket: &'a Path,
    pub ready_timeout: Duration,
}

/// Kills a VMM whose creation failed half-way, unless disarmed.
pub(crate) struct KillOnFailure {
    process: VmmProcess,
    armed: bool,
}

/// The parts of a VM record a backend supplies after launching and configuring the VMM.
pub(crate) struct RecordDraft<'a> {
    pub backend: BackendKind,
    pub spec: &'a VmSpec,
    pub paths: &'a StatePaths,
    pub control_socket: PathBuf,
    pub agent: Option<AgentChannel>,
    pub binary: &'a Path,
    pub args: &'a [OsString],
    pub accelerator: Accelerator,
}

impl KillOnFailure {
    /// The VMM is set up: saves its record and keeps it running; if the record cannot be saved,
    /// nobody could find the VM again, so it is killed.
    pub fn save_record(mut self, draft: RecordDraft<'_>) -> Result<VmRecord, HypervisorError> {
        let record = VmRecord {
            format: RECORD_FORMAT,
            name: draft.spec.name.clone(),
            backend: draft.backend,
            state_dir: draft.spec.state_dir.clone(),
            process: self.process.clone(),
            control_socket: draft.control_socket,
            console_log: draft.spec.console_log.clone(),
            vmm_log: draft.paths.vmm_log.clone(),
            agent: draft.agent,
            binary: draft.binary.to_path_buf(),
            args: draft.args.iter().map(|a| a.to_string_lossy().into_owned()).collect(),
            accelerator: draft.accelerator,
            created_unix_secs: unix_now(),
            spec: draft.spec.clone(),
        };
        record.save()?;
        self.armed = false;
        Ok(record)
    }
}

impl Drop for KillOnFailure {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.process.vmm.signal(libc::SIGKILL);
            let _ = self.process.wait(Some(KILL_WAIT));
        }
    }
}

impl Launch<'_> {
    /// Starts the VMM detached and waits until `ready` (called every 10 ms) says its control socket
    /// answers. The VMM is killed if it does not get there.
    pub fn run(&self, mut ready: impl FnMut() -> bool) -> Result<KillOnFailure, HypervisorError> {
        let process = spawn_detached(&DetachedCommand {
            program: self.binary,
            args: self.args,
            stdout: self.stdout,
            stderr: self.vmm_log,
            exit_file: self.exit_file,
        })
        .map_err(|e| match e {
            DetachError::Setup(source) | DetachError::Exec(source) | DetachError::Monitor(source) => {
                HypervisorError::Spawn { program: self.binary.to_path_buf(), source }
            }
        })?;
        let guard = KillOnFailure { process: process.clone(), armed: true };
        let start = Instant::now();
        loop {
            if let Some(status) = process.exit_status() {
                return Err(HypervisorError::ExitedWhileStarting {
                    backend: self.backend,
                    status,
                    log: self.vmm_log.to_path_buf(),
                    log_tail: log_tail(self.vmm_log),
                });
            }
            if self.control_socket.exists() && ready() {
                return Ok(guard);
            }
            if start.elapsed() > self.ready_timeout {
                drop(guard);
                return Err(HypervisorError::NotReady {
                    backend: self.backend,
                    pid: process.vmm.pid,
                    socket: self.control_socket.to_path_buf(),
                    waited: self.ready_timeout,
                    log: self.vmm_log.to_path_buf(),
                    log_tail: log_tail(self.vmm_log),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A [`Vm`] made of a record and a backend's control protocol.
pub(crate) struct Machine<C> {
    record: VmRecord,
    control: Mutex<C>,
}

impl<C: Control> Machine<C> {
    pub fn new(record: VmRecord, control: C) -> Self {
        Self { record, control: Mutex::new(control) }
    }

    fn control(&self) -> MutexGuard<'_, C> {
        // A panic in another thread mid-call leaves nothing half-updated in a control client
        // that the next request would trust (each request is self-contained).
        self.control.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn exited(&self, status: VmExit) -> HypervisorError {
        HypervisorError::Exited { name: self.record.name.clone(), status }
    }

    fn process_error(&self, action: &'static str, source: std::io::Error) -> HypervisorError {
        HypervisorError::Process {
            name: self.record.name.clone(),
            action,
            pid: self.record.process.vmm.pid,
            source,
        }
    }

    /// Runs `op` on a live VMM; a VMM found dead before or after a failure is reported as exited.
    fn live<T>(&self, op: impl FnOnce(&mut C) -> Result<T, HypervisorError>) -> Result<T, HypervisorError> {
        if let Some(status) = self.record.process.exit_status() {
            return Err(self.exited(status));
        }
        let result = op(&mut self.control());
        result.map_err(|e| match self.record.process.exit_status() {
            Some(status) => self.exited(status),
            None => e,
        })
    }
}

impl<C: Control> Vm for Machine<C> {
    fn record(&self) -> &VmRecord {
        &self.record
    }

    fn start(&self) -> Result<(), HypervisorError> {
        self.live(|c| c.start())
    }

    fn pause(&self) -> Result<(), HypervisorError> {
        self.live(|c| c.pause())
    }

    fn resume(&self) -> Result<(), HypervisorError> {
        self.live(|c| c.resume())
    }

    fn stop(&self, timeout: Duration) -> Result<Stopped, HypervisorError> {
        let deadline = Instant::now() + timeout;
        let request = match self.state()? {
            VmState::Exited(exit) => return Ok(Stopped { exit, forced: false }),
            VmState::Created => None,
            VmState::Paused => Some(self.live(|c| {
                c.resume()?;
                c.request_shutdown()
            })),
            VmState::Running => Some(self.live(|c| c.request_shutdown())),
        };
        let asked = match request {
            Some(Ok(())) => true,
            Some(Err(e)) => {
                tracing::warn!(
                    "VM {}: could not ask the guest to shut down ({e}); killing it",
                    self.record.name
                );
                false
            }
            None => false,
        };
        if asked {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(exit) = self.wait(Some(left))? {
                return Ok(Stopped { exit, forced: false });
            }
            tracing::info!(
                "VM {}: the guest did not shut down within {timeout:?}; killing it",
                self.record.name
            );
        }
        Ok(Stopped { exit: self.kill()?, forced: true })
    }

    fn kill(&self) -> Result<VmExit, HypervisorError> {
        self.record.process.vmm.signal(libc::SIGKILL).map_err(|e| self.process_error("kill", e))?;
        match self.wait(Some(KILL_WAIT))? {
            Some(exit) => Ok(exit),
            None => Err(self.process_error(
                "kill",
                std::io::Error::new(std::io::ErrorKind::TimedOut, "still running 10 s after SIGKILL"),
            )),
        }
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<Option<VmExit>, HypervisorError> {
        self.record.process.wait(timeout).map_err(|e| self.process_error("wait for", e))
    }

    fn state(&self) -> Result<VmState, HypervisorError> {
        match self.live(|c| c.run_state()) {
            Ok(RunState::Created) => Ok(VmState::Created),
            Ok(RunState::Running) => Ok(VmState::Running),
            Ok(RunState::Paused) => Ok(VmState::Paused),
            Err(HypervisorError::Exited { status, .. }) => Ok(VmState::Exited(status)),
            Err(e) => Err(e),
        }
    }
}

/// A locally administered unicast MAC address derived from the VM name and interface index, so a
/// VM keeps its MAC across restarts and two VMs rarely share one.
pub(crate) fn default_mac(name: &str, index: usize) -> String {
    // FNV-1a: small, stable across releases (unlike std's hasher).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes().chain((index as u32).to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_le_bytes();
    format!("02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_macs_are_stable_local_unicast_and_differ_per_interface() {
        let a = default_mac("web", 0);
        assert_eq!(a, default_mac("web", 0));
        assert_ne!(a, default_mac("web", 1));
        assert_ne!(a, default_mac("db", 0));
        assert!(kiln_fc_api::models::is_valid_mac(&a) && a.starts_with("02:"), "{a}");
    }

    #[test]
    fn log_tails_keep_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let text: String = (0..30).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text).unwrap();
        let tail = log_tail(&log);
        assert!(tail.starts_with("line 10\n") && tail.ends_with("line 29"), "{tail}");
        assert!(log_tail(&dir.path().join("none")).contains("cannot read"));
    }
}
