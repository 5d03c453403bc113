import fs from 'node:fs';
import path from 'node:path';
import { shellsDir, vmDir, vmsDir } from '../config/paths.js';
import type { QemuRuntimePaths } from './qemu-args.js';
import type { ProcessIdentity } from '../native/index.js';
import { pidAlive } from '../util/pid.js';
import { writeFileAtomicSync } from '../util/atomic-write.js';

/**
 * The runtime directory of one VM: $HYDRAVM_HOME/vms/NAME/
 *
 *   spec.json        the validated spec it was started with
 *   state.json       VmState below, rewritten atomically by the supervisor
 *   qmp.sock         QMP for users and scripts
 *   supervisor.qmp   QMP kept by the supervisor
 *   hydra.qmp        QMP reserved for the checkpointer
 *   control.sock     the supervisor's HTTP control API (status, stop)
 *   serial.log       the guest's serial console
 *   qemu.log         QEMU's stderr
 *   supervisor.log   the supervisor's own log (JSON lines)
 *   watchdog.json    the HA watchdog feed from the host agent (only under HA)
 *   serial.in        FIFO: bytes written here reach the guest's serial console
 */
export interface VmPaths extends QemuRuntimePaths {
  dir: string;
  spec: string;
  state: string;
  controlSocket: string;
  qemuLog: string;
  supervisorLog: string;
  /** The HA watchdog feed (see watchdog.ts); present while the VM is under HA. */
  watchdog: string;
  /** Names the copy-on-write checkpointer holding guest RAM write-protected (see cow-guard.ts). */
  cowGuard: string;
  pauseGuard: string;
  /** The serial console's input (a FIFO the supervisor holds open; see serial.ts). */
  serialIn: string;
}

export function vmPaths(name: string): VmPaths {
  return pathsIn(vmDir(name));
}

/** A restore shell's runtime files: the same layout as a VM's, under HOME/shells/ID/. */
export function shellPaths(id: string): VmPaths {
  return pathsIn(path.join(shellsDir(), id));
}

function pathsIn(dir: string): VmPaths {
  return {
    dir,
    spec: path.join(dir, 'spec.json'),
    state: path.join(dir, 'state.json'),
    qmpSocket: path.join(dir, 'qmp.sock'),
    supervisorQmpSocket: path.join(dir, 'supervisor.qmp'),
    hydraQmpSocket: path.join(dir, 'hydra.qmp'),
    controlSocket: path.join(dir, 'control.sock'),
    serialLog: path.join(dir, 'serial.log'),
    qemuLog: path.join(dir, 'qemu.log'),
    supervisorLog: path.join(dir, 'supervisor.log'),
    watchdog: path.join(dir, 'watchdog.json'),
    cowGuard: path.join(dir, 'cow-guard.json'),
    pauseGuard: path.join(dir, 'pause-guard.json'),
    serialIn: path.join(dir, 'serial.in'),
  };
}

/** Lifecycle as the supervisor records it. "running"/"paused" come live from QMP in status. */
export type VmLifecycle = 'starting' | 'running' | 'stopping' | 'stopped' | 'crashed' | 'failed';

export interface VmState {
  name: string;
  lifecycle: VmLifecycle;
  supervisorPid: number;
  qemuPid?: number;
  /** Start times (/proc/PID/stat field 22) recorded at spawn: a signal goes to these PIDs only while they match. */
  supervisorStartTime?: string;
  qemuStartTime?: string;
  accel?: string;
  memoryBytes?: number;
  startedAt?: string;
  /** When QEMU was spawned (ms since the epoch, fractional). */
  qemuSpawnedAt?: number;
  endedAt?: string;
  /** Why it stopped or failed to start, in words. */
  reason?: string;
  exitCode?: number | null;
  exitSignal?: string | null;
  /** Set when the supervisor killed QEMU itself because its watchdog starved: why, and when. */
  selfFenced?: string;
  selfFencedAt?: string;
  /** Set when this QEMU was a pre-started restore shell the VM was restored into: the shell's id. */
  shell?: string;
  /** A restore shell only: the device configuration it accepts (src/vm/shell.ts). */
  shellKey?: string;
  /** A restore shell only: the process whose death ends the idle shell (its host agent or test). */
  ownerPid?: number;
}

export function readState(name: string): VmState | undefined {
  try {
    return JSON.parse(fs.readFileSync(vmPaths(name).state, 'utf8')) as VmState;
  } catch {
    return undefined;
  }
}

export function writeState(state: VmState, file = vmPaths(state.name).state): void {
  // Not fsynced: it describes live processes, and the supervisor rewrites it on every transition.
  writeFileAtomicSync(file, JSON.stringify(state, null, 2) + '\n', { durable: false });
}

export function readStateAt(file: string): VmState | undefined {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8')) as VmState;
  } catch {
    return undefined;
  }
}

/** A VM counts as live while its supervisor or its QEMU process exists. */
export function isLive(state: VmState | undefined): boolean {
  return !!state && (pidAlive(state.supervisorPid) || pidAlive(state.qemuPid));
}

export function listVmNames(): string[] {
  try {
    return fs.readdirSync(vmsDir(), { withFileTypes: true }).filter((d) => d.isDirectory()).map((d) => d.name).sort();
  } catch {
    return [];
  }
}

/** Remove sockets a dead QEMU left behind, so the next start binds cleanly. */
export function removeStaleSockets(name: string): void {
  const p = vmPaths(name);
  for (const f of [p.qmpSocket, p.supervisorQmpSocket, p.hydraQmpSocket, p.controlSocket]) {
    fs.rmSync(f, { force: true });
  }
}

/** Who the recorded QEMU PID must be: its start time at spawn, else (older state files) its -name argument. */
export function qemuIdentity(state: VmState): ProcessIdentity {
  return state.qemuStartTime !== undefined ? { startTime: state.qemuStartTime } : { cmdline: ['-name', `${state.name},debug-threads=on`] };
}

/** Who the recorded supervisor PID must be: its start time, else the supervisor's VM argument. */
export function supervisorIdentity(state: VmState): ProcessIdentity {
  return state.supervisorStartTime !== undefined ? { startTime: state.supervisorStartTime } : { cmdline: [state.name] };
}
