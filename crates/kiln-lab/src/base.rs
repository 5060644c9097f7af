//! The lab base: Debian's stock kernel plus a base initramfs (busybox, kvm modules, `/init`, the step
//! runner), built once and cached under `<cache>/lab/<key>` where the key hashes the kernel package
//! version and everything that goes into the initramfs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cpio::CpioWriter;
use crate::host::{self, FileLock};
use crate::modules::ModuleTree;
use crate::LabError;

/// Bumped when the layout of the base changes in a way the other inputs do not capture.
const FORMAT: &str = "kiln-lab-base-v2";

/// The modules every lab loads: nested SVM, and virtio-pci + virtio-blk for `.disk()`; tun so a VMM
/// in the lab can use tap devices.
pub(crate) const DEFAULT_MODULES: &[&str] = &["kvm_amd", "virtio_pci", "virtio_blk", "tun"];

/// The lab's init. Runs as PID 1 from the initramfs, then hands PID 1 to the step runner.
pub(crate) const INIT: &str = include_str!("init.sh");

/// Source of the step runner, compiled on the host with plain rustc.
pub(crate) const RUNNER_SRC: &str = include_str!("../runner/lab_runner.rs");

/// The kernel package that `linux-image-amd64` points at.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KernelPackage {
    pub name: String,
    pub version: String,
}

/// What a cached base was built from (stored as `meta.json` beside it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseMeta {
    pub package: KernelPackage,
    /// `uname -r` inside the lab.
    pub kernel_release: String,
    /// Hash of everything but the kernel package (init, runner, busybox, module list, rustc).
    pub recipe: String,
    /// Modules insmod'ed at boot, in load order.
    pub modules: Vec<String>,
    /// Seconds it took to build this base.
    pub build_secs: f64,
    /// The lab boots the uncompressed ELF `vmlinux` through its PVH entry (skipping the bzImage's
    /// XZ decompression, which costs seconds under TCG); false when it could not be extracted and
    /// the lab boots `vmlinuz`.
    pub pvh_vmlinux: bool,
}

/// A ready base: kernel image and base cpio.
#[derive(Debug, Clone)]
pub struct Base {
    pub dir: PathBuf,
    /// What the lab boots: `vmlinux` (PVH) or `vmlinuz`.
    pub kernel: PathBuf,
    /// Debian's compressed kernel as shipped.
    pub bzimage: PathBuf,
    pub cpio: PathBuf,
    pub meta: BaseMeta,
    /// Set when this call built the base (not taken from the cache).
    pub built_in: Option<Duration>,
}

fn sha_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn rustc() -> Result<PathBuf, LabError> {
    if let Some(r) = std::env::var_os("RUSTC").and_then(host::which) {
        return Ok(r);
    }
    host::which("rustc").ok_or_else(|| LabError::Missing {
        what: "`rustc` (to build the lab's step runner)".into(),
        hint: "install a Rust toolchain or set RUSTC".into(),
    })
}

/// Builds (or takes from the cache) the static step runner; returns its path.
fn runner_binary(cache: &Path, rustc: &Path, rustc_version: &str) -> Result<PathBuf, LabError> {
    let key = sha_hex(&[RUNNER_SRC.as_bytes(), rustc_version.as_bytes()]);
    let out = cache.join(format!("runner-{}", &key[..16]));
    if out.is_file() {
        return Ok(out);
    }
    let tmp = tempfile::Builder::new()
        .prefix(".runner-build-")
        .tempdir_in(cache)
        .map_err(|e| LabError::io(cache, e))?;
    let src = tmp.path().join("lab_runner.rs");
    std::fs::write(&src, RUNNER_SRC).map_err(|e| LabError::io(&src, e))?;
    let bin = tmp.path().join("lab-runner");
    let result = Command::new(rustc)
        .args(["--edition", "2021", "-O", "-C", "target-feature=+crt-static", "-C", "strip=symbols"])
        .args(["-C", "panic=abort", "--crate-name", "lab_runner", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .map_err(|e| LabError::RunnerBuild(e.to_string()))?;
    if !result.status.success() {
        return Err(LabError::RunnerBuild(String::from_utf8_lossy(&result.stderr).into_owned()));
    }
    std::fs::rename(&bin, &out).map_err(|e| LabError::io(&out, e))?;
    Ok(out)
}

fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(name)).map(str::trim)
}

/// Resolves `linux-image-amd64` to the versioned kernel package with apt-cache, or takes a local
/// `.deb` from `KILN_LAB_KERNEL_DEB`.
fn resolve_package(cache: &Path) -> Result<(KernelPackage, Option<PathBuf>), LabError> {
    if let Some(deb) = std::env::var_os("KILN_LAB_KERNEL_DEB") {
        let deb = PathBuf::from(deb);
        let out = host::run(Command::new("dpkg-deb").arg("-f").arg(&deb).args(["Package", "Version"]))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let name = field(&text, "Package:").unwrap_or_default().to_string();
        let version = field(&text, "Version:").unwrap_or_default().to_string();
        if name.is_empty() || version.is_empty() {
            return Err(LabError::KernelPackage(format!("{}: no Package/Version fields", deb.display())));
        }
        return Ok((KernelPackage { name, version }, Some(deb)));
    }
    // apt-cache takes about a second per call here; remember the answer for as long as the apt
    // lists are unchanged.
    let fingerprint = apt_lists_fingerprint();
    let memo = cache.join("kernel-package.json");
    if let Some(fp) = &fingerprint {
        if let Ok(text) = std::fs::read_to_string(&memo) {
            if let Ok(m) = serde_json::from_str::<PackageMemo>(&text) {
                if &m.fingerprint == fp {
                    return Ok((m.package, None));
                }
            }
        }
    }
    let package = query_apt()?;
    if let Some(fingerprint) = fingerprint {
        let memo_tmp = cache.join(format!(".kernel-package.json.{}", std::process::id()));
        let json = serde_json::to_string(&PackageMemo { fingerprint, package: package.clone() });
        if let Ok(json) = json {
            if std::fs::write(&memo_tmp, json).is_ok() {
                let _ = std::fs::rename(&memo_tmp, &memo);
            }
        }
    }
    Ok((package, None))
}

#[derive(Serialize, Deserialize)]
struct PackageMemo {
    fingerprint: String,
    package: KernelPackage,
}

/// Names, sizes and mtimes of apt's package lists: changes whenever `apt-get update` changes them.
fn apt_lists_fingerprint() -> Option<String> {
    let mut entries: Vec<String> = std::fs::read_dir("/var/lib/apt/lists")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            let mtime = m.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
            Some(format!("{}:{}:{}", e.file_name().to_string_lossy(), m.len(), mtime.as_nanos()))
        })
        .collect();
    if entries.is_empty() {
        return None;
    }
    entries.sort();
    Some(sha_hex(&[entries.join("\n").as_bytes()]))
}

/// `linux-image-amd64` → the versioned kernel package it depends on.
fn query_apt() -> Result<KernelPackage, LabError> {
    let apt_cache = host::require("apt-cache", "apt")?;
    let no_lists =
        || LabError::KernelPackage("apt-cache knows no linux-image-amd64; run `apt-get update`".into());
    let out = host::run(Command::new(&apt_cache).args(["show", "--no-all-versions", "linux-image-amd64"]))
        .map_err(|_| no_lists())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let dep = field(&text, "Depends:")
        .into_iter()
        .flat_map(|d| d.split(','))
        .map(str::trim)
        .find(|d| d.starts_with("linux-image-") && d.contains("-amd64"))
        .ok_or_else(no_lists)?;
    // "linux-image-6.1.0-56-amd64 (= 6.1.192-2)"
    let (name, pinned) = match dep.split_once('(') {
        Some((n, v)) => {
            (n.trim().to_string(), v.trim_end_matches(')').trim().strip_prefix("= ").map(str::trim))
        }
        None => (dep.to_string(), None),
    };
    let version = match pinned {
        Some(v) => v.to_string(),
        None => {
            let out = host::run(Command::new(&apt_cache).args(["show", "--no-all-versions", &name]))?;
            let text = String::from_utf8_lossy(&out.stdout);
            field(&text, "Version:")
                .ok_or_else(|| LabError::KernelPackage(format!("apt-cache show {name}: no Version")))?
                .to_string()
        }
    };
    Ok(KernelPackage { name, version })
}

/// Everything that determines the base besides the kernel package.
struct Recipe {
    hash: String,
    modules: Vec<String>,
    busybox: PathBuf,
    rustc: PathBuf,
    rustc_version: String,
}

fn recipe(extra_modules: &[String]) -> Result<Recipe, LabError> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| host::which("busybox"))
        .ok_or_else(|| LabError::Missing {
            what: "busybox (Debian package busybox-static)".into(),
            hint: host::INSTALL_HINT.into(),
        })?;
    let bb = std::fs::read(&busybox).map_err(|e| LabError::io(&busybox, e))?;
    let rustc = rustc()?;
    let rustc_version =
        String::from_utf8_lossy(&host::run(Command::new(&rustc).arg("-vV"))?.stdout).into_owned();
    let mut modules: Vec<String> = DEFAULT_MODULES.iter().map(|s| s.to_string()).collect();
    for m in extra_modules {
        let m = crate::modules::module_name(m);
        if !modules.contains(&m) {
            modules.push(m);
        }
    }
    let joined = modules.join(",");
    let hash = sha_hex(&[
        FORMAT.as_bytes(),
        INIT.as_bytes(),
        RUNNER_SRC.as_bytes(),
        rustc_version.as_bytes(),
        &bb,
        joined.as_bytes(),
    ]);
    Ok(Recipe { hash, modules, busybox, rustc, rustc_version })
}

fn read_meta(dir: &Path) -> Option<BaseMeta> {
    let text = std::fs::read_to_string(dir.join("meta.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn base_at(dir: PathBuf, built_in: Option<Duration>) -> Option<Base> {
    let meta = read_meta(&dir)?;
    let bzimage = dir.join("vmlinuz");
    let kernel = if meta.pvh_vmlinux { dir.join("vmlinux") } else { bzimage.clone() };
    let cpio = dir.join("base.cpio");
    (kernel.is_file() && bzimage.is_file() && cpio.is_file()).then_some(Base {
        dir,
        kernel,
        bzimage,
        cpio,
        meta,
        built_in,
    })
}

/// Returns the cached base for the current kernel package, building it if needed.
pub(crate) fn prepare(extra_modules: &[String]) -> Result<Base, LabError> {
    let cache = host::lab_cache_dir()?;
    let recipe = recipe(extra_modules)?;
    let (package, local_deb) = match resolve_package(&cache) {
        Ok(p) => p,
        Err(e) => {
            // Offline or no apt lists: the newest cached base built from the same recipe will do.
            return newest_cached(&cache, &recipe.hash).ok_or(e);
        }
    };
    let key = &sha_hex(&[recipe.hash.as_bytes(), package.name.as_bytes(), package.version.as_bytes()])[..20];
    let dir = cache.join(key);
    if let Some(base) = base_at(dir.clone(), None) {
        return Ok(base);
    }
    let _lock = FileLock::exclusive(&cache.join(format!(".lock-{key}")))?;
    if let Some(base) = base_at(dir.clone(), None) {
        return Ok(base); // built by someone else while we waited
    }
    let started = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".build-{key}-"))
        .tempdir_in(&cache)
        .map_err(|e| LabError::io(&cache, e))?;
    let mut meta = build(tmp.path(), &cache, &recipe, &package, local_deb.as_deref())?;
    meta.build_secs = started.elapsed().as_secs_f64();
    let meta_path = tmp.path().join("meta.json");
    let json = serde_json::to_string_pretty(&meta).map_err(|e| LabError::Protocol(e.to_string()))?;
    std::fs::write(&meta_path, json).map_err(|e| LabError::io(&meta_path, e))?;
    let staged = tmp.keep();
    std::fs::rename(&staged, &dir).map_err(|e| LabError::io(&dir, e))?;
    base_at(dir.clone(), Some(started.elapsed())).ok_or_else(|| LabError::Missing {
        what: format!("the lab base just built in {}", dir.display()),
        hint: "check the cache directory's permissions".into(),
    })
}

fn newest_cached(cache: &Path, recipe: &str) -> Option<Base> {
    let mut best: Option<(std::time::SystemTime, Base)> = None;
    for entry in std::fs::read_dir(cache).ok()?.flatten() {
        let Some(base) = base_at(entry.path(), None) else { continue };
        if base.meta.recipe != recipe {
            continue;
        }
        let mtime = entry.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
        if best.as_ref().is_none_or(|(t, _)| mtime > *t) {
            best = Some((mtime, base));
        }
    }
    best.map(|(_, b)| b)
}

fn build(
    out: &Path,
    cache: &Path,
    recipe: &Recipe,
    package: &KernelPackage,
    local_deb: Option<&Path>,
) -> Result<BaseMeta, LabError> {
    let runner = runner_binary(cache, &recipe.rustc, &recipe.rustc_version)?;
    let work = out.join("work");
    std::fs::create_dir_all(&work).map_err(|e| LabError::io(&work, e))?;
    let deb = match local_deb {
        Some(d) => d.to_path_buf(),
        None => {
            host::require("apt-get", "apt")?;
            host::run(
                Command::new("apt-get")
                    .args(["download", "-q", &format!("{}={}", package.name, package.version)])
                    .current_dir(&work),
            )?;
            let found = std::fs::read_dir(&work)
                .map_err(|e| LabError::io(&work, e))?
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "deb"));
            found.ok_or_else(|| {
                LabError::KernelPackage(format!("apt-get download {} left no .deb", package.name))
            })?
        }
    };
    let root = work.join("root");
    host::require("dpkg-deb", "dpkg")?;
    host::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;

    let release = package
        .name
        .strip_prefix("linux-image-")
        .ok_or_else(|| LabError::KernelPackage(format!("unexpected package name {}", package.name)))?
        .to_string();
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    let kernel = out.join("vmlinuz");
    std::fs::copy(&vmlinuz, &kernel).map_err(|e| LabError::io(&vmlinuz, e))?;
    let pvh_vmlinux = extract_vmlinux(&kernel, &out.join("vmlinux"))?;
    let moddir = [root.join("lib/modules").join(&release), root.join("usr/lib/modules").join(&release)]
        .into_iter()
        .find(|p| p.is_dir())
        .ok_or_else(|| LabError::KernelPackage(format!("{}: no lib/modules/{release}", package.name)))?;
    let tree = ModuleTree::open(&moddir)?;
    let order = tree.closure(&recipe.modules)?;

    let cpio_path = out.join("base.cpio");
    let file = std::fs::File::create(&cpio_path).map_err(|e| LabError::io(&cpio_path, e))?;
    let mut w = CpioWriter::new(std::io::BufWriter::new(file));
    let io = |e| LabError::io(&cpio_path, e);
    for d in ["dev", "proc", "sys", "run", "root", "etc", "mnt", "lab", "bin", "sbin", "usr/bin", "usr/sbin"]
    {
        w.dir(d, 0o755).map_err(io)?;
    }
    w.dir("tmp", 0o1777).map_err(io)?;
    w.chardev("dev/console", 0o600, 5, 1).map_err(io)?;
    w.chardev("dev/null", 0o666, 1, 3).map_err(io)?;
    w.file("init", 0o755, INIT.as_bytes()).map_err(io)?;
    w.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n").map_err(io)?;
    w.file("etc/group", 0o644, b"root:x:0:\nkvm:x:101:\n").map_err(io)?;
    w.file("etc/hostname", 0o644, b"lab\n").map_err(io)?;
    add_host_file(&mut w, &recipe.busybox, "bin/busybox", 0o755)?;
    for lib in host::ldd_closure(&recipe.busybox)? {
        add_host_file(&mut w, &lib, &lib.to_string_lossy(), 0o755)?;
    }
    let applets = host::run(Command::new(&recipe.busybox).arg("--list-full"))?;
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "bin/busybox" || applet.ends_with("/init") {
            continue;
        }
        w.symlink(applet, "/bin/busybox").map_err(io)?;
    }
    add_host_file(&mut w, &runner, "lab/runner", 0o755)?;
    let mut names = String::new();
    for (name, path) in &order {
        add_host_file(&mut w, path, &format!("lab/modules/{name}.ko"), 0o644)?;
        names.push_str(name);
        names.push('\n');
    }
    w.file("lab/modules.order", 0o644, names.as_bytes()).map_err(io)?;
    let mut inner = w.finish().map_err(io)?;
    inner.flush().map_err(io)?;
    std::fs::remove_dir_all(&work).map_err(|e| LabError::io(&work, e))?;
    Ok(BaseMeta {
        package: package.clone(),
        kernel_release: release,
        recipe: recipe.hash.clone(),
        modules: order.into_iter().map(|(n, _)| n).collect(),
        build_secs: 0.0,
        pvh_vmlinux,
    })
}

/// Decompresses the ELF vmlinux out of a bzImage; keeps it only if it has a PVH entry note.
fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<bool, LabError> {
    let data = std::fs::read(bzimage).map_err(|e| LabError::io(bzimage, e))?;
    let candidates: [(&[u8], &str, &[&str]); 3] = [
        (b"\xfd7zXZ\x00", "xz", &["-dc", "--single-stream"]),
        (b"\x28\xb5\x2f\xfd", "zstd", &["-dcq"]),
        (b"\x1f\x8b\x08\x00", "gzip", &["-dcq"]),
    ];
    for (magic, tool, args) in candidates {
        let Some(pos) = data.windows(magic.len()).position(|w| w == magic) else { continue };
        let Some(tool) = host::which(tool) else { continue };
        let file = std::fs::File::create(out).map_err(|e| LabError::io(out, e))?;
        let mut child = match Command::new(tool)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(file)
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(_) => continue,
        };
        if let Some(mut stdin) = child.stdin.take() {
            // Trailing data after the stream makes some decompressors stop early with an error,
            // which is fine: the ELF check below decides.
            let _ = stdin.write_all(&data[pos..]);
        }
        let _ = child.wait();
        let elf = std::fs::read(out).map_err(|e| LabError::io(out, e))?;
        if crate::modules::has_pvh_note(&elf) {
            return Ok(true);
        }
    }
    let _ = std::fs::remove_file(out);
    Ok(false)
}

/// Adds a host file (following symlinks) to an archive.
pub(crate) fn add_host_file<W: Write>(
    w: &mut CpioWriter<W>,
    src: &Path,
    dst: &str,
    perm: u32,
) -> Result<(), LabError> {
    let mut f = std::fs::File::open(src).map_err(|e| LabError::io(src, e))?;
    let len = f.metadata().map_err(|e| LabError::io(src, e))?.len();
    w.file_from(dst, perm, len, &mut f).map_err(|e| LabError::io(src, e))
}
