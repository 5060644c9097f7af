//! Against a real registry: Debian's `docker-registry` on 127.0.0.1, images pushed with `skopeo`.
//! Pull (digests checked), list/inspect, rootfs ext4 (checked with debugfs), per-VM disks, kernels
//! as images, removal; and the failures a user meets: unknown image, registry down, tampered blob.
#![allow(clippy::unwrap_used)] // Test helpers: a failed setup step should panic.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use kiln_image::kernel::KernelSource;
use kiln_image::{
    BlobKind, CopyMethod, ImageError, ImageStore, NoProgress, ProgressEvent, Reference, RegistryOptions,
    RootfsOptions,
};
use kiln_test_utils::oci::{busybox_layers, OciLayout, TarBuilder, BUSYBOX_APPLETS};
use kiln_test_utils::registry::{free_port, LocalRegistry};
use serde_json::json;

fn debugfs(image: &Path, request: &str) -> (bool, String) {
    let out = Command::new("debugfs").arg("-R").arg(request).arg(image).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // debugfs reports a missing file on stderr with status 0.
    let failed = stderr.lines().any(|l| l.contains("not found") || l.contains("File not found"));
    (out.status.success() && !failed, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn reference(registry: &LocalRegistry, repo_tag: &str) -> Reference {
    Reference::parse(&format!("{}/{repo_tag}", registry.host())).unwrap()
}

#[derive(Default)]
struct Recorder(Mutex<Vec<ProgressEvent>>);

impl kiln_image::Progress for Recorder {
    fn event(&self, event: ProgressEvent) {
        self.0.lock().unwrap().push(event);
    }
}

#[test]
fn pull_busybox_build_rootfs_and_vm_disks() {
    let registry = LocalRegistry::start();
    let work = tempfile::tempdir().unwrap();
    let mut layout = OciLayout::create(&work.path().join("layout"));
    let run = json!({"Entrypoint": ["/bin/sh"], "Cmd": ["-c", "echo hi"], "Env": ["PATH=/bin"], "WorkingDir": "/root"});
    let built = layout.add_image(&busybox_layers(), true, run, "latest");
    registry.push_oci(&layout.dir, "latest", "kiln/busybox:latest");

    let images = ImageStore::open(&work.path().join("state")).unwrap();
    let name = reference(&registry, "kiln/busybox:latest");
    let recorder = Recorder::default();
    let summary = images.pull(&name, &RegistryOptions::default(), &recorder).unwrap();
    assert_eq!(summary.id.as_str(), built.config_digest);
    assert_eq!(summary.names, vec![name.to_string()]);
    let record = images.resolve(&name.to_string()).unwrap();
    let layer_digests: Vec<&str> = record.layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(layer_digests, built.layer_digests);
    for digest in record.blobs() {
        let stored = fs::read(images.store().blob_path(digest)).unwrap();
        assert_eq!(kiln_image::Digest::of(&stored), *digest, "stored blob does not match its digest");
    }
    let events = recorder.0.into_inner().unwrap();
    for (i, digest) in built.layer_digests.iter().enumerate() {
        assert!(
            events.iter().any(|e| matches!(e, ProgressEvent::BlobStarted { digest: d, kind: BlobKind::Layer { index, count: 2 }, .. } if d.as_str() == digest && *index == i)),
            "no start event for layer {i}: {events:?}"
        );
        assert!(events.iter().any(
            |e| matches!(e, ProgressEvent::BlobDone { digest: d, reused: false } if d.as_str() == digest)
        ));
    }

    // ls / inspect by short name, ID prefix and pinned digest.
    assert_eq!(images.list().unwrap().len(), 1);
    let details = images.inspect(&summary.id.as_str()[7..19]).unwrap();
    assert_eq!(details.config.entrypoint, Some(vec!["/bin/sh".to_string()]));
    assert_eq!(details.config.cmd, Some(vec!["-c".to_string(), "echo hi".to_string()]));
    assert_eq!(details.config.working_dir.as_deref(), Some("/root"));
    assert_eq!(details.layers.len(), 2);
    let pinned = format!("{}/kiln/busybox@{}", registry.host(), summary.digest);
    assert_eq!(images.resolve(&pinned).unwrap().id(), &summary.id);

    // A second pull reuses every blob.
    let recorder = Recorder::default();
    images.pull(&name, &RegistryOptions::default(), &recorder).unwrap();
    let events = recorder.0.into_inner().unwrap();
    assert!(!events.iter().any(|e| matches!(e, ProgressEvent::BlobDone { reused: false, .. })), "{events:?}");

    // The root filesystem: ext4 built without mounting, layers applied in order.
    let rootfs = images.rootfs(&name.to_string(), &RootfsOptions::default(), &NoProgress).unwrap();
    assert!(!rootfs.cached);
    let (ok, motd) = debugfs(&rootfs.path, "cat /etc/motd");
    assert!(ok);
    assert_eq!(motd, "layer two\n");
    assert!(!debugfs(&rootfs.path, "stat /etc/removed").0, "whited-out file present in the ext4 image");
    let (_, cfg) = debugfs(&rootfs.path, "ls -p /opt/cfg");
    assert!(cfg.contains("/new/") && !cfg.contains("/old/") && !cfg.contains("/keep/"), "{cfg}");
    let (_, stat) = debugfs(&rootfs.path, "stat /bin/busybox");
    let size = fs::metadata("/bin/busybox").unwrap().len();
    assert!(stat.contains(&format!("Size: {size}")), "{stat}");
    for applet in BUSYBOX_APPLETS {
        let (_, link) = debugfs(&rootfs.path, &format!("stat /bin/{applet}"));
        assert!(link.contains("Type: symlink") && link.contains("Fast link dest: \"busybox\""), "{link}");
    }
    let (_, root_stat) = debugfs(&rootfs.path, "stat /tmp");
    assert!(root_stat.contains("Mode:  01777"), "{root_stat}");
    let again = images.rootfs(&name.to_string(), &RootfsOptions::default(), &NoProgress).unwrap();
    assert!(again.cached);
    assert_eq!(again.path, rootfs.path);

    // Each VM gets its own copy, optionally grown, and a clean filesystem.
    let vm_disk = work.path().join("vm1.ext4");
    let method = images
        .vm_disk(&name.to_string(), &vm_disk, Some(256 << 20), &RootfsOptions::default(), &NoProgress)
        .unwrap();
    assert!(matches!(method, CopyMethod::Reflink | CopyMethod::SparseCopy));
    assert_eq!(fs::metadata(&vm_disk).unwrap().len(), 256 << 20);
    let fsck = Command::new("e2fsck").args(["-fn"]).arg(&vm_disk).output().unwrap();
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
    let (_, stats) = debugfs(&vm_disk, "stats");
    assert!(stats.contains(&format!("Block count:              {}", (256u64 << 20) / 4096)), "{stats}");
    assert_eq!(debugfs(&vm_disk, "cat /etc/motd").1, "layer two\n");

    // rm removes the name, the image, its blobs and its caches.
    let report = images.remove(&name.to_string()).unwrap();
    assert_eq!(report.deleted.as_ref(), Some(&summary.digest));
    assert!(images.list().unwrap().is_empty());
    assert!(!images.store().blob_path(&record.layers[0].digest).exists());
    assert!(!rootfs.path.exists());
    assert!(vm_disk.exists(), "a VM's disk is its own");
}

#[test]
fn unknown_images_and_a_registry_that_is_down_are_clear_errors() {
    let registry = LocalRegistry::start();
    let work = tempfile::tempdir().unwrap();
    let images = ImageStore::open(work.path()).unwrap();
    let err = images
        .pull(&reference(&registry, "no/such-image:1"), &RegistryOptions::default(), &NoProgress)
        .unwrap_err();
    eprintln!("unknown image: {err}");
    assert!(matches!(err, ImageError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("not found"), "{err}");

    let down = Reference::parse(&format!("127.0.0.1:{}/busybox:latest", free_port())).unwrap();
    let err = images.pull(&down, &RegistryOptions::default(), &NoProgress).unwrap_err();
    eprintln!("registry down: {err}: {}", std::error::Error::source(&err).unwrap());
    assert!(matches!(err, ImageError::RegistryUnreachable { .. }), "{err}");
    assert!(err.to_string().contains("cannot reach registry"), "{err}");
    assert!(images.list().unwrap().is_empty());
    let err = images.resolve("busybox").unwrap_err();
    assert!(err.to_string().contains("no image named"), "{err}");
}

#[test]
fn a_tampered_blob_is_refused_and_nothing_is_stored() {
    let registry = LocalRegistry::start();
    let work = tempfile::tempdir().unwrap();
    let mut layout = OciLayout::create(&work.path().join("layout"));
    let mut layer = TarBuilder::new();
    layer.file("payload", 0o644, &[7u8; 64 << 10]);
    let built = layout.add_image(&[layer.finish()], true, json!({}), "v1");
    registry.push_oci(&layout.dir, "v1", "kiln/tampered:v1");
    // Flip one byte of the layer as the registry stores it (same size, wrong digest).
    let data_path = registry.blob_data_path(&built.layer_digests[0]);
    let mut data = fs::read(&data_path).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0xff;
    fs::write(&data_path, &data).unwrap();

    let images = ImageStore::open(work.path()).unwrap();
    let err = images
        .pull(&reference(&registry, "kiln/tampered:v1"), &RegistryOptions::default(), &NoProgress)
        .unwrap_err();
    eprintln!("tampered: {err}");
    match &err {
        ImageError::DigestMismatch { expected, what, source_name, .. } => {
            assert_eq!(expected.as_str(), built.layer_digests[0]);
            assert!(what.contains("layer 1/1"), "{what}");
            assert!(source_name.contains(&registry.host()), "{source_name}");
        }
        other => panic!("expected a digest mismatch, got {other}"),
    }
    let layer_digest = kiln_image::Digest::parse(&built.layer_digests[0]).unwrap();
    assert!(!images.store().blob_path(&layer_digest).exists());
    assert_eq!(fs::read_dir(images.store().tmp_dir()).unwrap().count(), 0, "partial download left behind");
    assert!(images.list().unwrap().is_empty());
}

#[test]
fn kernels_come_from_images_carrying_boot_vmlinux() {
    let registry = LocalRegistry::start();
    let work = tempfile::tempdir().unwrap();
    let mut layout = OciLayout::create(&work.path().join("layout"));
    let kernel = b"\x7fELF pretend kernel".repeat(1000);
    let mut layer = TarBuilder::new();
    layer.dir("boot", 0o755).file("boot/vmlinux-6.1", 0o644, &kernel).symlink("boot/vmlinux", "vmlinux-6.1");
    layout.add_image(&[layer.finish()], true, json!({}), "6.1");
    registry.push_oci(&layout.dir, "6.1", "kiln/kernel:6.1");
    let images = ImageStore::open(&work.path().join("state")).unwrap();
    let name = reference(&registry, "kiln/kernel:6.1");
    images.pull(&name, &RegistryOptions::default(), &NoProgress).unwrap();
    let path = images.kernel(&KernelSource::Image(name.to_string()), &NoProgress).unwrap();
    assert_eq!(fs::read(&path).unwrap(), kernel);
    assert_eq!(images.kernel(&KernelSource::Image(name.to_string()), &NoProgress).unwrap(), path);
    let file = KernelSource::File(path.clone());
    assert_eq!(images.kernel(&file, &NoProgress).unwrap(), path);

    let mut layout = OciLayout::create(&work.path().join("layout2"));
    let mut layer = TarBuilder::new();
    layer.file("etc/hostname", 0o644, b"none");
    layout.add_image(&[layer.finish()], false, json!({}), "x");
    registry.push_oci(&layout.dir, "x", "kiln/nokernel:x");
    let name = reference(&registry, "kiln/nokernel:x");
    images.pull(&name, &RegistryOptions::default(), &NoProgress).unwrap();
    let err = images.kernel(&KernelSource::Image(name.to_string()), &NoProgress).unwrap_err();
    assert!(matches!(err, ImageError::NoKernel { .. }), "{err}");
}
