//! iptables rules (Debian 12's default `iptables` is the nf_tables backend): outbound NAT,
//! forwarding, published ports. Kiln's rules live in its own chains, entered from the built-in
//! ones, and every rule carries a comment `kiln:<network>` or `kiln:<network>:<vm>`, so removal
//! finds exactly what Kiln added even when its state files are gone.

use crate::config::NetworkConfig;
use crate::error::{NetworkError, Result};
use crate::host::{run, succeeds};
use crate::ipam::Lease;

const FORWARD: &str = "KILN-FORWARD";
const DNAT: &str = "KILN-DNAT";
const POSTROUTING: &str = "KILN-POSTROUTING";

/// Kiln's chains: (table, chain, the built-in chains that jump to it, extra match on the jump).
const CHAINS: [(&str, &str, &[&str], &[&str]); 3] = [
    ("filter", FORWARD, &["FORWARD"], &[]),
    ("nat", DNAT, &["PREROUTING", "OUTPUT"], &["-m", "addrtype", "--dst-type", "LOCAL"]),
    ("nat", POSTROUTING, &["POSTROUTING"], &[]),
];

/// One rule in one of Kiln's chains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Rule {
    pub table: &'static str,
    pub chain: &'static str,
    pub args: Vec<String>,
}

fn rule(table: &'static str, chain: &'static str, args: &[&str], tag: &str) -> Rule {
    let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    args.extend(["-m", "comment", "--comment", tag].map(String::from));
    Rule { table, chain, args }
}

pub(crate) fn network_tag(network: &str) -> String {
    format!("kiln:{network}")
}

pub(crate) fn vm_tag(network: &str, vm_id: &str) -> String {
    format!("kiln:{network}:{vm_id}")
}

/// The network's own rules: its VMs may send anywhere (and reach each other, should the host
/// filter bridged traffic); replies come back; traffic leaving the host from the subnet is
/// masqueraded; redirected connections from this host's loopback or from the subnet itself
/// (a VM using another's published port) are masqueraded so the replies return through the host.
pub(crate) fn network_rules(config: &NetworkConfig) -> Vec<Rule> {
    let tag = network_tag(&config.name);
    let (br, subnet) = (config.bridge.as_str(), config.subnet.to_string());
    vec![
        rule("filter", FORWARD, &["-i", br, "-j", "ACCEPT"], &tag),
        rule(
            "filter",
            FORWARD,
            &["-o", br, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"],
            &tag,
        ),
        rule("nat", POSTROUTING, &["-s", &subnet, "!", "-o", br, "-j", "MASQUERADE"], &tag),
        rule("nat", POSTROUTING, &["-s", "127.0.0.0/8", "-o", br, "-j", "MASQUERADE"], &tag),
        rule(
            "nat",
            POSTROUTING,
            &["-s", &subnet, "-o", br, "-m", "conntrack", "--ctstate", "DNAT", "-j", "MASQUERADE"],
            &tag,
        ),
    ]
}

/// A VM's published ports: DNAT from any local address (PREROUTING for other hosts, OUTPUT for
/// this one) and an explicit forward accept for hosts whose FORWARD policy is DROP.
pub(crate) fn port_rules(config: &NetworkConfig, lease: &Lease) -> Vec<Rule> {
    let tag = vm_tag(&config.name, &lease.vm_id);
    let mut rules = Vec::new();
    for port in &lease.ports {
        let (proto, host_port, guest_port) =
            (port.protocol.to_string(), port.host_port.to_string(), port.guest_port.to_string());
        let to = format!("{}:{}", lease.ip, port.guest_port);
        let ip = lease.ip.to_string();
        rules.push(rule(
            "nat",
            DNAT,
            &["-p", &proto, "--dport", &host_port, "-j", "DNAT", "--to-destination", &to],
            &tag,
        ));
        let accept = ["-d", &ip, "-o", &config.bridge, "-p", &proto, "--dport", &guest_port, "-j", "ACCEPT"];
        rules.push(rule("filter", FORWARD, &accept, &tag));
    }
    rules
}

fn iptables(table: &str, args: &[&str], what: &str) -> Result<String> {
    let mut full = vec!["-w", "-t", table];
    full.extend_from_slice(args);
    run("iptables", &full, what)
}

fn iptables_ok(table: &str, args: &[&str]) -> Result<bool> {
    let mut full = vec!["-w", "-t", table];
    full.extend_from_slice(args);
    succeeds("iptables", &full)
}

/// Creates Kiln's chains and the jumps into them (each once).
pub(crate) fn ensure_chains() -> Result<()> {
    let what = "setting up Kiln's firewall chains";
    for (table, chain, parents, matches) in CHAINS {
        if !iptables_ok(table, &["-S", chain])? {
            match iptables(table, &["-N", chain], what) {
                // Made meanwhile by a Kiln with another state root.
                Err(NetworkError::Command { stderr, .. }) if stderr.contains("already exists") => {}
                other => {
                    other?;
                }
            }
        }
        for parent in parents {
            let mut jump: Vec<&str> = matches.to_vec();
            jump.extend(["-j", chain]);
            let mut check = vec!["-C", parent];
            check.extend(&jump);
            if !iptables_ok(table, &check)? {
                let mut insert = vec!["-I", parent, "1"];
                insert.extend(&jump);
                iptables(table, &insert, what)?;
            }
        }
    }
    Ok(())
}

/// Appends each rule that is not already there.
pub(crate) fn add(rules: &[Rule], what: &str) -> Result<()> {
    for r in rules {
        let args: Vec<&str> = r.args.iter().map(String::as_str).collect();
        let mut check = vec!["-C", r.chain];
        check.extend(&args);
        if !iptables_ok(r.table, &check)? {
            let mut append = vec!["-A", r.chain];
            append.extend(&args);
            iptables(r.table, &append, what)?;
        }
    }
    Ok(())
}

/// Which tagged rules to delete.
pub(crate) enum Select<'a> {
    /// One VM's rules.
    Vm { network: &'a str, vm_id: &'a str },
    /// A network's rules and all its VMs'.
    Network(&'a str),
}

impl Select<'_> {
    fn matches(&self, line: &str) -> bool {
        match self {
            Select::Vm { network, vm_id } => line.contains(&format!("/* {} */", vm_tag(network, vm_id))),
            Select::Network(network) => {
                let tag = network_tag(network);
                line.contains(&format!("/* {tag} */")) || line.contains(&format!("/* {tag}:"))
            }
        }
    }
}

/// Deletes the selected rules from Kiln's chains (by line number, last first). Missing chains
/// are fine: there is nothing to delete.
pub(crate) fn delete(select: &Select<'_>, what: &str) -> Result<()> {
    for (table, chain, _, _) in CHAINS {
        if !iptables_ok(table, &["-S", chain])? {
            continue;
        }
        let listing = iptables(table, &["-L", chain, "-n", "--line-numbers"], what)?;
        let mut numbers: Vec<u32> = listing
            .lines()
            .filter(|line| select.matches(line))
            .filter_map(|line| line.split_whitespace().next()?.parse().ok())
            .collect();
        numbers.sort_unstable_by(|a, b| b.cmp(a));
        for n in numbers {
            iptables(table, &["-D", chain, &n.to_string()], what)?;
        }
    }
    Ok(())
}

/// Removes Kiln's chains and their jumps when no network has rules left in them.
pub(crate) fn remove_chains_if_unused() -> Result<()> {
    let what = "removing Kiln's firewall chains";
    for (table, chain, _, _) in CHAINS {
        if iptables_ok(table, &["-S", chain])? {
            let rules = iptables(table, &["-S", chain], what)?;
            if rules.lines().any(|l| l.starts_with("-A ")) {
                return Ok(());
            }
        }
    }
    for (table, chain, parents, matches) in CHAINS {
        for parent in parents {
            let mut delete = vec!["-D", parent];
            delete.extend(matches.iter());
            delete.extend(["-j", chain]);
            while iptables_ok(table, &delete)? {}
        }
        if iptables_ok(table, &["-S", chain])? {
            iptables(table, &["-X", chain], what)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::{PortMapping, Protocol};

    #[test]
    fn rules_carry_their_tags_and_ports() {
        let config = NetworkConfig::default_network();
        let lease = Lease {
            vm_id: "web".into(),
            ip: "10.77.0.2".parse().unwrap(),
            mac: String::new(),
            tap: String::new(),
            ports: vec![PortMapping { host_port: 8080, guest_port: 80, protocol: Protocol::Tcp }],
        };
        let rules = port_rules(&config, &lease);
        assert_eq!(rules.len(), 2);
        let dnat = rules[0].args.join(" ");
        assert_eq!(
            dnat,
            "-p tcp --dport 8080 -j DNAT --to-destination 10.77.0.2:80 -m comment --comment kiln:kiln0:web"
        );
        assert!(network_rules(&config).iter().all(|r| r.args.ends_with(&["kiln:kiln0".to_string()])));
        let masq = network_rules(&config)[2].args.join(" ");
        assert_eq!(masq, "-s 10.77.0.0/16 ! -o kiln0 -j MASQUERADE -m comment --comment kiln:kiln0");
    }

    #[test]
    fn selection_matches_whole_tags_only() {
        let line = "3    ACCEPT     0    --  0.0.0.0/0  10.77.0.2  /* kiln:kiln0:web */ tcp dpt:80";
        assert!(Select::Vm { network: "kiln0", vm_id: "web" }.matches(line));
        assert!(!Select::Vm { network: "kiln0", vm_id: "we" }.matches(line));
        assert!(Select::Network("kiln0").matches(line));
        assert!(!Select::Network("kiln").matches(line));
        assert!(
            Select::Network("kiln0").matches("1 MASQUERADE all -- 10.77.0.0/16 0.0.0.0/0 /* kiln:kiln0 */")
        );
    }
}
