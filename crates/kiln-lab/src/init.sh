#!/bin/busybox sh
# The lab's /init (kiln-lab). PID 1 in the lab VM: mounts, loads the kvm modules, waits for the
# disks, then hands PID 1 to the step runner, which reports on ttyS1 and reboots the VM when done.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm /sys/fs/cgroup
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
echo "lab: init $(cut -d' ' -f1 /proc/uptime)s"
# Module parameters come from the kernel command line as `module.param=value`, as modprobe does.
while read -r m; do
  params=$(tr ' ' '\n' < /proc/cmdline | sed -n "s/^$m\.//p" | tr '\n' ' ')
  # shellcheck disable=SC2086 # one word per parameter
  insmod "/lab/modules/$m.ko" $params || echo "lab: insmod $m $params failed"
done < /lab/modules.order
hostname lab
ip link set lo up 2>/dev/null
disks=$(sed -n 's/.*kiln\.disks=\([0-9]*\).*/\1/p' /proc/cmdline)
i=0
while [ "$(ls /dev/vd? 2>/dev/null | wc -l)" -lt "${disks:-0}" ] && [ "$i" -lt 1000 ]; do
  sleep 0.01; i=$((i+1))
done
[ -e /dev/kvm ] || echo "lab: no /dev/kvm"
echo "lab: runner $(cut -d' ' -f1 /proc/uptime)s"
exec /lab/runner run /lab/scenario /dev/ttyS1
echo "lab: cannot start the step runner"
reboot -f
