//! The network benchmark: host↔guest TCP throughput over virtio-net on a tap, kiln-vmm against QEMU
//! microvm (userspace virtio-net, no vhost in either), same kernel, initramfs, vCPUs and memory, in
//! one lab run.
//!
//! Inside the lab a tap (`169.254.100.1/30`) is made once. Each VMM boot runs the busybox guest with
//! `ip=169.254.100.2` and a loop of `rounds` transfers each way: the guest accepts one connection on
//! port 5001 and discards it (host → guest), then sends a `bytes`-long file of zeros to the host's
//! port 5002 (guest → host; `nc < file`, the file made in tmpfs once per boot before the first
//! round, so nothing but `nc` and the guest's stack run during the transfer). The lab side is `kiln-bench netpump` (this module's [`pump`]): it connects to the
//! guest and sends, closing its write side and timing until the guest closes (so every byte reached
//! the guest's reader), and it accepts the guest's connection and times until `bytes` arrived. The
//! same code times every VMM; boots alternate between VMMs.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::lab::{qemu_microvm_command, sh_quote, Vmm};
use crate::stats::{summarize, Summary};

pub const GUEST_IP: &str = "169.254.100.2";
const LAB_IP: &str = "169.254.100.1";
const H2G_PORT: u16 = 5001;
const G2H_PORT: u16 = 5002;
/// What the guest sends, made once per boot in tmpfs (the init mounts /dev/shm), so the timed
/// transfer is `nc` alone: no `dd` and pipe competing for the guest's one vCPU.
const G2H_FILE: &str = "/dev/shm/g2h";

/// One transfer's measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transfer {
    pub direction: String,
    pub bytes: u64,
    pub secs: f64,
}

impl Transfer {
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.secs
    }
}

/// Connects to `addr`, retrying while nothing listens yet (the guest may still be booting).
fn connect_retrying(addr: SocketAddr, within: Duration) -> Result<TcpStream> {
    let deadline = Instant::now() + within;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => bail!("connecting to {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Accepts one connection on `listener`, failing after `within` (a guest that never connects must
/// not hold the lab step forever).
fn accept_within(listener: &TcpListener, within: Duration) -> Result<TcpStream> {
    listener.set_nonblocking(true).context("listener")?;
    let deadline = Instant::now() + within;
    loop {
        match listener.accept() {
            Ok((c, _)) => {
                c.set_nonblocking(false).context("accepted socket")?;
                return Ok(c);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                bail!("the guest did not connect within {within:?}")
            }
            Err(e) => return Err(e).context("accepting the guest's connection"),
        }
    }
}

/// The lab's listener for the guest's sends, and the guest's address for ours ([`pump`]).
pub fn lab_sockets(guest: &str) -> Result<(TcpListener, SocketAddr)> {
    let listener =
        TcpListener::bind((LAB_IP, G2H_PORT)).with_context(|| format!("binding {LAB_IP}:{G2H_PORT}"))?;
    let guest = format!("{guest}:{H2G_PORT}").parse().context("guest address")?;
    Ok((listener, guest))
}

/// The lab side of `rounds` transfers each way (see the module doc): accepts the guest's sends on
/// `listener`, connects to `guest_addr` for its own. Prints nothing; returns the transfers.
pub fn pump(
    listener: TcpListener,
    guest_addr: SocketAddr,
    rounds: usize,
    bytes: u64,
    timeout: Duration,
) -> Result<Vec<Transfer>> {
    let chunk = vec![0u8; 256 * 1024];
    let mut out = Vec::new();
    for _ in 0..rounds {
        // Host -> guest: the clock starts once connected (booting is not networking).
        let mut s = connect_retrying(guest_addr, timeout)?;
        s.set_read_timeout(Some(timeout)).context("socket timeout")?;
        s.set_write_timeout(Some(timeout)).context("socket timeout")?;
        let start = Instant::now();
        let mut left = bytes;
        while left > 0 {
            let n = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
            s.write_all(&chunk[..n]).context("sending to the guest")?;
            left -= n as u64;
        }
        s.shutdown(Shutdown::Write).context("closing the write side")?;
        let mut sink = [0u8; 64];
        while s.read(&mut sink).context("waiting for the guest to close")? > 0 {}
        out.push(Transfer { direction: "h2g".into(), bytes, secs: start.elapsed().as_secs_f64() });

        // Guest -> host: from the guest's connection to the last expected byte.
        let mut c = accept_within(&listener, timeout)?;
        c.set_read_timeout(Some(timeout)).context("socket timeout")?;
        let start = Instant::now();
        let mut got = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        while got < bytes {
            let n = c.read(&mut buf).context("receiving from the guest")?;
            if n == 0 {
                bail!("the guest closed after {got} of {bytes} bytes");
            }
            got += n as u64;
        }
        out.push(Transfer { direction: "g2h".into(), bytes: got, secs: start.elapsed().as_secs_f64() });
    }
    Ok(out)
}

/// What the network lab run does.
#[derive(Debug, Clone)]
pub struct NetPlan {
    pub kiln_vmm: PathBuf,
    pub qemu: PathBuf,
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    /// Boots per VMM.
    pub boots: usize,
    /// Transfers each way per boot.
    pub rounds: usize,
    pub bytes: u64,
    pub mem_mib: u64,
}

const KERNEL_ARGS: &str =
    "console=ttyS0 panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd quiet";

impl NetPlan {
    pub fn vmms() -> [Vmm; 2] {
        [Vmm::Kiln, Vmm::Qemu]
    }

    /// Kernel command line; the guest's side of the transfers runs after ` -- `.
    pub fn cmdline(&self, vmm: Vmm) -> String {
        // QEMU would append its virtio_mmio.device= after ` -- `, where the kernel hands it to init
        // (see scripts/guest-assets): auto-kernel-cmdline=off, and the net device (QEMU 7.2 puts
        // the first device on its last transport) is named before ` -- ` here.
        let reboot = if vmm == Vmm::Qemu {
            "reboot=t acpi=off virtio_mmio.device=512@0xfeb00e00:12"
        } else {
            "reboot=k"
        };
        let count = self.bytes.div_ceil(65536);
        format!(
            "{KERNEL_ARGS} {reboot} ip={GUEST_IP}::{LAB_IP}:255.255.255.252::eth0:off -- \
             dd if=/dev/zero of={G2H_FILE} bs=65536 count={count} 2>/dev/null; \
             for i in $(seq {r}); do nc -l -p {H2G_PORT} >/dev/null; \
             nc {LAB_IP} {G2H_PORT} <{G2H_FILE}; done",
            r = self.rounds
        )
    }

    fn kiln_config(&self) -> Vec<u8> {
        serde_json::json!({
            "boot-source": {
                "kernel_image_path": "/lab/vmlinux",
                "initrd_path": "/lab/initramfs.cpio.gz",
                "boot_args": self.cmdline(Vmm::Kiln),
            },
            "machine-config": { "vcpu_count": 1, "mem_size_mib": self.mem_mib },
            "network-interfaces": [
                {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:a9:fe:64:02"}
            ]
        })
        .to_string()
        .into_bytes()
    }

    pub fn vmm_command(&self, vmm: Vmm) -> Vec<String> {
        let s = |x: &str| x.to_string();
        match vmm {
            Vmm::Qemu => qemu_microvm_command(
                "microvm,pit=on,acpi=off,auto-kernel-cmdline=off",
                self.mem_mib,
                1,
                &[
                    "-netdev",
                    "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off",
                    "-device",
                    "virtio-net-device,netdev=n0,mac=06:00:a9:fe:64:02",
                ],
                self.cmdline(vmm),
            ),
            _ => vec![
                s("/usr/bin/kiln-vmm"),
                s("--no-api"),
                s("--no-stdin"),
                s("--config-file"),
                s("/lab/net.json"),
            ],
        }
    }

    /// One boot: the VMM in the background, the pump, then the VMM's exit.
    fn step_command(&self, vmm: Vmm) -> String {
        let vmm_cmd = self.vmm_command(vmm).iter().map(|w| sh_quote(w)).collect::<Vec<_>>().join(" ");
        format!(
            "{vmm_cmd} >/tmp/console.log 2>/tmp/vmm.log & VMM=$!\n\
             timeout 600 /usr/bin/kiln-bench netpump --guest {GUEST_IP} --rounds {r} --bytes {b}; rc=$?\n\
             timeout 120 sh -c \"while kill -0 $VMM 2>/dev/null; do sleep 0.2; done\" || kill -9 $VMM\n\
             wait $VMM; echo \"vmm-exit=$?\" >&2\n\
             if [ $rc != 0 ]; then tail -c 3000 /tmp/console.log >&2; tail -c 2000 /tmp/vmm.log >&2; fi\n\
             exit $rc",
            r = self.rounds,
            b = self.bytes
        )
    }

    /// Runs the lab; per VMM, every transfer that completed, and the failures.
    pub fn run(&self, bench_exe: &std::path::Path) -> Result<NetOutcome> {
        let mut lab = kiln_lab::Lab::new()
            .context("preparing the lab")?
            .binary(bench_exe, "/usr/bin/kiln-bench")
            .binary(&self.kiln_vmm, "/usr/bin/kiln-vmm")
            .binary(&self.qemu, "/usr/bin/qemu-system-x86_64")
            .binary("/usr/sbin/ip", "/usr/sbin/ip")
            .dir("/usr/share/qemu", "/usr/share/qemu")
            .dir("/usr/share/seabios", "/usr/share/seabios")
            .file(&self.vmlinux, "/lab/vmlinux")
            .file(&self.initramfs, "/lab/initramfs.cpio.gz")
            .file_bytes(self.kiln_config(), "/lab/net.json", 0o644)
            .step(
                "tap",
                &format!(
                    "/usr/sbin/ip tuntap add tap0 mode tap && /usr/sbin/ip addr add {LAB_IP}/30 dev tap0 \
                     && /usr/sbin/ip link set tap0 up"
                ),
            );
        let mut names = Vec::new();
        for i in 0..self.boots {
            let mut order = Self::vmms().to_vec();
            order.rotate_left(i % 2);
            for vmm in order {
                let name = format!("{}-net-{}", vmm.key(), i + 1);
                lab = lab.step(&name, &self.step_command(vmm));
                names.push((name, vmm));
            }
        }
        let steps = u32::try_from(names.len()).unwrap_or(u32::MAX);
        lab = lab.timeout(Duration::from_secs(300) + Duration::from_secs(240).saturating_mul(steps));
        let report = lab.run_with(crate::lab::echo_live_output).context("running the lab")?;
        if let Ok(s) = report.step("tap") {
            if s.exit_code != 0 {
                bail!("making the tap in the lab failed: {}", s.stderr_str());
            }
        }
        let mut out = NetOutcome::default();
        for (name, vmm) in names {
            match report.step(&name) {
                Err(e) => out.failures.push((name, format!("{e}"))),
                Ok(s) if s.exit_code != 0 => {
                    out.failures.push((name, format!("exit {}: {}", s.exit_code, s.stderr_str())))
                }
                Ok(s) => match serde_json::from_str::<Vec<Transfer>>(s.stdout_str().trim()) {
                    Ok(t) => out.transfers.extend(t.into_iter().map(|t| (vmm, t))),
                    Err(e) => {
                        out.failures.push((name, format!("unreadable pump output ({e}): {}", s.stdout_str())))
                    }
                },
            }
        }
        Ok(out)
    }
}

/// Every transfer, tagged with its VMM, and the boots that failed.
#[derive(Debug, Default)]
pub struct NetOutcome {
    pub transfers: Vec<(Vmm, Transfer)>,
    pub failures: Vec<(String, String)>,
}

impl NetOutcome {
    /// MiB/s summary for `vmm` in `direction`.
    pub fn summary(&self, vmm: Vmm, direction: &str) -> Option<Summary> {
        let v: Vec<f64> = self
            .transfers
            .iter()
            .filter(|(m, t)| *m == vmm && t.direction == direction)
            .map(|(_, t)| t.mib_per_s())
            .collect();
        summarize(&v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> NetPlan {
        NetPlan {
            kiln_vmm: "/k".into(),
            qemu: "/q".into(),
            vmlinux: "/v".into(),
            initramfs: "/i".into(),
            boots: 2,
            rounds: 3,
            bytes: 64 << 20,
            mem_mib: 256,
        }
    }

    #[test]
    fn the_guest_command_fits_the_kernels_init_argument_limit() {
        let p = plan();
        let cmd = p.cmdline(Vmm::Kiln);
        let after = cmd.split(" -- ").nth(1).unwrap_or_default();
        // The kernel hands init at most 32 arguments (argv[0] included).
        assert!(after.split_whitespace().count() < 31, "{after}");
        assert!(after.contains("count=1024"));
        // The timed send is nc reading a file made before the rounds, not a pipe.
        let (prepare, rounds) = after.split_once("; for i in").unwrap();
        assert!(prepare.starts_with("dd if=/dev/zero of=/dev/shm/g2h "), "{prepare}");
        assert!(rounds.contains("nc 169.254.100.1 5002 </dev/shm/g2h;") && !rounds.contains('|'), "{rounds}");
        // QEMU's guest must find its NIC: the device is named before ` -- ` (QEMU's own appending
        // is off), and the rest is the same guest.
        let qemu = p.cmdline(Vmm::Qemu);
        let (qemu_kernel_args, qemu_guest) = qemu.split_once(" -- ").unwrap();
        assert!(qemu_kernel_args.contains("virtio_mmio.device=512@0xfeb00e00:12"), "{qemu}");
        assert_eq!(qemu_guest, after);
    }

    #[test]
    fn pump_measures_both_directions_against_a_fake_guest() {
        // The fake guest does what the busybox guest does: drain one connection, then send.
        let guest = TcpListener::bind("127.0.0.1:0").unwrap();
        let guest_addr = guest.local_addr().unwrap();
        let lab = TcpListener::bind("127.0.0.1:0").unwrap();
        let listen = lab.local_addr().unwrap();
        let bytes = 3 << 20;
        let fake = std::thread::spawn(move || {
            for _ in 0..2 {
                let (mut c, _) = guest.accept().unwrap();
                let mut n = 0;
                let mut buf = [0u8; 65536];
                loop {
                    let r = c.read(&mut buf).unwrap();
                    if r == 0 {
                        break;
                    }
                    n += r;
                }
                assert_eq!(n, bytes);
                drop(c);
                let mut s = connect_retrying(listen, Duration::from_secs(5)).unwrap();
                s.write_all(&vec![0u8; bytes]).unwrap();
            }
        });
        let t = pump(lab, guest_addr, 2, bytes as u64, Duration::from_secs(10)).unwrap();
        fake.join().unwrap();
        let dirs: Vec<&str> = t.iter().map(|t| t.direction.as_str()).collect();
        assert_eq!(dirs, ["h2g", "g2h", "h2g", "g2h"]);
        assert!(t.iter().all(|t| t.bytes == bytes as u64 && t.secs > 0.0 && t.mib_per_s() > 0.0));
    }
}
