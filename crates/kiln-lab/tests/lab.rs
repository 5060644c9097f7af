//! Lab tests. They need only QEMU (and the cached or downloadable Debian kernel package), so they
//! always run. Each lab boot costs ~8–15 s of TCG, so checks are grouped: one scenario boot, one
//! timeout boot.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use kiln_lab::cpio::CpioWriter;
use kiln_lab::{Lab, LabError, LabEvent, LabHang};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A tiny initramfs for a guest booted by QEMU inside the lab: busybox and an init that prints a
/// marker and reboots.
fn nested_guest_initramfs(path: &Path) -> TestResult {
    let mut w = CpioWriter::new(std::io::BufWriter::new(std::fs::File::create(path)?));
    w.chardev("dev/console", 0o600, 5, 1)?;
    w.dir("proc", 0o755)?;
    w.file("bin/busybox", 0o755, &std::fs::read("/bin/busybox")?)?;
    w.symlink("bin/sh", "busybox")?;
    w.file(
        "init",
        0o755,
        b"#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n\
          echo \"NESTED-GUEST-UP uptime=$(/bin/busybox cut -d' ' -f1 /proc/uptime)\"\n\
          /bin/busybox reboot -f\n",
    )?;
    w.finish()?.flush()?;
    Ok(())
}

#[test]
fn lab_scenario() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("rw.img");
    std::fs::write(&disk, vec![0u8; 1 << 20])?;
    let ro_disk = tmp.path().join("ro.img");
    let mut ro = b"read-only-disk-content".to_vec();
    ro.resize(1 << 16, 0);
    std::fs::write(&ro_disk, &ro)?;
    let guest_initrd = tmp.path().join("guest.cpio");
    nested_guest_initramfs(&guest_initrd)?;

    let lab = Lab::new()?;
    // The PVH vmlinux boots faster than the bzImage (no decompression); QEMU microvm takes both.
    let kernel = lab.vmlinux_path().unwrap_or(lab.kernel_path()).to_path_buf();
    let report = lab
        .binary("/usr/bin/qemu-img", "/usr/bin/qemu-img")
        .binary("/usr/bin/qemu-system-x86_64", "/usr/bin/qemu-system-x86_64")
        .dir("/usr/share/qemu", "/usr/share/qemu")
        .file(&kernel, "/lab/guest/vmlinuz")
        .file(&guest_initrd, "/lab/guest/initrd.cpio")
        .file_bytes("carried content\n", "/lab/data/note.txt", 0o644)
        .disk(&disk)
        .disk_read_only(&ro_disk)
        .env("LAB_TEST_VAR", "value with spaces")
        .timeout(Duration::from_secs(600))
        .step(
            "kvm",
            "/lab/runner kvm-check && ls -l /dev/kvm && dmesg | grep -E 'Nested (Paging|Virtualization) enabled'",
        )
        .step("io", "echo \"out $LAB_TEST_VAR\"; cat /lab/data/note.txt; echo err >&2; sleep 0.3")
        .step("fail", "echo failing >&2; exit 7")
        // A step shell can `wait` for a running background child (it must not inherit the
        // runner's blocked SIGCHLD, or busybox ash waits forever).
        .step("wait", "grep SigBlk /proc/self/status; sleep 0.5 & wait $!; echo waited-$?")
        .step("signal", "kill -9 $$")
        .step("rss", "dd if=/dev/zero of=/dev/null bs=48M count=1 2>/dev/null")
        .step("big", "head -c 1500000 /dev/zero | tr '\\0' x")
        .step_background("server", "sleep 0.5; echo server-done")
        .step_background("forever", "echo started; exec sleep 1000")
        .step("ldd", "qemu-img --version && qemu-img create -f qcow2 /tmp/t.qcow2 16M && qemu-img info /tmp/t.qcow2")
        .wait_for("server")
        .step("disk", "printf kiln-lab-disk-ok | dd of=/dev/vda conv=notrunc 2>/dev/null && head -c 22 /dev/vdb")
        .step(
            "microvm",
            // A nested guest the lab's emulation freezes (docs/testing.md) is booted once more,
            // loudly: its output goes to stderr as `lab-retry:` lines.
            "for try in 1 2; do \
               timeout 120 qemu-system-x86_64 -M microvm -accel kvm -cpu host -m 256 -smp 1 -nodefaults \
                 -no-user-config -nographic -no-reboot -serial stdio -kernel /lab/guest/vmlinuz \
                 -initrd /lab/guest/initrd.cpio -append 'console=ttyS0 reboot=t panic=-1 quiet' > /tmp/mv.out 2>&1; \
               rc=$?; \
               if [ $rc = 0 ] && grep -q NESTED-GUEST-UP /tmp/mv.out; then cat /tmp/mv.out; exit 0; fi; \
               echo \"lab-retry: nested guest attempt $try ended with $rc\" >&2; tail -n 20 /tmp/mv.out | sed 's/^/lab-retry: /' >&2; \
             done; cat /tmp/mv.out; exit 1",
        )
        .run()?;

    eprintln!(
        "lab boot {:?} (guest uptime {:?}), total {:?}",
        report.lab_boot_time, report.guest_boot_time, report.total_time
    );
    for s in &report.steps {
        eprintln!("step {:8} exit {:3} wall {:?} rss {} KiB", s.name, s.exit_code, s.wall, s.max_rss_kib);
    }

    // /dev/kvm inside the lab is real: KVM_GET_API_VERSION works, a VM can be created, nested paging.
    let kvm = report.step("kvm")?.ensure_success()?;
    assert!(kvm.stdout_str().contains("KVM_GET_API_VERSION=12"), "{}", kvm.stdout_str());
    assert!(kvm.stdout_str().contains("KVM_CREATE_VM=ok"));
    assert!(kvm.stdout_str().contains("Nested Paging enabled"));

    // stdout, stderr, env, carried files, timing.
    let io = report.step("io")?.ensure_success()?;
    assert_eq!(io.stdout_str(), "out value with spaces\ncarried content\n");
    assert_eq!(io.stderr_str(), "err\n");
    assert!(io.wall >= Duration::from_millis(300) && io.wall < Duration::from_secs(30), "{:?}", io.wall);
    assert!(!io.background && !io.killed);

    // Failures come back with their code; signals as 128 + signal.
    let fail = report.step("fail")?;
    assert_eq!(fail.exit_code, 7);
    assert_eq!(fail.stderr_str(), "failing\n");
    match fail.ensure_success() {
        Err(LabError::StepFailed { exit_code: 7, stderr_tail, .. }) => assert_eq!(stderr_tail, "failing\n"),
        other => panic!("expected StepFailed, got {other:?}"),
    }
    let signal = report.step("signal")?;
    assert_eq!((signal.exit_code, signal.signal), (137, Some(9)));

    // Peak RSS of the largest process: dd's 48 MiB buffer.
    let rss = report.step("rss")?.ensure_success()?;
    assert!(rss.max_rss_kib >= 48 * 1024, "max_rss_kib {}", rss.max_rss_kib);
    assert!(rss.max_rss_kib < 200 * 1024, "max_rss_kib {}", rss.max_rss_kib);

    // Output is bounded to the last 1 MiB, with the dropped count reported.
    let big = report.step("big")?.ensure_success()?;
    assert_eq!(big.stdout.len(), 1 << 20);
    assert!(big.stdout.iter().all(|&b| b == b'x'));
    assert_eq!(big.stdout_dropped, 1_500_000 - (1 << 20));

    let wait = report.step("wait")?.ensure_success()?;
    assert_eq!(wait.stdout_str(), "SigBlk:\t0000000000000000\nwaited-0\n");

    // Background steps: one waited for, one stopped at the end of the scenario.
    let server = report.step("server")?.ensure_success()?;
    assert!(server.background && !server.killed);
    assert_eq!(server.stdout_str(), "server-done\n");
    assert!(server.wall >= Duration::from_millis(500));
    let forever = report.step("forever")?;
    assert!(forever.background && forever.killed);
    assert_eq!(forever.signal, Some(15));
    assert_eq!(forever.stdout_str(), "started\n");

    // A dynamically linked binary carried with its ldd closure runs.
    let ldd = report.step("ldd")?.ensure_success()?;
    assert!(ldd.stdout_str().contains("qemu-img version"), "{}", ldd.stdout_str());
    assert!(ldd.stdout_str().contains("file format: qcow2"), "{}", ldd.stdout_str());

    // Disks: the write inside the lab is in the host file now; the read-only disk was readable.
    let d = report.step("disk")?.ensure_success()?;
    assert_eq!(d.stdout_str(), "read-only-disk-content");
    let written = std::fs::read(&disk)?;
    assert_eq!(&written[..16], b"kiln-lab-disk-ok");

    // QEMU -M microvm -accel kvm inside the lab boots a Linux guest.
    let microvm = report.step("microvm")?.ensure_success()?;
    let marker = microvm.stdout_str().lines().find(|l| l.contains("NESTED-GUEST-UP")).map(str::to_string);
    assert!(marker.is_some(), "{}", microvm.stdout_str());
    eprintln!("nested QEMU microvm guest: {marker:?} in {:?}", microvm.wall);
    for line in microvm.stderr_str().lines().filter(|l| l.starts_with("lab-retry:")) {
        eprintln!("{line}");
    }

    // The console came back too, separately from the results.
    assert!(report.console.contains("lab: runner"), "{}", report.console);
    assert!(!report.console.contains("\"t\":\"step\""));
    assert!(report.lab_boot_time > Duration::ZERO && report.lab_boot_time < report.total_time);
    Ok(())
}

#[test]
fn lab_timeout_is_an_error_with_the_console_tail() -> TestResult {
    // Also exercises live events: the output of the hanging step arrives before the timeout.
    let mut events = Vec::new();
    let err = Lab::new()?
        .timeout(Duration::from_secs(40))
        .step("quick", "true")
        .step("hang", "echo hanging; echo to-stderr >&2; sleep 1000")
        .run_with(|ev| {
            events.push(match ev {
                LabEvent::Ready { .. } => "ready".to_string(),
                LabEvent::StepStarted { name } => format!("start {name}"),
                LabEvent::Output { step, stream, data } => {
                    format!("{step} {stream:?} {}", String::from_utf8_lossy(data))
                }
                LabEvent::StepFinished(r) => format!("end {} {}", r.name, r.exit_code),
            })
        })
        .err()
        .ok_or("the lab should have timed out")?;
    match &err {
        LabError::Timeout(hang) => {
            let LabHang { timeout, running_step, completed, unfinished_output, lab_cpus, console_tail } =
                &**hang;
            assert_eq!(*timeout, Duration::from_secs(40));
            assert!(console_tail.contains("lab: "), "console tail: {console_tail}");
            // Where the lab's own CPUs were, from QEMU's monitor: registers and local APICs.
            assert!(lab_cpus.contains("--- (qemu) info lapic"), "{lab_cpus}");
            assert!(lab_cpus.contains("RIP="), "{lab_cpus}");
            assert!(lab_cpus.contains("LVTT"), "{lab_cpus}");
            // Under heavy load the runner may not even have started; when it has, it was in `hang`.
            if let Some(step) = running_step {
                assert_eq!(step, "hang");
                assert_eq!(completed.len(), 1);
                assert_eq!(completed[0].name, "quick");
                assert_eq!(events[..4], ["ready", "start quick", "end quick 0", "start hang"], "{events:?}");
                assert!(events.contains(&"hang Stdout hanging\n".to_string()), "{events:?}");
                assert!(events.contains(&"hang Stderr to-stderr\n".to_string()), "{events:?}");
                // The error itself carries what the hanging step printed.
                assert!(unfinished_output.contains("--- stdout of `hang`"), "{unfinished_output}");
                assert!(unfinished_output.contains("hanging\n"), "{unfinished_output}");
                assert!(unfinished_output.contains("to-stderr\n"), "{unfinished_output}");
                assert!(!unfinished_output.contains("`quick`"), "{unfinished_output}");
            }
        }
        other => panic!("expected a timeout, got {other}"),
    }
    assert!(err.to_string().contains("console tail"));
    Ok(())
}

#[test]
fn scenario_errors_are_reported_before_booting() -> TestResult {
    let lab = Lab::new()?;
    let dup = lab.clone().step("a", "true").step("a", "true").run();
    assert!(matches!(dup, Err(LabError::Scenario(_))), "{dup:?}");
    let wait = lab.clone().wait_for("nope").run();
    assert!(matches!(wait, Err(LabError::Scenario(_))), "{wait:?}");
    let reserved = lab.clone().file_bytes("x", "/lab/runner", 0o755).run();
    assert!(matches!(reserved, Err(LabError::Scenario(_))), "{reserved:?}");
    let missing = lab.file("/nonexistent/file", "/x").run();
    assert!(matches!(missing, Err(LabError::Io { .. })), "{missing:?}");
    Ok(())
}

#[test]
fn lab_crash_is_reported_with_the_console_tail() -> TestResult {
    let err = Lab::new()?
        .timeout(Duration::from_secs(300))
        .step("before", "echo fine")
        .step("crash", "echo c > /proc/sysrq-trigger; sleep 100")
        .step("never", "true")
        .run()
        .err()
        .ok_or("the lab should have died")?;
    match &err {
        LabError::LabDied { completed, console_tail, .. } => {
            assert_eq!(completed.len(), 1, "{completed:?}");
            assert_eq!(completed[0].stdout_str(), "fine\n");
            assert!(
                console_tail.contains("sysrq") || console_tail.contains("Kernel panic"),
                "{console_tail}"
            );
        }
        other => panic!("expected LabDied, got {other}"),
    }
    Ok(())
}
