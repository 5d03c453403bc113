// MAC addresses and host interface names as a VM spec may give them.

/** NIC models HydraVM starts and restores: userspace virtio-net (no vhost), whose state lives in QEMU's device state. */
export const NIC_MODELS = ['virtio-net-pci'] as const;
export type NicModel = (typeof NIC_MODELS)[number];

export type MacCheck = { ok: true; mac: string } | { ok: false; problem: string };

/** Accepts aa:bb:cc:dd:ee:ff or aa-bb-..., any case; returns it lower-case with colons. */
export function normalizeMac(value: string): MacCheck {
  const v = value.trim().toLowerCase().replace(/-/g, ':');
  if (!/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/.test(v)) return { ok: false, problem: 'is not a MAC address (six hex pairs, e.g. 52:54:00:12:34:56)' };
  const first = parseInt(v.slice(0, 2), 16);
  if (first & 1) return { ok: false, problem: 'is a multicast address (the lowest bit of the first byte is set); a NIC needs a unicast MAC such as 52:54:00:...' };
  if (v === '00:00:00:00:00:00') return { ok: false, problem: 'is the all-zero address' };
  return { ok: true, mac: v };
}

/** Why `name` cannot be a Linux interface name, or undefined if it can. */
export function checkIfName(name: string): string | undefined {
  if (name.length === 0 || name.length > 15) return 'is not an interface name (1-15 characters)';
  if (!/^[A-Za-z0-9_.-]+$/.test(name) || name === '.' || name === '..') return 'is not an interface name (letters, digits, "-", "_", "." only)';
  return undefined;
}
