//! Building OCI images in tests: raw tar layers (any entry name, including hostile ones), gzip, and
//! `oci-layout` directories with configs, manifests and an index.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest as _, Sha256};

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// gzip-compresses `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// tar entry types.
pub const REGULAR: u8 = b'0';
pub const HARDLINK: u8 = b'1';
pub const SYMLINK: u8 = b'2';
pub const CHAR_DEVICE: u8 = b'3';
pub const DIRECTORY: u8 = b'5';
pub const FIFO: u8 = b'6';

/// Writes ustar archives entry by entry, with names taken verbatim (so tests can craft `../x`,
/// `/abs`, ...). Names or link targets over 100 bytes get a PAX header.
#[derive(Default)]
pub struct TarBuilder {
    buf: Vec<u8>,
}

/// One raw tar entry.
pub struct RawEntry<'a> {
    pub path: &'a [u8],
    pub kind: u8,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub link: &'a [u8],
    pub data: &'a [u8],
    pub device: (u32, u32),
}

impl<'a> RawEntry<'a> {
    pub fn new(path: &'a [u8], kind: u8) -> Self {
        let mode = if kind == DIRECTORY { 0o755 } else { 0o644 };
        RawEntry { path, kind, mode, uid: 0, gid: 0, link: b"", data: b"", device: (0, 0) }
    }
}

fn octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let s = format!("{value:0width$o}");
    assert!(s.len() <= width, "tar field overflow");
    field[..width].copy_from_slice(s.as_bytes());
    field[width] = 0;
}

impl TarBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.raw(&RawEntry { mode, ..RawEntry::new(path.as_bytes(), DIRECTORY) })
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.raw(&RawEntry { mode, data, ..RawEntry::new(path.as_bytes(), REGULAR) })
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.raw(&RawEntry {
            mode: 0o777,
            link: target.as_bytes(),
            ..RawEntry::new(path.as_bytes(), SYMLINK)
        })
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.raw(&RawEntry { link: target.as_bytes(), ..RawEntry::new(path.as_bytes(), HARDLINK) })
    }

    /// An empty file named `.wh.NAME` next to `path`'s last component (`dir/.wh.name`).
    pub fn whiteout(&mut self, path: &str) -> &mut Self {
        let (parent, name) =
            path.rsplit_once('/').map(|(p, n)| (format!("{p}/"), n)).unwrap_or((String::new(), path));
        self.file(&format!("{parent}.wh.{name}"), 0o644, b"")
    }

    /// Marks `dir` opaque (`dir/.wh..wh..opq`).
    pub fn opaque(&mut self, dir: &str) -> &mut Self {
        self.file(&format!("{dir}/.wh..wh..opq"), 0o644, b"")
    }

    /// Any entry, verbatim.
    pub fn raw(&mut self, e: &RawEntry<'_>) -> &mut Self {
        if e.path.len() > 100 || e.link.len() > 100 {
            let mut records = Vec::new();
            for (key, value) in [("path", e.path), ("linkpath", e.link)] {
                if value.is_empty() {
                    continue;
                }
                let body_len = key.len() + value.len() + 3;
                let mut len = body_len + 1;
                while len != body_len + len.to_string().len() {
                    len = body_len + len.to_string().len();
                }
                records.extend_from_slice(format!("{len} {key}=").as_bytes());
                records.extend_from_slice(value);
                records.push(b'\n');
            }
            self.header(
                &RawEntry { data: &records, ..RawEntry::new(b"PaxHeader", b'x') },
                records.len() as u64,
            );
            self.data(&records);
        }
        self.header(e, if e.kind == REGULAR { e.data.len() as u64 } else { 0 });
        if e.kind == REGULAR {
            self.data(e.data);
        }
        self
    }

    fn header(&mut self, e: &RawEntry<'_>, size: u64) {
        let mut h = [0u8; 512];
        let name = &e.path[..e.path.len().min(100)];
        h[..name.len()].copy_from_slice(name);
        octal(&mut h[100..108], u64::from(e.mode));
        octal(&mut h[108..116], u64::from(e.uid));
        octal(&mut h[116..124], u64::from(e.gid));
        octal(&mut h[124..136], size);
        octal(&mut h[136..148], 1_700_000_000);
        h[156] = e.kind;
        let link = &e.link[..e.link.len().min(100)];
        h[157..157 + link.len()].copy_from_slice(link);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        octal(&mut h[329..337], u64::from(e.device.0));
        octal(&mut h[337..345], u64::from(e.device.1));
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        self.buf.extend_from_slice(&h);
    }

    fn data(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.buf.extend(std::iter::repeat_n(0u8, pad));
    }

    /// The archive, with its two zero end blocks.
    pub fn finish(&self) -> Vec<u8> {
        let mut out = self.buf.clone();
        out.extend(std::iter::repeat_n(0u8, 1024));
        out
    }
}

/// Digests of an image written into an [`OciLayout`].
#[derive(Clone, Debug)]
pub struct BuiltImage {
    pub manifest_digest: String,
    pub manifest_size: usize,
    pub config_digest: String,
    /// Layer blob digests (compressed when the layers were gzipped).
    pub layer_digests: Vec<String>,
    pub diff_ids: Vec<String>,
}

/// An `oci-layout` directory being written.
pub struct OciLayout {
    pub dir: PathBuf,
    manifests: Vec<serde_json::Value>,
}

impl OciLayout {
    /// Creates the layout (the directory may exist).
    pub fn create(dir: &Path) -> Self {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let layout = OciLayout { dir: dir.to_path_buf(), manifests: Vec::new() };
        layout.write_index();
        layout
    }

    /// Stores a blob, returning its digest.
    pub fn blob(&self, data: &[u8]) -> String {
        let digest = sha256_digest(data);
        fs::write(self.blob_path(&digest), data).unwrap();
        digest
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))
    }

    fn write_index(&self) {
        let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": self.manifests});
        fs::write(self.dir.join("index.json"), serde_json::to_vec_pretty(&index).unwrap()).unwrap();
    }

    /// Adds an image made of `layers` (uncompressed tars; stored gzipped when `gzip`), with `run`
    /// merged into the config's `config` (Entrypoint, Cmd, Env, ...), listed in index.json under
    /// `ref_name` (`org.opencontainers.image.ref.name`).
    pub fn add_image(
        &mut self,
        layers: &[Vec<u8>],
        gzip_layers: bool,
        run: serde_json::Value,
        ref_name: &str,
    ) -> BuiltImage {
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256_digest(l)).collect();
        let mut layer_descs = Vec::new();
        let mut layer_digests = Vec::new();
        for layer in layers {
            let (data, media_type) = if gzip_layers {
                (gzip(layer), "application/vnd.oci.image.layer.v1.tar+gzip")
            } else {
                (layer.clone(), "application/vnd.oci.image.layer.v1.tar")
            };
            let digest = self.blob(&data);
            layer_descs.push(json!({"mediaType": media_type, "digest": digest, "size": data.len()}));
            layer_digests.push(digest);
        }
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "config": run,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config_bytes = serde_json::to_vec(&config).unwrap();
        let config_digest = self.blob(&config_bytes);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_bytes.len()},
            "layers": layer_descs,
        });
        let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
        let manifest_digest = self.blob(&manifest_bytes);
        self.manifests.push(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_bytes.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": ref_name},
        }));
        self.write_index();
        BuiltImage {
            manifest_digest,
            manifest_size: manifest_bytes.len(),
            config_digest,
            layer_digests,
            diff_ids,
        }
    }
}

/// The applets linked to `/bin/busybox` in [`busybox_layers`].
pub const BUSYBOX_APPLETS: [&str; 10] =
    ["sh", "ls", "cat", "echo", "mount", "poweroff", "reboot", "sleep", "true", "uname"];

/// Two layers of a tiny busybox root filesystem (Debian's busybox-static): the first has
/// `/bin/busybox`, applet symlinks, `/etc/passwd`, `/etc/removed` and `/opt/cfg/{old,keep}`; the
/// second whites out `/etc/removed`, makes `/opt/cfg` opaque (only `new` remains) and replaces
/// `/etc/motd`.
pub fn busybox_layers() -> Vec<Vec<u8>> {
    let busybox =
        fs::read("/bin/busybox").expect("/bin/busybox (Debian busybox-static; run scripts/install-deps)");
    let mut base = TarBuilder::new();
    base.dir("bin", 0o755).file("bin/busybox", 0o755, &busybox);
    for applet in BUSYBOX_APPLETS {
        base.symlink(&format!("bin/{applet}"), "busybox");
    }
    base.dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        .file("etc/motd", 0o644, b"layer one\n")
        .file("etc/removed", 0o644, b"whited out by layer two\n")
        .dir("opt", 0o755)
        .dir("opt/cfg", 0o755)
        .file("opt/cfg/old", 0o644, b"hidden by the opaque dir\n")
        .file("opt/cfg/keep", 0o644, b"also hidden\n")
        .dir("tmp", 0o1777)
        .dir("root", 0o700);
    let mut top = TarBuilder::new();
    top.whiteout("etc/removed")
        .file("etc/motd", 0o644, b"layer two\n")
        .dir("opt/cfg", 0o755)
        .opaque("opt/cfg")
        .file("opt/cfg/new", 0o600, b"from layer two\n");
    vec![base.finish(), top.finish()]
}

/// Deterministic, poorly compressible file content (xorshift), like binaries and libraries.
fn bench_content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Half the bytes repeat, so gzip gets roughly 2:1 as on real root filesystems.
        out.extend_from_slice(&(x & 0x0f0f_0f0f_0f0f_0f0f).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The benchmarks' 5-layer image of about `total_mb` MB (uncompressed): four layers of 32 KiB..512 KiB
/// files, and a top layer with a whiteout and a small file.
pub fn five_layer_image(total_mb: usize) -> Vec<Vec<u8>> {
    let per_layer = total_mb << 20 >> 2;
    let mut layers = Vec::new();
    let mut seed = 1;
    for layer in 0..4 {
        let mut tar = TarBuilder::new();
        tar.dir(&format!("usr/lib/l{layer}"), 0o755);
        let mut written = 0;
        while written < per_layer {
            let len = 32 * 1024 * (1 + (seed as usize % 16));
            tar.file(&format!("usr/lib/l{layer}/f{seed}.so"), 0o644, &bench_content(seed, len));
            written += len;
            seed += 1;
        }
        layers.push(tar.finish());
    }
    let mut top = TarBuilder::new();
    top.whiteout("usr/lib/l0/f1.so").file("etc/hostname", 0o644, b"bench\n");
    layers.push(top.finish());
    layers
}
