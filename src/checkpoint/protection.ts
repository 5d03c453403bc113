import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { cliEntry } from '../config/paths.js';
import { loadSecret } from '../config/secret.js';
import { CheckpointError, VmNotFoundError } from '../errors.js';
import { vmPaths, readState, isLive, type LaunchFile } from '../vm/index.js';
import { pidAlive } from '../util/pid.js';
import { vmLog } from '../util/log.js';
import { Checkpointer } from './checkpointer.js';
import type { CheckpointerOptions } from './checkpointer-options.js';
import { CowCheckpointer, cowSettings, releaseCowOf } from './cow-mode.js';
import type { CheckpointStats, ProtectionStatus } from './stats.js';
import { sleep } from '../util/sleep.js';
import { writeFileAtomicSync } from '../util/atomic-write.js';
import { lastLines } from '../util/log-tail.js';

/**
 * Protection of one VM runs in its own detached process (like the VM's
 * supervisor) so it outlives `hydravm protect`. Its files, beside the VM's:
 *   protect.json      what was asked (store, interval, generation)
 *   protection.json   ProtectionStatus, rewritten after every commit
 *   checkpointer.log  its log
 *   checkpoints.jsonl one line of measurements per committed checkpoint
 *   devstate.bin      scratch: QEMU writes the device state here in each pause (when /dev/shm is missing; else a tmpfs file there)
 */
export interface ProtectRequest {
  vm: string;
  store: string;
  /**
   * In a cluster: where the checkpointer looks up the active store on every
   * (re)connection (etcd endpoints; credentials from HYDRAVM_ETCD_*), so it
   * follows a standby store that took over. `store` is then the first address.
   */
  storeDiscovery?: StoreDiscovery;
  intervalMs: number;
  generation: number;
  secretFile?: string;
  stagingBytes?: number;
  /** Most the basic mode's staging buffer grows to (default 1 GiB). */
  stagingCapBytes?: number;
  /** Shared directory for frozen disk layers; default .hydravm-layers beside the first disk. */
  layerDir?: string;
  /** Copy-on-write checkpoints (false: basic); absent: as the VM's spec says (`protection.cow`). */
  cow?: false | { grain?: number; stagingBytes?: number; maxSpillBytes?: number };
}

export interface StoreDiscovery {
  etcd: string;
}

/** Builds the lookup of the active store for a checkpointer process (the HA layer provides it). */
export type StoreResolverFactory = (d: StoreDiscovery) => { resolve(): Promise<string>; close(): void };

function files(vm: string) {
  const dir = vmPaths(vm).dir;
  return {
    request: path.join(dir, 'protect.json'),
    status: path.join(dir, 'protection.json'),
    log: path.join(dir, 'checkpointer.log'),
    devstate: path.join(dir, 'devstate.bin'),
    history: path.join(dir, 'checkpoints.jsonl'),
  };
}

export function readProtection(vm: string): ProtectionStatus | undefined {
  try {
    return JSON.parse(fs.readFileSync(files(vm).status, 'utf8')) as ProtectionStatus;
  } catch {
    return undefined;
  }
}

function writeProtection(status: ProtectionStatus): void {
  // Not fsynced: a status report rewritten after every commit, of a process a host crash ends.
  writeFileAtomicSync(files(status.vm).status, JSON.stringify(status, null, 2) + '\n', { durable: false });
}

/** Measurements of every checkpoint committed for this VM on this host. */
export function readCheckpointHistory(vm: string): (CheckpointStats & { generation: number })[] {
  try {
    return fs.readFileSync(files(vm).history, 'utf8').trim().split('\n').filter(Boolean).map((l) => JSON.parse(l));
  } catch {
    return [];
  }
}

/** Whether this status names a checkpointer still protecting its VM. */
function protecting(s: ProtectionStatus | undefined): s is ProtectionStatus {
  return !!s && pidAlive(s.pid) && s.state !== 'stopped' && s.state !== 'failed';
}

export function isProtected(vm: string): boolean {
  return protecting(readProtection(vm));
}

/** A VM can be protected while it runs on this host. */
export function assertProtectable(vm: string): void {
  const state = readState(vm);
  if (!state) throw new VmNotFoundError(vm);
  if (!isLive(state) || state.lifecycle !== 'running') {
    throw new CheckpointError('HYDRA_CKPT_VM_NOT_RUNNING', `VM "${vm}" is not running (${isLive(state) ? state.lifecycle : state.lifecycle === 'running' ? 'crashed' : state.lifecycle}); only a running VM can be protected`);
  }
}

/**
 * Start protecting a running VM; resolves once the initial full checkpoint is
 * committed (calling `onProgress` meanwhile), or rejects with the reason.
 */
export async function protectVm(req: ProtectRequest, onProgress?: (s: ProtectionStatus) => void, timeoutMs = 300_000): Promise<ProtectionStatus> {
  assertProtectable(req.vm);
  const current = readProtection(req.vm);
  if (protecting(current)) throw new CheckpointError('HYDRA_CKPT_ALREADY', `VM "${req.vm}" is already protected (checkpointer pid ${current.pid})`);
  loadSecret({ secretFile: req.secretFile });
  releaseCowOf(req.vm, { alsoAsync: true });
  const f = files(req.vm);
  fs.writeFileSync(f.request, JSON.stringify(req, null, 2) + '\n');
  fs.rmSync(f.status, { force: true });
  const logFd = fs.openSync(f.log, 'a');
  const child = spawn(process.execPath, [cliEntry, 'internal-checkpoint', req.vm], { detached: true, stdio: ['ignore', logFd, logFd] });
  fs.closeSync(logFd);
  child.unref();
  const deadline = Date.now() + timeoutMs;
  let lastUpdate = 0;
  for (;;) {
    const s = readProtection(req.vm);
    if (s && s.updatedAt !== lastUpdate) {
      lastUpdate = s.updatedAt;
      onProgress?.(s);
    }
    if (s?.state === 'protected') return s;
    if (s?.state === 'failed') {
      // The checkpointer writes its failure before it has released the VM; the caller may act on the VM
      // as soon as this throws, so the checkpointer must be gone by then.
      const exitBy = Date.now() + 10_000;
      while (pidAlive(child.pid) && Date.now() < exitBy) await sleep(20);
      throw new CheckpointError('HYDRA_CKPT_FAILED', `protecting VM "${req.vm}" failed: ${s.reason} (see ${f.log})`);
    }
    if (!pidAlive(child.pid)) throw new CheckpointError('HYDRA_CKPT_FAILED', `checkpointer of VM "${req.vm}" exited during start (see ${f.log}): ${lastLines(f.log)}`);
    if (Date.now() > deadline) {
      process.kill(child.pid!, 'SIGTERM');
      throw new CheckpointError('HYDRA_CKPT_TIMEOUT', `VM "${req.vm}": initial checkpoint not committed within ${timeoutMs / 1000} s (see ${f.log})`);
    }
    await sleep(100);
  }
}

export async function unprotectVm(vm: string, timeoutMs = 15_000): Promise<ProtectionStatus | undefined> {
  const s = readProtection(vm);
  if (!s || !pidAlive(s.pid)) {
    releaseCowOf(vm);
    return s;
  }
  process.kill(s.pid, 'SIGTERM');
  const deadline = Date.now() + timeoutMs;
  while (pidAlive(s.pid)) {
    if (Date.now() > deadline) {
      process.kill(s.pid, 'SIGKILL');
      // Gone before we return: a caller protecting again at once must not find it alive.
      const killedBy = Date.now() + 5_000;
      while (pidAlive(s.pid) && Date.now() < killedBy) await sleep(10);
      // A killed copy-on-write checkpointer leaves guest RAM write-protected: release it.
      releaseCowOf(vm);
      break;
    }
    await sleep(50);
  }
  return readProtection(vm);
}

/**
 * Where QEMU writes the device state in each pause: a tmpfs file when the
 * host has /dev/shm, else `fallback` (the VM's directory). The save runs
 * inside the pause, and rewriting a file on ext4 there cost 4-5 ms against
 * 2 ms on tmpfs on the loaded test machine (truncating a file with data
 * makes ext4 allocate and start writing it back on close).
 */
function pauseDevstateFile(vm: string, fallback: string): string {
  try {
    if (fs.statSync('/dev/shm').isDirectory()) {
      fs.accessSync('/dev/shm', fs.constants.W_OK);
      // Left by checkpointers of this VM name that were killed (their pid is gone): ours to remove.
      for (const name of fs.readdirSync('/dev/shm')) {
        const m = /^hydravm-(.+)-(\d+)-devstate\.bin$/.exec(name);
        if (m && m[1] === vm && !pidAlive(Number(m[2]))) fs.rmSync(path.join('/dev/shm', name), { force: true });
      }
      return path.join('/dev/shm', `hydravm-${vm}-${process.pid}-devstate.bin`);
    }
  } catch {
    /* no usable /dev/shm: the VM's directory */
  }
  return fallback;
}

/** Body of the detached checkpointer process. */
export async function runCheckpointerProcess(vm: string, resolverFor?: StoreResolverFactory): Promise<void> {
  const f = files(vm);
  const req = JSON.parse(fs.readFileSync(f.request, 'utf8')) as ProtectRequest;
  const state = readState(vm);
  if (!state?.qemuPid || !isLive(state)) throw new VmNotFoundError(vm);
  const config = JSON.parse(fs.readFileSync(vmPaths(vm).spec, 'utf8')) as LaunchFile;
  const devstateFile = pauseDevstateFile(vm, f.devstate);
  // A restored VM runs on overlays, not on the disks its spec names.
  const diskPaths = config.launch.diskFiles ?? config.spec.disks.map((d) => d.path);
  const resolver = req.storeDiscovery && resolverFor ? resolverFor(req.storeDiscovery) : undefined;
  const cpOpts: CheckpointerOptions = {
    vm,
    qemuPid: state.qemuPid,
    qmpSocket: vmPaths(vm).hydraQmpSocket,
    devstateFile,
    store: req.store,
    ...(resolver ? { resolveStore: () => resolver.resolve() } : {}),
    secret: loadSecret({ secretFile: req.secretFile }),
    generation: req.generation,
    intervalMs: req.intervalMs,
    config,
    stagingBytes: req.stagingBytes,
    stagingCapBytes: req.stagingCapBytes,
    disks: diskPaths.length ? { paths: diskPaths.map((p) => ({ path: p })), layerDir: req.layerDir ?? config.launch.layerDir ?? path.join(path.dirname(diskPaths[0]!), '.hydravm-layers') } : undefined,
    onStatus: writeProtection,
    onCheckpoint: (stats) => fs.appendFileSync(f.history, JSON.stringify({ generation: req.generation, ...stats }) + '\n'),
  };
  const cow = cowSettings(req, config, state.qemuPid);
  if (cow.refused) cpOpts.cowRefused = cow.refused;
  const cp = cow.settings ? new CowCheckpointer(cpOpts, cow.settings) : new Checkpointer(cpOpts);
  process.on('SIGTERM', () => cp.stop());
  process.on('SIGINT', () => cp.stop());
  try {
    await cp.run();
  } catch (err) {
    vmLog(vm).error({ err: (err as Error).message }, 'protection failed');
    process.exitCode = 1;
  } finally {
    resolver?.close();
    if (devstateFile !== f.devstate) fs.rmSync(devstateFile, { force: true });
  }
}
