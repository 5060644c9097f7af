//! The crate's one error type: each message says what was wrong and what to do.

use std::path::PathBuf;

use crate::ports::Protocol;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{what} needs root or CAP_NET_ADMIN (`{command}`: {stderr}); run kiln as root")]
    NeedsPrivilege { what: String, command: String, stderr: String },
    #[error("`{program}` was not found; install it (Debian: `apt-get install {package}`, or scripts/install-deps)")]
    ToolMissing { program: String, package: String },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("could not run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("network state {path}: I/O error; check the state directory's permissions and free space")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("network state {path} is not valid JSON; move it away to start over (its leases are lost)")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("no network named {name:?} (known: {known}); create it first (`kiln network create NAME --subnet CIDR`)")]
    UnknownNetwork { name: String, known: String },
    #[error(
        "network name {0:?} is invalid: use 1-15 characters a-z, 0-9, '-' or '_', starting with a letter"
    )]
    InvalidNetworkName(String),
    #[error("VM id {0:?} is invalid for networking: use 1-64 characters a-z, A-Z, 0-9, '-', '_' or '.'")]
    InvalidVmId(String),
    #[error("subnet {0:?} is invalid: write an IPv4 CIDR like 10.77.0.0/16 (prefix 8-30)")]
    InvalidSubnet(String),
    #[error("port mapping {spec:?} is invalid: {why} (write HOST:GUEST, HOST:GUEST/tcp or HOST:GUEST/udp)")]
    InvalidPort { spec: String, why: String },
    #[error("network {name:?} already exists with a different configuration ({existing}); remove it first or pick another name")]
    Conflict { name: String, existing: String },
    #[error("subnet {subnet} of network {name:?} overlaps network {other:?} ({other_subnet}); choose a disjoint subnet")]
    Overlap { name: String, subnet: String, other: String, other_subnet: String },
    #[error("subnet {subnet} of network {name:?} overlaps this host's route `{route}`; create the network with a disjoint subnet (or edit its network.json)")]
    HostRouteOverlap { name: String, subnet: String, route: String },
    #[error("network {network:?} ({subnet}) has no free address; remove unused VMs or use a larger subnet")]
    Exhausted { network: String, subnet: String },
    #[error("host port {port}/{protocol} is already published by VM {owner:?} on network {network:?}; pick another host port")]
    PortInUse { port: u16, protocol: Protocol, owner: String, network: String },
    #[error("network {network:?} is still used by {vms}; remove those VMs first or force the removal")]
    InUse { network: String, vms: String },
}

pub type Result<T> = std::result::Result<T, NetworkError>;

impl NetworkError {
    pub(crate) fn state(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> NetworkError {
        let path = path.into();
        move |source| NetworkError::State { path, source }
    }
}
