#!/usr/bin/env bash
# Installs the Debian packages HydraVM needs on a host (idempotent).
# QEMU comes from bookworm-backports: bookworm's 7.2 has a broken device path
# for slim restore (see docs/design.md).
set -euo pipefail

need_install=0
want_qemu_major=10
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  need_install=1
else
  major=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1)
  [ "${major:-0}" -ge "$want_qemu_major" ] || need_install=1
fi
for tool in qemu-img busybox etcd cpio dpkg-deb gcc mmdebstrap mkfs.ext4 ip; do
  command -v "$tool" >/dev/null 2>&1 || need_install=1
done
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need_install=1

if [ "$need_install" = 0 ]; then
  echo "host packages: already installed"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "error: installing host packages needs root (apt-get)" >&2
  exit 1
fi

# Add bookworm-backports from the same Debian mirror the machine already uses.
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  uri=$(grep -rhs '^URIs:.*debian$\|^URIs: .*/debian$' /etc/apt/sources.list.d/*.sources | head -1 | awk '{print $2}')
  if [ -z "$uri" ]; then
    uri=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -1)
  fi
  uri=${uri:-http://deb.debian.org/debian}
  cat > /etc/apt/sources.list.d/hydravm-backports.sources <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
apt-get install -y -qq busybox-static cpio etcd-server etcd-client libc6-dev gcc make iproute2 >/dev/null
# Debian guest images (hydravm image build debian): bookworm's mmdebstrap, mkfs.ext4 -d.
apt-get install -y -qq mmdebstrap e2fsprogs >/dev/null
# etcd-server's package starts a system etcd on the default ports; HydraVM starts its own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl stop etcd || true
  systemctl disable etcd >/dev/null 2>&1 || true
fi
qemu-system-x86_64 --version | head -1
