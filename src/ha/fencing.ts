import fs from 'node:fs';
import path from 'node:path';
import type { VmState } from '../vm/runtime.js';
import type { VmRecord } from './cluster.js';

/**
 * What an agent knows about the VMs of its host, read straight from
 * HOME/vms/NAME/ (the agent is given its HYDRAVM_HOME explicitly, so several
 * agents may live in one process in tests):
 *
 *   state.json       the supervisor's VmState
 *   protection.json  the checkpointer's status (pid, generation)
 *   ha.json          HaLocal, written by the agent: which generation this copy of
 *                    the VM is. A copy whose generation is older than the one in
 *                    etcd must not run: it is fenced (killed).
 */
export interface HaLocal {
  vm: string;
  host: string;
  generation: number;
  updatedAt: number;
  /** Set when the agent killed this copy, with the reason. */
  fenced?: string;
  fencedAt?: number;
}

interface ProtectionLite {
  pid?: number;
  generation?: number;
  state?: string;
}

export interface LocalVm {
  name: string;
  dir: string;
  state?: VmState;
  protection?: ProtectionLite;
  ha?: HaLocal;
  qemuAlive: boolean;
  supervisorAlive: boolean;
  /** QEMU or its supervisor exists. */
  live: boolean;
}

export function pidAlive(pid: number | undefined | null): boolean {
  if (!pid) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function readJson<T>(file: string): T | undefined {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8')) as T;
  } catch {
    return undefined;
  }
}

export function vmDirOf(home: string, vm: string): string {
  return path.join(home, 'vms', vm);
}

export function readLocalVm(home: string, vm: string): LocalVm | undefined {
  const dir = vmDirOf(home, vm);
  if (!fs.existsSync(dir)) return undefined;
  const state = readJson<VmState>(path.join(dir, 'state.json'));
  const qemuAlive = pidAlive(state?.qemuPid);
  const supervisorAlive = pidAlive(state?.supervisorPid);
  return {
    name: vm,
    dir,
    state,
    protection: readJson<ProtectionLite>(path.join(dir, 'protection.json')),
    ha: readJson<HaLocal>(path.join(dir, 'ha.json')),
    qemuAlive,
    supervisorAlive,
    live: qemuAlive || supervisorAlive,
  };
}

export function listLocalVms(home: string): LocalVm[] {
  let names: string[] = [];
  try {
    names = fs.readdirSync(path.join(home, 'vms'), { withFileTypes: true }).filter((d) => d.isDirectory() && !d.name.endsWith('.starting')).map((d) => d.name);
  } catch {
    return [];
  }
  return names.map((n) => readLocalVm(home, n)).filter((v): v is LocalVm => !!v);
}

export function writeHaLocal(home: string, rec: HaLocal): void {
  const dir = vmDirOf(home, rec.vm);
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, 'ha.json');
  const tmp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, JSON.stringify(rec, null, 2) + '\n');
  fs.renameSync(tmp, file);
}

export function removeHaLocal(home: string, vm: string): void {
  fs.rmSync(path.join(vmDirOf(home, vm), 'ha.json'), { force: true });
}

/** Which generation this local copy is: what the agent recorded, else what its checkpointer used. */
export function localGeneration(v: LocalVm): number | undefined {
  return v.ha?.generation ?? v.protection?.generation;
}

export type Death =
  | { kind: 'alive' }
  | { kind: 'unknown' }
  | { kind: 'crashed' | 'stopped'; at: number; reason: string };

/**
 * Is this VM's QEMU dead, and was that on purpose? Reads only local files and
 * pids, so it answers in microseconds: the agent calls it every poll.
 */
export function vmDeath(v: LocalVm): Death {
  const s = v.state;
  if (!s) return { kind: 'unknown' };
  const ended = s.endedAt ? Date.parse(s.endedAt) : Date.now();
  switch (s.lifecycle) {
    case 'crashed':
    case 'failed':
      return { kind: 'crashed', at: ended, reason: s.reason ?? s.lifecycle };
    case 'stopped':
      return { kind: 'stopped', at: ended, reason: s.reason ?? 'stopped' };
    case 'stopping':
      return v.live ? { kind: 'alive' } : { kind: 'stopped', at: ended, reason: 'stopped by request' };
    case 'starting':
      return v.live ? { kind: 'alive' } : { kind: 'crashed', at: Date.now(), reason: 'supervisor and QEMU vanished during start' };
    case 'running':
      if (!v.qemuAlive) return { kind: 'crashed', at: Date.now(), reason: v.supervisorAlive ? 'QEMU process is gone' : 'supervisor and QEMU are gone' };
      return { kind: 'alive' };
    default:
      return { kind: 'unknown' };
  }
}

/**
 * Must this local copy die? Yes when etcd names a newer generation of the VM
 * (it was restored elsewhere, or here again) or another host for this same
 * generation. Returns the reason, or undefined to leave it.
 */
export function staleReason(v: LocalVm, record: VmRecord | undefined, myHost: string): string | undefined {
  if (!record) return undefined;
  const gen = localGeneration(v);
  if (gen === undefined) return undefined;
  if (record.generation > gen) return `generation ${gen} is stale: the VM is at generation ${record.generation} on host ${record.host}`;
  if (record.generation === gen && record.host !== myHost) return `generation ${gen} belongs to host ${record.host}`;
  return undefined;
}

export interface FenceResult {
  vm: string;
  killedQemu?: number;
  killedCheckpointer?: number;
  killedSupervisor?: number;
}

function kill(pid: number | undefined, signal: NodeJS.Signals = 'SIGKILL'): boolean {
  if (!pid || !pidAlive(pid)) return false;
  try {
    process.kill(pid, signal);
    return true;
  } catch {
    return false;
  }
}

/**
 * Kill a local copy of a VM hard and at once: QEMU and its checkpointer get
 * SIGKILL now; the supervisor records the death and exits by itself, or gets
 * SIGKILL after `supervisorGraceMs`. Marks ha.json as fenced.
 */
export async function fenceLocalVm(home: string, vm: string, reason: string, supervisorGraceMs = 1500): Promise<FenceResult> {
  const v = readLocalVm(home, vm);
  const res: FenceResult = { vm };
  if (!v) return res;
  if (kill(v.state?.qemuPid)) res.killedQemu = v.state?.qemuPid;
  if (v.protection?.pid && kill(v.protection.pid)) res.killedCheckpointer = v.protection.pid;
  if (v.ha) writeHaLocal(home, { ...v.ha, fenced: reason, fencedAt: Date.now() });
  const sup = v.state?.supervisorPid;
  if (sup && pidAlive(sup)) {
    const deadline = Date.now() + supervisorGraceMs;
    while (pidAlive(sup) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    if (kill(sup)) res.killedSupervisor = sup;
  }
  return res;
}
