//! What goes into a VM's root filesystem and onto its kernel command line: the static agent at
//! `/sbin/kiln-agent`, its configuration at `/etc/kiln/agent.json`, and the VM's ssh public key in
//! `/root/.ssh/authorized_keys`. Files are written into the ext4 image with `debugfs -w` (no
//! mounting, no root needed); the guest cannot reach anything on the host through them.

use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln_hypervisor::BackendKind;
use kiln_image::store::write_atomic;
use serde_json::json;

use crate::error::{io_err, ManagerError, Result};
use crate::record::{MainProcess, VmEntry};

/// Where the agent lives in the guest.
pub const AGENT_GUEST_PATH: &str = "/sbin/kiln-agent";
/// Where its configuration lives in the guest.
pub const AGENT_CONFIG_GUEST_PATH: &str = "/etc/kiln/agent.json";
/// `KILN_AGENT_BIN`: the static agent binary to inject.
pub const AGENT_BIN_ENV: &str = "KILN_AGENT_BIN";

/// The agent's configuration for one boot.
pub fn agent_config(entry: &VmEntry, wait_for_attach: bool, tty: Option<(u16, u16)>, stdin: bool) -> Vec<u8> {
    let MainProcess { argv, env, cwd, user } = &entry.main;
    let tty = tty.map(|(rows, cols)| json!({"rows": rows, "cols": cols}));
    let config = json!({
        "hostname": entry.name,
        "main": {"argv": argv, "env": env, "cwd": cwd, "user": user,
                 "wait_for_attach": wait_for_attach, "tty": tty, "stdin": stdin && wait_for_attach},
        "poweroff": "reboot",
        "exit_linger_ms": 3000,
    });
    serde_json::to_vec_pretty(&config).unwrap_or_default()
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

/// Runs a `debugfs -w` script against `image`; fails on any error line it prints. `tolerated`
/// are error substrings that are expected (e.g. "File exists" for `mkdir`).
fn debugfs(image: &Path, script: &str, tolerated: &[&str]) -> Result<()> {
    let script_path = image.with_extension("debugfs");
    fs::write(&script_path, script).map_err(io_err("writing", &script_path))?;
    let output = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script_path)
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ManagerError::ToolMissing { tool: "debugfs", package: "e2fsprogs", source });
    let _ = fs::remove_file(&script_path);
    let output = output?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .filter(|l| !tolerated.iter().any(|t| l.contains(t)))
        .collect();
    if !output.status.success() || !errors.is_empty() {
        return Err(ManagerError::Tool {
            tool: "debugfs",
            path: image.to_path_buf(),
            detail: errors.join("; "),
        });
    }
    Ok(())
}

/// Paths that may only contain characters debugfs reads as one word.
fn plain(path: &Path) -> Result<String> {
    let s = path.to_string_lossy();
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c)) {
        Ok(s.into_owned())
    } else {
        Err(ManagerError::InvalidInput {
            what: "path",
            detail: format!("{s:?} must be plain ASCII without spaces or quotes for debugfs"),
        })
    }
}

/// The directory the agent is written to: `/sbin`, or where the image's `/sbin` symlink points
/// (merged-/usr images such as Debian 12: `/sbin -> usr/sbin`), since debugfs follows no
/// symlinks. The kernel's `init=/sbin/kiln-agent` resolves the link at boot.
fn agent_dir(disk: &Path) -> Result<String> {
    let output =
        Command::new("debugfs")
            .args(["-R", "stat /sbin"])
            .arg(disk)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ManagerError::ToolMissing { tool: "debugfs", package: "e2fsprogs", source })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let target = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Fast link dest: "))
        .map(|t| t.trim_matches('"').trim_start_matches('/').trim_end_matches('/'));
    Ok(match target {
        // Only a plain link into the root (`usr/sbin`, `/usr/sbin`); anything else is written
        // over as before.
        Some(t) if !t.is_empty() && t.split('/').all(|c| !c.is_empty() && c != ".." && c != ".") => {
            format!("/{t}")
        }
        _ => "/sbin".to_string(),
    })
}

/// Puts the agent binary and the ssh public key into a VM's disk (once, at creation).
pub fn inject_agent_and_key(disk: &Path, agent: &Path, ssh_pub: &Path) -> Result<()> {
    let agent = plain(agent)?;
    let key = plain(ssh_pub)?;
    let dir = agent_dir(disk)?;
    let dest = format!("{dir}/kiln-agent");
    let script = format!(
        "mkdir {dir}\nmkdir /etc\nmkdir /etc/kiln\nmkdir /root\nmkdir /root/.ssh\n\
         rm {dest}\nwrite {agent} {dest}\n\
         sif {dest} mode 0100755\nsif {dest} uid 0\nsif {dest} gid 0\n\
         sif /root/.ssh mode 040700\n\
         rm /root/.ssh/authorized_keys\nwrite {key} /root/.ssh/authorized_keys\n\
         sif /root/.ssh/authorized_keys mode 0100600\nsif /root/.ssh/authorized_keys uid 0\n\
         sif /root/.ssh/authorized_keys gid 0\n"
    );
    debugfs(disk, &script, &["directory already exists", "File not found by ext2_lookup"])
}

/// Writes the agent configuration for the next boot into a VM's disk.
pub fn write_agent_config(disk: &Path, config_file: &Path) -> Result<()> {
    let config = plain(config_file)?;
    let script = format!(
        "rm {AGENT_CONFIG_GUEST_PATH}\nwrite {config} {AGENT_CONFIG_GUEST_PATH}\n\
         sif {AGENT_CONFIG_GUEST_PATH} mode 0100644\n"
    );
    debugfs(disk, &script, &["File not found by ext2_lookup"])
}

/// Writes the guest's `/etc/resolv.conf` (replacing the image's file or link, as Docker does) with
/// the name servers its network hands out.
pub fn write_resolv_conf(disk: &Path, servers: &[std::net::Ipv4Addr]) -> Result<()> {
    let tmp = disk.with_extension("resolv.conf");
    let text: String = servers.iter().map(|s| format!("nameserver {s}\n")).collect();
    fs::write(&tmp, text).map_err(io_err("writing", &tmp))?;
    let source = plain(&tmp)?;
    let script = format!(
        "mkdir /etc\nrm /etc/resolv.conf\nwrite {source} /etc/resolv.conf\nsif /etc/resolv.conf mode 0100644\n"
    );
    let result = debugfs(disk, &script, &["directory already exists", "File not found by ext2_lookup"]);
    let _ = fs::remove_file(&tmp);
    result
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
    fn the_agent_goes_through_a_merged_usr_sbin_link() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("usr/sbin")).unwrap();
        std::os::unix::fs::symlink("usr/sbin", root.join("sbin")).unwrap();
        let disk = dir.path().join("disk.ext4");
        let mkfs =
            Command::new("mkfs.ext4").args(["-q", "-d"]).arg(&root).arg(&disk).arg("8M").output().unwrap();
        assert!(mkfs.status.success(), "{}", String::from_utf8_lossy(&mkfs.stderr));
        let agent = dir.path().join("agent");
        let key = dir.path().join("key.pub");
        fs::write(&agent, b"\x7fELF agent").unwrap();
        fs::write(&key, b"ssh-ed25519 AAAA test").unwrap();
        inject_agent_and_key(&disk, &agent, &key).unwrap();
        let cat = |path: &str| {
            let out =
                Command::new("debugfs").args(["-R", &format!("cat {path}")]).arg(&disk).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert_eq!(cat("/usr/sbin/kiln-agent"), "\x7fELF agent");
        assert_eq!(cat("/root/.ssh/authorized_keys"), "ssh-ed25519 AAAA test");
        let sbin = Command::new("debugfs").args(["-R", "stat /sbin"]).arg(&disk).output().unwrap();
        assert!(String::from_utf8_lossy(&sbin.stdout).contains("Type: symlink"), "the link must stay a link");
    }

    #[test]
    fn paths_debugfs_would_split_are_refused() {
        assert!(plain(Path::new("/tmp/a b")).is_err());
        assert!(plain(Path::new("/var/lib/kiln/vms/0a/agent.json")).is_ok());
    }
}
