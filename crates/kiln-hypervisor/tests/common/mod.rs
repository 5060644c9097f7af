//! Helpers shared by kiln-hypervisor's integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use kiln_hypervisor::{Vm, VmExit, VmState};
use kiln_test_utils::{repo_root, wait_until};

/// Kills the VM when a test ends early (a handle alone never kills its VM).
pub struct KillOnDrop(Option<Box<dyn Vm>>);

impl KillOnDrop {
    pub fn new(vm: Box<dyn Vm>) -> Self {
        Self(Some(vm))
    }

    /// The plain handle: dropping it leaves the VM running.
    pub fn release(mut self) -> Box<dyn Vm> {
        self.0.take().unwrap()
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = dyn Vm;
    fn deref(&self) -> &Self::Target {
        &**self.0.as_ref().unwrap()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(vm) = self.0.take() {
            if !matches!(vm.state(), Ok(VmState::Exited(_))) {
                let _ = vm.kill();
            }
        }
    }
}

/// The guest's console so far.
pub fn console(vm: &dyn Vm) -> String {
    String::from_utf8_lossy(&std::fs::read(vm.console_log()).unwrap_or_default()).replace('\r', "")
}

/// Waits until the console has a line equal to `line`; panics with the console otherwise.
pub fn wait_for_line(vm: &dyn Vm, line: &str, timeout: Duration) {
    let found = wait_until(timeout, || console(vm).lines().any(|l| l.trim_end() == line));
    assert!(found, "no line {line:?} on the console within {timeout:?}:\n{}", console(vm));
}

/// Number of console lines starting with `prefix`.
pub fn count_lines(vm: &dyn Vm, prefix: &str) -> usize {
    console(vm).lines().filter(|l| l.starts_with(prefix)).count()
}

/// Checks that the guest's output stands still for a while (paused), then returns the count.
pub fn assert_frozen(vm: &dyn Vm, prefix: &str) -> usize {
    std::thread::sleep(Duration::from_millis(300));
    let before = count_lines(vm, prefix);
    std::thread::sleep(Duration::from_millis(1500));
    let after = count_lines(vm, prefix);
    assert_eq!(before, after, "the guest printed while paused:\n{}", console(vm));
    after
}

/// Waits for the VMM's end and returns how it ended.
pub fn wait_exit(vm: &dyn Vm, timeout: Duration) -> VmExit {
    match vm.wait(Some(timeout)).unwrap() {
        Some(exit) => exit,
        None => panic!("VM {} still running after {timeout:?}; console:\n{}", vm.name(), console(vm)),
    }
}

/// A tap device created for one test and removed afterwards.
pub struct Tap(pub String);

impl Tap {
    /// Creates `kht<tag><pid>` (fails the test when taps cannot be created: run as root).
    pub fn new(tag: &str) -> Self {
        let name = format!("kht{tag}{}", std::process::id() % 100_000);
        let out = Command::new("ip").args(["tuntap", "add", "dev", &name, "mode", "tap"]).output().unwrap();
        assert!(
            out.status.success(),
            "cannot create tap {name} (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tap(name)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["tuntap", "del", "dev", &self.0, "mode", "tap"]).output();
    }
}

fn newest_mtime(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        let m = if p.is_dir() { newest_mtime(&p) } else { entry.metadata().unwrap().modified().unwrap() };
        newest = newest.max(m);
    }
    newest
}

/// The kiln-vmm binary: `$KILN_VMM_BIN`, else the workspace's `target/debug/kiln-vmm` when it is
/// newer than its sources (`cargo test --workspace` builds it first), else a build of it into a
/// separate target directory (`cargo test` holds the lock of the main one while tests run).
pub fn kiln_vmm_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("KILN_VMM_BIN") {
            return PathBuf::from(p);
        }
        // target/debug/deps/<test binary> -> target/debug
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let candidate = profile_dir.join("kiln-vmm");
        let root = repo_root();
        let sources = ["crates/kiln-vmm", "crates/kiln-devices", "crates/kiln-fc-api"]
            .iter()
            .map(|c| newest_mtime(&root.join(c).join("src")))
            .chain([std::fs::metadata(root.join("Cargo.lock")).unwrap().modified().unwrap()])
            .max()
            .unwrap();
        if std::fs::metadata(&candidate).and_then(|m| m.modified()).is_ok_and(|m| m >= sources) {
            return candidate;
        }
        let target = profile_dir.parent().unwrap().join("kiln-hypervisor-tests");
        eprintln!("building kiln-vmm into {} for these tests", target.display());
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--locked", "-p", "kiln-vmm", "--bin", "kiln-vmm", "--target-dir"])
            .arg(&target)
            .current_dir(&root)
            .status()
            .unwrap();
        assert!(status.success(), "building kiln-vmm failed");
        target.join("debug/kiln-vmm")
    })
    .clone()
}

/// Environment variable that makes a test binary's `creator_process` test create a VM and exit.
pub const CREATOR_ENV: &str = "KILN_HYP_TEST_CREATOR_DIR";

/// Runs this test binary's `creator_process` test in a new process with `dir` in [`CREATOR_ENV`]
/// and asserts it succeeded: the VM it created must then outlive it.
pub fn run_creator_process(dir: &Path) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["creator_process", "--exact", "--include-ignored", "--nocapture", "--test-threads=1"])
        .env(CREATOR_ENV, dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the creator process failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
