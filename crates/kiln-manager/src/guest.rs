//! What a VM's guest gets from the host: the static agent at `/sbin/kiln-agent` (added to the
//! image's cached root filesystem once per image and agent build, see [`agent_rootfs_options`]),
//! its kernel command line, and — over the agent channel once the guest is up — its configuration
//! for the boot ([`guest_config`]: main process, hostname, clock, ssh key, name servers). Nothing
//! is written into a VM's own disk by the host.

use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use kiln_agent_proto::{GuestConfig, MainConfig, Timestamp, WindowSize};
use kiln_hypervisor::BackendKind;
use kiln_image::store::write_atomic;
use kiln_image::{AddedFile, RootfsOptions};

use crate::error::{io_err, ManagerError, Result};
use crate::record::{MainProcess, VmEntry};

/// Where the agent lives in the guest.
pub const AGENT_GUEST_PATH: &str = "/sbin/kiln-agent";
/// `KILN_AGENT_BIN`: the static agent binary to inject.
pub const AGENT_BIN_ENV: &str = "KILN_AGENT_BIN";

/// Root filesystem options that add `agent` at [`AGENT_GUEST_PATH`]: every VM of an image shares
/// one cached root filesystem with the agent in it (per agent build), so creating a VM copies a
/// disk and writes nothing into it.
pub fn agent_rootfs_options(agent: &Path) -> RootfsOptions {
    RootfsOptions {
        added_files: vec![AddedFile {
            guest_path: AGENT_GUEST_PATH.to_string(),
            source: agent.to_path_buf(),
            mode: 0o755,
        }],
        ..RootfsOptions::default()
    }
}

/// What the host tells the agent when a VM boots.
#[derive(Debug, Clone, Default)]
pub struct BootSettings {
    /// The main process waits for the host to attach (`kiln run` in the foreground).
    pub wait_for_attach: bool,
    /// Its terminal size, when it gets a tty.
    pub tty: Option<(u16, u16)>,
    /// The host sends stdin.
    pub stdin: bool,
    /// The VM's ssh public key (`authorized_keys` line).
    pub ssh_public_key: Option<String>,
    /// Name servers from the VM's network.
    pub nameservers: Vec<std::net::Ipv4Addr>,
}

/// The agent's configuration for one boot of `entry`.
pub fn guest_config(entry: &VmEntry, boot: &BootSettings) -> GuestConfig {
    let MainProcess { argv, env, cwd, user } = &entry.main;
    let exec = kiln_agent_proto::ExecRequest {
        argv: argv.clone(),
        env: env.clone(),
        cwd: cwd.clone(),
        user: user.clone(),
        tty: boot.tty.map(|(rows, cols)| WindowSize { rows, cols }),
        stdin: boot.stdin && boot.wait_for_attach,
    };
    GuestConfig {
        hostname: Some(entry.name.clone()),
        main: Some(MainConfig { exec, wait_for_attach: boot.wait_for_attach }),
        time: Some(Timestamp::of(std::time::SystemTime::now())),
        authorized_keys: boot.ssh_public_key.clone(),
        nameservers: boot.nameservers.iter().map(ToString::to_string).collect(),
        // Power-off by reboot (kiln's microVMs end on it) and the agent's exit linger.
        ..GuestConfig::default()
    }
}

/// The VM's ssh public key (`private.pub`), if it has one.
pub fn ssh_public_key(private: &Path) -> Option<String> {
    fs::read_to_string(private.with_extension("pub")).ok()
}

/// The kernel command line of a VM (backends add the root device and virtio-mmio devices).
pub fn kernel_cmdline(entry: &VmEntry) -> String {
    let mut cmdline = String::from("console=ttyS0 reboot=k panic=1 tsc=reliable");
    match entry.backend {
        // kiln-vmm has no PCI and an i8042 that only resets (docs/kiln-vmm.md).
        BackendKind::KilnVmm => {
            cmdline.push_str(" pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd")
        }
        // microvm without ACPI tables (docs/hypervisors.md).
        BackendKind::Qemu => cmdline.push_str(" acpi=off"),
    }
    if let Some(ip) = entry.network.as_ref().and_then(|n| n.kernel_param()) {
        let _ = write!(cmdline, " {ip}");
    }
    let _ = write!(cmdline, " init={AGENT_GUEST_PATH}");
    cmdline
}

/// The static agent binary: `$KILN_AGENT_BIN`, else `kiln-agent` next to the running program.
/// A dynamically linked binary is refused: guest images need not have its C library.
pub fn find_agent_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    let candidate = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(AGENT_BIN_ENV).map(PathBuf::from))
        .or_else(|| std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("kiln-agent"))));
    let Some(path) = candidate else {
        return Err(agent_missing("no candidate path"));
    };
    let mut head = vec![0u8; 4096];
    let n = fs::File::open(&path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| agent_missing(&format!("{}: {e}", path.display())))?;
    head.truncate(n);
    if !head.starts_with(b"\x7fELF") {
        return Err(agent_missing(&format!("{} is not an ELF program", path.display())));
    }
    if head.windows(8).any(|w| w == b"/lib64/l" || w == b"/lib/ld-") {
        return Err(agent_missing(&format!(
            "{} is dynamically linked; guests need the static build",
            path.display()
        )));
    }
    Ok(path)
}

fn agent_missing(detail: &str) -> ManagerError {
    ManagerError::InvalidInput {
        what: "guest agent",
        detail: format!(
            "{detail}; build it with `scripts/build-agent` and point {AGENT_BIN_ENV} at the path it prints"
        ),
    }
}

/// Writes a new ed25519 key pair in OpenSSH's formats: `private` (mode 0600) and `private.pub`.
/// Generated in-process (a `ssh-keygen` run per VM cost ~120 ms in the lab); each file is replaced
/// atomically, in a directory only the owner may enter, so the private key is never readable by
/// others, not even before its mode is set.
pub fn generate_ssh_key(private: &Path, comment: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;

    let key_error = |e: ssh_key::Error| ManagerError::Tool {
        tool: "ssh key generation",
        path: private.to_path_buf(),
        detail: e.to_string(),
    };
    if let Some(dir) = private.parent() {
        fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err("restricting", dir))?;
    }
    let mut key = ssh_key::PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519)
        .map_err(key_error)?;
    key.set_comment(comment);
    let private_text = key.to_openssh(ssh_key::LineEnding::LF).map_err(key_error)?;
    let public_text = key.public_key().to_openssh().map_err(key_error)? + "\n";
    write_atomic(private, private_text.as_bytes())?;
    // ssh refuses a private key others could read.
    fs::set_permissions(private, fs::Permissions::from_mode(0o600))
        .map_err(io_err("restricting", private))?;
    write_atomic(&private.with_extension("pub"), public_text.as_bytes())?;
    Ok(())
}

/// The main process's exit code from the agent's console line `KILN-MAIN-EXIT code=N|signal=N`,
/// looked for after byte `offset` of the console log (the last one wins).
pub fn main_exit_from_console(console: &Path, offset: u64) -> Option<i32> {
    let bytes = fs::read(console).ok()?;
    let tail = bytes.get(usize::try_from(offset).ok()?..)?;
    let text = String::from_utf8_lossy(tail);
    let line = text.lines().filter_map(|l| l.split("KILN-MAIN-EXIT ").nth(1)).next_back()?;
    let word = line.split_whitespace().next()?;
    if let Some(code) = word.strip_prefix("code=") {
        code.parse().ok()
    } else {
        word.strip_prefix("signal=").and_then(|s| s.parse::<i32>().ok()).map(|s| 128 + s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn generated_ssh_keys_are_openssh_keys_ssh_accepts() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("ssh/id_ed25519");
        generate_ssh_key(&private, "kiln-test").unwrap();
        let public = fs::read_to_string(private.with_extension("pub")).unwrap();
        assert!(public.starts_with("ssh-ed25519 ") && public.ends_with(" kiln-test\n"), "{public}");
        // ssh refuses private keys others can read.
        assert_eq!(fs::metadata(&private).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(private.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
        // OpenSSH itself reads the private key and derives the same public key from it.
        let derived = Command::new("ssh-keygen").arg("-y").arg("-f").arg(&private).output().unwrap();
        assert!(derived.status.success(), "{}", String::from_utf8_lossy(&derived.stderr));
        let derived = String::from_utf8(derived.stdout).unwrap();
        let key_of = |line: &str| line.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        assert_eq!(key_of(&derived), key_of(&public));
        // A second VM gets another key.
        let other = dir.path().join("other/id_ed25519");
        generate_ssh_key(&other, "kiln-other").unwrap();
        assert_ne!(key_of(&fs::read_to_string(other.with_extension("pub")).unwrap()), key_of(&public));
    }

    #[test]
    fn the_console_exit_line_after_the_offset_gives_the_main_code() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        fs::write(&log, "boot\nKILN-MAIN-EXIT code=1\nsecond boot\r\nKILN-MAIN-EXIT code=3\r\n").unwrap();
        assert_eq!(main_exit_from_console(&log, 0), Some(3));
        fs::write(&log, "x\nKILN-MAIN-EXIT signal=9\n").unwrap();
        assert_eq!(main_exit_from_console(&log, 0), Some(137));
        assert_eq!(main_exit_from_console(&log, 2), Some(137));
        assert_eq!(main_exit_from_console(&log, 100), None);
    }

    #[test]
    fn the_boot_configuration_carries_the_main_process_key_and_name_servers() {
        let entry: VmEntry = serde_json::from_value(serde_json::json!({
            "format": 1, "id": "0a", "name": "web", "image": "busybox:1", "image_id": "sha256:00",
            "kernel": "k", "backend": "kiln-vmm", "vcpus": 1, "memory_mib": 128,
            "main": {"argv": ["sh", "-c", "true"], "env": ["A=1"], "cwd": "/srv", "user": "1:1"},
            "auto_remove": false, "status": "created", "created_at": 0, "console_offset": 0
        }))
        .unwrap();
        let boot = BootSettings {
            wait_for_attach: true,
            tty: Some((24, 80)),
            stdin: true,
            ssh_public_key: Some("ssh-ed25519 AAAA kiln-web\n".into()),
            nameservers: vec![std::net::Ipv4Addr::new(10, 77, 0, 1)],
        };
        let c = guest_config(&entry, &boot);
        let main = c.main.unwrap();
        assert_eq!(main.exec.argv, ["sh", "-c", "true"]);
        assert_eq!((main.exec.cwd.as_deref(), main.exec.user.as_deref()), (Some("/srv"), Some("1:1")));
        assert!(main.wait_for_attach && main.exec.stdin);
        assert_eq!(main.exec.tty, Some(WindowSize { rows: 24, cols: 80 }));
        assert_eq!(c.hostname.as_deref(), Some("web"));
        assert_eq!(c.authorized_keys.as_deref(), Some("ssh-ed25519 AAAA kiln-web\n"));
        assert_eq!(c.nameservers, ["10.77.0.1"]);
        assert!(c.time.is_some_and(|t| t.secs > 1_700_000_000));
        // Detached: no stdin even if asked, the main process starts at once.
        let detached = guest_config(&entry, &BootSettings { stdin: true, ..Default::default() });
        let main = detached.main.unwrap();
        assert!(!main.wait_for_attach && !main.exec.stdin);
    }
}
