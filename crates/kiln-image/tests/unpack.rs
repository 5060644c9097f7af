//! Layer application: order, whiteouts, opaque directories, hardlinks, unprivileged fixups, and every
//! kind of escape a crafted layer can try (nothing may be written outside the staging directory).
#![allow(clippy::unwrap_used)] // Test helpers: a failed setup step should panic.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_image::digest::Digest;
use kiln_image::unpack::{unpack_layers, Fixup, LayerSource, NodeKind, UnpackOptions};
use kiln_image::ImageError;
use kiln_test_utils::oci::{busybox_layers, gzip, RawEntry, TarBuilder, CHAR_DEVICE, REGULAR};

/// A staging root inside a sandbox that also holds an `outside` directory with a sentinel file.
struct Sandbox {
    dir: tempfile::TempDir,
    layers: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("a/b/root")).unwrap();
        fs::create_dir_all(dir.path().join("outside")).unwrap();
        fs::write(dir.path().join("outside/secret"), b"host data").unwrap();
        Sandbox { dir, layers: tempfile::tempdir().unwrap() }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("a/b/root")
    }

    /// Every path in the sandbox outside the root.
    fn outside_tree(&self) -> BTreeSet<PathBuf> {
        fn walk(p: &Path, root: &Path, out: &mut BTreeSet<PathBuf>) {
            for e in fs::read_dir(p).unwrap() {
                let path = e.unwrap().path();
                if path == root {
                    continue;
                }
                out.insert(path.clone());
                if path.is_dir() && !path.is_symlink() {
                    walk(&path, root, out);
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(self.dir.path(), &self.root(), &mut out);
        out
    }

    fn apply(
        &self,
        layers: &[Vec<u8>],
        options: &UnpackOptions,
    ) -> Result<kiln_image::unpack::UnpackReport, ImageError> {
        let paths: Vec<PathBuf> = layers
            .iter()
            .enumerate()
            .map(|(i, data)| {
                let p = self.layers.path().join(format!("layer{i}.tar"));
                fs::write(&p, data).unwrap();
                p
            })
            .collect();
        let sources: Vec<LayerSource<'_>> = paths
            .iter()
            .enumerate()
            .map(|(i, p)| LayerSource { path: p, name: format!("test layer {i}"), diff_id: None })
            .collect();
        unpack_layers(&self.root(), &sources, options, |_| {})
    }

    /// Applies a layer that must be refused, and checks nothing outside the root changed.
    fn assert_refused(&self, layer: Vec<u8>, why: &str) {
        let before = self.outside_tree();
        let err = self.apply(&[layer], &UnpackOptions::default()).unwrap_err();
        eprintln!("{why}: {err}");
        assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{why}: expected a refusal, got: {err}");
        assert_eq!(self.outside_tree(), before, "{why}: something was written outside the root");
        assert_eq!(fs::read(self.dir.path().join("outside/secret")).unwrap(), b"host data");
    }
}

#[test]
fn layers_apply_in_order_with_whiteouts_and_opaque_dirs() {
    let sandbox = Sandbox::new();
    let layers = busybox_layers();
    let report = sandbox.apply(&[gzip(&layers[0]), layers[1].clone()], &UnpackOptions::default()).unwrap();
    let root = sandbox.root();
    assert_eq!(fs::read(root.join("etc/motd")).unwrap(), b"layer two\n");
    assert!(!root.join("etc/removed").exists(), "the whiteout did not remove etc/removed");
    assert!(!root.join("etc/.wh.removed").exists(), "a whiteout marker was materialised");
    let cfg: BTreeSet<String> = fs::read_dir(root.join("opt/cfg"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(cfg, BTreeSet::from(["new".to_string()]), "the opaque dir kept lower-layer files");
    assert_eq!(fs::read_link(root.join("bin/sh")).unwrap(), Path::new("busybox"));
    assert_eq!(
        fs::metadata(root.join("bin/busybox")).unwrap().len(),
        fs::metadata("/bin/busybox").unwrap().len()
    );
    assert_eq!(fs::metadata(root.join("bin/busybox")).unwrap().mode() & 0o7777, 0o755);
    assert_eq!(fs::metadata(root.join("opt/cfg/new")).unwrap().mode() & 0o7777, 0o600);
    assert_eq!(fs::metadata(root.join("tmp")).unwrap().mode() & 0o7777, 0o1777);
    assert_eq!(fs::metadata(root.join("root")).unwrap().mode() & 0o7777, 0o700);
    assert!(report.entries > 10);
}

#[test]
fn whiteouts_do_not_hide_files_of_their_own_layer_and_replace_types() {
    let sandbox = Sandbox::new();
    let mut lower = TarBuilder::new();
    lower.dir("d", 0o755).file("d/x", 0o644, b"lower").file("f", 0o644, b"file");
    let mut upper = TarBuilder::new();
    // `d` becomes a file, `f` a directory; a whiteout for a name this layer writes does not hide it.
    upper
        .file("d", 0o644, b"now a file")
        .dir("f", 0o755)
        .file("f/inner", 0o644, b"in")
        .file("same", 0o644, b"kept");
    upper.whiteout("same").whiteout("never-existed");
    sandbox.apply(&[lower.finish(), upper.finish()], &UnpackOptions::default()).unwrap();
    let root = sandbox.root();
    assert_eq!(fs::read(root.join("d")).unwrap(), b"now a file");
    assert_eq!(fs::read(root.join("f/inner")).unwrap(), b"in");
    assert_eq!(fs::read(root.join("same")).unwrap(), b"kept");
}

#[test]
fn hardlinks_share_the_inode_inside_the_root() {
    let sandbox = Sandbox::new();
    let mut layer = TarBuilder::new();
    layer.dir("bin", 0o755).file("bin/tool", 0o755, b"#!/bin/sh\n").hardlink("bin/alias", "bin/tool");
    sandbox.apply(&[layer.finish()], &UnpackOptions::default()).unwrap();
    let a = fs::metadata(sandbox.root().join("bin/tool")).unwrap();
    let b = fs::metadata(sandbox.root().join("bin/alias")).unwrap();
    assert_eq!(a.ino(), b.ino());
}

#[test]
fn symlinks_in_parents_resolve_inside_the_root() {
    let sandbox = Sandbox::new();
    let outside = sandbox.dir.path().join("outside");
    let mut lower = TarBuilder::new();
    lower.dir("usr/lib", 0o755).symlink("lib", "usr/lib").symlink("hostlink", outside.to_str().unwrap());
    let mut upper = TarBuilder::new();
    // Through a relative symlink, and through an absolute one naming a host path: both stay inside.
    upper.file("lib/libx.so", 0o644, b"lib").file("hostlink/planted", 0o644, b"inside");
    let before = sandbox.outside_tree();
    sandbox.apply(&[lower.finish(), upper.finish()], &UnpackOptions::default()).unwrap();
    assert_eq!(fs::read(sandbox.root().join("usr/lib/libx.so")).unwrap(), b"lib");
    let inside = sandbox.root().join(outside.strip_prefix("/").unwrap()).join("planted");
    assert_eq!(fs::read(inside).unwrap(), b"inside");
    assert_eq!(sandbox.outside_tree(), before);
}

#[test]
fn dotdot_paths_are_refused() {
    let sandbox = Sandbox::new();
    let mut layer = TarBuilder::new();
    layer.file("../../../outside/planted", 0o644, b"x");
    sandbox.assert_refused(layer.finish(), "../ path");
    let mut layer = TarBuilder::new();
    layer.dir("ok", 0o755).file("ok/../../escape", 0o644, b"x");
    sandbox.assert_refused(layer.finish(), "inner ../ path");
}

#[test]
fn absolute_paths_are_refused() {
    let sandbox = Sandbox::new();
    let target = sandbox.dir.path().join("outside/planted");
    let mut layer = TarBuilder::new();
    layer.file(target.to_str().unwrap(), 0o644, b"x");
    sandbox.assert_refused(layer.finish(), "absolute path");
    assert!(!target.exists());
}

#[test]
fn long_pax_paths_are_checked_too() {
    let sandbox = Sandbox::new();
    let long = format!("{}/../../../../outside/planted", "d/".repeat(60));
    let mut layer = TarBuilder::new();
    layer.file(&long, 0o644, b"x");
    sandbox.assert_refused(layer.finish(), "PAX path with ..");
}

#[test]
fn writing_through_an_escaping_symlink_is_refused() {
    let sandbox = Sandbox::new();
    // A symlink climbing out of the root, then a file written through it, in the same layer...
    let mut layer = TarBuilder::new();
    layer.symlink("evil", "../../../outside").file("evil/planted", 0o644, b"x");
    sandbox.assert_refused(layer.finish(), "symlink escape, same layer");
    // ...and across layers, and via a chain of symlinks.
    let sandbox = Sandbox::new();
    let mut lower = TarBuilder::new();
    lower.dir("x", 0o755).symlink("x/up", "..").symlink("chain", "x/up/x/up/x/up/..");
    sandbox.apply(&[lower.finish()], &UnpackOptions::default()).unwrap();
    let mut upper = TarBuilder::new();
    upper.file("chain/outside/planted", 0o644, b"x");
    sandbox.assert_refused(upper.finish(), "symlink chain escape");
}

#[test]
fn hardlink_escapes_are_refused() {
    let sandbox = Sandbox::new();
    let mut layer = TarBuilder::new();
    layer.hardlink("stolen", "../../../outside/secret");
    sandbox.assert_refused(layer.finish(), "hardlink with ..");
    let secret = sandbox.dir.path().join("outside/secret");
    let mut layer = TarBuilder::new();
    layer.hardlink("stolen", secret.to_str().unwrap());
    sandbox.assert_refused(layer.finish(), "absolute hardlink target");
    let mut layer = TarBuilder::new();
    layer.symlink("up", "../../..").hardlink("stolen", "up/outside/secret");
    sandbox.assert_refused(layer.finish(), "hardlink through an escaping symlink");
    assert_eq!(fs::metadata(&secret).unwrap().nlink(), 1, "the host file got a new link");
}

#[test]
fn a_symlink_as_final_component_is_replaced_not_followed() {
    let sandbox = Sandbox::new();
    let secret = sandbox.dir.path().join("outside/secret");
    let mut lower = TarBuilder::new();
    lower.symlink("passwd", secret.to_str().unwrap());
    let mut upper = TarBuilder::new();
    upper.file("passwd", 0o644, b"replaced");
    sandbox.apply(&[lower.finish(), upper.finish()], &UnpackOptions::default()).unwrap();
    assert_eq!(fs::read(&secret).unwrap(), b"host data");
    assert_eq!(fs::read(sandbox.root().join("passwd")).unwrap(), b"replaced");
}

#[test]
fn unprivileged_unpack_records_owners_and_device_nodes() {
    let sandbox = Sandbox::new();
    let mut layer = TarBuilder::new();
    layer.raw(&RawEntry { uid: 1000, gid: 100, data: b"data", ..RawEntry::new(b"home-file", REGULAR) });
    layer.raw(&RawEntry { device: (1, 3), mode: 0o666, ..RawEntry::new(b"null", CHAR_DEVICE) });
    let report = sandbox.apply(&[layer.finish()], &UnpackOptions { privileged: false }).unwrap();
    assert!(report.fixups.contains(&Fixup::Owner { path: b"home-file".to_vec(), uid: 1000, gid: 100 }));
    assert!(report.fixups.contains(&Fixup::Node {
        path: b"null".to_vec(),
        kind: NodeKind::Char,
        major: 1,
        minor: 3,
        mode: 0o666,
        uid: 0,
        gid: 0
    }));
    assert!(!sandbox.root().join("null").exists());
}

#[test]
fn a_wrong_diff_id_is_an_error() {
    let sandbox = Sandbox::new();
    let mut layer = TarBuilder::new();
    layer.file("a", 0o644, b"a");
    let path = sandbox.layers.path().join("layer.tar");
    fs::write(&path, layer.finish()).unwrap();
    let wrong = Digest::of(b"not this layer");
    let source = LayerSource { path: &path, name: "l".into(), diff_id: Some(&wrong) };
    let err = unpack_layers(&sandbox.root(), &[source], &UnpackOptions::default(), |_| {}).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
}

#[test]
fn zstd_layers_apply_like_gzip_ones() {
    let sandbox = Sandbox::new();
    let layers = busybox_layers();
    let zstd = |l: &[u8]| ruzstd::encoding::compress_to_vec(l, ruzstd::encoding::CompressionLevel::Fastest);
    sandbox.apply(&[zstd(&layers[0]), zstd(&layers[1])], &UnpackOptions::default()).unwrap();
    assert_eq!(fs::read(sandbox.root().join("etc/motd")).unwrap(), b"layer two\n");
    assert!(!sandbox.root().join("etc/removed").exists());
}
