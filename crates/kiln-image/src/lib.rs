//! OCI images in, root filesystems and kernels out.
//!
//! Owns: image references, the registry client (distribution API v2: Bearer and Basic auth, HTTPS
//! trusting the system CA bundle and per-registry `certs.d` CAs and client certificates, plain HTTP
//! only for loopback or explicitly allowed registries), the content-addressed blob store and
//! image index under `<root>/images` (every blob's digest and size verified before it is stored;
//! index written atomically under file locks), importing `oci-layout` directories and archives and
//! `docker save` archives, applying layers to a staging directory (whiteouts, opaque directories,
//! hardlinks, devices), turning that into an ext4 image with `mkfs.ext4 -d` (no mounts, no root)
//! cached per image, per-VM copies of it (reflink or sparse copy, optionally grown), and kernels
//! carried in images (`/boot/vmlinux`).
//!
//! Must not: trust a tar entry's path (absolute paths, `..`, symlink and hardlink escapes are refused;
//! nothing is ever written outside the staging directory), store an unverified blob, or print to the
//! terminal (progress goes to a [`Progress`] the caller renders).

pub mod digest;
pub mod disk;
pub mod error;
pub mod images;
pub mod import;
pub mod kernel;
pub mod oci;
pub mod progress;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod rootfs;
pub mod store;
pub mod unpack;

pub use digest::Digest;
pub use disk::CopyMethod;
pub use error::{ImageError, Result};
pub use images::{ImageDetails, ImageStore, ImageSummary, RemoveReport, RootfsImage};
pub use kernel::KernelSource;

pub use progress::{BlobKind, NoProgress, Progress, ProgressEvent};
pub use reference::Reference;
pub use registry::auth::{Anonymous, CredentialSource, Credentials, DockerConfig, StaticCredentials};
pub use registry::RegistryOptions;
pub use rootfs::{AddedFile, RootfsOptions};
pub use store::PruneReport;
pub use unpack::UnpackOptions;
