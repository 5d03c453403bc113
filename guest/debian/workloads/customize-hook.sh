#!/bin/sh
# mmdebstrap --customize-hook of a workload image (runs before the common hook, which drops apt's lists):
# the workload runner and its unit, the compile job's C source from Debian's source package, and the
# transcode job's input video.
set -eu
root="$1"
here=$(dirname "$0")
install -m 755 "$here/hydra-workload" "$root/usr/local/sbin/hydra-workload"
install -m 644 "$here/hydra-workload.service" "$root/etc/systemd/system/hydra-workload.service"
mkdir -p "$root/usr/local/lib/hydra-workload" "$root/usr/src/hydra"
install -m 644 "$here/compile.sh" "$here/transcode.sh" "$root/usr/local/lib/hydra-workload/"
chroot "$root" systemctl enable hydra-workload.service >/dev/null 2>&1
# The runner's gate reads the serial console's input: no login prompt competes for it.
chroot "$root" systemctl mask serial-getty@ttyS0.service >/dev/null 2>&1

# Lua from Debian's source archive (deb-src of the same mirror): the upstream tarball, unpacked.
dl="$root/usr/src/hydra/download"
mkdir -p "$dl"
(cd "$dl" && APT_CONFIG="$MMDEBSTRAP_APT_CONFIG" apt-get source --download-only -q lua5.4 >/dev/null)
tar -C "$root/usr/src/hydra" -xzf "$dl"/lua5.4_*.orig.tar.gz
rm -rf "$dl" "$root/usr/src/hydra/compile-src"
mv "$root"/usr/src/hydra/lua-5.4* "$root/usr/src/hydra/compile-src"
[ -f "$root/usr/src/hydra/compile-src/src/Makefile" ]

# The input video, made once here (natively) so the guest only transcodes.
chroot "$root" ffmpeg -nostdin -hide_banner -loglevel error -f lavfi -i testsrc=duration=120:size=640x360:rate=25 \
  -c:v libx264 -pix_fmt yuv420p -y /usr/src/hydra/input.mp4
