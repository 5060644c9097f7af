//! Leases across "processes": every allocator opens the lease file on its own (its own lock file
//! descriptor, as a separate `kiln` process would), so only the file lock keeps them apart.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use kiln_network::ipam::Ipam;
use kiln_network::{NetworkConfig, Networks};

#[test]
fn concurrent_allocators_never_share_an_address_and_leases_survive_reopening() {
    let state = tempfile::tempdir().unwrap();
    let nets = Networks::open(state.path()).unwrap();
    let config = NetworkConfig::new("busy", "10.66.0.0/24".parse().unwrap()).unwrap();
    nets.create(&config).unwrap();
    let dir = state.path().join("busy");
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (dir, config) = (dir.clone(), config.clone());
            std::thread::spawn(move || {
                for i in 0..15 {
                    let mut leases = Ipam::new(&dir).lock(&config).unwrap();
                    leases.allocate(&config, &format!("vm-{t}-{i}")).unwrap();
                    leases.save().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Reopened from disk through the public API.
    let leases = Networks::open(state.path()).unwrap().leases("busy").unwrap();
    assert_eq!(leases.len(), 120);
    let ips: HashSet<Ipv4Addr> = leases.iter().map(|l| l.ip).collect();
    assert_eq!(ips.len(), 120, "an address was handed out twice");
    assert!(!ips.contains(&config.gateway));
    let taps: HashSet<&str> = leases.iter().map(|l| l.tap.as_str()).collect();
    assert_eq!(taps.len(), 120);
    // A VM keeps its address when it asks again.
    let mut locked = Ipam::new(&dir).lock(&config).unwrap();
    assert_eq!(
        locked.allocate(&config, "vm-3-7").unwrap().ip,
        leases.iter().find(|l| l.vm_id == "vm-3-7").unwrap().ip
    );
}
