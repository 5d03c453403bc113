import type { HostRecord, VmRecord } from './cluster.js';

/**
 * Where to restore a VM: any live host with enough free memory (the point of
 * HydraVM: no standby reserves memory, so the restoration host is chosen at
 * fail-over time).
 *
 * A host's free memory is what its agent last reported, minus the memory of
 * VMs already being restored onto it (their QEMU may not be counted in the
 * report yet). Among the hosts that fit, the one with the most memory left
 * wins, except that a host with an idle restore shell of the VM's
 * configuration comes first (the restore skips QEMU's start there); a host
 * the VM just failed on (its QEMU crashed there, or a restore failed there)
 * is used only when nothing else fits.
 */
export interface PlacementRequest {
  vm: string;
  memoryBytes: number;
  /** Hosts that must not be chosen (dead). */
  exclude?: Iterable<string>;
  /** Hosts to use only as a last resort. */
  avoid?: Iterable<string>;
  /** Extra room per VM for QEMU itself. */
  headroomBytes?: number;
  /** The VM's restore-shell key: among hosts that fit, one with an idle shell of it is preferred (no QEMU start). */
  shellKey?: string;
}

export interface PlacementCandidate {
  host: string;
  freeBytes: number;
  reservedBytes: number;
  availableBytes: number;
  /** Idle restore shells of the VM's configuration on the host. */
  warmShells: number;
}

export type PlacementResult =
  | { ok: true; host: string; candidates: PlacementCandidate[] }
  | { ok: false; reason: string; candidates: PlacementCandidate[] };

export const DEFAULT_HEADROOM = 64 * 1024 * 1024;

/** Memory reserved on each host by restores in flight. */
export function reservations(vms: Iterable<VmRecord>): Map<string, number> {
  const out = new Map<string, number>();
  for (const v of vms) {
    if (v.state === 'restoring') out.set(v.host, (out.get(v.host) ?? 0) + (v.memoryBytes ?? 0));
  }
  return out;
}

export function placeVm(req: PlacementRequest, hosts: Iterable<HostRecord>, reserved: Map<string, number> = new Map()): PlacementResult {
  const exclude = new Set(req.exclude ?? []);
  const avoid = new Set(req.avoid ?? []);
  const need = req.memoryBytes + (req.headroomBytes ?? DEFAULT_HEADROOM);
  const candidates: PlacementCandidate[] = [];
  for (const h of hosts) {
    if (exclude.has(h.name)) continue;
    const reservedBytes = reserved.get(h.name) ?? 0;
    const warmShells = req.shellKey ? (h.shells ?? []).filter((s) => s.key === req.shellKey).reduce((n, s) => n + s.idle, 0) : 0;
    candidates.push({ host: h.name, freeBytes: h.freeMemoryBytes, reservedBytes, availableBytes: h.freeMemoryBytes - reservedBytes, warmShells });
  }
  const fits = candidates.filter((c) => c.availableBytes >= need);
  fits.sort((a, b) => Number(avoid.has(a.host)) - Number(avoid.has(b.host)) || Number(b.warmShells > 0) - Number(a.warmShells > 0) || b.availableBytes - a.availableBytes || a.host.localeCompare(b.host));
  if (fits.length > 0) return { ok: true, host: fits[0]!.host, candidates };
  const mib = (n: number) => `${Math.round(n / 1024 / 1024)} MiB`;
  const reason = candidates.length === 0
    ? `no live host to restore VM "${req.vm}" on`
    : `no host has ${mib(need)} free for VM "${req.vm}" (${candidates.map((c) => `${c.host}: ${mib(c.availableBytes)}`).join(', ')})`;
  return { ok: false, reason, candidates };
}
