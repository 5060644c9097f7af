//! The lab's step runner: runs inside the lab VM as PID 1 (exec'd by the lab's `/init`).
//!
//! Built by the harness on the host with plain
//! `rustc -O -C target-feature=+crt-static lab_runner.rs` (no Cargo, no crates), so it must stay one
//! file with no dependencies: the few libc calls it needs are declared below by hand.
//!
//! `lab-runner run SCENARIO RESULTS` reads the scenario written by the host, runs each step with
//! `/bin/sh -c`, and writes one JSON line per event to RESULTS (the lab's second serial port):
//! `ready`, `start` (a step began), `step` (a step ended: exit code, signal, wall time in µs, CPU time,
//! peak RSS from wait4, the tail of stdout/stderr in base64), `done`. Then it syncs and reboots the lab
//! (QEMU runs with `-no-reboot`, so it exits).
//!
//! `lab-runner kvm-check` opens /dev/kvm, prints KVM_GET_API_VERSION and tries KVM_CREATE_VM.
//!
//! Scenario format, one directive per line, fields separated by one space, strings hex-encoded:
//! `limit BYTES`, `env KEY VALUE`, `run NAME CMD`, `bg NAME CMD`, `wait NAME`.
//! New step output is also sent every 50 ms as `out` records (fd 1 or 2), so a lab that times out
//! still shows what its steps printed.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Rusage {
    /// ru_utime (sec, usec), ru_stime (sec, usec), then the 14 `long` fields of `struct rusage`.
    fields: [i64; 18],
}

const RU_UTIME_SEC: usize = 0;
const RU_UTIME_USEC: usize = 1;
const RU_STIME_SEC: usize = 2;
const RU_STIME_USEC: usize = 3;
const RU_MAXRSS: usize = 4;

extern "C" {
    fn wait4(pid: i32, status: *mut i32, options: i32, rusage: *mut Rusage) -> i32;
    fn clock_gettime(clock: i32, ts: *mut [i64; 2]) -> i32;
    fn kill(pid: i32, sig: i32) -> i32;
    fn sync();
    fn reboot(cmd: i32) -> i32;
    fn ioctl(fd: i32, request: u64, ...) -> i32;
    fn tcgetattr(fd: i32, termios: *mut [u64; 16]) -> i32;
    fn tcsetattr(fd: i32, action: i32, termios: *const [u64; 16]) -> i32;
    fn cfmakeraw(termios: *mut [u64; 16]);
    fn close(fd: i32) -> i32;
    fn sigemptyset(set: *mut [u64; 16]) -> i32;
    fn sigaddset(set: *mut [u64; 16], sig: i32) -> i32;
    fn sigprocmask(how: i32, set: *const [u64; 16], old: *mut [u64; 16]) -> i32;
    fn sigtimedwait(set: *const [u64; 16], info: *mut [u64; 16], timeout: *const [i64; 2]) -> i32;
}

const CLOCK_MONOTONIC: i32 = 1;
const CLOCK_BOOTTIME: i32 = 7;
const WNOHANG: i32 = 1;
const SIGTERM: i32 = 15;
const SIGKILL: i32 = 9;
const SIGCHLD: i32 = 17;
const SIG_BLOCK: i32 = 0;
const SIG_UNBLOCK: i32 = 1;
const RB_AUTOBOOT: i32 = 0x0123_4567;
const KVM_GET_API_VERSION: u64 = 0xAE00;
const KVM_CREATE_VM: u64 = 0xAE01;

fn now_us(clock: i32) -> u64 {
    let mut ts = [0i64; 2];
    // SAFETY: `ts` is a valid, writable timespec-sized buffer for the duration of the call.
    let rc = unsafe { clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts[0] as u64) * 1_000_000 + (ts[1] as u64) / 1_000
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// One reaped child: raw wait status, rusage, and when it was reaped.
#[derive(Clone, Copy)]
struct Reaped {
    status: i32,
    rusage: Rusage,
    end_us: u64,
}

/// Reaps any child that has exited; `None` when none has (yet).
fn reap_any() -> Option<(i32, Reaped)> {
    loop {
        let mut status = 0i32;
        let mut rusage = Rusage::default();
        // SAFETY: `status` and `rusage` are valid writable buffers of the sizes wait4 writes.
        let pid = unsafe { wait4(-1, &mut status, WNOHANG, &mut rusage) };
        if pid > 0 {
            let end_us = now_us(CLOCK_MONOTONIC);
            return Some((pid, Reaped { status, rusage, end_us }));
        }
        if pid < 0 && errno() == 4 {
            continue; // EINTR
        }
        return None;
    }
}

struct Step {
    name: String,
    background: bool,
    pid: i32,
    start_us: u64,
    out_path: String,
    err_path: String,
    reaped: Option<Reaped>,
    reported: bool,
    killed: bool,
    /// Bytes of stdout/stderr already streamed.
    streamed: [u64; 2],
}

struct Runner {
    results: File,
    limit: u64,
    sigchld: [u64; 16],
    env: Vec<(String, String)>,
    steps: Vec<Step>,
    by_pid: HashMap<i32, usize>,
}

fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 { T[(n >> 6) as usize & 63] as char } else { '=' });
        out.push(if chunk.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    out
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn unhex(s: &str) -> Result<String, String> {
    if s.len() % 2 != 0 {
        return Err(format!("odd hex length in {s:?}"));
    }
    let mut bytes = Vec::with_capacity(s.len() / 2);
    for i in (0..s.len()).step_by(2) {
        let byte = s.get(i..i + 2).ok_or("bad hex")?;
        bytes.push(u8::from_str_radix(byte, 16).map_err(|e| e.to_string())?);
    }
    String::from_utf8(bytes).map_err(|e| e.to_string())
}

/// The last `limit` bytes of a file, and how many bytes were dropped before them.
fn tail(path: &str, limit: u64) -> (Vec<u8>, u64) {
    let Ok(mut f) = File::open(path) else {
        return (Vec::new(), 0);
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let skip = len.saturating_sub(limit);
    if f.seek(SeekFrom::Start(skip)).is_err() {
        return (Vec::new(), 0);
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    (buf, skip)
}

impl Runner {
    fn emit(&mut self, line: &str) {
        let mut data = String::with_capacity(line.len() + 1);
        data.push_str(line);
        data.push('\n');
        let _ = self.results.write_all(data.as_bytes());
        let _ = self.results.flush();
    }

    /// Starts a step; returns its index, or `None` when it could not be started (already reported).
    fn spawn(&mut self, name: String, cmd: &str, background: bool) -> Option<usize> {
        let idx = self.steps.len();
        let out_path = format!("/tmp/.lab-step-{idx}.out");
        let err_path = format!("/tmp/.lab-step-{idx}.err");
        self.emit(&format!(
            "{{\"t\":\"start\",\"name\":{},\"bg\":{},\"uptime_us\":{}}}",
            json_str(&name),
            background,
            now_us(CLOCK_BOOTTIME)
        ));
        let files = File::create(&out_path).and_then(|o| File::create(&err_path).map(|e| (o, e)));
        let start_us = now_us(CLOCK_MONOTONIC);
        let spawned = files.and_then(|(out, err)| {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(cmd).stdin(Stdio::null()).stdout(out).stderr(err);
            c.current_dir("/").process_group(0);
            // The runner blocks SIGCHLD (to take it with sigtimedwait) and a signal mask survives
            // exec: a step shell with SIGCHLD blocked hangs forever in `wait` for a running child
            // (busybox ash sleeps in sigsuspend for a signal that never arrives).
            let sigchld = self.sigchld;
            // SAFETY: runs in the forked child before exec; sigprocmask is async-signal-safe and
            // `sigchld` is a copied, initialised sigset_t-sized buffer.
            unsafe {
                c.pre_exec(move || {
                    sigprocmask(SIG_UNBLOCK, &sigchld, std::ptr::null_mut());
                    Ok(())
                });
            }
            for (k, v) in &self.env {
                c.env(k, v);
            }
            c.spawn()
        });
        match spawned {
            Ok(child) => {
                let pid = child.id() as i32;
                // The runner reaps with wait4 itself; `Child` must not be waited on or dropped into a
                // zombie-reaping path, so leak it (dropping a Child does not wait).
                std::mem::forget(child);
                self.by_pid.insert(pid, idx);
                self.steps.push(Step {
                    name,
                    background,
                    pid,
                    start_us,
                    out_path,
                    err_path,
                    reaped: None,
                    reported: false,
                    killed: false,
                    streamed: [0, 0],
                });
                Some(idx)
            }
            Err(e) => {
                self.emit(&format!(
                    "{{\"t\":\"step\",\"name\":{},\"bg\":{},\"exit_code\":127,\"signal\":null,\"wall_us\":0,\
                     \"user_us\":0,\"sys_us\":0,\"max_rss_kib\":0,\"stdout\":\"\",\"stdout_dropped\":0,\
                     \"stderr\":{},\"stderr_dropped\":0,\"killed\":false}}",
                    json_str(&name),
                    background,
                    json_str(&b64(format!("lab-runner: spawn failed: {e}\n").as_bytes()))
                ));
                None
            }
        }
    }

    /// Emits new output of unreported steps as `out` records; `all` drains to the end of the files.
    fn stream_outputs(&mut self, only: Option<usize>, all: bool) {
        for i in 0..self.steps.len() {
            if only.is_some_and(|o| o != i) || self.steps[i].reported {
                continue;
            }
            for fd in 0..2 {
                loop {
                    let step = &self.steps[i];
                    let path = if fd == 0 { &step.out_path } else { &step.err_path };
                    let Ok(mut f) = File::open(path) else { break };
                    if f.seek(SeekFrom::Start(step.streamed[fd])).is_err() {
                        break;
                    }
                    let mut buf = Vec::new();
                    let _ = (&mut f).take(64 * 1024).read_to_end(&mut buf);
                    if buf.is_empty() {
                        break;
                    }
                    let name = json_str(&step.name);
                    self.steps[i].streamed[fd] += buf.len() as u64;
                    self.emit(&format!(
                        "{{\"t\":\"out\",\"name\":{name},\"fd\":{},\"data\":\"{}\"}}",
                        fd + 1,
                        b64(&buf)
                    ));
                    if !all {
                        break;
                    }
                }
            }
        }
    }

    /// Reaps children until step `idx` has exited, recording every step that exits meanwhile and
    /// streaming output every 50 ms. SIGCHLD is blocked and waited for with a timeout, so a step is
    /// still reaped as soon as it exits.
    fn wait_step(&mut self, idx: usize) {
        loop {
            while let Some((pid, r)) = reap_any() {
                self.record(pid, r);
            }
            if self.steps.get(idx).is_none_or(|s| s.reaped.is_some()) {
                return;
            }
            self.stream_outputs(None, false);
            let timeout = [0i64, 50_000_000];
            let mut info = [0u64; 16];
            // SAFETY: all pointers are to live, correctly sized local buffers.
            unsafe { sigtimedwait(&self.sigchld, &mut info, &timeout) };
        }
    }

    fn record(&mut self, pid: i32, r: Reaped) {
        if let Some(&i) = self.by_pid.get(&pid) {
            if let Some(step) = self.steps.get_mut(i) {
                step.reaped = Some(r);
            }
            // Background steps are reported as soon as they end, so their output is not lost if
            // the lab times out later.
            if self.steps.get(i).is_some_and(|s| s.background) {
                self.report(i);
            }
        }
        // Otherwise: an orphan re-parented to PID 1; reaping it is all there is to do.
    }

    fn report(&mut self, idx: usize) {
        let Some(step) = self.steps.get(idx) else { return };
        if step.reported {
            return;
        }
        if step.reaped.is_none() {
            return;
        }
        self.stream_outputs(Some(idx), true);
        let Some(step) = self.steps.get(idx) else { return };
        let Some(r) = step.reaped else { return };
        let (code, signal) = if r.status & 0x7f == 0 {
            ((r.status >> 8) & 0xff, None)
        } else {
            let sig = r.status & 0x7f;
            (128 + sig, Some(sig))
        };
        let f = &r.rusage.fields;
        let user_us = f[RU_UTIME_SEC] * 1_000_000 + f[RU_UTIME_USEC];
        let sys_us = f[RU_STIME_SEC] * 1_000_000 + f[RU_STIME_USEC];
        let (out, out_dropped) = tail(&step.out_path, self.limit);
        let (err, err_dropped) = tail(&step.err_path, self.limit);
        let line = format!(
            "{{\"t\":\"step\",\"name\":{},\"bg\":{},\"exit_code\":{},\"signal\":{},\"wall_us\":{},\
             \"user_us\":{},\"sys_us\":{},\"max_rss_kib\":{},\"stdout\":\"{}\",\"stdout_dropped\":{},\
             \"stderr\":\"{}\",\"stderr_dropped\":{},\"killed\":{}}}",
            json_str(&step.name),
            step.background,
            code,
            signal.map_or("null".to_string(), |s| s.to_string()),
            r.end_us.saturating_sub(step.start_us),
            user_us,
            sys_us,
            f[RU_MAXRSS],
            b64(&out),
            out_dropped,
            b64(&err),
            err_dropped,
            step.killed,
        );
        let _ = std::fs::remove_file(&step.out_path);
        let _ = std::fs::remove_file(&step.err_path);
        if let Some(s) = self.steps.get_mut(idx) {
            s.reported = true;
        }
        self.emit(&line);
    }

    /// Stops background steps still running at the end of the scenario: SIGTERM, then SIGKILL.
    fn stop_background(&mut self) {
        let running: Vec<usize> =
            (0..self.steps.len()).filter(|&i| self.steps[i].reaped.is_none()).collect();
        if running.is_empty() {
            return;
        }
        for &i in &running {
            self.steps[i].killed = true;
            // SAFETY: plain syscall on a process group this runner created.
            unsafe { kill(-self.steps[i].pid, SIGTERM) };
        }
        let deadline = now_us(CLOCK_MONOTONIC) + 2_000_000;
        loop {
            while let Some((pid, r)) = reap_any() {
                self.record(pid, r);
            }
            if running.iter().all(|&i| self.steps[i].reaped.is_some()) {
                break;
            }
            if now_us(CLOCK_MONOTONIC) > deadline {
                for &i in &running {
                    if self.steps[i].reaped.is_none() {
                        // SAFETY: plain syscall on a process group this runner created.
                        unsafe { kill(-self.steps[i].pid, SIGKILL) };
                    }
                }
                for &i in &running {
                    self.wait_step(i);
                }
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

fn set_raw(f: &File) {
    use std::os::fd::AsRawFd;
    let mut t = [0u64; 16];
    // SAFETY: `t` is larger than glibc's struct termios (60 bytes); fd is valid while `f` lives.
    unsafe {
        if tcgetattr(f.as_raw_fd(), &mut t) == 0 {
            cfmakeraw(&mut t);
            tcsetattr(f.as_raw_fd(), 0, &t);
        }
    }
}

fn run(scenario: &str, results: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(scenario).map_err(|e| format!("{scenario}: {e}"))?;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .open(results)
        .map_err(|e| format!("{results}: {e}"))?;
    set_raw(&out);
    let mut sigchld = [0u64; 16];
    // SAFETY: `sigchld` is a sigset_t-sized buffer; blocking SIGCHLD lets sigtimedwait take it.
    // Step shells get SIGCHLD unblocked again before exec (see `spawn`).
    unsafe {
        sigemptyset(&mut sigchld);
        sigaddset(&mut sigchld, SIGCHLD);
        sigprocmask(SIG_BLOCK, &sigchld, std::ptr::null_mut());
    }
    let mut r = Runner {
        results: out,
        limit: 1 << 20,
        sigchld,
        env: Vec::new(),
        steps: Vec::new(),
        by_pid: HashMap::new(),
    };
    r.emit(&format!("{{\"t\":\"ready\",\"uptime_us\":{}}}", now_us(CLOCK_BOOTTIME)));
    for (n, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split(' ').collect();
        let bad = || format!("scenario line {}: {line:?}", n + 1);
        match f.as_slice() {
            [""] => {}
            ["limit", v] => r.limit = v.parse().map_err(|_| bad())?,
            ["env", k, v] => r.env.push((unhex(k)?, unhex(v)?)),
            ["run", name, cmd] => {
                if let Some(idx) = r.spawn(unhex(name)?, &unhex(cmd)?, false) {
                    r.wait_step(idx);
                    r.report(idx);
                }
            }
            ["bg", name, cmd] => {
                r.spawn(unhex(name)?, &unhex(cmd)?, true);
            }
            ["wait", name] => {
                let name = unhex(name)?;
                let idx = r.steps.iter().position(|s| s.background && s.name == name);
                let Some(idx) = idx else {
                    return Err(format!("wait: no background step named {name:?}"));
                };
                r.wait_step(idx);
                r.report(idx);
            }
            _ => return Err(bad()),
        }
    }
    r.stop_background();
    r.emit(&format!("{{\"t\":\"done\",\"uptime_us\":{}}}", now_us(CLOCK_BOOTTIME)));
    Ok(())
}

fn kvm_check() -> i32 {
    use std::os::fd::AsRawFd;
    let kvm = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(f) => f,
        Err(e) => {
            eprintln!("open /dev/kvm: {e}");
            return 1;
        }
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a value.
    let api = unsafe { ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0u64) };
    println!("KVM_GET_API_VERSION={api}");
    // SAFETY: KVM_CREATE_VM takes the machine type (0) by value and returns a new fd or -1.
    let vm = unsafe { ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0u64) };
    if vm < 0 {
        println!("KVM_CREATE_VM=failed errno={}", errno());
        return 1;
    }
    println!("KVM_CREATE_VM=ok");
    // SAFETY: `vm` is a file descriptor this function owns and closes exactly once.
    unsafe { close(vm) };
    if api == 12 {
        0
    } else {
        1
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let code = match args.get(1).map(String::as_str) {
        Some("run") if args.len() == 4 => match run(&args[2], &args[3]) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("lab-runner: {e}");
                1
            }
        },
        Some("kvm-check") => kvm_check(),
        _ => {
            eprintln!("usage: lab-runner run SCENARIO RESULTS | lab-runner kvm-check");
            2
        }
    };
    if std::process::id() == 1 {
        // PID 1 must never exit: flush the disks and end the lab (QEMU has -no-reboot).
        // SAFETY: plain syscalls with no memory arguments.
        unsafe {
            sync();
            reboot(RB_AUTOBOOT);
        }
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
    std::process::exit(code);
}
