//! Kernels: a file on the host, or an OCI image carrying one at `/boot/vmlinux` (Ignite's convention;
//! `/boot/vmlinuz` and `/boot/bzImage` are accepted too).

use std::path::PathBuf;

/// Where a kernel comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelSource {
    /// A vmlinux (ELF) or bzImage file on the host.
    File(PathBuf),
    /// An image reference or ID whose root filesystem carries the kernel.
    Image(String),
}

/// Paths (inside an image) searched for a kernel, in order.
pub const KERNEL_PATHS: [&str; 3] = ["boot/vmlinux", "boot/vmlinuz", "boot/bzImage"];
