//! Every bad input a user can give kiln-vmm gets one clear line on stderr and a documented,
//! non-zero exit code (kiln_vmm::exit_code) — never a panic or a hang.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use kiln_test_utils::assemble_elf;
use kiln_vmm::exit_code;

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // World-readable so the unprivileged-user case can read it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A real (tiny, purpose-built) kernel, so only the thing under test is wrong.
    fn kernel(&self) -> PathBuf {
        let k = self.path("guest.elf");
        if !k.exists() {
            let src = format!("{}\n{}", include_str!("guests/common.S"), include_str!("guests/pvh.S"));
            assemble_elf(&src, 0x10_0000, &k);
        }
        k
    }

    fn config(&self, json: &str) -> PathBuf {
        let p = self.path("vm.json");
        std::fs::write(&p, json).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, |_| {})
    }

    fn run_with(&self, args: &[&str], tweak: impl FnOnce(&mut Command)) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln-vmm"));
        c.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        tweak(&mut c);
        let child = c.spawn().unwrap();
        let id = child.id();
        // Bad input must be refused promptly; a hang is a failure.
        let watchdog = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(30));
            // SAFETY-free: kill(1) by pid via the shell-less libc call is not needed; use the command.
            let _ = Command::new("kill").arg("-9").arg(id.to_string()).status();
        });
        let out = child.wait_with_output().unwrap();
        drop(watchdog);
        out
    }

    fn run_config(&self, json: &str) -> Output {
        let cfg = self.config(json);
        self.run(&["--no-api", "--no-stdin", "--config-file", cfg.to_str().unwrap()])
    }
}

/// Asserts the exit code and that stderr is one line mentioning every `needle`, with no panic.
fn assert_refused(o: &Output, code: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{n:?} not in: {stderr}");
    }
}

fn boot_source(kernel: &Path) -> String {
    format!(r#""boot-source": {{"kernel_image_path": "{}"}}"#, kernel.display())
}

#[test]
fn missing_kernel() {
    let c = Case::new();
    let o = c.run_config(r#"{"boot-source": {"kernel_image_path": "/nonexistent/vmlinux"}}"#);
    assert_refused(&o, exit_code::BAD_CONFIGURATION, &["/nonexistent/vmlinux", "No such file"]);
}

#[test]
fn garbage_kernel() {
    let c = Case::new();
    let k = c.path("garbage");
    std::fs::write(&k, b"this is not a kernel at all, just some text").unwrap();
    let o = c.run_config(&format!("{{{}}}", boot_source(&k)));
    assert_refused(&o, exit_code::BAD_CONFIGURATION, &["neither an x86_64 ELF vmlinux nor a bzImage"]);
}

#[test]
fn bad_json_and_unknown_fields() {
    let c = Case::new();
    let o = c.run_config(r#"{"boot-source": {"kernel_image_path": "/k",}"#);
    assert_refused(&o, exit_code::BAD_CONFIGURATION, &["vm.json", "line 1"]);
    let o = c.run_config(r#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "turbo": true}}"#);
    assert_refused(&o, exit_code::BAD_CONFIGURATION, &["unknown field", "turbo"]);
    let o = c.run_config(r#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": "two", "mem_size_mib": 128}}"#);
    assert_refused(&o, exit_code::BAD_CONFIGURATION, &["vcpu_count"]);
}

#[test]
fn vcpu_count_out_of_range() {
    let c = Case::new();
    let k = c.kernel();
    for n in [0, 33] {
        let o = c.run_config(&format!(
            r#"{{{}, "machine-config": {{"vcpu_count": {n}, "mem_size_mib": 128}}}}"#,
            boot_source(&k)
        ));
        assert_refused(&o, exit_code::BAD_CONFIGURATION, &[&format!("vcpu_count {n}"), "1 to 32"]);
    }
}

#[test]
fn memory_larger_than_the_host_can_back() {
    let c = Case::new();
    let k = c.kernel();
    let o = c.run_config(&format!(
        r#"{{{}, "machine-config": {{"vcpu_count": 1, "mem_size_mib": 1099511627776}}}}"#,
        boot_source(&k)
    ));
    assert_refused(&o, exit_code::BAD_CONFIGURATION, &["mem_size_mib", "lower mem_size_mib"]);
}

#[test]
fn missing_disk_file() {
    let c = Case::new();
    let k = c.kernel();
    let o = c.run_config(&format!(
        r#"{{{}, "drives": [{{"drive_id": "data", "path_on_host": "/nonexistent/disk.img", "is_root_device": false, "is_read_only": false}}]}}"#,
        boot_source(&k)
    ));
    assert_refused(&o, exit_code::BAD_CONFIGURATION, &["drive 'data'", "/nonexistent/disk.img"]);
}

/// A file the VMM cannot open for writing, even as root: immutable (chattr +i) for root, mode 0444
/// for others. Returns a guard that makes it removable again.
struct ReadOnlyFile(PathBuf);

impl ReadOnlyFile {
    fn new(path: PathBuf) -> Option<Self> {
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        // SAFETY-free check of the effective uid through the id command keeps this test unsafe-free.
        let root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
        if root {
            let ok =
                Command::new("chattr").arg("+i").arg(&path).status().map(|s| s.success()).unwrap_or(false);
            if !ok {
                eprintln!("SKIPPED read-only disk case: chattr +i is not supported on this filesystem");
                return None;
            }
        } else {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
        }
        Some(Self(path))
    }
}

impl Drop for ReadOnlyFile {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
fn read_only_disk_configured_writable() {
    let c = Case::new();
    let k = c.kernel();
    let Some(disk) = ReadOnlyFile::new(c.path("ro.img")) else { return };
    let drive = |ro: bool| {
        format!(
            r#"{{{}, "drives": [{{"drive_id": "ro", "path_on_host": "{}", "is_root_device": false, "is_read_only": {ro}}}]}}"#,
            boot_source(&k),
            disk.0.display()
        )
    };
    let o = c.run_config(&drive(false));
    assert_refused(&o, exit_code::BAD_CONFIGURATION, &["drive 'ro'", "is_read_only"]);
    // Configured read-only, the same file is accepted (the run then fails later only on KVM access,
    // or boots: either way it is not refused as a configuration error).
    let o = c.run_config(&drive(true));
    assert_ne!(o.status.code(), Some(exit_code::BAD_CONFIGURATION), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn kvm_device_missing() {
    let c = Case::new();
    let k = c.kernel();
    let cfg = c.config(&format!("{{{}}}", boot_source(&k)));
    let o = c.run_with(&["--no-api", "--allow-pvm", "--config-file", cfg.to_str().unwrap()], |cmd| {
        cmd.env("KILN_KVM_DEVICE", "/nonexistent/kvm");
    });
    assert_refused(&o, exit_code::KVM_UNAVAILABLE, &["/nonexistent/kvm does not exist"]);
}

#[test]
fn kvm_device_not_permitted() {
    let c = Case::new();
    let k = c.kernel();
    let cfg = c.config(&format!("{{{}}}", boot_source(&k)));
    let is_root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    // A node that exists but that this user may not open: as root, run the VMM as 'nobody' against a
    // private copy of the KVM device node (mode 0600, owned by root).
    let node = c.path("kvm");
    let made = is_root
        && Command::new("mknod")
            .arg(&node)
            .args(["c", "10", "232"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if !made {
        eprintln!("SKIPPED kvm_device_not_permitted: needs root to create a private device node");
        return;
    }
    std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o600)).unwrap();
    let o = c.run_with(&["--no-api", "--allow-pvm", "--config-file", cfg.to_str().unwrap()], |cmd| {
        cmd.env("KILN_KVM_DEVICE", &node).uid(65534).gid(65534);
    });
    assert_refused(&o, exit_code::KVM_UNAVAILABLE, &["permission denied", "kvm"]);
}

#[test]
fn pvm_host_is_refused_in_one_line() {
    if !kiln_test_utils::host_is_pvm() {
        eprintln!("SKIPPED pvm_host_is_refused_in_one_line: this host's KVM is not PVM");
        return;
    }
    let c = Case::new();
    let k = c.kernel();
    let o = c.run_config(&format!("{{{}}}", boot_source(&k)));
    assert_refused(&o, exit_code::KVM_UNAVAILABLE, &["PVM", "--allow-pvm"]);
}

#[test]
fn bad_arguments() {
    let c = Case::new();
    assert_refused(&c.run(&["--no-such-flag"]), exit_code::ARG_PARSING, &["--no-such-flag"]);
    assert_refused(&c.run(&["--no-api"]), exit_code::ARG_PARSING, &["--config-file"]);
    assert_refused(
        &c.run(&["--config-file", "/nonexistent.json", "--no-api"]),
        exit_code::BAD_CONFIGURATION,
        &["/nonexistent.json"],
    );
    assert_refused(
        &c.run(&["--config-file", "x", "--no-api", "--level", "loud"]),
        exit_code::BAD_CONFIGURATION,
        &["x"],
    );
}
