// Restore shells: a supervisor plus QEMU already started with `-incoming defer`, waiting for a VM to adopt them.
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import crypto from 'node:crypto';
import { execFileSync, spawn } from 'node:child_process';
import { shellsDir, supervisorEntry, shimPath } from '../config/paths.js';
import { QemuError, VmError, VmExistsError } from '../errors.js';
import { killProcess } from '../native/index.js';
import { pidAlive } from '../util/pid.js';
import { sleep } from '../util/sleep.js';
import type { Accel } from './accel.js';
import { findQemu } from './manager.js';
import type { QemuLaunchOptions } from './qemu-args.js';
import { isLive, qemuIdentity, readState, readStateAt, removeStaleSockets, shellPaths, supervisorIdentity, vmPaths, type VmState } from './runtime.js';
import type { LaunchFile } from './supervisor.js';
import type { VmSpec } from './spec.js';
import type { NicModel } from '../net/index.js';

/**
 * What a shell must agree on with the VM restored into it: everything QEMU
 * fixes at start and the device state does not carry. RAM is a memfd
 * registered for missing-page faults at hand-off (file and network mode
 * alike), so it costs nothing until the guest runs; disks are raw filters over
 * placeholders of the right size, pointed at the restore overlays at hand-off.
 * NICs are plugged in at hand-off (the tap is the VM's, named and bridged per
 * VM, and so is the MAC), each into an empty root port the shell holds where
 * a cold start puts it: only their models and count are fixed in advance.
 */
export interface ShellConfig {
  memoryBytes: number;
  vcpus: number;
  accel: Accel;
  kernel: string;
  initrd?: string;
  /** Virtual size of each disk, in order. */
  diskSizes: number[];
  /** The model of each NIC, in order (absent: none). */
  nics?: NicModel[];
}

/** The key of a configuration: shells and VMs match when their keys are equal. */
export function shellKey(c: ShellConfig): string {
  const fw = crypto.createHash('sha256').update(`${c.kernel}\0${c.initrd ?? ''}`).digest('hex').slice(0, 8);
  const disks = c.diskSizes.length > 0 ? c.diskSizes.map((s) => `${Math.round(s / 1048576)}M`).join('+') : 'none';
  const nics = (c.nics ?? []).length > 0 ? `-n${c.nics!.join('+')}` : '';
  return `m${Math.round(c.memoryBytes / 1048576)}M-c${c.vcpus}-${c.accel}-d${disks}${nics}-fw${fw}`;
}

/**
 * The shell configuration a VM needs, or why no shell can take it.
 * `nicPorts`: the VM's recorded launch puts its NICs behind root ports
 * (launches recorded before that put them on the root bus, where nothing can
 * be plugged in later).
 */
export function shellConfigOf(spec: VmSpec, accel: Accel, diskSizes: number[], nicPorts = true): { config: ShellConfig } | { reason: string } {
  const nics = (spec.nics ?? []).map((n) => n.model);
  if (nics.length > 0 && !nicPorts) return { reason: `VM "${spec.name}" was started with its NICs on the root PCIe bus, where a restore shell cannot plug them in` };
  if (diskSizes.length !== spec.disks.length) return { reason: `VM "${spec.name}": disk sizes unknown` };
  return { config: { memoryBytes: spec.memoryBytes, vcpus: spec.vcpus, accel, kernel: spec.kernel, ...(spec.initrd ? { initrd: spec.initrd } : {}), diskSizes, ...(nics.length > 0 ? { nics } : {}) } };
}

export interface ShellInfo {
  id: string;
  key: string;
  config: ShellConfig;
  /** Started and waiting for a VM. */
  idle: boolean;
  /** Supervisor or QEMU still exists. */
  live: boolean;
  state?: VmState;
  dir: string;
  /** When its directory was made (ms since the epoch). */
  createdAt: number;
  /** Who started it (a host agent's pool names itself), if anyone said. */
  owner?: string;
}

function readLaunch(id: string): LaunchFile | undefined {
  try {
    return JSON.parse(fs.readFileSync(shellPaths(id).spec, 'utf8')) as LaunchFile;
  } catch {
    return undefined;
  }
}

/** Every shell directory on this host, dead ones included (a pool reaps those). */
export function listShells(): ShellInfo[] {
  let ids: string[];
  try {
    ids = fs.readdirSync(shellsDir(), { withFileTypes: true }).filter((d) => d.isDirectory()).map((d) => d.name).sort();
  } catch {
    return [];
  }
  const out: ShellInfo[] = [];
  for (const id of ids) {
    const launch = readLaunch(id);
    const config = (launch as (LaunchFile & { shellConfig?: ShellConfig }) | undefined)?.shellConfig;
    if (!launch?.shell || !config) continue;
    const state = readStateAt(shellPaths(id).state);
    const live = !!state && (pidAlive(state.supervisorPid) || pidAlive(state.qemuPid));
    let createdAt = 0;
    try {
      createdAt = fs.statSync(shellPaths(id).spec).mtimeMs;
    } catch {
      // removed meanwhile: counts as old debris
    }
    const owner = (launch as LaunchFile & { shellOwner?: string }).shellOwner;
    out.push({ id, key: launch.shell.key, config, idle: live && state?.lifecycle === 'running', live, ...(state ? { state } : {}), dir: shellPaths(id).dir, createdAt, ...(owner ? { owner } : {}) });
  }
  return out;
}

/**
 * Start one shell for `config`, owned by `ownerPid` (the shell stops itself
 * when that process dies while it is idle). Resolves once QEMU answers QMP,
 * waiting for its incoming migration.
 */
export async function startShell(config: ShellConfig, opts: { ownerPid?: number; owner?: string; timeoutMs?: number } = {}): Promise<ShellInfo> {
  const qemuBinary = findQemu();
  if (!fs.existsSync(shimPath)) throw new QemuError(`the userfaultfd shim ${shimPath} is not built (run \`hydravm setup\`)`);
  const key = shellKey(config);
  const id = `${Date.now().toString(36)}-${crypto.randomBytes(3).toString('hex')}`;
  const paths = shellPaths(id);
  fs.mkdirSync(paths.dir, { recursive: true });
  // The spec names the shell, not a VM: only what buildQemuArgs reads of it matters.
  const spec: VmSpec = {
    name: `shell-${id}`, memoryBytes: config.memoryBytes, vcpus: config.vcpus, accel: config.accel, kernel: config.kernel,
    ...(config.initrd ? { initrd: config.initrd } : {}), cmdline: 'console=ttyS0', disks: [], nics: [],
  } as VmSpec;
  const launch: QemuLaunchOptions = { accel: config.accel, ram: { kind: 'memfd' }, incomingDefer: true, placeholderDisks: config.diskSizes, placeholderNics: (config.nics ?? []).length };
  const launchFile: LaunchFile & { shellConfig: ShellConfig; shellOwner?: string } = { spec, launch, qemuBinary, shell: { key, ownerPid: opts.ownerPid ?? process.pid }, shellConfig: config, ...(opts.owner ? { shellOwner: opts.owner } : {}) };
  fs.writeFileSync(paths.spec, JSON.stringify(launchFile, null, 2) + '\n');
  const logFd = fs.openSync(paths.supervisorLog, 'a');
  const child = spawn(process.execPath, [supervisorEntry, '--shell', id], { detached: true, stdio: ['ignore', logFd, logFd], env: process.env });
  fs.closeSync(logFd);
  child.unref();
  const deadline = Date.now() + (opts.timeoutMs ?? 20_000);
  for (;;) {
    const state = readStateAt(paths.state);
    if (state && state.lifecycle !== 'starting') {
      if (state.lifecycle === 'running') return { id, key, config, idle: true, live: true, state, dir: paths.dir, createdAt: Date.now(), ...(opts.owner ? { owner: opts.owner } : {}) };
      removeShell(id);
      throw new VmError('HYDRA_VM_SHELL_FAILED', `restore shell ${key} did not start: ${state.reason ?? state.lifecycle}`);
    }
    if (!pidAlive(child.pid) && !(state && pidAlive(state.qemuPid))) {
      const why = lastLine(paths.supervisorLog);
      removeShell(id);
      throw new VmError('HYDRA_VM_SHELL_FAILED', `restore shell ${key}: its supervisor exited during start (${why})`);
    }
    if (Date.now() > deadline) {
      stopShellNow(id);
      throw new VmError('HYDRA_VM_SHELL_FAILED', `restore shell ${key} did not start within ${(opts.timeoutMs ?? 20_000) / 1000} s`);
    }
    await sleep(5);
  }
}

function lastLine(file: string): string {
  try {
    return fs.readFileSync(file, 'utf8').trim().split('\n').pop() ?? '(no output)';
  } catch {
    return '(no output)';
  }
}

/** Kill a shell's processes (if any) and remove its directory. */
export function stopShellNow(id: string): void {
  const state = readStateAt(shellPaths(id).state);
  if (state) {
    killProcess(state.supervisorPid, supervisorIdentity(state));
    if (state.qemuPid) killProcess(state.qemuPid, qemuIdentity(state));
  }
  removeShell(id);
}

/** Remove a dead shell's directory (a live one's processes are left alone: use stopShellNow). */
export function removeShell(id: string): void {
  fs.rmSync(shellPaths(id).dir, { recursive: true, force: true });
}

/** Stop every shell of this host (agent shutdown, tests) and wait until their processes are gone. */
export async function stopAllShells(timeoutMs = 5000): Promise<void> {
  const shells = listShells();
  for (const s of shells) stopShellNow(s.id);
  const deadline = Date.now() + timeoutMs;
  for (const s of shells) {
    while (s.state && (pidAlive(s.state.supervisorPid) || pidAlive(s.state.qemuPid)) && Date.now() < deadline) await sleep(20);
  }
}

function post<T>(socketPath: string, urlPath: string, timeoutMs: number): Promise<{ status: number; body: T }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath, method: 'POST', path: urlPath, timeout: timeoutMs }, (res) => {
      let body = '';
      res.on('data', (c) => (body += c));
      res.on('end', () => {
        try {
          resolve({ status: res.statusCode ?? 0, body: JSON.parse(body) as T });
        } catch (err) {
          reject(err);
        }
      });
    });
    req.on('timeout', () => req.destroy(new VmError('HYDRA_VM_CONTROL_TIMEOUT', `restore shell control socket ${socketPath} did not answer in ${timeoutMs} ms`)));
    req.on('error', reject);
    req.end();
  });
}

export interface AdoptResult {
  state: VmState;
  shell: ShellInfo;
}

/**
 * Hand an idle shell to VM `spec.name`: its QEMU becomes the VM's, waiting for
 * the device state. `launch` is recorded as the VM's spec.json (what a cold
 * start would have run). Refused (HYDRA_VM_SHELL_BUSY) unless the shell's key
 * equals `key`, the shell is idle and alive, and the VM is not live here; the
 * caller then starts cold.
 */
export async function adoptShell(id: string, spec: VmSpec, launch: QemuLaunchOptions, key: string): Promise<AdoptResult> {
  const shell = listShells().find((s) => s.id === id);
  if (!shell) throw new VmError('HYDRA_VM_SHELL_BUSY', `VM "${spec.name}": no restore shell ${id} on this host`);
  if (shell.key !== key) throw new VmError('HYDRA_VM_SHELL_BUSY', `VM "${spec.name}": restore shell ${id} is for ${shell.key}, the VM needs ${key}`);
  if (!shell.idle) throw new VmError('HYDRA_VM_SHELL_BUSY', `VM "${spec.name}": restore shell ${id} is ${shell.live ? shell.state?.lifecycle ?? 'starting' : 'dead'}`);
  const paths = vmPaths(spec.name);
  fs.mkdirSync(path.dirname(paths.dir), { recursive: true });
  // The same claim as a cold start: mkdir is atomic, two racing restores cannot both win.
  const lockDir = `${paths.dir}.starting`;
  try {
    fs.mkdirSync(lockDir);
  } catch {
    throw new VmExistsError(spec.name);
  }
  try {
    if (isLive(readState(spec.name))) throw new VmExistsError(spec.name);
    fs.mkdirSync(paths.dir, { recursive: true });
    removeStaleSockets(spec.name);
    fs.rmSync(paths.state, { force: true });
    // As for a cold start: an earlier incarnation's feed never arms this one.
    fs.rmSync(paths.watchdog, { force: true });
    const launchFile: LaunchFile = { spec, launch, qemuBinary: readLaunch(id)?.qemuBinary ?? findQemu() };
    fs.writeFileSync(paths.spec, JSON.stringify(launchFile, null, 2) + '\n');
    const r = await post<VmState & { error?: string; code?: string }>(shellPaths(id).controlSocket, `/adopt/${encodeURIComponent(spec.name)}`, 5000)
      .catch((err: unknown) => { throw new VmError('HYDRA_VM_SHELL_BUSY', `VM "${spec.name}": restore shell ${id} did not answer: ${(err as Error).message}`, { cause: err }); });
    if (r.status !== 200) throw new VmError('HYDRA_VM_SHELL_BUSY', r.body.error ?? `VM "${spec.name}": restore shell ${id} refused (HTTP ${r.status})`);
    return { state: r.body, shell };
  } catch (err) {
    // Not adopted: the VM's directory must not keep a spec nobody runs.
    if (!isLive(readState(spec.name))) fs.rmSync(paths.spec, { force: true });
    throw err;
  } finally {
    fs.rmSync(lockDir, { recursive: true, force: true });
  }
}

/** The idle shells for `key`, oldest first (the one a restore should take). */
export function idleShellsFor(key: string): ShellInfo[] {
  return listShells().filter((s) => s.idle && s.key === key);
}

/**
 * The shell configuration of a VM running on this host, from its recorded
 * spec (disk sizes read with qemu-img), or undefined when no shell can take
 * it (NICs on the root bus) or its files cannot be read.
 */
export function localShellConfig(vm: string): ShellConfig | undefined {
  let launch: LaunchFile;
  try {
    launch = JSON.parse(fs.readFileSync(vmPaths(vm).spec, 'utf8')) as LaunchFile;
  } catch {
    return undefined;
  }
  const files = launch.launch.diskFiles ?? launch.spec.disks.map((d) => d.path);
  const sizes: number[] = [];
  for (const f of files) {
    try {
      const info = JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', f], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] })) as { 'virtual-size'?: number };
      if (typeof info['virtual-size'] !== 'number') return undefined;
      sizes.push(info['virtual-size']);
    } catch {
      return undefined;
    }
  }
  const c = shellConfigOf(launch.spec, launch.launch.accel, sizes, launch.launch.nicPorts === true);
  return 'config' in c ? c.config : undefined;
}
