//! The kernel store: `<root>/kernels/<name>/vmlinux` plus `kernel.json`, and `<root>/kernels/DEFAULT`
//! naming the kernel used when a VM names none (the first one imported, or one imported with
//! `default`). Kernels come from a file, an OCI image carrying `/boot/vmlinux`, or a build with the
//! repository's config fragment (`scripts/guest-assets`).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln_image::store::write_atomic;
use kiln_image::{ImageStore, KernelSource, Progress};
use serde::{Deserialize, Serialize};

use crate::error::{io_err, ManagerError, Result};

const DEFAULT_FILE: &str = "DEFAULT";
const KERNEL_FILE: &str = "vmlinux";
const INFO_FILE: &str = "kernel.json";

/// One stored kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    pub name: String,
    /// Where it came from (a path or an image name).
    pub source: String,
    pub size: u64,
    pub imported_at: u64,
    #[serde(default)]
    pub default: bool,
}

/// The kernel store.
#[derive(Debug, Clone)]
pub struct KernelStore {
    dir: PathBuf,
}

impl KernelStore {
    pub fn open(root: &Path) -> Result<Self> {
        let dir = root.join("kernels");
        fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        Ok(KernelStore { dir })
    }

    fn default_name(&self) -> Option<String> {
        fs::read_to_string(self.dir.join(DEFAULT_FILE)).ok().map(|s| s.trim().to_string())
    }

    /// All kernels, by name.
    pub fn list(&self) -> Result<Vec<KernelInfo>> {
        let default = self.default_name();
        let mut out = Vec::new();
        for dirent in fs::read_dir(&self.dir).map_err(io_err("listing", &self.dir))? {
            let path = dirent.map_err(io_err("listing", &self.dir))?.path().join(INFO_FILE);
            let Ok(bytes) = fs::read(&path) else { continue };
            let Ok(mut info) = serde_json::from_slice::<KernelInfo>(&bytes) else { continue };
            info.default = default.as_deref() == Some(info.name.as_str());
            out.push(info);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The kernel file of `name`, or of the default kernel.
    pub fn resolve(&self, name: Option<&str>) -> Result<(String, PathBuf)> {
        let name = match name {
            Some(n) => n.to_string(),
            None => self.default_name().ok_or(ManagerError::NoDefaultKernel)?,
        };
        let path = self.dir.join(&name).join(KERNEL_FILE);
        if kiln_hypervisor::spec::is_valid_name(&name) && path.is_file() {
            Ok((name, path))
        } else if name.is_empty() {
            Err(ManagerError::NoDefaultKernel)
        } else {
            Err(ManagerError::NoSuchKernel(name))
        }
    }

    /// Imports a kernel file or the kernel of an image (a path that exists is a file; anything else
    /// is an image name, pulled into the image store first if needed by the caller).
    pub fn import(
        &self,
        images: &ImageStore,
        source: &str,
        name: Option<&str>,
        make_default: bool,
        progress: &dyn Progress,
    ) -> Result<KernelInfo> {
        let (kernel_source, default_name) = if Path::new(source).exists() {
            let stem = Path::new(source).file_name().map(|s| s.to_string_lossy().into_owned());
            (KernelSource::File(PathBuf::from(source)), stem.unwrap_or_else(|| "kernel".into()))
        } else {
            let repo = source.rsplit('/').next().unwrap_or(source);
            let short = repo.split([':', '@']).next().unwrap_or(repo).to_string();
            (KernelSource::Image(source.to_string()), short)
        };
        let name = name.map(str::to_string).unwrap_or_else(|| sanitize(&default_name));
        if !kiln_hypervisor::spec::is_valid_name(&name) {
            return Err(ManagerError::InvalidInput {
                what: "kernel name",
                detail: format!("{name:?}: use 1-64 characters of A-Z, a-z, 0-9 or '-' (--name)"),
            });
        }
        let dir = self.dir.join(&name);
        if dir.exists() {
            return Err(ManagerError::KernelExists(name));
        }
        let file = images.kernel(&kernel_source, progress)?;
        let tmp = self.dir.join(format!(".tmp-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(io_err("creating", &tmp))?;
        let result = (|| -> Result<KernelInfo> {
            let dest = tmp.join(KERNEL_FILE);
            let size = fs::copy(&file, &dest).map_err(io_err("copying the kernel to", &dest))?;
            let info = KernelInfo {
                name: name.clone(),
                source: source.to_string(),
                size,
                imported_at: crate::now_secs(),
                default: false,
            };
            let json = serde_json::to_vec_pretty(&info).unwrap_or_default();
            write_atomic(&tmp.join(INFO_FILE), &json)?;
            fs::rename(&tmp, &dir).map_err(io_err("storing the kernel in", &dir))?;
            Ok(info)
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        let mut info = result?;
        if make_default || self.default_name().is_none_or(|d| !self.dir.join(d).is_dir()) {
            write_atomic(&self.dir.join(DEFAULT_FILE), name.as_bytes())?;
            info.default = true;
        }
        Ok(info)
    }

    /// Makes `name` the default kernel.
    pub fn set_default(&self, name: &str) -> Result<()> {
        self.resolve(Some(name))?;
        Ok(write_atomic(&self.dir.join(DEFAULT_FILE), name.as_bytes())?)
    }

    /// Removes a kernel (the caller checks no VM uses it).
    pub fn remove(&self, name: &str) -> Result<()> {
        self.resolve(Some(name))?;
        let dir = self.dir.join(name);
        fs::remove_dir_all(&dir).map_err(io_err("removing", &dir))?;
        if self.default_name().as_deref() == Some(name) {
            match fs::remove_file(self.dir.join(DEFAULT_FILE)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_err("removing", &self.dir.join(DEFAULT_FILE))(e))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Builds the guest kernel with the repository's config fragment (`scripts/guest-assets`, which
    /// uses Debian's `linux-source`; cached by its inputs) and returns the vmlinux path.
    pub fn build(repo: &Path) -> Result<PathBuf> {
        let script = repo.join("scripts/guest-assets");
        if !script.is_file() {
            return Err(ManagerError::KernelBuild(format!(
                "{} not found: run `kiln kernel build` inside a Kiln source tree or set KILN_REPO",
                script.display()
            )));
        }
        let output = Command::new("bash")
            .arg(&script)
            .current_dir(repo)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|source| ManagerError::ToolMissing { tool: "bash", package: "bash", source })?;
        if !output.status.success() {
            return Err(ManagerError::KernelBuild(format!(
                "{} failed ({}); its output above says why",
                script.display(),
                output.status
            )));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("KILN_VMLINUX="))
            .map(|v| PathBuf::from(v.trim_matches(['\'', '"'])))
            .ok_or_else(|| ManagerError::KernelBuild(format!("{} printed no KILN_VMLINUX", script.display())))
    }
}

/// A kernel name from a file or image name: invalid characters become '-'.
fn sanitize(s: &str) -> String {
    let mut out: String =
        s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
    out.truncate(kiln_hypervisor::spec::MAX_NAME_LEN);
    if out.is_empty() {
        out.push_str("kernel");
    }
    out
}
