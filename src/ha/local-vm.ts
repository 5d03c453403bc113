// What an agent reads about its host's VMs from their directories: state, protection, HA record, liveness.
import fs from 'node:fs';
import path from 'node:path';
import { pidAlive } from '../util/pid.js';
import type { VmState } from '../vm/index.js';
import { writeFileAtomicSync } from '../util/atomic-write.js';

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
  /** The checkpointer's start time (/proc/PID/stat field 22), when it records one. */
  startTime?: string;
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
  // Not fsynced, as state.json beside it: the copy it describes dies with the host.
  writeFileAtomicSync(path.join(dir, 'ha.json'), JSON.stringify(rec, null, 2) + '\n', { durable: false });
}

export function removeHaLocal(home: string, vm: string): void {
  fs.rmSync(path.join(vmDirOf(home, vm), 'ha.json'), { force: true });
}

/** The MACs of a local VM's NICs, from its recorded spec (none when it has no NIC or no readable spec). */
export function localMacs(home: string, vm: string): string[] {
  try {
    const launch = JSON.parse(fs.readFileSync(path.join(vmDirOf(home, vm), 'spec.json'), 'utf8')) as { spec?: { nics?: { mac?: unknown }[] } };
    return (launch.spec?.nics ?? []).map((n) => n.mac).filter((m): m is string => typeof m === 'string').map((m) => m.toLowerCase());
  } catch {
    return [];
  }
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
