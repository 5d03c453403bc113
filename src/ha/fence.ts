// Fencing a local VM copy: deciding it must die (a newer generation exists) and killing it.
import { pidAlive } from '../util/pid.js';
import { killProcess, qemuIdentity, supervisorIdentity, type ProcessIdentity } from '../vm/index.js';
import type { VmRecord } from './cluster.js';
import { localGeneration, readLocalVm, writeHaLocal, type LocalVm } from './local-vm.js';
import { sleep } from '../util/sleep.js';

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

/** Kill through a pidfd, and only the process recorded (a reused PID is left alone). */
function kill(pid: number | undefined, who: ProcessIdentity): boolean {
  if (!pid || !pidAlive(pid)) return false;
  return killProcess(pid, who, 'SIGKILL');
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
  if (v.state && kill(v.state.qemuPid, qemuIdentity(v.state))) res.killedQemu = v.state.qemuPid;
  // A checkpointer that records no start time is known by its command line (`internal-checkpoint VM`).
  const cp: ProcessIdentity = v.protection?.startTime !== undefined ? { startTime: v.protection.startTime } : { cmdline: ['internal-checkpoint', vm] };
  if (v.protection?.pid && kill(v.protection.pid, cp)) res.killedCheckpointer = v.protection.pid;
  if (v.ha) writeHaLocal(home, { ...v.ha, fenced: reason, fencedAt: Date.now() });
  const sup = v.state?.supervisorPid;
  if (sup && pidAlive(sup)) {
    const deadline = Date.now() + supervisorGraceMs;
    while (pidAlive(sup) && Date.now() < deadline) await sleep(20);
    if (kill(sup, supervisorIdentity(v.state!))) res.killedSupervisor = sup;
  }
  return res;
}
