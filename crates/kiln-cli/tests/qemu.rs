//! `kiln` end to end on this host with the QEMU backend (TCG where /dev/kvm is missing or PVM): a real
//! registry (Debian's `docker-registry` on 127.0.0.1) with a busybox image pushed by skopeo, the
//! repository's guest kernel, the static agent. One VM is reused across the lifecycle assertions
//! (a TCG boot takes seconds).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kiln_test_utils::oci::{busybox_layers, OciLayout, RawEntry, TarBuilder, REGULAR};
use kiln_test_utils::registry::{free_port, LocalRegistry};
use kiln_test_utils::{guest_assets, static_agent};
use serde_json::json;

/// A state root and the `kiln` binary run against it.
struct Kiln {
    root: tempfile::TempDir,
}

impl Kiln {
    fn new() -> Self {
        let k = Kiln { root: tempfile::tempdir().unwrap() };
        let out = k.run(&["kernel", "import", guest_assets().vmlinux.to_str().unwrap(), "--name", "guest"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        k
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.args(args)
            .env("KILN_ROOT", self.root.path())
            .env("KILN_AGENT_BIN", static_agent())
            // These tests run in the host's own network namespace: no bridges or rules there
            // (networking is tested in namespaces of its own, tests/qemu_network.rs).
            .env("KILN_NETWORK", "none")
            .env_remove("KILN_LOG")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().unwrap();
        kiln_test_utils::eprint_command(&format!("kiln {}", args.join(" ")), &out);
        out
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "kiln {args:?} failed: {}", text(&out.stderr));
        text(&out.stdout)
    }

    /// Runs and expects kiln's own error (125); returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(out.status.code(), Some(125), "kiln {args:?} should fail: {}", text(&out.stdout));
        let err = text(&out.stderr);
        assert!(err.lines().any(|l| l.starts_with("kiln: ")), "{err}");
        err
    }

    fn vm_dirs(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.root.path().join("vms")) {
            Ok(d) => d.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn ps(&self, all: bool) -> Vec<serde_json::Value> {
        let args: &[&str] = if all { &["ps", "-a", "--format", "json"] } else { &["ps", "--format", "json"] };
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    /// The VMM pid of a running VM (its hypervisor record).
    fn vmm_pid(&self, vm: &str) -> i32 {
        let inspect: serde_json::Value = serde_json::from_str(&self.ok(&["inspect", vm])).unwrap();
        let dir = PathBuf::from(inspect["dir"].as_str().unwrap());
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("run/vm.json")).unwrap()).unwrap();
        record["process"]["vmm"]["pid"].as_i64().unwrap() as i32
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

/// Pushes an image made of `layers` to the registry as `repo_tag`; returns the layout's image.
fn push(registry: &LocalRegistry, dir: &Path, layers: &[Vec<u8>], run: serde_json::Value, repo_tag: &str) {
    let mut layout = OciLayout::create(&dir.join(repo_tag.replace([':', '/'], "-")));
    layout.add_image(layers, true, run, "v1");
    registry.push_oci(&layout.dir, "v1", repo_tag);
}

/// A guest shell that says "ready", then waits; SIGINT ends it with 42, SIGTERM with 43.
const TRAP_INT_AND_TERM: &str =
    "trap 'echo got-int; exit 42' INT; trap 'echo got-term; exit 43' TERM; echo ready; while :; do sleep 1; done";

/// Starts `kiln ARGS`, waits for the guest's "ready" line, sends SIGNAL to the kiln process and
/// returns kiln's exit code and the rest of its stdout. Gives up (killing kiln) after 120 s.
fn signal_while_running(kiln: &Kiln, args: &[&str], signal: &str) -> (Option<i32>, String) {
    use std::io::{BufRead, Read};
    let mut child = kiln.cmd(args).stdout(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(120));
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n", "kiln {args:?}");
    assert!(Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().unwrap().success());
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let code = child.wait().unwrap().code();
    drop(watchdog);
    (code, rest)
}

#[test]
fn pull_run_exec_stop_start_rm_and_bad_input() {
    let registry = LocalRegistry::start();
    let work = tempfile::tempdir().unwrap();
    push(
        &registry,
        work.path(),
        &busybox_layers(),
        json!({"Cmd": ["sh"], "Env": ["PATH=/bin", "GREETING=image"]}),
        "kiln/busybox:1",
    );
    let image = format!("{}/kiln/busybox:1", registry.host());
    let kiln = Kiln::new();

    kiln.ok(&["image", "pull", &image]);
    assert!(kiln.ok(&["image", "ls"]).contains("kiln/busybox:1"));

    // Foreground: stdout streams, the exit code is the command's, --rm leaves nothing.
    let out = kiln.run(&["run", "--rm", "--hypervisor", "qemu", &image, "echo", "hi"]);
    assert_eq!(text(&out.stdout), "hi\n");
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("TCG") || guest_kvm_is_hardware(), "{}", text(&out.stderr));
    let out = kiln.run(&[
        "run",
        "--rm",
        "--hypervisor",
        "qemu",
        "-e",
        "GREETING=cli",
        &image,
        "sh",
        "-c",
        "echo $GREETING; echo oops >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(text(&out.stdout), "cli\n");
    assert!(text(&out.stderr).contains("oops"));
    assert!(kiln.vm_dirs().is_empty(), "--rm left {:?}", kiln.vm_dirs());
    assert!(kiln.ps(true).is_empty());
    // Ctrl-C (SIGINT) to a foreground `kiln run` interrupts the guest's main process; --rm still
    // cleans up.
    let run = ["run", "--rm", "--hypervisor", "qemu", &image, "sh", "-c", TRAP_INT_AND_TERM];
    let (code, out) = signal_while_running(&kiln, &run, "INT");
    assert_eq!((code, out.as_str()), (Some(42), "got-int\n"));
    assert!(kiln.vm_dirs().is_empty(), "--rm left {:?}", kiln.vm_dirs());

    // Detached: exec, stop, start (the disk keeps what was written), rm.
    assert_eq!(
        kiln.ok(&["run", "-d", "--name", "keep", "--hypervisor", "qemu", &image, "sleep", "3600"]).trim(),
        "keep"
    );
    let ps = kiln.ps(false);
    assert_eq!(ps.len(), 1);
    assert_eq!(ps[0]["name"], "keep");
    assert_eq!(ps[0]["status"], "running");
    assert_eq!(kiln.ok(&["exec", "keep", "sh", "-c", "echo kept > /root/file; hostname"]), "keep\n");
    let out = kiln.run(&["exec", "keep", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    // Several kiln commands reach one VM's agent at once (QEMU: one virtio-serial port each): an
    // interactive exec holds one while others run.
    let mut holder = kiln
        .cmd(&["exec", "-i", "keep", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut holder_in = holder.stdin.take().unwrap();
    {
        use std::io::{BufRead, Write};
        holder_in.write_all(b"held\n").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(holder.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line, "held\n");
    }
    let started = std::time::Instant::now();
    assert_eq!(kiln.ok(&["exec", "keep", "echo", "alongside"]), "alongside\n");
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "took {:?}", started.elapsed());
    drop(holder_in);
    assert!(holder.wait().unwrap().success());

    // Signals kiln gets reach the guest process, as with `docker run`'s sig-proxy.
    let exec = ["exec", "keep", "sh", "-c", TRAP_INT_AND_TERM];
    let (code, out) = signal_while_running(&kiln, &exec, "TERM");
    assert_eq!((code, out.as_str()), (Some(43), "got-term\n"));
    let copied = work.path().join("copied");
    kiln.ok(&["cp", "keep:/root/file", copied.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&copied).unwrap(), "kept\n");
    copies_directories_both_ways(&kiln, "keep", work.path());

    // A name clash: a clear error, the first VM untouched.
    let err = kiln.fails(&["create", "--name", "keep", "--hypervisor", "qemu", &image]);
    assert!(err.contains("already exists"), "{err}");
    // Two kiln processes creating the same name at once: the store lock lets exactly one win.
    let racers: Vec<_> = (0..2)
        .map(|_| {
            kiln.cmd(&["create", "--name", "dup", "--hypervisor", "qemu", &image])
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let results: Vec<Output> = racers.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    assert_eq!(results.iter().filter(|o| o.status.success()).count(), 1, "exactly one create wins");
    assert!(results.iter().any(|o| text(&o.stderr).contains("already exists")));
    assert_eq!(kiln.ps(true).iter().filter(|v| v["name"] == "dup").count(), 1);
    kiln.ok(&["rm", "dup"]);
    // rm of a running VM without -f.
    let err = kiln.fails(&["rm", "keep"]);
    assert!(err.contains("running") && err.contains("rm -f"), "{err}");
    assert_eq!(kiln.ps(false).len(), 1);

    kiln.ok(&["pause", "keep"]);
    assert_eq!(kiln.ps(false)[0]["status"], "paused");
    kiln.ok(&["resume", "keep"]);

    kiln.ok(&["stop", "-t", "5", "keep"]);
    let all = kiln.ps(true);
    assert_eq!(all[0]["status"], "exited");
    assert!(kiln.ps(false).is_empty());
    kiln.ok(&["start", "keep"]);
    assert_eq!(kiln.ok(&["exec", "keep", "cat", "/root/file"]), "kept\n");
    let logs = kiln.ok(&["logs", "keep"]);
    assert!(logs.contains("Linux version"), "console log: {logs}");
    // An agent port without a host polls as readable and hung up at once: the agent must wait for
    // a host there, not spin on it (it once did, filling the console with failed handshakes).
    let failed_handshakes = logs.matches("handshake failed").count();
    assert!(failed_handshakes <= 2, "{failed_handshakes} failed handshakes on the console");

    // kill -9 of the VMM: ps shows it exited (with the signal), start works again.
    let pid = kiln.vmm_pid("keep");
    assert!(Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
    assert!(kiln_test_utils::wait_until(std::time::Duration::from_secs(10), || !pid_alive(pid)));
    let all = kiln.ps(true);
    assert_eq!(all[0]["status"], "exited", "{all:?}");
    assert_eq!(all[0]["exit"]["vmm"], json!({"signal": 9}), "{all:?}");
    assert!(kiln.ok(&["ps", "-a"]).contains("exited (137)"));
    kiln.ok(&["start", "keep"]);
    assert_eq!(kiln.ok(&["exec", "keep", "cat", "/root/file"]), "kept\n");

    let pid = kiln.vmm_pid("keep");
    kiln.ok(&["rm", "-f", "keep"]);
    assert!(kiln_test_utils::wait_until(std::time::Duration::from_secs(10), || !pid_alive(pid)));
    assert!(kiln.vm_dirs().is_empty(), "rm left {:?}", kiln.vm_dirs());
    let err = kiln.fails(&["exec", "keep", "true"]);
    assert!(err.contains("no VM named"), "{err}");

    // A guest that cannot boot (its disk wiped after create): `start` says so as soon as the VMM
    // ends, not after the agent's 120 s boot timeout, and the VM reads as exited.
    kiln.ok(&["create", "--name", "broken", "--hypervisor", "qemu", &image, "true"]);
    let disk = kiln.vm_dirs()[0].join("disk.ext4");
    let f = std::fs::OpenOptions::new().write(true).truncate(true).open(&disk).unwrap();
    f.set_len(1 << 20).unwrap();
    let started = std::time::Instant::now();
    let err = kiln.fails(&["start", "broken"]);
    assert!(err.contains("ended while booting") && err.contains("kiln logs broken"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "took {:?}", started.elapsed());
    assert_eq!(kiln.ps(true)[0]["status"], "exited");
    assert!(kiln.ok(&["logs", "broken"]).contains("Kernel panic"));
    kiln.ok(&["rm", "broken"]);

    // Unknown image, registry down: clear errors, nothing made.
    let err = kiln.fails(&["run", "--rm", "--hypervisor", "qemu", "no/such:image", "true"]);
    assert!(err.contains("no image named"), "{err}");
    let err = kiln.fails(&["image", "pull", &format!("{}/kiln/nothere:1", registry.host())]);
    assert!(err.contains("not found"), "{err}");
    let err = kiln.fails(&["image", "pull", &format!("127.0.0.1:{}/kiln/busybox:1", free_port())]);
    assert!(err.contains("cannot reach registry"), "{err}");
    let err = kiln.fails(&["run", "--hypervisor", "qemu", "--cpus", "0", &image]);
    assert!(err.contains("--cpus"), "{err}");
    assert!(kiln.vm_dirs().is_empty(), "{:?}", kiln.vm_dirs());
}

/// `kiln cp` of directories: a host tree into the guest (contents into the named directory), back out
/// to a new host path and into an existing host directory; modes and symlinks survive, nothing
/// temporary is left next to the destinations.
fn copies_directories_both_ways(kiln: &Kiln, vm: &str, work: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let tree = work.join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    std::fs::write(tree.join("a"), "A").unwrap();
    std::fs::write(tree.join("sub/deeper/b"), "B").unwrap();
    std::fs::set_permissions(tree.join("sub/deeper/b"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("a", tree.join("link")).unwrap();
    kiln.ok(&["cp", tree.to_str().unwrap(), &format!("{vm}:/root/tree")]);
    assert_eq!(
        kiln.ok(&["exec", vm, "cat", "/root/tree/a", "/root/tree/sub/deeper/b", "/root/tree/link"]),
        "ABA"
    );
    let listing = kiln.ok(&["exec", vm, "ls", "-l", "/root/tree/sub/deeper/b", "/root/tree/link"]);
    assert!(listing.contains("-rwxr-x---") && listing.contains("link -> a"), "{listing}");

    kiln.ok(&["exec", vm, "sh", "-c", "mkdir -p /root/made/d && echo made > /root/made/d/f"]);
    let back = work.join("back");
    kiln.ok(&["cp", &format!("{vm}:/root/tree"), back.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(back.join("a")).unwrap(), "A");
    assert_eq!(std::fs::read_to_string(back.join("sub/deeper/b")).unwrap(), "B");
    let mode = std::fs::metadata(back.join("sub/deeper/b")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o750);
    assert_eq!(std::fs::read_link(back.join("link")).unwrap(), Path::new("a"));
    let into = work.join("into");
    std::fs::create_dir(&into).unwrap();
    kiln.ok(&["cp", &format!("{vm}:/root/made"), into.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(into.join("made/d/f")).unwrap(), "made\n");
    // A file into an existing directory lands inside it.
    kiln.ok(&["cp", &format!("{vm}:/root/made/d/f"), into.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(into.join("f")).unwrap(), "made\n");

    let err = kiln.fails(&["cp", &format!("{vm}:/root/no-such-dir"), work.join("nothing").to_str().unwrap()]);
    assert!(err.contains("/root/no-such-dir"), "{err}");
    assert!(!work.join("nothing").exists());
    let leftovers: Vec<_> = std::fs::read_dir(work)
        .unwrap()
        .chain(std::fs::read_dir(&into).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("kiln-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// `kernel import IMAGE`: a kernel shipped as an OCI image carrying `/boot/vmlinux` (no boot needed).
#[test]
fn kernel_import_from_an_image_carrying_boot_vmlinux() {
    let kiln = Kiln::new();
    let work = tempfile::tempdir().unwrap();
    let vmlinux = std::fs::read(&guest_assets().vmlinux).unwrap();
    let mut layer = TarBuilder::new();
    layer.dir("boot", 0o755).file("boot/vmlinux", 0o644, &vmlinux);
    let mut layout = OciLayout::create(&work.path().join("kernel-image"));
    layout.add_image(&[layer.finish()], true, json!({}), "guest-kernel:6.1");
    kiln.ok(&["image", "import", layout.dir.to_str().unwrap(), "--name", "guest-kernel:6.1"]);

    let out = kiln.ok(&["kernel", "import", "guest-kernel:6.1", "--name", "from-image"]);
    assert!(out.contains("from-image"), "{out}");
    let ls = kiln.ok(&["kernel", "ls"]);
    assert!(ls.contains("from-image") && ls.contains("guest-kernel:6.1"), "{ls}");
    let stored = std::fs::read(kiln.root.path().join("kernels/from-image/vmlinux")).unwrap();
    assert!(stored == vmlinux, "the stored kernel is not the image's /boot/vmlinux");
    // Kiln::new imported the first kernel, so this one is not the default unless asked.
    assert!(!std::fs::read_to_string(kiln.root.path().join("kernels/DEFAULT"))
        .unwrap()
        .contains("from-image"));

    // An image without /boot/vmlinux: a clear error, no kernel stored.
    let mut layer = TarBuilder::new();
    layer.dir("boot", 0o755).file("boot/readme", 0o644, b"no kernel here\n");
    let mut layout = OciLayout::create(&work.path().join("no-kernel"));
    layout.add_image(&[layer.finish()], true, json!({}), "no-kernel:1");
    kiln.ok(&["image", "import", layout.dir.to_str().unwrap(), "--name", "no-kernel:1"]);
    let err = kiln.fails(&["kernel", "import", "no-kernel:1", "--name", "none"]);
    assert!(err.contains("/boot/vmlinux"), "{err}");
    assert!(!kiln.ok(&["kernel", "ls"]).contains("none"));
    assert!(!kiln.root.path().join("kernels/none").exists());
}

fn guest_kvm_is_hardware() -> bool {
    kiln_test_utils::host_has_kvm() && !kiln_test_utils::host_is_pvm()
}

#[test]
fn tampered_and_escaping_images_are_refused_and_nothing_is_written_outside() {
    let registry = LocalRegistry::start();
    let work = tempfile::tempdir().unwrap();
    let kiln = Kiln::new();
    let outside = work.path().join("outside");
    std::fs::create_dir(&outside).unwrap();

    // Digest mismatch: one byte of the stored layer flipped.
    let mut layout = OciLayout::create(&work.path().join("tampered"));
    let mut layer = TarBuilder::new();
    layer.file("payload", 0o644, &[7u8; 32 << 10]);
    let built = layout.add_image(&[layer.finish()], true, json!({"Cmd": ["true"]}), "v1");
    registry.push_oci(&layout.dir, "v1", "kiln/tampered:v1");
    let data_path = registry.blob_data_path(&built.layer_digests[0]);
    let mut data = std::fs::read(&data_path).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0xff;
    std::fs::write(&data_path, &data).unwrap();
    let err = kiln.fails(&["image", "pull", &format!("{}/kiln/tampered:v1", registry.host())]);
    assert!(err.contains("digest mismatch"), "{err}");
    assert!(!kiln.ok(&["image", "ls"]).contains("tampered"));

    // Crafted layers: `..`, an absolute path, a symlink escape. The pull stores the blobs (they
    // are verified); building the VM's root filesystem refuses them.
    let dotdot = format!("../../../../../../..{}/planted-dotdot", outside.display());
    let absolute = format!("{}/planted-absolute", outside.display());
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut t = TarBuilder::new();
    t.file(&dotdot, 0o644, b"x");
    cases.push(("dotdot", t.finish()));
    let mut t = TarBuilder::new();
    t.raw(&RawEntry { data: b"x", ..RawEntry::new(absolute.as_bytes(), REGULAR) });
    cases.push(("absolute", t.finish()));
    let mut t = TarBuilder::new();
    let up = format!("../../../../../../..{}", outside.display());
    t.symlink("evil", &up).file("evil/planted-symlink", 0o644, b"x");
    cases.push(("symlink", t.finish()));
    for (what, layer) in cases {
        let mut base = busybox_layers();
        base.truncate(1);
        base.push(layer);
        let repo_tag = format!("kiln/escape-{what}:v1");
        push(&registry, work.path(), &base, json!({"Cmd": ["true"]}), &repo_tag);
        let image = format!("{}/{repo_tag}", registry.host());
        kiln.ok(&["image", "pull", &image]);
        let err = kiln.fails(&["run", "--rm", "--hypervisor", "qemu", &image]);
        assert!(err.contains("refused"), "{what}: {err}");
        assert!(kiln.vm_dirs().is_empty(), "{what}: {:?}", kiln.vm_dirs());
    }
    let planted: Vec<_> = std::fs::read_dir(&outside).unwrap().collect();
    assert!(planted.is_empty(), "written outside: {planted:?}");
}
