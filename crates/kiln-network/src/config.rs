//! A network's configuration: name, bridge, IPv4 subnet and gateway.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{NetworkError, Result};

/// The network `kiln run` uses unless told otherwise.
pub const DEFAULT_NETWORK: &str = "kiln0";
/// Its subnet. Not 10.88.0.0/16 (Podman's default) nor Docker's 172.17-31 pools, so it can coexist
/// with both on one host.
pub const DEFAULT_SUBNET: &str = "10.77.0.0/16";

/// An IPv4 subnet in CIDR form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self> {
        if !(8..=30).contains(&prefix) {
            return Err(NetworkError::InvalidSubnet(format!("{addr}/{prefix}")));
        }
        let network = Ipv4Addr::from(u32::from(addr) & Self::mask_bits(prefix));
        Ok(Subnet { network, prefix })
    }

    fn mask_bits(prefix: u8) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask_bits(self.prefix) == u32::from(self.network)
    }

    pub fn overlaps(&self, other: &Subnet) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }

    /// The first usable host address (network + 1).
    pub fn first_host(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// All usable host addresses, network and broadcast excluded.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network) + 1;
        let broadcast = u32::from(self.network) | !Self::mask_bits(self.prefix);
        (first..broadcast).map(Ipv4Addr::from)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = NetworkError;
    fn from_str(s: &str) -> Result<Self> {
        let invalid = || NetworkError::InvalidSubnet(s.to_string());
        let (addr, prefix) = s.split_once('/').ok_or_else(invalid)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| invalid())?;
        let prefix: u8 = prefix.parse().map_err(|_| invalid())?;
        if Subnet::new(addr, prefix)?.network != addr {
            return Err(invalid());
        }
        Subnet::new(addr, prefix)
    }
}

impl TryFrom<String> for Subnet {
    type Error = NetworkError;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<Subnet> for String {
    fn from(s: Subnet) -> String {
        s.to_string()
    }
}

/// A named network: one Linux bridge holding the gateway address, VMs' taps as its ports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    pub name: String,
    /// The bridge device (the network's name unless set).
    pub bridge: String,
    pub subnet: Subnet,
    /// The bridge's address and the VMs' default route.
    pub gateway: Ipv4Addr,
}

impl NetworkConfig {
    /// A network with the bridge named after it and the gateway at the subnet's first address.
    pub fn new(name: &str, subnet: Subnet) -> Result<Self> {
        validate_network_name(name)?;
        Ok(NetworkConfig {
            name: name.to_string(),
            bridge: name.to_string(),
            subnet,
            gateway: subnet.first_host(),
        })
    }

    /// `kiln0`, 10.77.0.0/16, gateway 10.77.0.1.
    pub fn default_network() -> Self {
        let subnet = Subnet { network: Ipv4Addr::new(10, 77, 0, 0), prefix: 16 };
        NetworkConfig {
            name: DEFAULT_NETWORK.to_string(),
            bridge: DEFAULT_NETWORK.to_string(),
            subnet,
            gateway: subnet.first_host(),
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        validate_network_name(&self.name)?;
        validate_network_name(&self.bridge)?;
        if !self.subnet.contains(self.gateway) || self.gateway == self.subnet.network() {
            return Err(NetworkError::InvalidSubnet(format!(
                "{} with gateway {}",
                self.subnet, self.gateway
            )));
        }
        Ok(())
    }
}

/// Network names double as bridge names: Linux allows 15 bytes.
pub(crate) fn validate_network_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(NetworkError::InvalidNetworkName(name.to_string()))
    }
}

/// VM ids go into file contents and firewall rule comments: a conservative alphabet.
pub(crate) fn validate_vm_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(NetworkError::InvalidVmId(id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_enumerate_hosts() {
        let s: Subnet = "10.77.0.0/16".parse().unwrap();
        assert_eq!(s.first_host(), Ipv4Addr::new(10, 77, 0, 1));
        assert!(s.contains(Ipv4Addr::new(10, 77, 255, 254)));
        assert!(!s.contains(Ipv4Addr::new(10, 78, 0, 1)));
        let small: Subnet = "192.168.5.0/30".parse().unwrap();
        assert_eq!(
            small.hosts().collect::<Vec<_>>(),
            [Ipv4Addr::new(192, 168, 5, 1), Ipv4Addr::new(192, 168, 5, 2)]
        );
        assert!(s.overlaps(&"10.77.3.0/24".parse().unwrap()));
        assert!(!s.overlaps(&"10.78.0.0/24".parse().unwrap()));
        for bad in ["10.77.0.1/16", "10.77.0.0", "10.77.0.0/31", "10.77.0.0/4", "x/16", "::1/64"] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad} accepted");
        }
        assert_eq!(NetworkConfig::default_network().subnet.to_string(), DEFAULT_SUBNET);
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_network_name("kiln0").is_ok());
        assert!(validate_network_name("a-very-long-name-x").is_err());
        assert!(validate_network_name("0abc").is_err());
        assert!(validate_network_name("br;rm").is_err());
        assert!(validate_vm_id("web-1.test_2").is_ok());
        assert!(validate_vm_id("a b").is_err());
        assert!(validate_vm_id("").is_err());
    }
}
