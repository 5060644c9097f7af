//! The agent binary on this host in its `--listen-unix` test mode, driven by the host client of
//! kiln-agent-proto: exec, stdio, signals, tty + resize, concurrency, copies, flow control with a
//! slow reader, the main process, shutdown and hostile input. No VM needed.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_agent_proto::{Client, ClientError, CopyFormat, ExecRequest, ExitStatus, WindowSize};
use kiln_test_utils::wait_until;

struct Agent {
    child: Child,
    sock: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn start() -> Agent {
        Self::start_with_config(None)
    }

    fn start_with_config(config: Option<&str>) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let cfg = dir.path().join("agent.json");
        if let Some(c) = config {
            std::fs::write(&cfg, c).unwrap();
        }
        let child = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
            .arg("--listen-unix")
            .arg(&sock)
            .arg("--config")
            .arg(&cfg)
            .env("KILN_AGENT_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        assert!(wait_until(Duration::from_secs(10), || sock.exists()), "the agent did not create {sock:?}");
        Agent { child, sock, dir }
    }

    fn client(&self) -> Client {
        Client::connect_unix(&self.sock, Duration::from_secs(10)).unwrap()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the agent to exit; returns its code and stderr.
    fn wait_exit(mut self, timeout: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                self.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                return (status.code(), err);
            }
            assert!(Instant::now() < deadline, "the agent did not exit within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn exec(argv: &[&str]) -> ExecRequest {
    ExecRequest { argv: argv.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

fn alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[test]
fn exec_reports_stdout_stderr_and_exit_code() {
    let agent = Agent::start();
    let c = agent.client();
    assert!(!c.welcome().pid1 && !c.welcome().has_main);
    let out = c.exec(exec(&["sh", "-c", "echo hi; echo oops >&2; exit 3"])).unwrap().output().unwrap();
    assert_eq!(out.stdout, b"hi\n");
    assert_eq!(out.stderr, b"oops\n");
    assert_eq!(out.status, ExitStatus::Code(3));
    // env is exactly what was asked (plus PATH/HOME defaults), cwd as asked.
    let req = ExecRequest {
        env: vec!["GREETING=hello world".into()],
        cwd: Some("/tmp".into()),
        ..exec(&["sh", "-c", "echo \"$GREETING|$PWD|$HOME|${PATH:+path-set}|${USER:-no-user}\""])
    };
    let out = c.exec(req).unwrap().output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello world|/tmp|/root|path-set|no-user\n");
}

#[test]
fn exec_errors_are_reported_with_their_cause() {
    let agent = Agent::start();
    let c = agent.client();
    let e = c.exec(exec(&["no-such-command-kiln"])).unwrap_err();
    assert!(
        matches!(&e, ClientError::Remote(m) if m.contains("no-such-command-kiln") && m.contains("No such file")),
        "{e}"
    );
    let e = c.exec(ExecRequest { cwd: Some("/nonexistent-dir".into()), ..exec(&["true"]) }).unwrap_err();
    assert!(e.to_string().contains("working directory \"/nonexistent-dir\""), "{e}");
    let e = c.exec(ExecRequest { user: Some("no-such-user-kiln".into()), ..exec(&["true"]) }).unwrap_err();
    assert!(e.to_string().contains("/etc/passwd"), "{e}");
    let e = c.exec(exec(&[])).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    // The connection is still good.
    assert_eq!(c.exec(exec(&["true"])).unwrap().output().unwrap().status, ExitStatus::Code(0));
}

#[test]
fn exec_as_another_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED exec_as_another_user: needs root to switch users");
        return;
    }
    let agent = Agent::start();
    let c = agent.client();
    let req =
        ExecRequest { user: Some("65534:65534".into()), ..exec(&["sh", "-c", "id -u; id -g; echo $HOME"]) };
    let out = c.exec(req).unwrap().output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(&lines[..2], ["65534", "65534"], "{text}");
}

#[test]
fn stdin_streams_to_the_process_with_flow_control() {
    let agent = Agent::start();
    let c = agent.client();
    let p = c.exec(ExecRequest { stdin: true, ..exec(&["sh", "-c", "cat; echo done >&2"]) }).unwrap();
    // 3 MiB: many times the stdin window, so the credit has to come back as cat drains it.
    let data: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
    let out = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut out = Vec::new();
            p.stdout().read_to_end(&mut out).unwrap();
            out
        });
        for chunk in data.chunks(100_000) {
            p.write_stdin(chunk).unwrap();
        }
        p.close_stdin().unwrap();
        reader.join().unwrap()
    });
    assert!(out == data, "cat returned {} bytes, not the 3 MiB sent", out.len());
    let mut err = String::new();
    p.stderr().read_to_string(&mut err).unwrap();
    assert_eq!(err, "done\n");
    assert_eq!(p.wait().unwrap(), ExitStatus::Code(0));
}

#[test]
fn a_signal_kills_a_sleep() {
    let agent = Agent::start();
    let c = agent.client();
    let p = c.exec(exec(&["sleep", "100"])).unwrap();
    assert!(alive(p.pid()));
    let start = Instant::now();
    p.signal(libc::SIGTERM).unwrap();
    assert_eq!(p.wait().unwrap(), ExitStatus::Signal(libc::SIGTERM));
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(!alive(p.pid()) || std::fs::read_to_string(format!("/proc/{}/stat", p.pid())).is_err());
}

#[test]
fn tty_with_resize() {
    let agent = Agent::start();
    let c = agent.client();
    let req = ExecRequest {
        tty: Some(WindowSize { rows: 24, cols: 80 }),
        stdin: true,
        ..exec(&["sh", "-c", "stty size; test -t 0 && echo is-a-tty; read line; stty size; exit 7"])
    };
    let p = c.exec(req).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&out).contains("is-a-tty") {
        let n = p.stdout().read(&mut buf).unwrap();
        assert!(n > 0, "output ended early: {:?}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
    p.resize(WindowSize { rows: 50, cols: 132 }).unwrap();
    p.write_stdin(b"go\n").unwrap();
    p.stdout().read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("24 80\r\n"), "{text:?}");
    assert!(text.contains("50 132\r\n"), "stty size after the resize: {text:?}");
    assert_eq!(p.wait().unwrap(), ExitStatus::Code(7));
}

#[test]
fn many_concurrent_execs_on_one_connection() {
    let agent = Agent::start();
    let c = agent.client();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..40)
            .map(|i| {
                let c = &c;
                s.spawn(move || {
                    let script = format!(
                        "i=0; while [ $i -lt 200 ]; do echo line-{i}-$i; i=$((i+1)); done; exit {}",
                        i % 7
                    );
                    let out = c.exec(exec(&["sh", "-c", &script])).unwrap().output().unwrap();
                    (i, out)
                })
            })
            .collect();
        for h in handles {
            let (i, out) = h.join().unwrap();
            assert_eq!(out.status, ExitStatus::Code(i % 7));
            let expected: String = (0..200).map(|n| format!("line-{i}-{n}\n")).collect();
            assert_eq!(String::from_utf8_lossy(&out.stdout), expected, "exec {i}");
        }
    });
}

#[test]
fn copy_files_and_tar_streams_in_and_out() {
    let agent = Agent::start();
    let c = agent.client();
    let guest_dir = agent.dir.path().join("guest");
    std::fs::create_dir(&guest_dir).unwrap();
    let data: Vec<u8> = (0..2_500_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let target = guest_dir.join("file.bin");
    let n = c.copy_in(target.to_str().unwrap(), Some(0o600), CopyFormat::File, &data[..]).unwrap();
    assert_eq!(n, data.len() as u64);
    assert!(std::fs::read(&target).unwrap() == data, "copied-in content differs");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o600);
    let mut back = Vec::new();
    let n = c.copy_out(target.to_str().unwrap(), CopyFormat::File, &mut back).unwrap();
    assert_eq!(n, data.len() as u64);
    assert!(back == data, "copied-out content differs");

    // A tar stream of a host dir into the guest, and the guest dir back out as tar.
    let src = agent.dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("a.txt"), "alpha").unwrap();
    std::fs::write(src.join("sub/b.txt"), "beta").unwrap();
    let tar = Command::new("tar").arg("-C").arg(&src).args(["-cf", "-", "."]).output().unwrap();
    assert!(tar.status.success());
    let unpacked = guest_dir.join("unpacked");
    c.copy_in(unpacked.to_str().unwrap(), None, CopyFormat::Tar, &tar.stdout[..]).unwrap();
    assert_eq!(std::fs::read_to_string(unpacked.join("sub/b.txt")).unwrap(), "beta");
    let mut archive = Vec::new();
    c.copy_out(unpacked.to_str().unwrap(), CopyFormat::Tar, &mut archive).unwrap();
    let listing = tar_listing(&archive);
    for want in ["unpacked", "unpacked/a.txt", "unpacked/sub", "unpacked/sub/b.txt"] {
        assert!(listing.lines().any(|l| l.trim_end_matches('/') == want), "{want} missing from:\n{listing}");
    }

    // Errors: missing source, a directory as a file target, a relative path.
    let e = c.copy_out("/nonexistent-kiln/x", CopyFormat::File, Vec::new()).unwrap_err();
    assert!(e.to_string().contains("No such file"), "{e}");
    let e = c.copy_in(guest_dir.to_str().unwrap(), None, CopyFormat::File, &b"x"[..]).unwrap_err();
    assert!(e.to_string().contains("is a directory"), "{e}");
    let e = c.copy_in("relative/path", None, CopyFormat::File, &b"x"[..]).unwrap_err();
    assert!(e.to_string().contains("absolute"), "{e}");
    // No temporary file is left behind by the refused or completed copies.
    let leftovers: Vec<_> = std::fs::read_dir(&guest_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("kiln-copy"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn tar_listing(archive: &[u8]) -> String {
    let mut child =
        Command::new("tar").args(["-tf", "-"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(archive).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn huge_output_to_a_slow_reader_keeps_the_agent_bounded() {
    let agent = Agent::start();
    let c = agent.client();
    // Warm up (thread stacks, allocator arenas) before taking the baseline.
    c.exec(exec(&["sh", "-c", "head -c 1000000 /dev/zero"])).unwrap().output().unwrap();
    let baseline = status_kib(agent.pid(), "VmRSS:");
    const TOTAL: u64 = 256 << 20;
    let p = c.exec(exec(&["head", "-c", &TOTAL.to_string(), "/dev/zero"])).unwrap();
    // Slow for 2 s: the process can produce 256 MiB in far less, the agent must not hold it.
    let mut buf = vec![0u8; 4096];
    let mut got = 0u64;
    let slow_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < slow_until {
        got += p.stdout().read(&mut buf).unwrap() as u64;
        std::thread::sleep(Duration::from_millis(10));
    }
    let during = status_kib(agent.pid(), "VmRSS:");
    let mut big = vec![0u8; 1 << 20];
    loop {
        let n = p.stdout().read(&mut big).unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    assert_eq!(p.wait().unwrap(), ExitStatus::Code(0));
    assert_eq!(got, TOTAL);
    let peak = status_kib(agent.pid(), "VmHWM:");
    eprintln!("agent RSS: baseline {baseline} KiB, while slow {during} KiB, peak {peak} KiB");
    // The window (256 KiB) plus the write queue (16 frames of 64 KiB) bound the buffered output.
    assert!(
        during < baseline + 8 * 1024,
        "agent RSS grew from {baseline} to {during} KiB behind a slow reader"
    );
    assert!(peak < baseline + 16 * 1024, "agent peak RSS {peak} KiB (baseline {baseline} KiB)");
}

#[test]
fn a_dropped_connection_hangs_up_its_processes_and_the_agent_survives_garbage() {
    let agent = Agent::start();
    let pid = {
        let c = agent.client();
        let p = c.exec(exec(&["sleep", "100"])).unwrap();
        p.pid()
    };
    assert!(
        wait_until(Duration::from_secs(10), || !alive(pid) || is_zombie(pid)),
        "sleep {pid} survived its connection"
    );
    // Garbage and a truncated frame: the agent closes that connection and keeps serving.
    let mut s = UnixStream::connect(&agent.sock).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.read_to_end(&mut rest);
    let mut s = UnixStream::connect(&agent.sock).unwrap();
    s.write_all(&[0, 0, 0, 50, 1, 0]).unwrap();
    drop(s);
    let c = agent.client();
    assert_eq!(c.exec(exec(&["true"])).unwrap().output().unwrap().status, ExitStatus::Code(0));
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.contains(") Z ")).unwrap_or(true)
}

#[test]
fn the_main_process_attach_wait_and_power_off() {
    let config = r#"{"main": {"argv": ["sh", "-c", "echo main-out; echo main-err >&2; exit 4"],
                      "wait_for_attach": true}, "exit_linger_ms": 5000}"#;
    let agent = Agent::start_with_config(Some(config));
    let c = agent.client();
    assert!(c.welcome().has_main);
    let waiter = agent.client();
    let wait = std::thread::spawn(move || waiter.wait_main());
    let out = c.attach_main().unwrap().output().unwrap();
    assert_eq!(out.stdout, b"main-out\n");
    assert_eq!(out.stderr, b"main-err\n");
    assert_eq!(out.status, ExitStatus::Code(4));
    assert_eq!(wait.join().unwrap().unwrap(), ExitStatus::Code(4));
    // Only one attach, and WaitMain still answers after the exit.
    assert!(c.attach_main().unwrap_err().to_string().contains("already exited"));
    assert_eq!(c.wait_main().unwrap(), ExitStatus::Code(4));
    drop(c);
    // With no host connected any more the agent "powers off" (in test mode: exits 0) at once,
    // not after the 5 s linger; the exit code line is on its stderr.
    let start = Instant::now();
    let (code, err) = agent.wait_exit(Duration::from_secs(4));
    assert_eq!(code, Some(0), "{err}");
    assert!(start.elapsed() < Duration::from_secs(4));
    assert!(err.contains("KILN-MAIN-EXIT code=4"), "{err}");
}

#[test]
fn a_detached_main_process_runs_at_start_and_wait_main_gets_its_exit() {
    let config = r#"{"main": {"argv": ["sh", "-c", "sleep 1; exit 9"]}}"#;
    let agent = Agent::start_with_config(Some(config));
    let c = agent.client();
    assert_eq!(c.wait_main().unwrap(), ExitStatus::Code(9));
    assert!(c.attach_main().is_err());
    drop(c);
    let (code, err) = agent.wait_exit(Duration::from_secs(5));
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("KILN-MAIN-EXIT code=9"), "{err}");
}

#[test]
fn the_host_configures_an_unconfigured_agent_once() {
    use kiln_agent_proto::{GuestConfig, MainConfig};
    let agent = Agent::start();
    let c = agent.client();
    assert!(!c.welcome().configured && !c.welcome().has_main);
    let e = c.wait_main().unwrap_err().to_string();
    assert!(e.contains("not configured"), "{e}");
    let main = |argv: &[&str], wait_for_attach| {
        Some(MainConfig {
            exec: ExecRequest { argv: argv.iter().map(|s| s.to_string()).collect(), ..Default::default() },
            wait_for_attach,
        })
    };
    // A bad configuration is refused and leaves the agent unconfigured.
    let bad = GuestConfig { main: main(&[], false), ..Default::default() };
    assert!(c.configure(bad).unwrap_err().to_string().contains("argv is empty"));
    let config = GuestConfig {
        main: main(&["sh", "-c", "echo configured-main; exit 6"], true),
        exit_linger_ms: 5000,
        // Machine settings apply only as PID 1: in test mode they must leave this host alone.
        hostname: Some("must-not-change-the-host".into()),
        authorized_keys: Some("ssh-ed25519 AAAA test".into()),
        nameservers: vec!["192.0.2.1".into()],
        time: Some(kiln_agent_proto::Timestamp { secs: 0, nanos: 0 }),
        ..Default::default()
    };
    c.configure(config.clone()).unwrap();
    let e = c.configure(config).unwrap_err().to_string();
    assert!(e.contains("already configured"), "{e}");
    let other = agent.client();
    assert!(other.welcome().configured && other.welcome().has_main);
    let out = other.attach_main().unwrap().output().unwrap();
    assert_eq!((out.stdout, out.status), (b"configured-main\n".to_vec(), ExitStatus::Code(6)));
    assert_eq!(c.wait_main().unwrap(), ExitStatus::Code(6));
    assert_ne!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim(),
        "must-not-change-the-host"
    );
    assert!(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() > 1_000_000
    );
}

#[test]
fn a_configured_detached_main_starts_at_once() {
    let agent = Agent::start();
    let c = agent.client();
    let config = kiln_agent_proto::GuestConfig {
        main: Some(kiln_agent_proto::MainConfig {
            exec: exec(&["sh", "-c", "exit 5"]),
            wait_for_attach: false,
        }),
        ..Default::default()
    };
    c.configure(config).unwrap();
    assert_eq!(c.wait_main().unwrap(), ExitStatus::Code(5));
}

#[test]
fn shutdown_stops_processes_and_the_agent() {
    let agent = Agent::start();
    let c = agent.client();
    let p = c.exec(exec(&["sh", "-c", "trap '' TERM; sleep 100"])).unwrap();
    let pid = p.pid();
    let other = agent.client();
    other.shutdown(kiln_agent_proto::ShutdownAction::Poweroff, Some(Duration::from_millis(300))).unwrap();
    // The TERM-ignoring shell gets SIGKILL after the grace period.
    let (code, err) = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    assert!(!alive(pid) || is_zombie(pid), "{pid} survived the shutdown");
    assert!(p.wait().is_err() || !alive(pid));
    assert!(other.set_time(std::time::SystemTime::now()).is_err());
}

#[test]
fn set_time_is_refused_in_test_mode() {
    let agent = Agent::start();
    let e = agent.client().set_time(std::time::SystemTime::now()).unwrap_err();
    assert!(e.to_string().contains("test mode"), "{e}");
}
