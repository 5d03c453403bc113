// Steps both checkpointers share: joining the store, the bulk of a full checkpoint streamed while the VM runs, what precedes each pause, which failures are retried.
import type { Logger } from 'pino';
import { StoreClient } from '../protocol/index.js';
import { CheckpointError, HydraError, QmpClosedError, type CheckpointCode } from '../errors.js';
import type { DirtyRun } from '../tracker/index.js';
import { batchRuns, totalBytes } from './runs.js';
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
 * What each checkpoint does before its pause, so nothing in the pause waits
 * on it: the next disk overlay is created and the
 * checkpoint announced to the store.
 */
/**
 * Stop the VM for a checkpoint's pause, if it runs. Read right before the
 * `stop`: an operator's pause during the pre-copy or pre-arm that came
 * before must not be undone by the `cont` that ends the checkpoint's pause.
 * Returns whether the VM was running (and so must be continued).
 */
export async function stopIfRunning(qmp: CheckpointOpening['qmp']): Promise<boolean> {
  const running = (await qmp.execute<{ status: string }>('query-status')).status === 'running';
  if (running) await qmp.execute('stop');
  return running;
}

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
