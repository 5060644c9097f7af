//! The host side of virtio-net: an existing tap device, attached through `/dev/net/tun` with a
//! virtio-net header in front of every frame (`IFF_VNET_HDR`), non-blocking.
//!
//! The raw `ioctl`s and `writev` live here and nowhere else in the device.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

use vm_memory::volatile_memory::PtrGuard;

use super::NetError;

const TUN_PATH: &str = "/dev/net/tun";

// ioctl numbers from <linux/if_tun.h>: _IOW('T', nr, int).
const TUNSETIFF: libc::Ioctl = 0x4004_54ca;
#[cfg(test)]
const TUNSETPERSIST: libc::Ioctl = 0x4004_54cb;
const TUNSETOFFLOAD: libc::Ioctl = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::Ioctl = 0x4004_54d8;

const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;

/// TUNSETOFFLOAD flags: which offloaded (partially checksummed, GSO) frames the tap may hand us.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_UFO: u32 = 0x10;

/// Most pieces one frame may be gathered from (the kernel's `UIO_MAXIOV`).
pub(super) const MAX_PIECES: usize = 1024;

/// `IFNAMSIZ` including the terminating NUL.
const IFNAMSIZ: usize = 16;

/// `struct ifreq` as TUNSETIFF uses it: the name, then the flags (a short) in the union, padded
/// to the 40 bytes of the kernel's struct.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: u16,
    _pad: [u8; 22],
}

/// Checks an interface name the way the kernel will (`dev_valid_name`).
pub(super) fn check_name(name: &str) -> Result<(), NetError> {
    let why = if name.is_empty() {
        Some("empty")
    } else if name.len() >= IFNAMSIZ {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("reserved")
    } else if name.bytes().any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace()) {
        Some("contains '/', ':', NUL or whitespace")
    } else {
        None
    };
    match why {
        Some(why) => Err(NetError::InvalidTapName { name: name.to_owned(), why }),
        None => Ok(()),
    }
}

fn ifreq(name: &str, flags: u16) -> IfReq {
    let mut req = IfReq { name: [0; IFNAMSIZ], flags, _pad: [0; 22] };
    // check_name guaranteed name.len() < IFNAMSIZ.
    let n = name.len().min(IFNAMSIZ - 1);
    req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    req
}

/// Whether a network interface of that name exists in this thread's network namespace.
fn interface_exists(name: &str) -> bool {
    let Ok(cname) = CString::new(name) else { return false };
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call; the call only
    // reads it.
    unsafe { libc::if_nametoindex(cname.as_ptr()) != 0 }
}

fn open_tun() -> io::Result<File> {
    OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(TUN_PATH)
}

/// `ioctl(fd, req, &value)` for the TUNSET* calls that take a pointer to an int.
fn ioctl_int_ptr(fd: &File, req: libc::Ioctl, value: u32) -> io::Result<()> {
    let v: libc::c_int = value as libc::c_int;
    // SAFETY: `fd` is an open /dev/net/tun fd; `req` is a TUNSET* request that reads one int
    // through the pointer, which points at a live local for the whole call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req, &v as *const libc::c_int) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `ioctl(fd, req, value)` for the TUNSET* calls that take the int by value.
fn ioctl_int_val(fd: &File, req: libc::Ioctl, value: libc::c_ulong) -> io::Result<()> {
    // SAFETY: `fd` is an open /dev/net/tun fd; `req` is a TUNSET* request that takes its
    // argument by value and touches no user memory.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req, value) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn set_iff(fd: &File, name: &str, flags: u16) -> io::Result<()> {
    let mut req = ifreq(name, flags);
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` has its layout and size
    // (40 bytes) and lives for the whole call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An attached tap (or, in unit tests, any non-blocking packet fd standing in for one).
pub(super) struct Tap {
    file: File,
    name: String,
    /// False for test stand-ins, which take no ioctls.
    is_tap: bool,
}

impl Tap {
    /// Attaches to the existing tap `name` with a `vnet_hdr_len`-byte virtio-net header.
    pub(super) fn open(name: &str, vnet_hdr_len: u32) -> Result<Tap, NetError> {
        check_name(name)?;
        // TUNSETIFF would create a missing tap (we may have the capability to); the VMM must only
        // use taps that the network setup made, so check first.
        if !interface_exists(name) {
            return Err(NetError::TapMissing { name: name.to_owned() });
        }
        let file = open_tun().map_err(|source| match source.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => NetError::TunPermission { source },
            _ => NetError::OpenTun { source },
        })?;
        set_iff(&file, name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).map_err(|source| {
            let name = name.to_owned();
            match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => NetError::TapPermission { name, source },
                Some(libc::EBUSY) => NetError::TapBusy { name, source },
                Some(libc::EINVAL) => NetError::NotATap { name, source },
                _ => NetError::Attach { name, source },
            }
        })?;
        let cfg_err = |what: &'static str| {
            let name = name.to_owned();
            move |source| NetError::Configure { name, what, source }
        };
        ioctl_int_ptr(&file, TUNSETVNETHDRSZ, vnet_hdr_len).map_err(cfg_err("set the vnet header size"))?;
        let tap = Tap { file, name: name.to_owned(), is_tap: true };
        tap.set_offload(0).map_err(cfg_err("clear offloads"))?;
        Ok(tap)
    }

    /// A stand-in for a tap (a SOCK_SEQPACKET socket, say), for unit tests.
    #[cfg(test)]
    pub(super) fn from_file(file: File, name: &str) -> Tap {
        Tap { file, name: name.to_owned(), is_tap: false }
    }

    pub(super) fn name(&self) -> &str {
        &self.name
    }

    pub(super) fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Which offloaded frames the tap may pass up to us (TUN_F_*).
    pub(super) fn set_offload(&self, flags: u32) -> io::Result<()> {
        if !self.is_tap {
            return Ok(());
        }
        ioctl_int_val(&self.file, TUNSETOFFLOAD, libc::c_ulong::from(flags))
    }

    /// Reads one frame (with its vnet header). `Ok(None)` when none is queued.
    pub(super) fn read_frame(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match (&self.file).read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes one frame (with its vnet header) gathered from `pieces` of guest memory, at most
    /// [`MAX_PIECES`] of them, `total` bytes together.
    pub(super) fn write_pieces(&self, pieces: &[PtrGuard], total: usize) -> io::Result<()> {
        if pieces.len() > MAX_PIECES {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let iovs: Vec<libc::iovec> = pieces
            .iter()
            .map(|p| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() })
            .collect();
        let count =
            libc::c_int::try_from(iovs.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        loop {
            // SAFETY: each iovec describes a range of guest memory that vm-memory checked to lie
            // inside a mapped region and whose mapping the caller's guards (and the borrowed
            // guest memory) keep alive for the whole call; writev only reads through them, and
            // `iovs` lives across the call with `count` entries.
            let n = unsafe { libc::writev(self.file.as_raw_fd(), iovs.as_ptr(), count) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            // A tap takes a frame whole or not at all.
            return match usize::try_from(n) {
                Ok(n) if n == total => Ok(()),
                _ => Err(io::Error::other(format!("short write to the tap: {n} of {total} bytes"))),
            };
        }
    }
}

/// Creates a persistent tap `name` (no owner) in the calling thread's network namespace, for
/// tests.
#[cfg(test)]
pub(super) fn create_persistent_tap(name: &str) -> io::Result<()> {
    let file = open_tun()?;
    set_iff(&file, name, IFF_TAP | IFF_NO_PI)?;
    ioctl_int_val(&file, TUNSETPERSIST, 1)
}
