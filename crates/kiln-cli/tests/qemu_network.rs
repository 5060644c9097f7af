//! `kiln` networking end to end with the QEMU backend (TCG where /dev/kvm is missing or PVM). Every
//! VM command runs inside a network namespace the test creates (`ip netns exec`), so the bridge,
//! taps and rules live there and vanish with it; images are pulled outside it from a registry on
//! the host's 127.0.0.1.
#![allow(clippy::unwrap_used)] // Test helpers: a failed setup step should panic.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_test_utils::netns::Netns;
use kiln_test_utils::oci::{busybox_layers, OciLayout};
use kiln_test_utils::registry::LocalRegistry;
use kiln_test_utils::{guest_assets, require_root, ssh_image, static_agent, SSH_IMAGE_REF};
use serde_json::json;

/// A state root, and `kiln` run against it — inside `ns` for everything that touches VMs.
struct Kiln {
    root: tempfile::TempDir,
    ns: Netns,
}

impl Kiln {
    fn new() -> Self {
        let k = Kiln { root: tempfile::tempdir().unwrap(), ns: Netns::new("kiln") };
        k.outside(&["kernel", "import", guest_assets().vmlinux.to_str().unwrap(), "--name", "guest"]);
        k
    }

    fn output(&self, in_ns: bool, args: &[&str]) -> Output {
        let mut c = if in_ns {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &self.ns.0, env!("CARGO_BIN_EXE_kiln")]);
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_kiln"))
        };
        let out = c
            .args(args)
            .env("KILN_ROOT", self.root.path())
            .env("KILN_AGENT_BIN", static_agent())
            .env_remove("KILN_NETWORK")
            .env_remove("KILN_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        kiln_test_utils::eprint_command(&format!("kiln {}", args.join(" ")), &out);
        out
    }

    /// `kiln args` in the namespace; expects success, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.output(true, args);
        assert!(out.status.success(), "kiln {args:?} failed: {}", text(&out.stderr));
        text(&out.stdout)
    }

    /// `kiln args` outside the namespace (pulls from the registry on the host's loopback).
    fn outside(&self, args: &[&str]) -> String {
        let out = self.output(false, args);
        assert!(out.status.success(), "kiln {args:?} failed: {}", text(&out.stderr));
        text(&out.stdout)
    }

    /// Retries `kiln args` until its stdout contains `want` (a TCG guest takes a while to boot).
    fn eventually(&self, args: &[&str], want: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let out = self.output(true, args);
            let stdout = text(&out.stdout);
            if out.status.success() && stdout.contains(want) {
                return stdout;
            }
            assert!(start.elapsed() < timeout, "kiln {args:?} never printed {want:?}: {}", text(&out.stderr));
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    fn guest_ip(&self, vm: &str) -> String {
        let inspect: serde_json::Value = serde_json::from_str(&self.ok(&["inspect", vm])).unwrap();
        inspect["network"]["guest"]["address"].as_str().unwrap().to_string()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn busybox_image(registry: &LocalRegistry, dir: &std::path::Path) -> String {
    let mut layout = OciLayout::create(&dir.join("busybox"));
    layout.add_image(&busybox_layers(), true, json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]}), "v1");
    registry.push_oci(&layout.dir, "v1", "kiln/busybox:net");
    format!("{}/kiln/busybox:net", registry.host())
}

#[test]
fn two_vms_reach_each_other_a_published_port_reaches_the_guest_and_rm_leaves_nothing() {
    require_root!();
    let registry = LocalRegistry::start();
    let work = tempfile::tempdir().unwrap();
    let image = busybox_image(&registry, work.path());
    let kiln = Kiln::new();
    kiln.outside(&["image", "pull", &image]);

    // A foreground --rm VM: it has its address, and when it exits its tap, rules and (being the
    // last VM) the bridge go away with it.
    let out = kiln.ok(&[
        "run",
        "--rm",
        "--hypervisor",
        "qemu",
        &image,
        "busybox",
        "ip",
        "-4",
        "addr",
        "show",
        "eth0",
    ]);
    assert!(out.contains("inet 10.77.0."), "{out}");
    assert_eq!(kiln.ns.leftovers(), (vec![], vec![]), "an exited --rm VM left links or rules");

    let serve = "echo hello-from-web > /tmp/index.html; exec busybox httpd -f -p 8080 -h /tmp";
    let args =
        ["run", "-d", "--hypervisor", "qemu", "--name", "web", "-p", "18080:8080", &image, "sh", "-c", serve];
    kiln.ok(&args);
    kiln.ok(&["run", "-d", "--hypervisor", "qemu", "--name", "client", &image, "sleep", "3600"]);
    let web_ip = kiln.guest_ip("web");
    let client_ip = kiln.guest_ip("client");
    assert_ne!(web_ip, client_ip);
    assert!(web_ip.starts_with("10.77."), "{web_ip}");
    assert!(kiln.ok(&["network", "ls"]).contains("kiln0"));

    // VM to VM, on the network.
    let url = format!("http://{web_ip}:8080/index.html");
    let timeout = Duration::from_secs(180);
    kiln.eventually(&["exec", "client", "busybox", "wget", "-q", "-O", "-", &url], "hello-from-web", timeout);
    // The guest has its address on eth0 (the kernel's ip= argument).
    let addr = kiln.ok(&["exec", "client", "busybox", "ip", "-4", "addr", "show", "eth0"]);
    assert!(addr.contains(&format!("{client_ip}/16")), "{addr}");
    // Name servers: the host's (inside `ip netns exec`, /etc/netns/NS/resolv.conf or the host's
    // own), loopback ones left out since a guest cannot reach them.
    let host_servers: Vec<String> = std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .map(|s| s.trim().to_string())
        .filter(|s| s.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| !ip.is_loopback()))
        .collect();
    if !host_servers.is_empty() {
        let resolv = kiln.ok(&["exec", "client", "cat", "/etc/resolv.conf"]);
        for server in &host_servers {
            assert!(resolv.contains(&format!("nameserver {server}")), "{resolv}");
        }
    }

    // The published port, from the host's loopback (inside the namespace standing in for the host)...
    let curl = kiln.ns.exec(&["curl", "-s", "--max-time", "10", "http://127.0.0.1:18080/index.html"]);
    assert_eq!(curl, "hello-from-web\n");
    // ...and from another VM through the host (the gateway address).
    let via_host = "http://10.77.0.1:18080/index.html";
    assert_eq!(
        kiln.ok(&["exec", "client", "busybox", "wget", "-q", "-O", "-", via_host]),
        "hello-from-web\n"
    );

    // A second VM may not publish the same host port.
    let out = kiln.output(true, &["create", "--hypervisor", "qemu", "-p", "18080:80", &image]);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("already published by VM"), "{}", text(&out.stderr));

    kiln.ok(&["rm", "-f", "web", "client"]);
    assert_eq!(kiln.ns.leftovers(), (vec![], vec![]), "rm left links or rules behind");
    assert!(kiln.ok(&["network", "ls"]).contains("kiln0  "), "the network record stays");
}

#[test]
fn ssh_into_the_debian_image() {
    require_root!();
    let registry = LocalRegistry::start();
    registry.push_oci(ssh_image(), SSH_IMAGE_REF, "debian/ssh:bookworm");
    let image = format!("{}/debian/ssh:bookworm", registry.host());
    let kiln = Kiln::new();
    kiln.outside(&["image", "pull", &image]);

    kiln.ok(&["run", "-d", "--hypervisor", "qemu", "--memory", "512M", "--name", "deb", &image]);
    let os_release = kiln.eventually(
        &["ssh", "deb", "cat", "/etc/os-release"],
        "VERSION_CODENAME=bookworm",
        Duration::from_secs(240),
    );
    assert!(os_release.contains("Debian GNU/Linux 12"), "{os_release}");
    // ssh went over the network, to the VM's own address.
    let ip = kiln.guest_ip("deb");
    let who = kiln.ok(&["ssh", "deb", "sh", "-c", "'echo $SSH_CONNECTION'"]);
    assert!(who.trim_end().ends_with(&format!("{ip} 22")), "{who}");

    kiln.ok(&["rm", "-f", "deb"]);
    assert_eq!(kiln.ns.leftovers(), (vec![], vec![]), "rm left links or rules behind");
}
