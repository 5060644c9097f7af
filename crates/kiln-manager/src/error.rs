//! The one error type of this crate. Messages say what was wrong and what to do; a `#[source]` is
//! never repeated in the message (the CLI prints the whole chain once).

use std::path::PathBuf;

/// Everything that can go wrong managing VMs.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM record {path} is corrupt; remove that VM's directory to forget it")]
    CorruptRecord {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("no VM named {0:?}; see `kiln ps -a`")]
    NoSuchVm(String),
    #[error("{0:?} matches more than one VM ID; use more characters or the name")]
    AmbiguousVm(String),
    #[error("a VM named {0:?} already exists; choose another --name or remove it with `kiln rm {0}`")]
    NameInUse(String),
    #[error("invalid VM name {0:?}: use 1-64 characters of A-Z, a-z, 0-9 or '-'")]
    InvalidName(String),
    #[error("invalid {what}: {detail}")]
    InvalidInput { what: &'static str, detail: String },
    #[error("VM {name} is {state}; {hint}")]
    WrongState { name: String, state: String, hint: &'static str },
    #[error(
        "the image has no command to run (no Entrypoint or Cmd); give one after the image name, e.g. \
         `kiln run IMAGE sh`"
    )]
    NoCommand,
    #[error(transparent)]
    Image(#[from] kiln_image::ImageError),
    #[error(transparent)]
    Network(#[from] kiln_network::NetworkError),
    #[error(transparent)]
    Hypervisor(#[from] kiln_hypervisor::HypervisorError),
    #[error("cannot use the {backend} backend here: {reason}")]
    BackendUnusable { backend: String, reason: String },
    #[error("cannot reach the agent of VM {name}")]
    AgentConnect {
        name: String,
        #[source]
        source: kiln_hypervisor::AgentError,
    },
    #[error("talking to the agent of VM {name} failed")]
    Agent {
        name: String,
        #[source]
        source: kiln_agent_proto::ClientError,
    },
    #[error(
        "VM {name} ended while booting ({status}) before its agent answered; its console log \
         (`kiln logs {name}`) says why"
    )]
    GuestEnded { name: String, status: String },
    #[error("VM {0} has no agent channel (it was created without one)")]
    NoAgentChannel(String),
    #[error("{tool} failed on {path}: {detail}")]
    Tool { tool: &'static str, path: PathBuf, detail: String },
    #[error("cannot run {tool}; install it (Debian: {package})")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("no kernel named {0:?}; see `kiln kernel ls`")]
    NoSuchKernel(String),
    #[error(
        "no default kernel: import one with `kiln kernel import PATH` (it becomes the default when it is \
         the first) or build one with `kiln kernel build`"
    )]
    NoDefaultKernel,
    #[error("a kernel named {0:?} already exists; remove it first (`kiln kernel rm {0}`) or choose another --name")]
    KernelExists(String),
    #[error("kernel {name} is used by VM(s) {vms}; remove them first")]
    KernelInUse { name: String, vms: String },
    #[error("{0}")]
    KernelBuild(String),
}

/// Result of this crate.
pub type Result<T, E = ManagerError> = std::result::Result<T, E>;

/// Maps an `io::Error` to [`ManagerError::Io`] for `path`.
pub(crate) fn io_err(
    action: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> ManagerError {
    let path = path.to_path_buf();
    move |source| ManagerError::Io { action, path, source }
}
