// Steps both checkpointers share: the bulk of a full checkpoint streamed while the VM runs, and what precedes each pause.
import type { Logger } from 'pino';
import type { StoreClient } from '../protocol/index.js';
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
  wasRunning: boolean;
  startedAt: number;
  /** Since the previous checkpoint started: the achieved interval. */
  intervalMs: number | null;
}

/**
 * What each checkpoint does before its pause, so nothing in the pause waits
 * on it: the next disk overlay is created, the VM's run state read, and the
 * checkpoint announced to the store.
 */
export async function openCheckpoint(o: CheckpointOpening): Promise<OpenedCheckpoint> {
  const startedAt = Date.now();
  await o.freezer?.prepare();
  const wasRunning = (await o.qmp.execute<{ status: string }>('query-status')).status === 'running';
  if (!o.continued) await o.client.begin(o.epoch, o.kind, { ramSize: o.ramSize });
  return { wasRunning, startedAt, intervalMs: o.lastStart === null ? null : startedAt - o.lastStart };
}
