//! `kiln image import`: oci-layout directories and archives, `docker save` archives; names; verified
//! blobs; crafted archives.
#![allow(clippy::unwrap_used)] // Test helpers: a failed setup step should panic.

use std::fs;
use std::path::Path;
use std::process::Command;

use kiln_image::{ImageError, ImageStore, NoProgress, Reference, RootfsOptions, UnpackOptions};
use kiln_test_utils::oci::{
    busybox_layers, sha256_digest, OciLayout, RawEntry, TarBuilder, REGULAR, SYMLINK,
};
use serde_json::json;

fn motd(image: &Path) -> String {
    let out = Command::new("debugfs").args(["-R", "cat /etc/motd"]).arg(image).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn name(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

#[test]
fn oci_layout_directory_and_archive() {
    let work = tempfile::tempdir().unwrap();
    let layout_dir = work.path().join("layout");
    let mut layout = OciLayout::create(&layout_dir);
    let built = layout.add_image(&busybox_layers(), true, json!({"Cmd": ["sh"]}), "latest");
    let images = ImageStore::open(&work.path().join("state")).unwrap();

    // A bare tag in the layout needs a name from the user.
    let err = images.import(&layout_dir, None, &NoProgress).unwrap_err();
    assert!(err.to_string().contains("give a name"), "{err}");
    let imported = images.import(&layout_dir, Some(&name("local/busybox:dir")), &NoProgress).unwrap();
    assert_eq!(imported.len(), 1);
    assert_eq!(imported[0].id.as_str(), built.config_digest);
    assert_eq!(imported[0].names, vec!["docker.io/local/busybox:dir".to_string()]);

    // The same layout as a tar archive (as `skopeo copy ... oci-archive:` or `tar` makes it).
    let archive = work.path().join("busybox-oci.tar");
    let status =
        Command::new("tar").arg("-C").arg(&layout_dir).arg("-cf").arg(&archive).arg(".").status().unwrap();
    assert!(status.success());
    images.import(&archive, Some(&name("local/busybox:tar")), &NoProgress).unwrap();
    let listed = images.list().unwrap();
    assert_eq!(listed.len(), 1, "one image under two names: {listed:?}");
    assert_eq!(listed[0].names.len(), 2);
    assert_eq!(fs::read_dir(images.store().tmp_dir()).unwrap().count(), 0, "scratch space left behind");

    let rootfs = images.rootfs("local/busybox:tar", &RootfsOptions::default(), &NoProgress).unwrap();
    assert_eq!(motd(&rootfs.path), "layer two\n");
}

#[test]
fn full_names_in_the_layout_are_used() {
    let work = tempfile::tempdir().unwrap();
    let mut layout = OciLayout::create(&work.path().join("layout"));
    layout.add_image(&busybox_layers(), false, json!({}), "docker.io/library/busybox:1.36");
    let images = ImageStore::open(&work.path().join("state")).unwrap();
    let imported = images.import(&work.path().join("layout"), None, &NoProgress).unwrap();
    assert_eq!(imported[0].names, vec!["docker.io/library/busybox:1.36".to_string()]);
    assert!(images.resolve("busybox:1.36").is_ok());
}

#[test]
fn a_tampered_blob_in_a_layout_is_refused_and_not_stored() {
    let work = tempfile::tempdir().unwrap();
    let mut layout = OciLayout::create(&work.path().join("layout"));
    let built = layout.add_image(&busybox_layers(), true, json!({}), "latest");
    let layer = layout.blob_path(&built.layer_digests[1]);
    let mut data = fs::read(&layer).unwrap();
    data[10] ^= 1;
    fs::write(&layer, data).unwrap();
    let images = ImageStore::open(&work.path().join("state")).unwrap();
    let err = images.import(&work.path().join("layout"), Some(&name("x/y:z")), &NoProgress).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains("layer 2/2"), "{err}");
    let digest = kiln_image::Digest::parse(&built.layer_digests[1]).unwrap();
    assert!(!images.store().blob_path(&digest).exists());
    assert!(images.list().unwrap().is_empty());
}

/// A `docker save` archive (classic layout: `<id>/layer.tar`, `<id>.json`, `manifest.json`), with a
/// repeated layer stored as a symlink the way docker does.
#[test]
fn docker_save_archive() {
    let layers = busybox_layers();
    let diff_ids = [sha256_digest(&layers[0]), sha256_digest(&layers[1]), sha256_digest(&layers[1])];
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_name = format!("{}.json", &sha256_digest(&config)[7..]);
    let manifest = serde_json::to_vec(&json!([{
        "Config": config_name,
        "RepoTags": ["busybox:saved"],
        "Layers": ["aaa/layer.tar", "bbb/layer.tar", "ccc/layer.tar"],
    }]))
    .unwrap();
    let mut tar = TarBuilder::new();
    tar.file("manifest.json", 0o644, &manifest).file(&config_name, 0o644, &config);
    tar.dir("aaa", 0o755).file("aaa/layer.tar", 0o644, &layers[0]);
    tar.dir("bbb", 0o755).file("bbb/layer.tar", 0o644, &layers[1]);
    tar.dir("ccc", 0o755)
        .raw(&RawEntry { link: b"../bbb/layer.tar", ..RawEntry::new(b"ccc/layer.tar", SYMLINK) });
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("saved.tar");
    fs::write(&archive, tar.finish()).unwrap();

    let images = ImageStore::open(&work.path().join("state")).unwrap();
    let imported = images.import(&archive, None, &NoProgress).unwrap();
    assert_eq!(imported[0].names, vec!["docker.io/library/busybox:saved".to_string()]);
    let details = images.inspect("busybox:saved").unwrap();
    assert_eq!(details.layers.len(), 3);
    assert_eq!(details.config.entrypoint, Some(vec!["/bin/sh".to_string()]));
    // The rootfs build re-checks each layer against its diff_id while unpacking.
    let rootfs = images.rootfs("busybox:saved", &RootfsOptions::default(), &NoProgress).unwrap();
    assert_eq!(motd(&rootfs.path), "layer two\n");
}

#[test]
fn a_crafted_archive_cannot_write_outside_the_scratch_space() {
    let work = tempfile::tempdir().unwrap();
    let mut tar = TarBuilder::new();
    tar.raw(&RawEntry { data: b"x", ..RawEntry::new(b"../../../../planted", REGULAR) });
    let archive = work.path().join("evil.tar");
    fs::write(&archive, tar.finish()).unwrap();
    let state = work.path().join("state");
    let images = ImageStore::open(&state).unwrap();
    let err = images.import(&archive, Some(&name("evil:1")), &NoProgress).unwrap_err();
    assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{err}");
    for dir in [work.path().to_path_buf(), state.clone(), state.join("images")] {
        assert!(!dir.join("planted").exists());
    }
    assert_eq!(fs::read_dir(images.store().tmp_dir()).unwrap().count(), 0);
}

/// Without root: owners from the image end up in the ext4 image through debugfs.
#[test]
fn unprivileged_build_sets_owners_inside_the_image() {
    let work = tempfile::tempdir().unwrap();
    let mut layout = OciLayout::create(&work.path().join("layout"));
    let mut layer = TarBuilder::new();
    layer.raw(&RawEntry {
        path: b"home",
        kind: b'5',
        mode: 0o750,
        uid: 1000,
        gid: 1000,
        ..RawEntry::new(b"home", b'5')
    });
    layer.raw(&RawEntry { uid: 1000, gid: 100, data: b"mine", ..RawEntry::new(b"home/file", REGULAR) });
    layer.raw(&RawEntry { device: (1, 3), mode: 0o666, ..RawEntry::new(b"null", b'3') });
    layout.add_image(&[layer.finish()], false, json!({}), "latest");
    let images = ImageStore::open(&work.path().join("state")).unwrap();
    images.import(&work.path().join("layout"), Some(&name("owners:1")), &NoProgress).unwrap();
    let options = RootfsOptions { unpack: UnpackOptions { privileged: false }, ..Default::default() };
    let rootfs = images.rootfs("owners:1", &options, &NoProgress).unwrap();
    let stat = |p: &str| {
        let out =
            Command::new("debugfs").arg("-R").arg(format!("stat {p}")).arg(&rootfs.path).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let file = stat("/home/file");
    assert!(file.contains("User:  1000") && file.contains("Group:   100"), "{file}");
    let home = stat("/home");
    assert!(home.contains("User:  1000") && home.contains("Mode:  0750"), "{home}");
    let null = stat("/null");
    assert!(null.contains("Type: character special") && null.contains("Mode:  0666"), "{null}");
    let root = stat("/");
    assert!(root.contains("User:     0"), "{root}");
}

/// Moving a name to another image leaves the old one unnamed; `prune` removes it and its blobs.
#[test]
fn prune_removes_images_left_without_a_name() {
    let work = tempfile::tempdir().unwrap();
    let images = ImageStore::open(&work.path().join("state")).unwrap();
    let mut ids = Vec::new();
    for (i, text) in [b"one".as_slice(), b"two"].into_iter().enumerate() {
        let mut layout = OciLayout::create(&work.path().join(format!("layout{i}")));
        let mut layer = TarBuilder::new();
        layer.file("version", 0o644, text);
        let built = layout.add_image(&[layer.finish()], true, json!({}), "latest");
        images.import(&layout.dir, Some(&name("app:1")), &NoProgress).unwrap();
        ids.push(built);
    }
    let listed = images.list().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().any(|s| s.names.is_empty() && s.id.as_str() == ids[0].config_digest));
    let report = images.prune().unwrap();
    assert_eq!(report.images, 1);
    let remaining = images.list().unwrap();
    assert_eq!(remaining.len(), 1);
    assert_eq!(remaining[0].id.as_str(), ids[1].config_digest);
    let old_layer = kiln_image::Digest::parse(&ids[0].layer_digests[0]).unwrap();
    assert!(!images.store().blob_path(&old_layer).exists());
}

/// Root filesystems built with an earlier build of an added file (Kiln's agent) are pruned when
/// only the current options are kept; the current one and the image stay.
#[test]
fn prune_keeping_drops_root_filesystems_of_other_added_file_builds() {
    let work = tempfile::tempdir().unwrap();
    let images = ImageStore::open(&work.path().join("state")).unwrap();
    let mut layout = OciLayout::create(&work.path().join("layout"));
    let mut layer = TarBuilder::new();
    layer.file("etc/hostname", 0o644, b"x\n");
    layout.add_image(&[layer.finish()], true, json!({}), "latest");
    images.import(&layout.dir, Some(&name("app:1")), &NoProgress).unwrap();
    let agent = work.path().join("agent");
    let options = |agent: &std::path::Path| RootfsOptions {
        added_files: vec![kiln_image::AddedFile {
            guest_path: "/sbin/kiln-agent".into(),
            source: agent.to_path_buf(),
            mode: 0o755,
        }],
        ..Default::default()
    };
    std::fs::write(&agent, b"old agent").unwrap();
    let old = images.rootfs("app:1", &options(&agent), &NoProgress).unwrap().path;
    let new_agent = work.path().join("agent2");
    std::fs::write(&new_agent, b"new agent").unwrap();
    let new = images.rootfs("app:1", &options(&new_agent), &NoProgress).unwrap().path;
    assert_ne!(old, new);
    let report = images.prune_keeping(&[options(&new_agent)]).unwrap();
    assert!(!old.exists(), "the old agent's root filesystem is still cached");
    assert!(new.exists());
    assert!(report.caches >= 1);
    assert_eq!(images.list().unwrap().len(), 1);
    // A plain prune keeps every variant of a named image.
    let again = images.rootfs("app:1", &options(&agent), &NoProgress).unwrap().path;
    images.prune().unwrap();
    assert!(again.exists() && new.exists());
}
