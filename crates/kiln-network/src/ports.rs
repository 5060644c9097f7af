//! Published ports: `-p HOST:GUEST[/tcp|udp]`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::NetworkError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A host port forwarded to a guest port: from other hosts (to any of this host's addresses) and
/// from this host itself, loopback included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortMapping {
    pub host_port: u16,
    pub guest_port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.host_port, self.guest_port, self.protocol)
    }
}

impl FromStr for PortMapping {
    type Err = NetworkError;
    fn from_str(spec: &str) -> Result<Self, NetworkError> {
        let invalid = |why: &str| NetworkError::InvalidPort { spec: spec.to_string(), why: why.to_string() };
        let (ports, protocol) = match spec.rsplit_once('/') {
            Some((ports, "tcp")) => (ports, Protocol::Tcp),
            Some((ports, "udp")) => (ports, Protocol::Udp),
            Some(_) => return Err(invalid("the protocol must be tcp or udp")),
            None => (spec, Protocol::Tcp),
        };
        let (host, guest) = ports.split_once(':').ok_or_else(|| invalid("missing ':'"))?;
        let port = |s: &str| match s.parse::<u16>() {
            Ok(0) | Err(_) => Err(invalid("ports are numbers 1-65535")),
            Ok(p) => Ok(p),
        };
        Ok(PortMapping { host_port: port(host)?, guest_port: port(guest)?, protocol })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs_parse() {
        let p: PortMapping = "8080:80".parse().unwrap();
        assert_eq!(p, PortMapping { host_port: 8080, guest_port: 80, protocol: Protocol::Tcp });
        assert_eq!("53:5353/udp".parse::<PortMapping>().unwrap().protocol, Protocol::Udp);
        assert_eq!(p.to_string().parse::<PortMapping>().unwrap(), p);
        for bad in ["80", "0:80", "80:70000", "80:80/sctp", "a:b", "1.2.3.4:80:80"] {
            let err = bad.parse::<PortMapping>().unwrap_err().to_string();
            assert!(err.contains("HOST:GUEST"), "{bad}: {err}");
        }
    }
}
