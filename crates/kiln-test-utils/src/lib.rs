//! Test-only helpers shared by Kiln's crates.
//!
//! Owns: gating tests on the host's `/dev/kvm` ([`require_kvm!`] skips loudly when it is absent and
//! never when it is present), locating the guest assets built by `scripts/guest-assets` (the one build
//! step; this crate only runs it), assembling small purpose-built guest images with binutils, and
//! waiting helpers. Must not: be a dependency of anything but tests, or hide a failure as a skip.
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
        let script = repo_root().join("scripts/guest-assets");
        let out =
            Command::new("bash").arg(&script).output().unwrap_or_else(|e| panic!("running {script:?}: {e}"));
        assert!(
            out.status.success(),
            "scripts/guest-assets failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let vars: HashMap<String, PathBuf> = String::from_utf8_lossy(&out.stdout)
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
