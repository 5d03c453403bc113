#!/bin/sh
# mmdebstrap --customize-hook: turns the installed packages into a HydraVM guest.
# Root on /dev/vda, console on ttyS0, network from the kernel's ip= or DHCP,
# redis answering on every address, no periodic jobs that disturb measurements.
set -eu
root="$1"
in_root() { chroot "$root" "$@"; }

echo 'hydravm-debian' > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 hydravm-debian\n::1 localhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
printf '/dev/vda / ext4 errors=remount-ro 0 1\n' > "$root/etc/fstab"
# A test guest on a private network: root logs in on the serial console without a password.
in_root passwd -d root >/dev/null

# Network: systemd-networkd. systemd-network-generator turns ip= on the kernel
# command line into /run/systemd/network/*.network (which win over /etc ones of a
# later name); without ip=, DHCP on every ethernet NIC. Kernel names (eth0, ...)
# so the ip= line does not depend on PCI slots.
mkdir -p "$root/etc/systemd/network"
ln -sf /dev/null "$root/etc/systemd/network/99-default.link"
printf '[Match]\nName=eth*\n\n[Network]\nDHCP=yes\n' > "$root/etc/systemd/network/90-hydravm-dhcp.network"
in_root systemctl enable systemd-networkd.service systemd-network-generator.service >/dev/null 2>&1
# Boot does not wait for an address: redis binds every address at once.
in_root systemctl mask systemd-networkd-wait-online.service >/dev/null 2>&1

# Quiet guest: no timers that wake up disk and CPU at random, no VGA getty, journal in RAM.
for unit in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer \
            e2scrub_reap.service getty@tty1.service; do
  in_root systemctl disable "$unit" >/dev/null 2>&1 || true
done
mkdir -p "$root/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' > "$root/etc/systemd/journald.conf.d/hydravm.conf"

# redis (if installed): serve the guest's network, not only loopback.
if [ -f "$root/etc/redis/redis.conf" ]; then
  sed -i -e 's/^bind .*/bind 0.0.0.0 -::/' -e 's/^protected-mode yes/protected-mode no/' "$root/etc/redis/redis.conf"
fi

# No package caches or lists in the image.
rm -rf "$root/var/cache/apt/"*.bin "$root/var/lib/apt/lists/"* "$root/var/log/"*.log
