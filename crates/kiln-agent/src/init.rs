//! PID-1 duties: the filesystems a container expects, the console, hostname, loopback; and how
//! the agent stops (the guest, or only itself) in each role.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_agent_proto::ShutdownAction;

use crate::agent::{Agent, Role, StopKind, StopRequest};
use crate::config::{AgentConfig, PoweroffMethod};
use crate::{server, sys};

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: libc::c_ulong,
    data: &'static str,
}

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

const MOUNTS: &[Mount] = &[
    Mount { source: "proc", target: "/proc", fstype: "proc", flags: NOSUID_NODEV_NOEXEC, data: "" },
    Mount { source: "sysfs", target: "/sys", fstype: "sysfs", flags: NOSUID_NODEV_NOEXEC, data: "" },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: libc::MS_NOSUID,
        data: "mode=0755",
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: "gid=5,mode=620,ptmxmode=666",
    },
    Mount {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
    },
    Mount {
        source: "run",
        target: "/run",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=0755",
    },
];

fn mounted_targets() -> HashSet<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

/// Mounts what is missing, opens the console as stdio when the kernel could not, sets the
/// hostname from `/etc/hostname`, brings up loopback and makes Ctrl-Alt-Del a signal. Failures are
/// reported on the console and do not stop the boot (a read-only root may lack a mount point).
pub fn setup_pid1() {
    for m in MOUNTS {
        // /proc first, then /proc/self/mounts tells what the kernel already mounted (devtmpfs).
        let present = if m.target == "/proc" { HashSet::new() } else { mounted_targets() };
        if present.contains(m.target) || (m.target == "/proc" && std::path::Path::new("/proc/self").exists())
        {
            continue;
        }
        let _ = std::fs::create_dir_all(m.target);
        if let Err(e) = sys::mount(m.source, m.target, m.fstype, m.flags, m.data) {
            eprintln!("kiln-agent: mounting {} on {}: {e}", m.fstype, m.target);
        }
    }
    if sys::is_read_only("/").unwrap_or(false) && !mounted_targets().contains("/tmp") {
        if let Err(e) = sys::mount("tmp", "/tmp", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777") {
            eprintln!("kiln-agent: mounting tmpfs on /tmp (read-only root): {e}");
        }
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    if !(0..3).all(sys::fd_is_open) {
        if let Ok(console) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/console") {
            use std::os::fd::AsRawFd;
            for fd in 0..3 {
                let _ = sys::dup2(console.as_raw_fd(), fd);
            }
        }
    }
    let hostname =
        std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()).filter(|h| !h.is_empty());
    if let Some(h) = hostname {
        set_hostname(&h);
    }
    if let Err(e) = sys::loopback_up() {
        eprintln!("kiln-agent: bringing up lo: {e}");
    }
    if let Err(e) = sys::disable_ctrl_alt_del() {
        eprintln!("kiln-agent: Ctrl-Alt-Del stays a hard reboot: {e}");
    }
}

fn set_hostname(name: &str) {
    if let Err(e) = sys::sethostname(name) {
        eprintln!("kiln-agent: setting the hostname to {name:?}: {e}");
    }
}

/// Applies a configuration's machine settings as PID 1: the clock, the hostname, root's
/// `authorized_keys` and `/etc/resolv.conf`. Each failure is reported on the console and the rest
/// still applies (a read-only root keeps its files; the main process still runs).
pub fn apply_guest_config(config: &AgentConfig) {
    if let Some(t) = config.time {
        if let Err(e) = sys::set_realtime(t.secs, t.nanos) {
            eprintln!("kiln-agent: setting the clock: {e}");
        }
    }
    if let Some(h) = &config.hostname {
        set_hostname(h);
    }
    if let Some(keys) = &config.authorized_keys {
        if let Err(e) = write_authorized_keys(Path::new("/root"), keys) {
            eprintln!("kiln-agent: writing /root/.ssh/authorized_keys: {e}");
        }
    }
    if !config.nameservers.is_empty() {
        let text: String = config.nameservers.iter().map(|s| format!("nameserver {s}\n")).collect();
        if let Err(e) = replace_file(Path::new("/etc/resolv.conf"), text.as_bytes(), 0o644) {
            eprintln!("kiln-agent: writing /etc/resolv.conf: {e}");
        }
    }
}

/// `home/.ssh/authorized_keys` (mode 0600, in a 0700 `.ssh`, as sshd's StrictModes wants).
fn write_authorized_keys(home: &Path, keys: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let ssh = home.join(".ssh");
    for dir in [home, ssh.as_path()] {
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o700))?;
    replace_file(&ssh.join("authorized_keys"), keys.as_bytes(), 0o600)
}

/// Replaces `path` (a file, or a symlink itself: not its target) with `content`: a temporary file
/// renamed over it, so a reader sees the old or the new file. Not synced: these files are written
/// again at every boot, and a flush through the VMM to the host's disk costs the boot time.
fn replace_file(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".kiln-new");
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
    f.write_all(content)?;
    std::fs::rename(&tmp, path)
}

/// Maps a signal received by the agent to a stop request (None: not a stop signal).
pub fn stop_for_signal(role: Role, signal: i32) -> Option<StopRequest> {
    let kind = match (role, signal) {
        (Role::Init, libc::SIGTERM | libc::SIGINT) => StopKind::Guest(ShutdownAction::Reboot),
        (Role::Init, libc::SIGUSR1 | libc::SIGUSR2 | libc::SIGPWR) => {
            StopKind::Guest(ShutdownAction::Poweroff)
        }
        (_, libc::SIGTERM | libc::SIGINT) => StopKind::AgentOnly,
        _ => return None,
    };
    Some(StopRequest { kind, grace: crate::agent::DEFAULT_GRACE, reason: format!("signal {signal}") })
}

fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    done()
}

/// How long stopping waits for queued replies (the Shutdown's Ok, exits) to reach the hosts.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Stops what `req` asks for; never returns.
pub fn stop(agent: &Agent, req: StopRequest) -> ! {
    server::wait_flushed(FLUSH_TIMEOUT);
    match (agent.role, req.kind) {
        // PID 1 cannot stop alone: the guest goes down with it.
        (Role::Init, kind) => stop_guest_as_pid1(agent, kind, req.grace),
        (Role::Service, StopKind::Guest(action)) => {
            let cmd = match action {
                ShutdownAction::Poweroff => "poweroff",
                ShutdownAction::Reboot => "reboot",
            };
            stop_own_processes(agent, req.grace);
            let mut c = std::process::Command::new(cmd);
            c.env("PATH", crate::spawn::DEFAULT_PATH);
            match agent.reaper.spawn(&mut c) {
                Ok((_, exit)) => {
                    let _ = exit.recv_timeout(Duration::from_secs(30));
                }
                Err(e) => eprintln!("kiln-agent: asking the init to {cmd}: {e}"),
            }
            std::process::exit(0)
        }
        _ => {
            stop_own_processes(agent, req.grace);
            server::wait_flushed(FLUSH_TIMEOUT);
            std::process::exit(0)
        }
    }
}

/// SIGTERM to the process group of each of our children, SIGKILL after `grace`.
fn stop_own_processes(agent: &Agent, grace: Duration) {
    let live = agent.reaper.live();
    for &pid in &live {
        let _ = sys::kill(-(pid as i32), libc::SIGTERM);
    }
    if !wait_until(Instant::now() + grace, || agent.reaper.live().is_empty()) {
        for pid in agent.reaper.live() {
            let _ = sys::kill(-(pid as i32), libc::SIGKILL);
        }
        wait_until(Instant::now() + Duration::from_secs(1), || agent.reaper.live().is_empty());
    }
}

fn stop_guest_as_pid1(agent: &Agent, kind: StopKind, grace: Duration) -> ! {
    eprintln!("kiln-agent: stopping all processes");
    let _ = sys::kill(-1, libc::SIGTERM);
    if !wait_until(Instant::now() + grace, || !sys::has_children()) {
        eprintln!("kiln-agent: processes left after {grace:?}: SIGKILL");
        let _ = sys::kill(-1, libc::SIGKILL);
        wait_until(Instant::now() + Duration::from_secs(2), || !sys::has_children());
    }
    server::wait_flushed(FLUSH_TIMEOUT);
    sys::sync();
    if let Err(e) = sys::remount_root_read_only() {
        tracing::debug!("remounting / read-only: {e}");
    }
    sys::sync();
    let cmd = match kind {
        StopKind::Guest(ShutdownAction::Reboot) => libc::RB_AUTOBOOT,
        _ => match agent.config().poweroff {
            PoweroffMethod::Reboot => libc::RB_AUTOBOOT,
            PoweroffMethod::Acpi => libc::RB_POWER_OFF,
        },
    };
    eprintln!(
        "kiln-agent: {}",
        if cmd == libc::RB_POWER_OFF { "powering off" } else { "rebooting (ends a microVM)" }
    );
    let e = sys::reboot(cmd);
    eprintln!("kiln-agent: reboot(2) failed: {e}");
    // PID 1 exiting panics the kernel; with panic=N the VM still goes down.
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn authorized_keys_are_written_private_in_a_private_ssh_dir() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("root");
        write_authorized_keys(&home, "ssh-ed25519 AAAA one\n").unwrap();
        let keys = home.join(".ssh/authorized_keys");
        assert_eq!(std::fs::read_to_string(&keys).unwrap(), "ssh-ed25519 AAAA one\n");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&home), mode(&home.join(".ssh")), mode(&keys)), (0o700, 0o700, 0o600));
        // A second boot replaces the key of the first.
        write_authorized_keys(&home, "ssh-ed25519 BBBB two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&keys).unwrap(), "ssh-ed25519 BBBB two\n");
        assert!(!home.join(".ssh/authorized_keys.kiln-new").exists());
    }

    #[test]
    fn a_replaced_symlink_is_replaced_itself_not_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("stub-resolv.conf");
        std::fs::write(&target, "nameserver 127.0.0.53\n").unwrap();
        let link = dir.path().join("resolv.conf");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        replace_file(&link, b"nameserver 10.77.0.1\n", 0o644).unwrap();
        assert!(!std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "nameserver 10.77.0.1\n");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "nameserver 127.0.0.53\n");
    }
}
