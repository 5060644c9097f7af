//! Network namespaces for tests that touch networking: each test makes its own, runs commands
//! or threads inside it, and the namespace (with every link and firewall rule in it) goes away on
//! drop, so nothing reaches the host's own network namespace.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// True when this process runs as root (namespaces, bridges and iptables need it).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Skips the calling test, loudly, when not running as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::netns::is_root() {
            eprintln!("SKIPPED {}: needs root (network namespaces, bridges, iptables)", module_path!());
            return;
        }
    };
}

/// Runs a command, panicking with its stderr when it fails; returns stdout.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace (`lo` up), deleted with every link and rule in it on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn new(role: &str) -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("kn{}-{role}{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }

    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.0];
        full.extend_from_slice(args);
        sh(&full)
    }

    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.0];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Runs `f` on a thread inside this namespace (sockets it creates stay in it).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().unwrap()
    }

    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let ns = File::open(Path::new("/var/run/netns").join(&self.0)).unwrap();
        std::thread::spawn(move || {
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap();
            f()
        })
    }

    /// Links other than `lo`, and every iptables rule or chain mentioning Kiln.
    pub fn leftovers(&self) -> (Vec<String>, Vec<String>) {
        let links: Vec<String> = self
            .ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().split('@').next().unwrap_or("").to_string()))
            .filter(|n| n != "lo")
            .collect();
        let rules = self.exec(&["iptables-save"]);
        let rules =
            rules.lines().filter(|l| l.contains("kiln") || l.contains("KILN")).map(String::from).collect();
        (links, rules)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
