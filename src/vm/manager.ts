import fs from 'node:fs';
import path from 'node:path';
import http from 'node:http';
import { spawn, execFileSync } from 'node:child_process';
import { supervisorEntry, shimPath } from '../config/paths.js';
import { QemuError, SpecError, VmError, VmExistsError, VmNotFoundError } from '../errors.js';
import { chooseAccel } from './accel.js';
import type { QemuLaunchOptions } from './qemu-args.js';
import { vmPaths, readState, isLive, listVmNames, removeStaleSockets, qemuIdentity, supervisorIdentity, type VmState } from './runtime.js';
import { killProcess } from '../native/index.js';
import { checkSpecFiles, type VmSpec } from './spec.js';
import { checkNics, prepareNics, releaseNics, releaseRecordedNics } from './nics.js';
import type { LaunchFile } from './supervisor.js';
import { sleep } from '../util/sleep.js';
import { pidAlive } from '../util/pid.js';

export const QEMU_BINARY = process.env.HYDRAVM_QEMU ?? 'qemu-system-x86_64';

/** Find the QEMU binary or say how to get it. */
export function findQemu(): string {
  try {
    execFileSync(QEMU_BINARY, ['--version'], { stdio: 'ignore' });
    return QEMU_BINARY;
  } catch {
    throw new QemuError(`QEMU binary "${QEMU_BINARY}" not found or not runnable (run \`hydravm setup\`, or set HYDRAVM_QEMU)`);
  }
}

export interface StartOptions {
  /** Override launch details (restore uses this). */
  launch?: Partial<QemuLaunchOptions>;
  /** How long to wait for QEMU to answer QMP. */
  timeoutMs?: number;
}

function createDisks(spec: VmSpec): void {
  for (const disk of spec.disks) {
    if (fs.existsSync(disk.path)) {
      assertQcow2(spec.name, disk.path);
      continue;
    }
    try {
      fs.mkdirSync(path.dirname(disk.path), { recursive: true });
      // On a base image: record the base's real path (not the images/NAME link, which a rebuild moves).
      const backing = disk.base ? ['-b', fs.realpathSync(disk.base), '-F', imageFormat(spec.name, disk.base)] : [];
      const size = disk.size === undefined ? [] : [String(disk.size)];
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', ...backing, disk.path, ...size], { stdio: ['ignore', 'ignore', 'pipe'] });
    } catch (err) {
      const stderr = (err as { stderr?: Buffer }).stderr?.toString().trim();
      throw new QemuError(`VM "${spec.name}": cannot create disk ${disk.path}: ${stderr || (err as Error).message}`);
    }
  }
}

function imageFormat(vm: string, file: string): string {
  try {
    return (JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', file], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] })) as { format?: string }).format ?? 'raw';
  } catch (err) {
    const stderr = (err as { stderr?: Buffer | string }).stderr?.toString().trim();
    throw new SpecError(`VM "${vm}": disk ${file} cannot be read: ${stderr || (err as Error).message}`);
  }
}

/** VMs open their disks as qcow2 (frozen layers per checkpoint need it): say so before QEMU does, naming the file. */
function assertQcow2(vm: string, file: string): void {
  const format = imageFormat(vm, file);
  if (format !== 'qcow2') {
    throw new SpecError(`VM "${vm}": disk ${file} is ${format ?? 'of unknown format'}, not qcow2 (convert it: qemu-img convert -O qcow2 ${file} NEW.qcow2)`);
  }
}

/**
 * Start a VM under its own supervisor and wait until QEMU answers QMP.
 * On any failure nothing stays behind: no QEMU, no supervisor, no socket.
 */
export async function startVm(spec: VmSpec, opts: StartOptions = {}): Promise<VmState> {
  const accel = opts.launch?.accel ?? chooseAccel(spec.accel, spec.name);
  const qemuBinary = findQemu();
  if (!fs.existsSync(shimPath)) throw new QemuError(`the userfaultfd shim ${shimPath} is not built (run \`hydravm setup\`)`);
  checkSpecFiles(spec);
  const paths = vmPaths(spec.name);

  // Claim the name: mkdir is atomic, so two racing starts cannot both win.
  fs.mkdirSync(paths.dir.replace(/\/[^/]+$/, ''), { recursive: true });
  const lockDir = `${paths.dir}.starting`;
  try {
    fs.mkdirSync(lockDir);
  } catch {
    throw new VmExistsError(spec.name);
  }
  try {
    const previous = readState(spec.name);
    if (isLive(previous)) throw new VmExistsError(spec.name);
    fs.mkdirSync(paths.dir, { recursive: true });
    removeStaleSockets(spec.name);
    fs.rmSync(paths.state, { force: true });
    // A feed (or revocation) left by an earlier incarnation never applies to this one: the
    // host agent arms the new incarnation with its next proof of the lease.
    fs.rmSync(paths.watchdog, { force: true });
    // NIC problems first: a refused start creates nothing.
    checkNics(spec);
    createDisks(spec);
    await prepareNics(spec);
    try {
      return await launchSupervisor(spec, accel, qemuBinary, opts);
    } catch (err) {
      // QEMU is gone (or never ran): its taps go too.
      await releaseNics(spec);
      throw err;
    }
  } finally {
    fs.rmSync(lockDir, { recursive: true, force: true });
  }
}

async function launchSupervisor(spec: VmSpec, accel: QemuLaunchOptions['accel'], qemuBinary: string, opts: StartOptions): Promise<VmState> {
  const paths = vmPaths(spec.name);
  {
    // NICs behind root ports unless the caller says otherwise (a restore of a VM recorded with them on the root bus).
    const launch: QemuLaunchOptions = { accel, nicPorts: true, ...opts.launch };
    const launchFile: LaunchFile = { spec, launch, qemuBinary };
    fs.writeFileSync(paths.spec, JSON.stringify(launchFile, null, 2) + '\n');

    const logFd = fs.openSync(paths.supervisorLog, 'a');
    const child = spawn(process.execPath, [supervisorEntry, spec.name], {
      detached: true,
      stdio: ['ignore', logFd, logFd],
      env: process.env,
    });
    fs.closeSync(logFd);
    child.unref();

    const deadline = Date.now() + (opts.timeoutMs ?? 20_000);
    for (;;) {
      const state = readState(spec.name);
      if (state && state.lifecycle !== 'starting') {
        if (state.lifecycle === 'running') return state;
        await waitGone(state, 5000);
        throw new QemuError(`VM "${spec.name}" failed to start: ${state.reason ?? state.lifecycle} (see ${paths.qemuLog})`);
      }
      if (!pidAlive(child.pid) && !(state && pidAlive(state.qemuPid))) {
        throw new QemuError(`VM "${spec.name}": supervisor exited during start (see ${paths.supervisorLog})`);
      }
      if (Date.now() > deadline) {
        if (state) killHard(state);
        else if (child.pid) killPid(child.pid);
        throw new QemuError(`VM "${spec.name}" did not start within ${(opts.timeoutMs ?? 20_000) / 1000} s (see ${paths.qemuLog})`);
      }
      await sleep(5);
    }
  }
}

/** Our own child, not yet reaped: its PID cannot have been reused. */
function killPid(pid: number, signal: NodeJS.Signals = 'SIGKILL'): void {
  try {
    process.kill(pid, signal);
  } catch {
    /* already gone */
  }
}

function killHard(state: VmState): void {
  killProcess(state.supervisorPid, supervisorIdentity(state));
  if (state.qemuPid) killProcess(state.qemuPid, qemuIdentity(state));
  removeStaleSockets(state.name);
}

async function waitGone(state: VmState, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (isLive(state)) {
    if (Date.now() > deadline) return false;
    await sleep(20);
  }
  return true;
}

function controlRequest<T>(name: string, method: string, urlPath: string, timeoutMs = 10_000): Promise<T> {
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath: vmPaths(name).controlSocket, method, path: urlPath, timeout: timeoutMs }, (res) => {
      let body = '';
      res.on('data', (c) => (body += c));
      res.on('end', () => {
        try {
          resolve(JSON.parse(body) as T);
        } catch (err) {
          reject(err);
        }
      });
    });
    req.on('timeout', () => req.destroy(new VmError('HYDRA_VM_CONTROL_TIMEOUT', `control socket of VM "${name}" did not answer in ${timeoutMs} ms`)));
    req.on('error', reject);
    req.end();
  });
}

/** Runs before a live VM is stopped, while QEMU still runs (protection ends itself there). */
export type StopHook = (vm: string) => Promise<void>;
const stopHooks: StopHook[] = [];

/** Register a hook every stopVm runs first; returns its removal. */
export function onStop(hook: StopHook): () => void {
  stopHooks.push(hook);
  return () => {
    const i = stopHooks.indexOf(hook);
    if (i >= 0) stopHooks.splice(i, 1);
  };
}

/** Stop a VM: run the stop hooks, ask its supervisor, escalate to signals if it does not answer. */
export async function stopVm(name: string, opts: { timeoutMs?: number } = {}): Promise<VmState> {
  const state = readState(name);
  if (!state) throw new VmNotFoundError(name);
  if (!isLive(state)) return state;
  for (const hook of stopHooks) await hook(name);
  try {
    await controlRequest(name, 'POST', '/stop', opts.timeoutMs ?? 10_000);
  } catch {
    killProcess(state.supervisorPid, supervisorIdentity(state), 'SIGTERM');
  }
  if (!(await waitGone(state, opts.timeoutMs ?? 10_000))) killHard(state);
  await waitGone(state, 2000);
  // The supervisor removes the taps when QEMU exits; after a hard kill it could not.
  await releaseRecordedNics(name);
  return readState(name) ?? state;
}

export interface VmStatus extends VmState {
  /** QEMU's run state from QMP (running, paused, inmigrate...) when live. */
  runState?: string;
  live: boolean;
  qmpSocket: string;
  serialLog: string;
  dir: string;
}

export async function vmStatus(name: string): Promise<VmStatus> {
  const state = readState(name);
  if (!state) throw new VmNotFoundError(name);
  const paths = vmPaths(name);
  const live = isLive(state);
  let runState: string | undefined;
  let current = state;
  if (live) {
    try {
      const s = await controlRequest<VmState & { runState?: string }>(name, 'GET', '/status', 3000);
      runState = s.runState;
      current = { ...state, ...s };
    } catch {
      runState = undefined;
    }
  } else if (state.lifecycle === 'running' || state.lifecycle === 'starting' || state.lifecycle === 'stopping') {
    // Supervisor and QEMU are gone without recording it (e.g. SIGKILL of both).
    current = { ...state, lifecycle: 'crashed', reason: state.reason ?? 'supervisor and QEMU are gone' };
  }
  return { ...current, runState, live, qmpSocket: paths.qmpSocket, serialLog: paths.serialLog, dir: paths.dir };
}

export async function listVms(): Promise<VmStatus[]> {
  const out: VmStatus[] = [];
  for (const name of listVmNames()) {
    try {
      out.push(await vmStatus(name));
    } catch {
      /* a directory without state: a start in progress or debris */
    }
  }
  return out;
}

export function assertVmName(name: string): void {
  if (!/^[a-z0-9][a-z0-9_-]{0,31}$/i.test(name)) throw new SpecError(`"${name}" is not a valid VM name`);
}
