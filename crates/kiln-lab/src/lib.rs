//! The nested-KVM lab ("the lab"): a QEMU/TCG virtual machine running Debian's stock kernel with
//! `kvm_amd`, which gives programs inside it a real hardware-virtualization `/dev/kvm` (TCG emulates
//! AMD SVM with nested paging). Tests and benchmarks use it to boot Linux guests with `kiln-vmm`
//! on a machine whose own `/dev/kvm` cannot (see `docs/testing.md`).
//!
//! Owns: fetching and caching the lab base (kernel package, module closure, busybox initramfs, the
//! step runner), the newc cpio writer, carrying a payload (files, binaries with their `ldd` closure,
//! directories, raw disks) into the lab, running a scenario of named shell steps and returning
//! structured results (exit code, stdout, stderr, wall time, peak RSS) read from a dedicated serial
//! port, and the lab-level timeout.
//!
//! Must not: know about Kiln's VMM, devices or API (payloads are opaque files and shell commands),
//! parse results out of the kernel console, or leave a QEMU process behind (it is killed on timeout,
//! error and drop).
//!
//! ```no_run
//! # fn main() -> Result<(), kiln_lab::LabError> {
//! use std::{path::Path, time::Duration};
//! let report = kiln_lab::Lab::new()?
//!     .binary("/usr/bin/qemu-img", "/usr/bin/qemu-img")
//!     .file(Path::new("/etc/hostname"), "/lab/hostname")
//!     .timeout(Duration::from_secs(300))
//!     .step("version", "qemu-img --version")
//!     .run()?;
//! let step = report.step("version")?.ensure_success()?;
//! println!("{} in {:?}", step.stdout_str(), step.wall);
//! # Ok(()) }
//! ```

mod base;
pub mod cpio;
mod error;
mod host;
mod modules;
mod monitor;
mod run;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use base::{BaseMeta, KernelPackage};
pub use error::{LabError, LabHang};

/// Something carried into the lab.
#[derive(Debug, Clone)]
enum Payload {
    /// A host file (symlinks followed); `libs` also carries its `ldd` closure.
    File { src: PathBuf, dst: String, perm: Option<u32>, libs: bool },
    /// Generated content.
    Bytes { data: Vec<u8>, dst: String, perm: u32 },
    /// A host directory, recursively (symlinks followed).
    Dir { src: PathBuf, dst: String },
}

/// One entry of the scenario.
#[derive(Debug, Clone)]
enum Directive {
    Run { name: String, cmd: String },
    Background { name: String, cmd: String },
    Wait { name: String },
}

/// A disk attached to the lab as virtio-blk (`/dev/vda`, `/dev/vdb`, … in the order added).
#[derive(Debug, Clone)]
struct Disk {
    path: PathBuf,
    read_only: bool,
}

/// A lab scenario being put together. Build it with the chaining methods, then [`Lab::run`] it.
#[derive(Debug, Clone)]
pub struct Lab {
    base: base::Base,
    qemu: PathBuf,
    payload: Vec<Payload>,
    disks: Vec<Disk>,
    directives: Vec<Directive>,
    env: Vec<(String, String)>,
    timeout: Duration,
    cpus: u32,
    memory_mib: u32,
    output_limit: u64,
    kernel_args: Vec<String>,
}

/// The result of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepResult {
    pub name: String,
    /// Exit status; `128 + signal` when the step was killed by a signal (as a shell reports it).
    pub exit_code: i32,
    /// The signal that ended the step, if one did.
    pub signal: Option<i32>,
    /// The last [`Lab::output_limit`] bytes of stdout.
    pub stdout: Vec<u8>,
    /// The last [`Lab::output_limit`] bytes of stderr.
    pub stderr: Vec<u8>,
    /// Bytes of stdout/stderr dropped before the returned tails.
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
    /// Wall time from spawn to reap, measured inside the lab (µs precision).
    pub wall: Duration,
    /// CPU time of the step and its waited-for descendants.
    pub user: Duration,
    pub system: Duration,
    /// Peak resident set of the largest process of the step (`ru_maxrss` from wait4), KiB.
    pub max_rss_kib: u64,
    /// Started with [`Lab::step_background`].
    pub background: bool,
    /// A background step still running at the end of the scenario, stopped by the runner.
    pub killed: bool,
}

impl StepResult {
    /// Exit code 0.
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }

    /// `Ok(self)` on success, else [`LabError::StepFailed`] with the tail of stderr.
    pub fn ensure_success(&self) -> Result<&Self, LabError> {
        if self.success() {
            return Ok(self);
        }
        let err = String::from_utf8_lossy(&self.stderr);
        let start = err.len().saturating_sub(2000);
        let start = (start..err.len()).find(|&i| err.is_char_boundary(i)).unwrap_or(err.len());
        Err(LabError::StepFailed {
            name: self.name.clone(),
            exit_code: self.exit_code,
            stderr_tail: err[start..].to_string(),
        })
    }

    /// stdout as text (invalid UTF-8 replaced).
    pub fn stdout_str(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.stdout)
    }

    /// stderr as text (invalid UTF-8 replaced).
    pub fn stderr_str(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.stderr)
    }
}

/// Which output stream a chunk of [`LabEvent::Output`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// Progress of a run, delivered live by [`Lab::run_with`].
#[derive(Debug)]
pub enum LabEvent<'a> {
    /// The step runner is up; `boot_time` is host time since QEMU started.
    Ready { boot_time: Duration },
    /// A step was started.
    StepStarted { name: &'a str },
    /// New output of a running step (sent every 50 ms while it runs, the rest when it ends).
    Output { step: &'a str, stream: OutputStream, data: &'a [u8] },
    /// A step ended.
    StepFinished(&'a StepResult),
}

/// A [`Lab::run_with`] callback that shows every step's output on stderr as it comes, so a
/// scenario that stalls shows how far it got.
pub fn echo_output(event: LabEvent<'_>) {
    if let LabEvent::Output { data, .. } = event {
        eprint!("{}", String::from_utf8_lossy(data));
    }
}

/// What a lab run returns.
#[derive(Debug, Clone)]
pub struct Report {
    /// Step results in the order they finished.
    pub steps: Vec<StepResult>,
    /// The lab's console (ttyS0): kernel messages and `/init` output.
    pub console: String,
    /// Host time from starting QEMU until the step runner was up (kernel boot + module loading).
    pub lab_boot_time: Duration,
    /// Guest uptime (CLOCK_BOOTTIME) when the step runner was up.
    pub guest_boot_time: Duration,
    /// Host time from starting QEMU until it exited.
    pub total_time: Duration,
    /// What QEMU itself printed (warnings).
    pub qemu_stderr: String,
}

impl Report {
    /// The result of the step called `name`.
    pub fn step(&self, name: &str) -> Result<&StepResult, LabError> {
        self.steps.iter().find(|s| s.name == name).ok_or_else(|| LabError::NoSuchStep(name.to_string()))
    }

    /// `Ok` when every step exited 0 (background steps stopped at the end count as success).
    pub fn ensure_all_success(&self) -> Result<(), LabError> {
        for s in self.steps.iter().filter(|s| !s.killed) {
            s.ensure_success()?;
        }
        Ok(())
    }
}

impl Lab {
    /// Finds QEMU and prepares (or takes from the cache) the lab base with the default modules
    /// (`kvm_amd`, `virtio_pci`, `virtio_blk`, `tun` and their dependencies).
    pub fn new() -> Result<Self, LabError> {
        Self::with_modules(&[])
    }

    /// Like [`Lab::new`], also loading `modules` (with their dependencies) at lab boot, e.g.
    /// `["ext4"]`. Each module set has its own cached base.
    pub fn with_modules(modules: &[&str]) -> Result<Self, LabError> {
        let qemu = match std::env::var_os("KILN_LAB_QEMU") {
            Some(q) => host::which(&q).ok_or_else(|| LabError::Missing {
                what: format!("KILN_LAB_QEMU={}", q.to_string_lossy()),
                hint: "point it at a qemu-system-x86_64 binary".into(),
            })?,
            None => host::require("qemu-system-x86_64", "qemu-system-x86")?,
        };
        let extra: Vec<String> = modules.iter().map(|m| m.to_string()).collect();
        let base = base::prepare(&extra)?;
        Ok(Self {
            base,
            qemu,
            payload: Vec::new(),
            disks: Vec::new(),
            directives: Vec::new(),
            env: Vec::new(),
            timeout: Duration::from_secs(600),
            cpus: 2,
            memory_mib: 2048,
            output_limit: 1 << 20,
            kernel_args: Vec::new(),
        })
    }

    /// What the cached base was built from (kernel package, release, modules, build time).
    pub fn base(&self) -> &BaseMeta {
        &self.base.meta
    }

    /// How long [`Lab::new`] spent building the base, if it was not cached.
    pub fn base_build_time(&self) -> Option<Duration> {
        self.base.built_in
    }

    /// Debian's stock kernel as shipped (bzImage); also a handy guest kernel for a VMM inside the
    /// lab (it has 8250, ACPI and virtio-mmio support built in or as modules).
    pub fn kernel_path(&self) -> &Path {
        &self.base.bzimage
    }

    /// The same kernel as an uncompressed ELF with a PVH entry note, when it could be extracted;
    /// the lab boots this one (no decompression under TCG).
    pub fn vmlinux_path(&self) -> Option<&Path> {
        self.base.meta.pvh_vmlinux.then_some(self.base.kernel.as_path())
    }

    /// The directory holding the cached kernel and base cpio.
    pub fn base_dir(&self) -> &Path {
        &self.base.dir
    }

    /// Carries an executable to `dst` (mode 0755) together with the shared libraries and dynamic
    /// loader `ldd` reports for it, placed at the same paths in the lab.
    pub fn binary(mut self, src: impl AsRef<Path>, dst: &str) -> Self {
        self.payload.push(Payload::File {
            src: src.as_ref().to_path_buf(),
            dst: dst.to_string(),
            perm: Some(0o755),
            libs: true,
        });
        self
    }

    /// Carries the `kiln` CLI (`/usr/bin/kiln`), kiln-vmm (`/usr/bin/kiln-vmm`), the static guest
    /// agent (`/usr/bin/kiln-agent-static`, for `KILN_AGENT_BIN`) and the host tools kiln calls
    /// (e2fsprogs' `mkfs.ext4`, `debugfs`, `resize2fs`; `ssh-keygen`).
    pub fn kiln_cli(
        self,
        kiln: impl AsRef<Path>,
        kiln_vmm: impl AsRef<Path>,
        agent: impl AsRef<Path>,
    ) -> Self {
        self.binary(kiln, "/usr/bin/kiln")
            .binary(kiln_vmm, "/usr/bin/kiln-vmm")
            .binary(agent, "/usr/bin/kiln-agent-static")
            .binary("/usr/sbin/mke2fs", "/usr/sbin/mkfs.ext4")
            .binary("/usr/sbin/debugfs", "/usr/sbin/debugfs")
            .binary("/usr/sbin/resize2fs", "/usr/sbin/resize2fs")
            .binary("/usr/bin/ssh-keygen", "/usr/bin/ssh-keygen")
    }

    /// Carries a host file (symlinks followed; permissions kept) to `dst`.
    pub fn file(mut self, src: impl AsRef<Path>, dst: &str) -> Self {
        self.payload.push(Payload::File {
            src: src.as_ref().to_path_buf(),
            dst: dst.to_string(),
            perm: None,
            libs: false,
        });
        self
    }

    /// Writes `data` to `dst` in the lab with permissions `perm` (e.g. a VM config).
    pub fn file_bytes(mut self, data: impl Into<Vec<u8>>, dst: &str, perm: u32) -> Self {
        self.payload.push(Payload::Bytes { data: data.into(), dst: dst.to_string(), perm });
        self
    }

    /// Carries a host directory recursively to `dst` (symlinks followed), e.g. `/usr/share/qemu`.
    pub fn dir(mut self, src: impl AsRef<Path>, dst: &str) -> Self {
        self.payload.push(Payload::Dir { src: src.as_ref().to_path_buf(), dst: dst.to_string() });
        self
    }

    /// Attaches a host file as a writable virtio-blk disk: the first is `/dev/vda`, then `/dev/vdb`, …
    /// Writes inside the lab land in the host file once the lab has ended.
    pub fn disk(mut self, path: impl AsRef<Path>) -> Self {
        self.disks.push(Disk { path: path.as_ref().to_path_buf(), read_only: false });
        self
    }

    /// Attaches a host file as a read-only virtio-blk disk.
    pub fn disk_read_only(mut self, path: impl AsRef<Path>) -> Self {
        self.disks.push(Disk { path: path.as_ref().to_path_buf(), read_only: true });
        self
    }

    /// Sets an environment variable for every step.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Lab-level timeout, from QEMU start to exit (default 600 s). On expiry QEMU is killed and
    /// [`Lab::run`] returns [`LabError::Timeout`] with the console tail.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// vCPUs of the lab VM (default 2).
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus.max(1);
        self
    }

    /// Memory of the lab VM in MiB (default 2048). The payload lives in it (initramfs).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib.max(256);
        self
    }

    /// How much of each step's stdout and stderr comes back (the last bytes; default 1 MiB).
    pub fn output_limit(mut self, bytes: u64) -> Self {
        self.output_limit = bytes;
        self
    }

    /// Appends an argument to the lab kernel's command line.
    pub fn kernel_arg(mut self, arg: &str) -> Self {
        self.kernel_args.push(arg.to_string());
        self
    }

    /// Runs `cmd` with `/bin/sh -c` and waits for it.
    pub fn step(mut self, name: &str, cmd: &str) -> Self {
        self.directives.push(Directive::Run { name: name.to_string(), cmd: cmd.to_string() });
        self
    }

    /// Starts `cmd` in the background (its own process group) and goes on. Its result is reported
    /// when it exits, when [`Lab::wait_for`] waits for it, or — if it is still running when the
    /// scenario ends — after it has been stopped (SIGTERM, then SIGKILL after 2 s; `killed` is set).
    pub fn step_background(mut self, name: &str, cmd: &str) -> Self {
        self.directives.push(Directive::Background { name: name.to_string(), cmd: cmd.to_string() });
        self
    }

    /// Waits until the background step `name` has exited.
    pub fn wait_for(mut self, name: &str) -> Self {
        self.directives.push(Directive::Wait { name: name.to_string() });
        self
    }

    /// Boots the lab, runs the scenario, and returns the results. Labs on one host run one at a
    /// time (a host-wide lock); the timeout counts from QEMU's start, not from the wait.
    ///
    /// When the lab's own kernel locks up (its soft-lockup watchdog panics it: an artifact of
    /// QEMU's emulated nesting, see docs/testing.md), the scenario runs once more from the start,
    /// and stderr says so with the first run's console tail. A second lockup is an error.
    pub fn run(&self) -> Result<Report, LabError> {
        run::run_retrying_lockups(self, None)
    }

    /// Like [`Lab::run`], and calls `on_event` as things happen, including step output while the
    /// step runs (a rerun after a lab lockup reports its events again from the start).
    pub fn run_with(&self, mut on_event: impl FnMut(LabEvent<'_>)) -> Result<Report, LabError> {
        run::run_retrying_lockups(self, Some(&mut on_event))
    }
}
