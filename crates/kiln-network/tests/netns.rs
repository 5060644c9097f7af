//! kiln-network on a real kernel, confined to network namespaces each test creates and removes:
//! a "host" namespace where the library makes its bridge, taps and rules, one namespace per
//! stand-in guest, and an "outside" one for a remote client. A guest stand-in is a tap `eth0` in
//! its namespace, with the attachment's address, wired to the VM's host tap by two threads copying
//! frames both ways (what a VMM's virtio-net does). Nothing touches the real host namespace.

#![allow(clippy::unwrap_used)] // Test helpers: a failed setup step should panic.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use kiln_network::{Attachment, Networks, PortMapping};
use kiln_test_utils::netns::Netns;
use kiln_test_utils::require_root;

const TUNSETIFF: libc::Ioctl = 0x4004_54ca;

/// Opens tap `name` in the calling thread's namespace (IFF_TAP | IFF_NO_PI: raw Ethernet frames).
fn open_tap(name: &str) -> File {
    let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").unwrap();
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: u16,
        pad: [u8; 22],
    }
    let mut req = IfReq { name: [0; 16], flags: 0x0002 | 0x1000, pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    use std::os::fd::AsRawFd;
    // SAFETY: TUNSETIFF reads a `struct ifreq` (name, then flags), which `IfReq` lays out with
    // the kernel's size (40 bytes); the pointer is valid for the call.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    assert_eq!(ret, 0, "TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    file
}

/// Copies frames from one tap to another until either goes away.
fn pump(mut from: File, mut to: File) {
    std::thread::spawn(move || {
        let mut frame = vec![0u8; 65536];
        while let Ok(n) = from.read(&mut frame) {
            if n == 0 || to.write(&frame[..n]).is_err() {
                break;
            }
        }
    });
}

/// A stand-in guest for `attachment`: its own namespace with `eth0` (the attachment's MAC and
/// address, default route via the gateway), wired to the host tap in `host`.
fn guest(host: &Netns, attachment: &Attachment) -> Netns {
    let g = Netns::new("guest");
    g.ip(&["tuntap", "add", "dev", "eth0", "mode", "tap"]);
    g.ip(&["link", "set", "eth0", "address", &attachment.mac, "up"]);
    g.ip(&["addr", "add", &format!("{}/{}", attachment.ip, attachment.prefix), "dev", "eth0"]);
    g.ip(&["route", "add", "default", "via", &attachment.gateway.to_string()]);
    let tap = attachment.tap.clone();
    let host_side = host.run(move || open_tap(&tap));
    let guest_side = g.run(|| open_tap("eth0"));
    pump(host_side.try_clone().unwrap(), guest_side.try_clone().unwrap());
    pump(guest_side, host_side);
    g
}

fn connect(addr: SocketAddr) -> TcpStream {
    let mut last = None;
    for _ in 0..50 {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                return s;
            }
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("connecting to {addr}: {last:?}");
}

/// A server in `ns` on `port`: answers each connection with "reply to <what it read>".
fn echo_server(ns: &Netns, port: u16) {
    let listener = ns.run(move || TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap());
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 64];
            let n = conn.read(&mut buf).unwrap_or(0);
            let _ = conn.write_all(format!("reply to {}", String::from_utf8_lossy(&buf[..n])).as_bytes());
        }
    });
}

/// A server in `ns` on `port` that answers with the address the connection came from.
fn peer_server(ns: &Netns, port: u16) {
    let listener = ns.run(move || TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap());
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let Ok(peer) = conn.peer_addr() else { continue };
            let _ = conn.read(&mut [0u8; 64]);
            let _ = conn.write_all(peer.ip().to_string().as_bytes());
        }
    });
}

fn ask(ns: &Netns, addr: SocketAddr, what: &'static str) -> String {
    ns.run(move || {
        let mut s = connect(addr);
        s.write_all(what.as_bytes()).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    })
}

#[test]
fn two_vms_on_one_network_reach_each_other_and_detach_leaves_nothing() {
    require_root!();
    let host = Netns::new("host");
    let state = tempfile::tempdir().unwrap();
    let nets = Networks::open(state.path()).unwrap();
    nets.ensure_default().unwrap();
    let (n1, n2) = (nets.clone(), nets.clone());
    let a = host.run(move || n1.attach("kiln0", "vm-a", &[]).unwrap());
    let b = host.run(move || n2.attach("kiln0", "vm-b", &[]).unwrap());
    assert_ne!(a.ip, b.ip);
    assert_ne!(a.tap, b.tap);
    assert!(host.ip(&["link", "show", "kiln0"]).contains("kiln0"));
    assert!(host.ip(&["-4", "addr", "show", "kiln0"]).contains("10.77.0.1/16"));
    let n3 = nets.clone();
    assert_eq!(host.run(move || n3.attach("kiln0", "vm-a", &[]).unwrap()), a, "attach is idempotent");

    let ga = guest(&host, &a);
    let gb = guest(&host, &b);
    echo_server(&gb, 7000);
    echo_server(&ga, 7001);
    assert_eq!(ask(&ga, (b.ip, 7000).into(), "a"), "reply to a");
    assert_eq!(ask(&gb, (a.ip, 7001).into(), "b"), "reply to b");
    // The gateway (the host side) is reachable too.
    echo_server(&host, 7002);
    assert_eq!(ask(&ga, (a.gateway, 7002).into(), "gw"), "reply to gw");

    let n4 = nets.clone();
    host.run(move || {
        n4.detach("kiln0", "vm-a").unwrap();
        n4.detach("kiln0", "vm-a").unwrap();
        n4.detach("kiln0", "vm-b").unwrap();
    });
    assert_eq!(host.leftovers(), (vec![], vec![]), "links and rules left after detaching all VMs");
    assert!(nets.leases("kiln0").unwrap().is_empty());
}

#[test]
fn a_published_port_reaches_the_guest_from_outside_and_from_the_hosts_loopback_and_nat_works() {
    require_root!();
    let host = Netns::new("host");
    let outside = Netns::new("out");
    // A link between "outside" and the host: 192.0.2.2 → 192.0.2.1.
    let (h_end, o_end) =
        (format!("kv{}h", std::process::id() % 100000), format!("kv{}o", std::process::id() % 100000));
    host.ip(&["link", "add", &h_end, "type", "veth", "peer", "name", &o_end, "netns", &outside.0]);
    host.ip(&["addr", "add", "192.0.2.1/24", "dev", &h_end]);
    host.ip(&["link", "set", &h_end, "up"]);
    outside.ip(&["addr", "add", "192.0.2.2/24", "dev", &o_end]);
    outside.ip(&["link", "set", &o_end, "up"]);

    let state = tempfile::tempdir().unwrap();
    let nets = Networks::open(state.path()).unwrap();
    nets.ensure_default().unwrap();
    let ports: Vec<PortMapping> = vec!["18080:80".parse().unwrap()];
    let n1 = nets.clone();
    let web = host.run(move || n1.attach("kiln0", "web", &ports).unwrap());
    let g = guest(&host, &web);
    echo_server(&g, 80);

    assert_eq!(ask(&host, "127.0.0.1:18080".parse().unwrap(), "loopback"), "reply to loopback");
    assert_eq!(ask(&host, "192.0.2.1:18080".parse().unwrap(), "host address"), "reply to host address");
    assert_eq!(ask(&outside, "192.0.2.1:18080".parse().unwrap(), "outside"), "reply to outside");
    // Outbound NAT: the guest reaches the outside host, which sees the host's address (it has no
    // route back to the VM subnet).
    peer_server(&outside, 9000);
    assert_eq!(ask(&g, "192.0.2.2:9000".parse().unwrap(), "who am i"), "192.0.2.1");

    // Another VM may not take the same host port.
    let n2 = nets.clone();
    let err = host
        .run(move || n2.attach("kiln0", "other", &["18080:81".parse().unwrap()]).unwrap_err().to_string());
    assert!(err.contains("already published by VM \"web\""), "{err}");

    let n3 = nets.clone();
    host.run(move || n3.detach("kiln0", "web").unwrap());
    let (links, rules) = host.leftovers();
    assert_eq!(links, [h_end], "only the test's own veth may remain");
    assert!(rules.is_empty(), "rules left: {rules:?}");
}

#[test]
fn removing_a_network_with_vms_needs_force_and_then_removes_everything() {
    require_root!();
    let host = Netns::new("host");
    let state = tempfile::tempdir().unwrap();
    let nets = Networks::open(state.path()).unwrap();
    let config = kiln_network::NetworkConfig::new("lab1", "10.99.4.0/24".parse().unwrap()).unwrap();
    nets.create(&config).unwrap();
    let n = nets.clone();
    let err = host.run(move || {
        n.attach("lab1", "x", &["2222:22".parse().unwrap()]).unwrap();
        n.attach("lab1", "y", &[]).unwrap();
        n.attach("lab1", "z", &[]).unwrap();
        // z's record is gone (say its `kiln` crashed): the caller reclaims its lease and tap.
        assert_eq!(n.reclaim("lab1", &|vm| vm != "z").unwrap(), ["z"]);
        n.remove("lab1", false).unwrap_err().to_string()
    });
    assert!(err.contains("still used by x, y"), "{err}");
    let z_tap = kiln_network::ipam::tap_name("lab1", "z");
    assert!(!host.ip(&["-o", "link", "show"]).contains(&z_tap), "reclaim left z's tap");
    let n = nets.clone();
    host.run(move || n.remove("lab1", true).unwrap());
    assert_eq!(host.leftovers(), (vec![], vec![]));
    assert!(nets.list().unwrap().is_empty());
}

#[test]
fn simultaneous_attaches_from_separate_handles_share_one_bridge_and_get_distinct_addresses() {
    require_root!();
    let host = Netns::new("host");
    let state = tempfile::tempdir().unwrap();
    Networks::open(state.path()).unwrap().ensure_default().unwrap();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let dir = state.path().to_path_buf();
            // Each thread opens its own handle, as separate `kiln` processes would.
            host.spawn(move || Networks::open(&dir).unwrap().attach("kiln0", &format!("vm{i}"), &[]).unwrap())
        })
        .collect();
    let attachments: Vec<Attachment> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ips: std::collections::HashSet<Ipv4Addr> = attachments.iter().map(|a| a.ip).collect();
    assert_eq!(ips.len(), 4);
    let bridges = host.ip(&["-o", "link", "show", "type", "bridge"]);
    assert_eq!(bridges.lines().count(), 1, "{bridges}");
    for a in &attachments {
        assert!(
            host.ip(&["-o", "link", "show", "master", "kiln0"]).contains(&a.tap),
            "{} not on the bridge",
            a.tap
        );
    }
    let dir = state.path().to_path_buf();
    host.run(move || {
        let nets = Networks::open(&dir).unwrap();
        for i in 0..4 {
            nets.detach("kiln0", &format!("vm{i}")).unwrap();
        }
    });
    assert_eq!(host.leftovers(), (vec![], vec![]));
}
