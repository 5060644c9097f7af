//! Test-only helpers shared by Kiln's crates.
//!
//! Owns: gating tests on the host's `/dev/kvm` ([`require_kvm!`] skips loudly when it is absent and
//! never when it is present), locating the guest assets built by `scripts/guest-assets` (the one build
//! step; this crate only runs it) and the static agent (`scripts/build-agent`), assembling small
//! purpose-built guest images with binutils, waiting helpers, the lab's retry-on-silent-reset
//! wrapper; OCI fixtures ([`oci`]: raw tar layers, oci-layout directories, a busybox image) and a
//! real registry ([`registry`]: Debian's `docker-registry` on 127.0.0.1, `skopeo` pushes); the
//! Debian+sshd image for ssh tests ([`ssh_image`], built by `scripts/ssh-image`); network
//! namespaces a test makes and removes ([`netns`]).
//! Must not: be a dependency of anything but tests, or hide a failure as a skip.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// True when `/dev/kvm` exists on this host.
pub fn host_has_kvm() -> bool {
    Path::new("/dev/kvm").exists()
}

/// True when the host's KVM is PVM (software KVM; only purpose-built or PVM-enabled guests run).
pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Skips the calling test, loudly, when the host has no `/dev/kvm`. When it is present the test runs.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::host_has_kvm() {
            eprintln!(
                "SKIPPED {}: /dev/kvm is missing on this host (load kvm_intel/kvm_amd to run host-KVM tests)",
                module_path!()
            );
            return;
        }
    };
}

/// Runs `scripts/<name>` with bash and returns its stdout; panics with its stderr when it fails
/// (tests that need its output cannot run without it).
fn run_script(name: &str) -> String {
    let script = repo_root().join("scripts").join(name);
    let out =
        Command::new("bash").arg(&script).output().unwrap_or_else(|e| panic!("running {script:?}: {e}"));
    assert!(
        out.status.success(),
        "scripts/{name} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Paths of the guest assets (see guest/README.md).
#[derive(Debug, Clone)]
pub struct GuestAssets {
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
    pub scratch: PathBuf,
}

/// Builds (first time, ~10-15 min for the kernel) or finds (cached) the guest assets. Panics with the
/// build's output when the build step fails: tests that need them cannot run without them.
pub fn guest_assets() -> &'static GuestAssets {
    static ASSETS: OnceLock<GuestAssets> = OnceLock::new();
    ASSETS.get_or_init(|| {
        let stdout = run_script("guest-assets");
        let vars: HashMap<String, PathBuf> = stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), PathBuf::from(v.trim_matches('\''))))
            .collect();
        let get = |k: &str| {
            vars.get(k).cloned().unwrap_or_else(|| panic!("scripts/guest-assets did not print {k}"))
        };
        GuestAssets {
            vmlinux: get("KILN_VMLINUX"),
            bzimage: get("KILN_BZIMAGE"),
            initramfs: get("KILN_INITRAMFS"),
            rootfs: get("KILN_ROOTFS"),
            scratch: get("KILN_SCRATCH"),
        }
    })
}

/// A writable copy of the guest rootfs in `dir` with `contents` written at `/<name>` (a script
/// there runs with `-- sh /<name>` at the end of boot_args). Written with debugfs: no mounting,
/// no root.
pub fn rootfs_with_file(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let root = dir.join("root.ext4");
    std::fs::copy(&guest_assets().rootfs, &root).unwrap();
    let file = dir.join(name);
    std::fs::write(&file, contents).unwrap();
    let o = Command::new("debugfs")
        .args(["-w", "-R"])
        .arg(format!("write {} /{name}", file.display()))
        .arg(&root)
        .output()
        .expect("running debugfs (e2fsprogs; scripts/install-deps installs it)");
    assert!(o.status.success(), "debugfs: {}", String::from_utf8_lossy(&o.stderr));
    root
}

/// Shows a command a test ran and what came of it (on stderr, which cargo shows on failure).
pub fn eprint_command(command: &str, out: &std::process::Output) {
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim_end().to_string();
    eprintln!(
        "$ {command}\n  -> {:?}\n  stdout: {}\n  stderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// The first line of `out` (a lab step's or a guest's output) that starts with `prefix`, whole.
/// Panics, showing `out`, when there is none.
pub fn line_starting<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} line in:\n{out}"))
}

/// The value of the first `KEY=value` line of `out` (a lab step's or a guest's output), trimmed.
/// Panics, showing `out`, when there is none.
pub fn key_value<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key}= line in:\n{out}"))
}

/// Assembles `source` (GNU as syntax, x86_64) and links it at `link_address` into an ELF at `out`,
/// with `_start` as the entry point. Used for small purpose-built guests that run on any KVM,
/// including PVM hosts where stock Linux cannot boot.
pub fn assemble_elf(source: &str, link_address: u64, out: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("guest.S");
    let obj = dir.path().join("guest.o");
    std::fs::write(&src, source).unwrap();
    let status = Command::new("as")
        .args(["--64", "-o"])
        .arg(&obj)
        .arg(&src)
        .status()
        .expect("running `as` (binutils; scripts/install-deps installs it)");
    assert!(status.success(), "assembling the test guest failed");
    // Text first at the link address, notes (e.g. the PVH entry note) in their own PT_NOTE segment.
    let script = dir.path().join("guest.ld");
    std::fs::write(
        &script,
        format!(
            "ENTRY(_start)\nSECTIONS {{\n  . = {link_address:#x};\n  .text : {{ *(.text) }}\n  .note.Xen : {{ *(.note.Xen) }}\n}}\n"
        ),
    )
    .unwrap();
    let status = Command::new("ld")
        .args(["-m", "elf_x86_64", "-static", "-nostdlib", "--build-id=none", "-T"])
        .arg(&script)
        .arg("-o")
        .arg(out)
        .arg(&obj)
        .status()
        .expect("running `ld` (binutils)");
    assert!(status.success(), "linking the test guest failed");
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub mod netns;
pub mod oci;
pub mod registry;

/// A lab-side wrapper, installed with `Lab::file_bytes(LAB_RETRY_ON_SILENT_RESET.as_bytes(),
/// "/lab/retry-on-silent-reset", 0o755)` and used as `/lab/retry-on-silent-reset CMD ARGS...`.
///
/// Runs the command; if kiln-vmm reported that its guest died by a silent reset
/// (`KVM_EXIT_SHUTDOWN`, a triple fault with no guest message), it runs the command once more and
/// that second run's output and exit code are the step's. The first run's log, with kiln-vmm's
/// register dump, is kept in the step's stderr under `lab-retry:` lines. Why: under the lab's nested
/// TCG SVM, rare guests (about one boot in fifty to a hundred in CI) die this way at random points
/// (in the bzImage decompressor with interrupts off, in user space), which points at the emulated
/// nesting rather than at the VMM; a second silent reset still fails the test. See docs/testing.md.
pub const LAB_RETRY_ON_SILENT_RESET: &str = r#"#!/bin/sh
out=$(mktemp) err=$(mktemp)
"$@" >"$out" 2>"$err"
rc=$?
if grep -q 'KVM_EXIT_SHUTDOWN; guest state' "$err"; then
  echo "lab-retry: the guest died by a silent reset (KVM_EXIT_SHUTDOWN) on the first run; running once more" >&2
  sed 's/^/lab-retry: /' "$err" >&2
  tail -c 2000 "$out" | sed 's/^/lab-retry: console: /' >&2
  rm -f "$out" "$err"
  exec "$@"
fi
cat "$out"
cat "$err" >&2
rm -f "$out" "$err"
exit $rc
"#;

/// Prints a lab step's `lab-retry:` lines (a guest the lab lost and the step ran once more) on the
/// test's stderr, so a retry is said loudly even when the test passes.
pub fn echo_lab_retries(step_stderr: &str) {
    for line in step_stderr.lines().filter(|l| l.starts_with("lab-retry:")) {
        eprintln!("{line}");
    }
}

/// The static `kiln-agent` for guests, built (first time, ~1-2 min) or found (cached) by
/// `scripts/build-agent`. Panics with the build's output when it fails.
pub fn static_agent() -> &'static Path {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT.get_or_init(|| {
        let path = PathBuf::from(run_script("build-agent").trim());
        assert!(path.is_file(), "scripts/build-agent printed {path:?}, which is not a file");
        path
    })
}

/// The ref name of the image in [`ssh_image`]'s layout.
pub const SSH_IMAGE_REF: &str = "bookworm-ssh";

/// The Debian bookworm minbase image with openssh-server (an oci-layout dir, image
/// [`SSH_IMAGE_REF`], Entrypoint `sh -c 'mkdir -p /run/sshd && exec /usr/sbin/sshd -D -e'`), built by `scripts/ssh-image` with
/// debootstrap the first time (a few minutes, needs root) and cached under `~/.cache/kiln`.
/// Push it with `LocalRegistry::push_oci(ssh_image(), SSH_IMAGE_REF, "debian/ssh:bookworm")`.
pub fn ssh_image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let stdout = run_script("ssh-image");
        let path = stdout
            .lines()
            .find_map(|l| l.strip_prefix("KILN_SSH_IMAGE="))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("scripts/ssh-image printed no KILN_SSH_IMAGE=: {stdout}"));
        assert!(path.join("index.json").is_file(), "{path:?} is not an oci-layout dir");
        path
    })
}

/// A binary of another workspace package (Cargo only gives tests `CARGO_BIN_EXE_*` of their own
/// package), built on first use with `cargo build -p <package> --bin <bin>` into its own target dir
/// (`target/test-bins`, so it never waits for the lock of the build running the tests). Cargo's own
/// freshness check makes it current.
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap();
    if let Some(p) = built.get(bin) {
        return p.clone();
    }
    let target = repo_root().join("target/test-bins");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .current_dir(repo_root())
        .args(["build", "-p", package, "--bin", bin, "--target-dir"])
        .arg(&target)
        .output()
        .unwrap_or_else(|e| panic!("running {cargo}: {e}"));
    assert!(
        out.status.success(),
        "cargo build -p {package} --bin {bin} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = target.join("debug").join(bin);
    built.insert(bin.to_string(), path.clone());
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the wrapper around a fake VMM that fails like a silent reset `resets` times, then
    /// succeeds; returns (exit code, stdout, stderr).
    fn wrapped(resets: u32) -> (i32, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let wrapper = dir.path().join("retry");
        std::fs::write(&wrapper, LAB_RETRY_ON_SILENT_RESET).unwrap();
        let fake = dir.path().join("fake-vmm");
        let count = dir.path().join("count");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\nn=$(cat {c} 2>/dev/null || echo 0); echo $((n+1)) > {c}\n\
                 if [ $n -lt {resets} ]; then echo console-$n; \
                 echo 'vCPU 0: KVM_EXIT_SHUTDOWN; guest state: rip=0x1' >&2; exit 0; fi\n\
                 echo console-ok; echo vmm-log-ok >&2; exit 7\n",
                c = count.display()
            ),
        )
        .unwrap();
        let o = Command::new("sh").arg(&wrapper).arg("sh").arg(&fake).output().unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    #[test]
    fn the_lab_retry_wrapper_passes_a_clean_run_through() {
        let (code, out, err) = wrapped(0);
        assert_eq!((code, out.as_str(), err.as_str()), (7, "console-ok\n", "vmm-log-ok\n"));
    }

    #[test]
    fn the_lab_retry_wrapper_retries_one_silent_reset_and_keeps_its_log() {
        let (code, out, err) = wrapped(1);
        assert_eq!((code, out.as_str()), (7, "console-ok\n"), "{err}");
        assert!(err.contains("lab-retry: vCPU 0: KVM_EXIT_SHUTDOWN; guest state: rip=0x1"), "{err}");
        assert!(err.contains("lab-retry: console: console-0"), "{err}");
        assert!(err.ends_with("vmm-log-ok\n"), "{err}");
    }

    #[test]
    fn the_lab_retry_wrapper_retries_only_once() {
        let (_, out, err) = wrapped(2);
        // The second silent reset is the step's result: the test then fails on it.
        assert_eq!(out, "console-1\n", "{err}");
        assert!(err.ends_with("KVM_EXIT_SHUTDOWN; guest state: rip=0x1\n"), "{err}");
    }
}
