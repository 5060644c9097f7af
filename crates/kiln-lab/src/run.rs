//! One lab run: payload archive, QEMU command line, the results channel and the timeout.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Deserialize;

use crate::cpio::{archive_path, CpioWriter};
use crate::host::{self, FileLock};
use crate::monitor;
use crate::{Directive, Lab, LabError, LabEvent, LabHang, OutputStream, Payload, Report, StepResult};

/// How long QEMU may take to exit after the runner reported the end of the scenario.
const EXIT_GRACE: Duration = Duration::from_secs(30);
/// How often the results file is polled.
const POLL: Duration = Duration::from_millis(10);

/// A record the step runner writes on ttyS1.
#[derive(Debug, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
enum Record {
    Ready { uptime_us: u64 },
    Start { name: String },
    Out { name: String, fd: u8, data: String },
    Step(StepRecord),
    Done {},
}

#[derive(Debug, Deserialize)]
struct StepRecord {
    name: String,
    bg: bool,
    exit_code: i32,
    signal: Option<i32>,
    wall_us: u64,
    user_us: u64,
    sys_us: u64,
    max_rss_kib: u64,
    stdout: String,
    stdout_dropped: u64,
    stderr: String,
    stderr_dropped: u64,
    killed: bool,
}

impl StepRecord {
    fn into_result(self) -> Result<StepResult, LabError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let decode =
            |s: &str| b64.decode(s).map_err(|e| LabError::Protocol(format!("step {}: {e}", self.name)));
        Ok(StepResult {
            stdout: decode(&self.stdout)?,
            stderr: decode(&self.stderr)?,
            name: self.name,
            exit_code: self.exit_code,
            signal: self.signal,
            stdout_dropped: self.stdout_dropped,
            stderr_dropped: self.stderr_dropped,
            wall: Duration::from_micros(self.wall_us),
            user: Duration::from_micros(self.user_us),
            system: Duration::from_micros(self.sys_us),
            max_rss_kib: self.max_rss_kib,
            background: self.bg,
            killed: self.killed,
        })
    }
}

/// The last output of steps that have started but not finished, for a timeout's report.
#[derive(Default)]
struct UnfinishedOutput {
    /// (step, stream) -> the last [`UNFINISHED_OUTPUT_TAIL`] bytes, in order of first output.
    tails: Vec<((String, OutputStream), Vec<u8>)>,
}

/// How much of each unfinished step's stdout and stderr a timeout report keeps.
const UNFINISHED_OUTPUT_TAIL: usize = 16 * 1024;

impl UnfinishedOutput {
    fn add(&mut self, step: &str, stream: OutputStream, data: &[u8]) {
        let index = match self.tails.iter().position(|((s, o), _)| s == step && *o == stream) {
            Some(i) => i,
            None => {
                self.tails.push(((step.to_string(), stream), Vec::new()));
                self.tails.len() - 1
            }
        };
        let tail = &mut self.tails[index].1;
        tail.extend_from_slice(data);
        let excess = tail.len().saturating_sub(UNFINISHED_OUTPUT_TAIL);
        tail.drain(..excess);
    }

    fn finished(&mut self, step: &str) {
        self.tails.retain(|((s, _), _)| s != step);
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for ((step, stream), tail) in &self.tails {
            let which = if *stream == OutputStream::Stderr { "stderr" } else { "stdout" };
            out.push_str(&format!("--- {which} of `{step}` (last {} bytes)\n", tail.len()));
            out.push_str(&String::from_utf8_lossy(tail));
            if !tail.ends_with(b"\n") {
                out.push('\n');
            }
        }
        out
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The scenario file the runner reads (see `runner/lab_runner.rs`).
fn scenario(lab: &Lab) -> Result<String, LabError> {
    let mut names = HashSet::new();
    let mut background = HashSet::new();
    let mut out = format!("limit {}\n", lab.output_limit);
    for (k, v) in &lab.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(LabError::Scenario(format!("bad environment variable {k:?}")));
        }
        out.push_str(&format!("env {} {}\n", hex(k), hex(v)));
    }
    for d in &lab.directives {
        match d {
            Directive::Run { name, cmd } | Directive::Background { name, cmd } => {
                if name.is_empty() || !names.insert(name.clone()) {
                    return Err(LabError::Scenario(format!(
                        "step names must be unique and non-empty: {name:?}"
                    )));
                }
                if cmd.contains('\0') {
                    return Err(LabError::Scenario(format!("step {name}: NUL in command")));
                }
                let bg = matches!(d, Directive::Background { .. });
                if bg {
                    background.insert(name.clone());
                }
                out.push_str(&format!("{} {} {}\n", if bg { "bg" } else { "run" }, hex(name), hex(cmd)));
            }
            Directive::Wait { name } => {
                if !background.contains(name) {
                    return Err(LabError::Scenario(format!(
                        "wait_for({name:?}): no earlier background step"
                    )));
                }
                out.push_str(&format!("wait {}\n", hex(name)));
            }
        }
    }
    Ok(out)
}

enum Source {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

fn collect_dir(
    src: &Path,
    dst: &str,
    depth: usize,
    out: &mut BTreeMap<String, (Source, u32)>,
) -> Result<(), LabError> {
    if depth > 32 {
        return Err(LabError::Scenario(format!(
            "{}: directory nesting too deep (symlink loop?)",
            src.display()
        )));
    }
    for entry in std::fs::read_dir(src).map_err(|e| LabError::io(src, e))? {
        let entry = entry.map_err(|e| LabError::io(src, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(_) => continue, // dangling symlink
        };
        let target = format!("{dst}/{name}");
        if meta.is_dir() {
            collect_dir(&path, &target, depth + 1, out)?;
        } else if meta.is_file() {
            use std::os::unix::fs::PermissionsExt;
            out.insert(
                archive_path(&target).map_err(|e| LabError::io(&path, e))?,
                (Source::Host(path), meta.permissions().mode()),
            );
        }
    }
    Ok(())
}

/// Resolves the payload into in-lab path → source, including `ldd` closures.
fn resolve_payload(lab: &Lab) -> Result<BTreeMap<String, (Source, u32)>, LabError> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = BTreeMap::new();
    for p in &lab.payload {
        match p {
            Payload::File { src, dst, perm, libs } => {
                let meta = std::fs::metadata(src).map_err(|e| LabError::io(src, e))?;
                if !meta.is_file() {
                    return Err(LabError::Scenario(format!("{} is not a file", src.display())));
                }
                if *libs {
                    for lib in host::ldd_closure(src)? {
                        let key = archive_path(&lib.to_string_lossy()).map_err(|e| LabError::io(&lib, e))?;
                        out.insert(key, (Source::Host(lib), 0o755));
                    }
                }
                let key = archive_path(dst).map_err(|e| LabError::io(src, e))?;
                out.insert(key, (Source::Host(src.clone()), perm.unwrap_or(meta.permissions().mode())));
            }
            Payload::Bytes { data, dst, perm } => {
                let key = archive_path(dst).map_err(|e| LabError::Scenario(e.to_string()))?;
                out.insert(key, (Source::Bytes(data.clone()), *perm));
            }
            Payload::Dir { src, dst } => collect_dir(src, dst, 0, &mut out)?,
        }
    }
    for reserved in ["init", "lab/runner", "lab/scenario"] {
        if out.contains_key(reserved) {
            return Err(LabError::Scenario(format!("/{reserved} is reserved by the lab")));
        }
    }
    Ok(out)
}

/// Writes `base.cpio` + payload archive to `path`.
fn write_initrd(lab: &Lab, path: &Path) -> Result<u64, LabError> {
    std::fs::copy(&lab.base.cpio, path).map_err(|e| LabError::io(&lab.base.cpio, e))?;
    let payload = resolve_payload(lab)?;
    let file = std::fs::OpenOptions::new().append(true).open(path).map_err(|e| LabError::io(path, e))?;
    let mut w = CpioWriter::new(BufWriter::new(file));
    let io = |e| LabError::io(path, e);
    for (dst, (src, perm)) in &payload {
        match src {
            Source::Host(p) => crate::base::add_host_file(&mut w, p, dst, *perm)?,
            Source::Bytes(b) => w.file(dst, *perm, b).map_err(io)?,
        }
    }
    w.file("lab/scenario", 0o644, scenario(lab)?.as_bytes()).map_err(io)?;
    w.finish().map_err(io)?;
    Ok(std::fs::metadata(path).map_err(io)?.len())
}

/// Kills QEMU if the run is abandoned (error, panic, timeout).
struct QemuGuard(Child);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Incrementally reads complete lines from a file another process appends to.
struct LineTail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl LineTail {
    fn poll(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        let Ok(mut f) = File::open(&self.path) else { return lines };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return lines;
        }
        let mut buf = Vec::new();
        if let Ok(n) = f.read_to_end(&mut buf) {
            self.offset += n as u64;
        }
        self.partial.extend_from_slice(&buf);
        while let Some(pos) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line).trim().to_string();
            if !text.is_empty() {
                lines.push(text);
            }
        }
        lines
    }
}

fn console_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn qemu_command(lab: &Lab, initrd: &Path, console: &Path, results: &Path, monitor: &Path) -> Command {
    let mut cmd = Command::new(&lab.qemu);
    let accel = match std::env::var("KILN_LAB_TCG_THREAD") {
        Ok(t) if !t.is_empty() => format!("tcg,thread={t}"),
        _ => "tcg".to_string(),
    };
    cmd.args(["-M", "pc", "-accel", &accel, "-cpu", "max"])
        .args(["-smp", &lab.cpus.to_string(), "-m", &lab.memory_mib.to_string()])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&lab.base.kernel)
        .arg("-initrd")
        .arg(initrd);
    let mut append =
        // A lab CPU stuck in its kernel panics the lab (so the run ends at once, see
        // `run_retrying_lockups`); loglevel=5 puts the lockup's registers and stack on the console.
        format!(
            "console=ttyS0 reboot=k panic=1 quiet loglevel=5 softlockup_panic=1 tsc=reliable kiln.disks={}",
            lab.disks.len()
        );
    for a in &lab.kernel_args {
        append.push(' ');
        append.push_str(a);
    }
    // Extra lab kernel arguments for experiments (`kvm_amd.npt=0`, ...), after the scenario's own.
    if let Ok(extra) = std::env::var("KILN_LAB_KERNEL_ARGS") {
        if !extra.trim().is_empty() {
            append.push(' ');
            append.push_str(extra.trim());
        }
    }
    cmd.arg("-append").arg(append);
    let esc = |p: &Path| p.to_string_lossy().replace(',', ",,");
    cmd.arg("-chardev").arg(format!("file,id=console,path={}", esc(console)));
    cmd.args(["-serial", "chardev:console"]);
    cmd.arg("-chardev").arg(format!("file,id=results,path={}", esc(results)));
    cmd.args(["-serial", "chardev:results"]);
    cmd.arg("-monitor").arg(format!("unix:{},server=on,wait=off", esc(monitor)));
    for (i, d) in lab.disks.iter().enumerate() {
        let ro = if d.read_only { ",readonly=on" } else { "" };
        cmd.arg("-drive").arg(format!("if=none,id=disk{i},format=raw,file={}{ro}", esc(&d.path)));
        cmd.arg("-device").arg(format!("virtio-blk-pci,drive=disk{i}"));
    }
    cmd
}

pub(crate) type EventSink<'a> = Option<&'a mut dyn FnMut(LabEvent<'_>)>;

/// The lab kernel's words when its watchdog found a CPU stuck in the kernel: the report, and
/// the panic that follows it (the report can scroll out of the console tail behind the stacks).
const LAB_LOCKUP_MARKERS: [&str; 4] = [
    "soft lockup - CPU#",
    "hard LOCKUP",
    "Kernel panic - not syncing: softlockup",
    "Kernel panic - not syncing: Hard LOCKUP",
];

/// Whether an error is the lab's own kernel locking up (not the scenario failing).
fn is_lab_lockup(e: &LabError) -> bool {
    match e {
        LabError::LabDied { console_tail, .. } => LAB_LOCKUP_MARKERS.iter().any(|m| console_tail.contains(m)),
        _ => false,
    }
}

/// [`run`], once more when the lab's kernel locked up (see [`crate::Lab::run`]).
pub(crate) fn run_retrying_lockups(lab: &Lab, mut events: EventSink<'_>) -> Result<Report, LabError> {
    match run(lab, &mut events) {
        Err(e) if is_lab_lockup(&e) => {
            for line in e.to_string().lines() {
                eprintln!("kiln-lab: lockup: {line}");
            }
            eprintln!("kiln-lab: the lab's own kernel locked up (above); running the scenario once more");
            run(lab, &mut events)
        }
        other => other,
    }
}

fn run(lab: &Lab, events: &mut EventSink<'_>) -> Result<Report, LabError> {
    for d in &lab.disks {
        if !d.path.is_file() {
            return Err(LabError::Scenario(format!("disk {} is not a file", d.path.display())));
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix("kiln-lab-")
        .tempdir()
        .map_err(|e| LabError::io(Path::new("/tmp"), e))?;
    let initrd = tmp.path().join("initrd.cpio");
    write_initrd(lab, &initrd)?;
    let console = tmp.path().join("console.log");
    let results = tmp.path().join("results.log");
    let qemu_err = tmp.path().join("qemu.stderr");
    let monitor_socket = tmp.path().join("monitor.sock");

    let _lock = if std::env::var_os("KILN_LAB_NO_LOCK").is_some() {
        None
    } else {
        Some(FileLock::exclusive(&host::lab_cache_dir()?.join("run.lock"))?)
    };

    let mut cmd = qemu_command(lab, &initrd, &console, &results, &monitor_socket);
    let err_file = File::create(&qemu_err).map_err(|e| LabError::io(&qemu_err, e))?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(err_file);
    let start = Instant::now();
    let child =
        cmd.spawn().map_err(|e| LabError::Command { command: format!("{cmd:?}"), detail: e.to_string() })?;
    let mut qemu = QemuGuard(child);
    let mut tail = LineTail { path: results, offset: 0, partial: Vec::new() };
    let mut steps = Vec::new();
    let mut running: Option<String> = None;
    let mut ready: Option<(Duration, Duration)> = None;
    let mut done_at: Option<Instant> = None;
    let mut unfinished_output = UnfinishedOutput::default();
    let exit_status;
    loop {
        let exited = qemu
            .0
            .try_wait()
            .map_err(|e| LabError::Command { command: "wait qemu".into(), detail: e.to_string() })?;
        // Read after checking for exit, so nothing QEMU wrote before exiting is missed.
        for line in tail.poll() {
            let rec: Record = serde_json::from_str(&line).map_err(|e| {
                LabError::Protocol(format!("{e}: {}", line.chars().take(200).collect::<String>()))
            })?;
            match rec {
                Record::Ready { uptime_us } => {
                    let boot_time = start.elapsed();
                    ready = Some((boot_time, Duration::from_micros(uptime_us)));
                    if let Some(f) = events.as_mut() {
                        f(LabEvent::Ready { boot_time });
                    }
                }
                Record::Start { name } => {
                    if let Some(f) = events.as_mut() {
                        f(LabEvent::StepStarted { name: &name });
                    }
                    running = Some(name);
                }
                Record::Out { name, fd, data } => {
                    let data = base64::engine::general_purpose::STANDARD
                        .decode(&data)
                        .map_err(|e| LabError::Protocol(format!("output of {name}: {e}")))?;
                    let stream = if fd == 2 { OutputStream::Stderr } else { OutputStream::Stdout };
                    unfinished_output.add(&name, stream, &data);
                    if let Some(f) = events.as_mut() {
                        f(LabEvent::Output { step: &name, stream, data: &data });
                    }
                }
                Record::Step(s) => {
                    let r = s.into_result()?;
                    unfinished_output.finished(&r.name);
                    if running.as_deref() == Some(r.name.as_str()) {
                        running = None;
                    }
                    if let Some(f) = events.as_mut() {
                        f(LabEvent::StepFinished(&r));
                    }
                    steps.push(r);
                }
                Record::Done {} => done_at = Some(Instant::now()),
            }
        }
        if let Some(status) = exited {
            exit_status = status;
            break;
        }
        if done_at.is_some_and(|t| t.elapsed() > EXIT_GRACE) {
            let _ = qemu.0.kill();
            exit_status = qemu
                .0
                .wait()
                .map_err(|e| LabError::Command { command: "wait qemu".into(), detail: e.to_string() })?;
            break;
        }
        if done_at.is_none() && start.elapsed() > lab.timeout {
            let lab_cpus = monitor::ask(&monitor_socket, &monitor::hang_questions(lab.cpus));
            drop(qemu);
            return Err(LabError::Timeout(Box::new(LabHang {
                timeout: lab.timeout,
                running_step: running,
                completed: steps,
                unfinished_output: unfinished_output.render(),
                lab_cpus,
                console_tail: console_tail(&console, 80),
            })));
        }
        std::thread::sleep(POLL);
    }
    let total_time = start.elapsed();
    let qemu_stderr =
        std::fs::read(&qemu_err).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    if done_at.is_none() {
        return Err(LabError::LabDied {
            status: exit_status.to_string(),
            qemu_stderr: qemu_stderr.trim().to_string(),
            completed: steps,
            console_tail: console_tail(&console, 80),
        });
    }
    let (lab_boot_time, guest_boot_time) = ready.unwrap_or_default();
    let console =
        std::fs::read(&console).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    Ok(Report { steps, console, lab_boot_time, guest_boot_time, total_time, qemu_stderr })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn died(console_tail: &str) -> LabError {
        LabError::LabDied {
            status: "exit status: 0".into(),
            qemu_stderr: String::new(),
            completed: Vec::new(),
            console_tail: console_tail.into(),
        }
    }

    #[test]
    fn only_a_lab_kernel_lockup_earns_a_second_run() {
        let lockup = "[   36.6] watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [kiln_vmm:123]\n\
                      [   36.7] Kernel panic - not syncing: softlockup: hung tasks";
        assert!(is_lab_lockup(&died(lockup)));
        // Only the panic left in the tail.
        assert!(is_lab_lockup(&died("[   36.7] Kernel panic - not syncing: softlockup: hung tasks")));
        assert!(!is_lab_lockup(&died("[    5.1] Kernel panic - not syncing: Attempted to kill init!")));
        assert!(!is_lab_lockup(&LabError::Protocol("soft lockup - CPU#0".into())));
    }
}
