//! The lab's error type.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::StepResult;

/// Everything that can go wrong preparing or running a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A host tool or file the lab needs is missing; `hint` says how to get it.
    #[error("{what} not found: {hint}")]
    Missing { what: String, hint: String },
    /// A file operation failed.
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A host command ran but failed.
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    /// The kernel package could not be resolved or unpacked.
    #[error("lab kernel package: {0}")]
    KernelPackage(String),
    /// A wanted kernel module could not be resolved.
    #[error("lab kernel modules: {0}")]
    Modules(String),
    /// The step runner did not compile.
    #[error("building the lab step runner failed:\n{0}")]
    RunnerBuild(String),
    /// The scenario or payload is invalid (duplicate step names, bad paths, ...).
    #[error("invalid lab scenario: {0}")]
    Scenario(String),
    /// A carried binary needs a library that `ldd` cannot find on the host.
    #[error("{binary}: `ldd` cannot find {library}")]
    MissingLibrary { binary: PathBuf, library: String },
    /// The lab did not finish within its timeout; QEMU was killed.
    #[error("{0}")]
    Timeout(Box<LabHang>),
    /// QEMU exited before the step runner reported the end of the scenario (kernel panic, QEMU
    /// error, runner crash).
    #[error("lab VM ended before the scenario finished ({status}); qemu stderr: {qemu_stderr}; console tail:\n{console_tail}")]
    LabDied { status: String, qemu_stderr: String, completed: Vec<StepResult>, console_tail: String },
    /// The results channel carried something that is not a valid record.
    #[error("bad result record from the lab: {0}")]
    Protocol(String),
    /// [`crate::Report::step`] was asked for a step the report does not have.
    #[error("no step named `{0}` in the lab report")]
    NoSuchStep(String),
    /// [`crate::StepResult::ensure_success`] on a step that failed.
    #[error("lab step `{name}` exited with code {exit_code}; stderr tail:\n{stderr_tail}")]
    StepFailed { name: String, exit_code: i32, stderr_tail: String },
}

impl LabError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }
}

/// What a timed-out lab run leaves behind: how far it got and where the lab's CPUs were.
#[derive(Debug)]
pub struct LabHang {
    pub timeout: Duration,
    /// The step that had started but not finished, if any.
    pub running_step: Option<String>,
    /// Steps that finished before the timeout.
    pub completed: Vec<StepResult>,
    /// The last output of the steps that had not finished (running or in the background).
    pub unfinished_output: String,
    /// The lab's own vCPUs when it timed out: registers, local APICs and interrupt counters
    /// from QEMU's monitor.
    pub lab_cpus: String,
    pub console_tail: String,
}

impl std::fmt::Display for LabHang {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let running = match &self.running_step {
            Some(s) => format!("step `{s}` was running"),
            None => "before the step runner started".to_string(),
        };
        write!(
            f,
            "lab timed out after {:?} ({running}); output of unfinished steps:\n{}\
             the lab's vCPUs at the timeout:\n{}console tail:\n{}",
            self.timeout, self.unfinished_output, self.lab_cpus, self.console_tail
        )
    }
}
