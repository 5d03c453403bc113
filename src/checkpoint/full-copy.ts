// Steps both checkpointers share: joining the store, the bulk of a full checkpoint streamed while the VM runs, what precedes each pause, which failures are retried.
import os from 'node:os';
import type { Logger } from 'pino';
import { StoreClient } from '../protocol/index.js';
import { CheckpointError, HydraError, QmpClosedError, type CheckpointCode } from '../errors.js';
import type { DirtyRun } from '../tracker/index.js';
import type { QmpClient, QmpEvent } from '../qmp/index.js';
import { batchRuns, totalBytes } from './runs.js';
import { clearPauseGuard, writePauseGuard } from '../vm/index.js';
import type { ProtectionStatus } from './stats.js';

export interface FullCopy {
  client: StoreClient;
  epoch: number;
  ramSize: number;
  /** The VM's launch configuration, stored with the image so a restore can start it. */
  config: unknown;
  runs: DirtyRun[];
  copyRuns(batch: DirtyRun[], dst: Buffer): number;
  bounce: Buffer;
  stopped(): boolean;
  publish(patch: Partial<ProtectionStatus>): void;
  log: Logger;
  /** The closing pause: what was written during the copy, the device state, the commit. */
  closingPause(): Promise<void>;
}

/**
 * BEGIN a full checkpoint, send `runs` in batches through `bounce`, then run
 * the caller's closing pause, which sends what was written meanwhile and the
 * device state. Returns false when protection was stopped part-way.
 */
export async function streamFullCopy(f: FullCopy): Promise<boolean> {
  const t0 = Date.now();
  const total = totalBytes(f.runs);
  f.publish({ state: 'initial-copy', initialCopy: { bytesSent: 0, bytesTotal: total } });
  f.log.info({ epoch: f.epoch, bytes: total }, 'initial full checkpoint: copying guest RAM while the VM runs');
  await f.client.begin(f.epoch, 'full', { ramSize: f.ramSize, config: f.config });
  let sent = 0;
  let lastReport = 0;
  for (const batch of batchRuns(f.runs, f.bounce.length)) {
    if (f.stopped()) return false;
    const n = f.copyRuns(batch, f.bounce);
    await f.client.sendPages(batch, f.bounce.subarray(0, n));
    sent += n;
    if (Date.now() - lastReport > 500) {
      lastReport = Date.now();
      f.publish({ initialCopy: { bytesSent: sent, bytesTotal: total } });
    }
  }
  f.publish({ initialCopy: { bytesSent: sent, bytesTotal: total, ms: Date.now() - t0 } });
  await f.closingPause();
  f.log.info({ epoch: f.epoch, ms: Date.now() - t0 }, 'initial full checkpoint committed');
  return true;
}

export interface CheckpointOpening {
  client: StoreClient;
  qmp: { execute<T = unknown>(cmd: string, args?: Record<string, unknown>): Promise<T> };
  freezer?: { prepare(): Promise<unknown> } | undefined;
  epoch: number;
  kind: 'full' | 'incremental';
  ramSize: number;
  /** The BEGIN was already sent (by the full copy). */
  continued: boolean;
  /** When the previous checkpoint started (Date.now()), null for the first. */
  lastStart: number | null;
}

export interface OpenedCheckpoint {
  startedAt: number;
  /** Since the previous checkpoint started: the achieved interval. */
  intervalMs: number | null;
}

/**
 * Nice value of the checkpointer's main thread while it holds a VM paused.
 * On a loaded host every wake-up of this thread in the pause (the answer to
 * `stop`, then to `cont`) waits for a core; a higher priority for those few
 * milliseconds shortens the guest's pause. Only this thread (Linux nice is
 * per thread): the copier and the sends to the store after `cont` keep their
 * own, so the guest's vCPU is not starved by them.
 */
const PAUSE_NICE = -10;
let boosted = false;
let boostRefused = false;

function boost(on: boolean): void {
  if (boostRefused || boosted === on) return;
  try {
    os.setPriority(on ? PAUSE_NICE : 0);
    boosted = on;
  } catch {
    boostRefused = true; // not permitted (not root, no CAP_SYS_NICE): pauses run at normal priority
  }
}

/** The QMP side of one checkpoint's pause (see beginPause). */
export interface PauseQmp {
  /** The VM was running before the pause (so `cont` ends it). */
  wasRunning: boolean;
  /** performance.now() when `stop` was sent, and when it was answered: the VM is paused. */
  sentAt: number;
  stoppedAt: number;
  /** The device-state save: resolves with performance.now() of its answer. */
  devstate: Promise<number>;
  /**
   * Send `cont` (once; later calls return the same promise). QMP runs a
   * monitor's commands in order, so it takes effect only after the
   * device-state save: sending it does not wait for the save's answer.
   * Resolves with performance.now() of its answer.
   */
  cont(): Promise<number>;
  /**
   * After cont() resolved: how long the VM was paused by QEMU's own clock,
   * from its STOP event (all vCPUs halted) to its RESUME event, or undefined
   * when either event was missing. Excludes the round trips to this process
   * before the stop takes effect and after the VM already runs again.
   */
  vmPausedMs(): number | undefined;
}

/**
 * Pause the VM for a checkpoint: `stop` and the device-state save go to QEMU
 * in one write, so the save starts the moment the VM is stopped, without a
 * round trip through this process; the caller collects (and copies) pages
 * once `stop` is answered, while QEMU saves, then calls cont(). The run state
 * is read before, so an operator's pause is not undone. A failed `stop`
 * throws (after the save settled); the VM was not stopped by us then.
 */
export async function beginPause(qmp: QmpClient, devstateFile: string, pauseGuardFile?: string): Promise<PauseQmp> {
  boost(true);
  const wasRunning = (await qmp.execute<{ status: string }>('query-status')).status === 'running';
  let stopAt: number | undefined;
  let resumeAt: number | undefined;
  let contSent: Promise<number> | undefined;
  const at = (e: QmpEvent) => (e.timestamp ? e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000 : undefined);
  const onEvent = (e: QmpEvent) => {
    if (e.event === 'STOP' && stopAt === undefined) stopAt = at(e);
    else if (e.event === 'RESUME' && contSent && resumeAt === undefined) resumeAt = at(e);
  };
  qmp.on('event', onEvent);
  // The supervisor resumes the VM if this process dies or hangs before its `cont` (vm/pause-guard.ts).
  if (wasRunning && pauseGuardFile) writePauseGuard(pauseGuardFile);
  const sentAt = performance.now();
  const stop = wasRunning ? qmp.execute('stop') : Promise.resolve();
  const devstate = qmp.execute('xen-save-devices-state', { filename: devstateFile, live: false }).then(() => performance.now());
  // Awaited by the caller; this only keeps an early rejection from being unhandled.
  devstate.catch(() => undefined);
  try {
    await stop;
  } catch (err) {
    boost(false);
    qmp.off('event', onEvent);
    // The VM was not stopped by us: nothing for the supervisor to resume.
    if (wasRunning && pauseGuardFile) clearPauseGuard(pauseGuardFile);
    await devstate.catch(() => undefined); // the stop's failure is the one to report
    throw err;
  }
  const stoppedAt = performance.now();
  // The guard is cleared only once `cont` is answered: a failed one leaves the resume to the supervisor.
  const cont = () => (contSent ??= (wasRunning
    ? qmp.execute('cont').then(() => {
      if (pauseGuardFile) clearPauseGuard(pauseGuardFile);
      return performance.now();
    })
    : Promise.resolve(performance.now())).finally(() => boost(false)));
  const vmPausedMs = () => {
    qmp.off('event', onEvent);
    return stopAt !== undefined && resumeAt !== undefined ? resumeAt - stopAt : undefined;
  };
  return { wasRunning, sentAt, stoppedAt, devstate, cont, vmPausedMs };
}

/**
 * What each checkpoint does before its pause, so nothing in the pause waits
 * on it: the next disk overlay is created and the
 * checkpoint announced to the store.
 */
export async function openCheckpoint(o: CheckpointOpening): Promise<OpenedCheckpoint> {
  const startedAt = Date.now();
  await o.freezer?.prepare();
  if (!o.continued) await o.client.begin(o.epoch, o.kind, { ramSize: o.ramSize });
  return { startedAt, intervalMs: o.lastStart === null ? null : startedAt - o.lastStart };
}

export interface StoreJoin {
  client: StoreClient;
  /** The address joined: `store`, or what `resolveStore` named this time. */
  address: string;
  /** The store's committed epoch of this generation (0: none). */
  storeEpoch: number;
  /** Only a full checkpoint is certain to match memory: the store has none, or it is ahead or behind us. */
  needFull: boolean;
}

export interface StoreTarget {
  /** The store's address (the first one, when `resolveStore` is given). */
  store: string;
  /**
   * In a cluster: the active store's address as etcd names it now. Asked on
   * every (re)connection, so a checkpointer follows a standby store that took
   * over the shared directory; the epoch comparison below then decides whether
   * the new store continues our image incrementally.
   */
  resolveStore?: () => Promise<string>;
  secret: string;
  vm: string;
  generation: number;
}

/** Connect as the checkpointer of the VM's generation and compare the store's committed epoch with ours. */
export async function joinStore(o: StoreTarget, ourEpoch: number, log: Logger): Promise<StoreJoin> {
  const address = o.resolveStore ? await o.resolveStore() : o.store;
  const client = await StoreClient.connect({ address, secret: o.secret, vm: o.vm, generation: o.generation, role: 'checkpointer' });
  const meta = await client.getMeta();
  const storeEpoch = meta && meta.generation === o.generation ? meta.committedEpoch : 0;
  if (storeEpoch === 0) return { client, address, storeEpoch, needFull: true };
  if (storeEpoch !== ourEpoch) {
    // The store is ahead (it committed what we never heard acknowledged) or behind (lost data).
    log.warn({ storeEpoch, ours: ourEpoch, store: address }, 'store epoch differs from ours; taking a full checkpoint');
    return { client, address, storeEpoch, needFull: true };
  }
  if (ourEpoch > 0) log.info({ store: address, epoch: storeEpoch }, 'store joined at our committed epoch; continuing incrementally');
  return { client, address, storeEpoch, needFull: false };
}

/** QEMU gone or this incarnation fenced: stop. Store trouble, or the checkpointer's own `retriedCode`: retry. */
export function retryable(err: unknown, retriedCode: CheckpointCode): boolean {
  if (err instanceof QmpClosedError) return false;
  if (err instanceof CheckpointError && err.code === retriedCode) return true;
  if (err instanceof HydraError && /STALE_GENERATION|AUTH|VERSION|TRACKER|DISK/.test(err.code)) return false;
  if (err instanceof CheckpointError) return false;
  return true;
}
