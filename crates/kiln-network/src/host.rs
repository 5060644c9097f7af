//! The host side, through iproute2's `ip` and `iptables` run as child processes (docs/networking.md
//! says why not a netlink crate): links, addresses, sysctls. Every call acts on the network
//! namespace of the calling thread, which is how the tests confine themselves to their own.

use std::net::Ipv4Addr;
use std::process::Command;

use crate::config::{NetworkConfig, Subnet};
use crate::error::{NetworkError, Result};

/// Runs `program args`, returning stdout; a failure becomes an error naming the command, with
/// "needs root" when the kernel refused for lack of privilege.
pub(crate) fn run(program: &str, args: &[&str], what: &str) -> Result<String> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program).args(args).output().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            let package = if program == "ip" { "iproute2" } else { program };
            NetworkError::ToolMissing { program: program.to_string(), package: package.to_string() }
        } else {
            NetworkError::Spawn { command: command.clone(), source }
        }
    })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if ["Operation not permitted", "Permission denied", "you must be root"].iter().any(|m| stderr.contains(m))
    {
        return Err(NetworkError::NeedsPrivilege { what: what.to_string(), command, stderr });
    }
    Err(NetworkError::Command { command, stderr })
}

/// True when `program args` succeeds (for checks like "does this link exist").
pub(crate) fn succeeds(program: &str, args: &[&str]) -> Result<bool> {
    match run(program, args, "checking the host's network") {
        Ok(_) => Ok(true),
        Err(NetworkError::Command { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

pub(crate) fn link_exists(name: &str) -> Result<bool> {
    succeeds("ip", &["link", "show", "dev", name])
}

/// Creates the bridge when missing and (re)applies its address, state and sysctls.
pub(crate) fn ensure_bridge(config: &NetworkConfig) -> Result<()> {
    let what = format!("creating bridge {}", config.bridge);
    if !link_exists(&config.bridge)? {
        let routes = run("ip", &["-4", "-o", "route", "show"], &what)?;
        if let Some(route) = overlapping_route(&routes, &config.subnet) {
            return Err(NetworkError::HostRouteOverlap {
                name: config.name.clone(),
                subnet: config.subnet.to_string(),
                route: route.to_string(),
            });
        }
        run("ip", &["link", "add", &config.bridge, "type", "bridge"], &what)?;
    }
    let address = format!("{}/{}", config.gateway, config.subnet.prefix());
    run("ip", &["addr", "replace", &address, "dev", &config.bridge], &what)?;
    run("ip", &["link", "set", &config.bridge, "up"], &what)?;
    // Forwarding for NAT and published ports (this host's routing; never turned off again, as other
    // software may rely on it). route_localnet on the bridge only: lets traffic to 127.0.0.1:HOST,
    // redirected to a guest, leave through it (then masqueraded to the gateway address).
    write_sysctl("net/ipv4/ip_forward", "1", &what)?;
    write_sysctl(&format!("net/ipv4/conf/{}/route_localnet", config.bridge), "1", &what)
}

fn write_sysctl(key: &str, value: &str, what: &str) -> Result<()> {
    let path = format!("/proc/sys/{key}");
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            NetworkError::NeedsPrivilege {
                what: what.to_string(),
                command: format!("write {path}"),
                stderr: e.to_string(),
            }
        } else {
            NetworkError::State { path: path.into(), source: e }
        }
    })
}

/// The first route of `ip -4 -o route show` whose destination overlaps `subnet` (the default
/// route aside): the bridge's address would shadow it or be shadowed.
fn overlapping_route<'a>(routes: &'a str, subnet: &Subnet) -> Option<&'a str> {
    let mask = |prefix: u32| u32::MAX.checked_shl(32 - prefix.min(32)).unwrap_or(0);
    routes.lines().map(str::trim).find(|line| {
        let Some(dest) = line.split_whitespace().next() else { return false };
        let (addr, prefix) = dest.split_once('/').unwrap_or((dest, "32"));
        match (addr.parse::<Ipv4Addr>(), prefix.parse::<u32>()) {
            // Two ranges overlap when the shorter prefix's mask gives both the same network.
            (Ok(addr), Ok(prefix)) if prefix > 0 => {
                let common = mask(prefix.min(u32::from(subnet.prefix())));
                u32::from(addr) & common == u32::from(subnet.network()) & common
            }
            _ => false,
        }
    })
}

/// Creates a persistent tap (opened later by the VMM) as a port of the bridge, up.
pub(crate) fn ensure_tap(tap: &str, bridge: &str) -> Result<()> {
    let what = format!("creating tap {tap}");
    if !link_exists(tap)? {
        run("ip", &["tuntap", "add", "dev", tap, "mode", "tap"], &what)?;
    }
    run("ip", &["link", "set", "dev", tap, "master", bridge, "up"], &what)?;
    Ok(())
}

pub(crate) fn delete_link(name: &str) -> Result<()> {
    if link_exists(name)? {
        run("ip", &["link", "del", "dev", name], &format!("removing {name}"))?;
    }
    Ok(())
}

/// The host's non-loopback IPv4 name servers (from `/etc/resolv.conf`), for the guest.
pub(crate) fn host_dns() -> Vec<Ipv4Addr> {
    let Ok(text) = std::fs::read_to_string("/etc/resolv.conf") else { return Vec::new() };
    parse_nameservers(&text)
}

fn parse_nameservers(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<Ipv4Addr>().ok())
        .filter(|ip| !ip.is_loopback())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_resolvers_are_not_handed_to_guests() {
        let text = "# x\nnameserver 127.0.0.53\nnameserver 192.0.2.53\nnameserver ::1\nsearch lan\n";
        assert_eq!(parse_nameservers(text), [Ipv4Addr::new(192, 0, 2, 53)]);
    }

    #[test]
    fn routes_overlapping_the_subnet_are_found() {
        let subnet: Subnet = "10.77.0.0/16".parse().unwrap();
        let routes =
            "default via 10.0.2.2 dev eth0\n10.0.2.0/24 dev eth0 proto kernel scope link src 10.0.2.15\n";
        assert_eq!(overlapping_route(routes, &subnet), None);
        let inside = format!("{routes}10.77.3.0/24 dev wg0 scope link\n");
        assert_eq!(overlapping_route(&inside, &subnet), Some("10.77.3.0/24 dev wg0 scope link"));
        assert!(overlapping_route("10.0.0.0/8 dev vpn0\n", &subnet).is_some(), "a wider route");
        assert!(overlapping_route("10.77.9.9 dev x\n", &subnet).is_some(), "a host route");
    }

    #[test]
    fn a_missing_tool_says_what_to_install() {
        let err = run("kiln-no-such-tool", &[], "testing").unwrap_err().to_string();
        assert!(err.contains("apt-get install"), "{err}");
    }
}
