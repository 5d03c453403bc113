#!/bin/sh
# mmdebstrap --essential-hook: runs before the kernel package is installed, so
# its initramfs is built once, small: only the modules a HydraVM guest boots with.
set -eu
root="$1"
mkdir -p "$root/etc/initramfs-tools/conf.d" "$root/usr/share/initramfs-tools/modules.d"
printf 'MODULES=list\nCOMPRESS=gzip\n' > "$root/etc/initramfs-tools/conf.d/hydravm.conf"
printf 'virtio_pci\nvirtio_blk\nvirtio_net\next4\ncrc32c_generic\n' > "$root/usr/share/initramfs-tools/modules.d/hydravm"
