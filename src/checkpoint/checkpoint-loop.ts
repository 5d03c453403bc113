// The protection loop both checkpoint daemons run: store connection, one full checkpoint, one checkpoint per interval, retries and fencing, around each mode's own pause.
import type { Logger } from 'pino';
import { HydraError, type CheckpointCode } from '../errors.js';
import { connectWhenReady, type QmpClient } from '../qmp/index.js';
import { processStartTime, type DirtyRun } from '../tracker/index.js';
import type { StoreClient } from '../protocol/index.js';
import { vmLog } from '../util/log.js';
import { DiskFreezer } from '../disk/index.js';
import { joinStore, retryable, streamFullCopy } from './full-copy.js';
import { summarize, type CheckpointStats, type ProtectionStatus } from './stats.js';
import type { CheckpointerOptions } from './checkpointer-options.js';
import { killFencedQemu } from './fenced-qemu.js';

/** Page data per protocol frame. */
export const BATCH_BYTES = 8 * 1024 * 1024;

/** What the loop needs of a mode's tracker. */
export interface LoopTracker {
  readonly ramSize: number;
  allocStaging(bytes: number): Buffer;
  copyRuns(runs: DirtyRun[], dst: Buffer): number;
  populatedRuns(): DirtyRun[];
  close(): void;
}

/**
 * The checkpoint daemon of one VM (the paper's `hacp`): one full checkpoint
 * taken while the VM runs, then every interval an incremental one. A
 * checkpoint starts only when its predecessor is durable on the store. A
 * subclass supplies the tracker and the checkpoint itself (what happens in
 * and after the pause); this class owns everything around it.
 */
export abstract class CheckpointLoop<T extends LoopTracker> {
  protected readonly opts: CheckpointerOptions;
  protected readonly log: Logger;
  protected tracker!: T;
  protected freezer: DiskFreezer | undefined;
  protected qmp!: QmpClient;
  protected client: StoreClient | undefined;
  /** Copy buffer of the full checkpoint's bulk copy (and basic mode's pre-copy rounds). */
  protected bounce!: Buffer;
  protected stopped = false;
  protected needFull = true;
  protected history: CheckpointStats[] = [];
  protected lastStart: number | null = null;
  /** QEMU's start time (/proc stat), so a fenced checkpointer never kills a process that reused its pid. */
  protected qemuStartTime: number | undefined;
  readonly status: ProtectionStatus;
  private wake: (() => void) | undefined;
  /** QEMU's QMP connection closed (QEMU exited): set at once, so a sleeping loop ends now, not at its next checkpoint. */
  private qmpLost: Error | undefined;

  /** A failure of this mode's own that ends a connection but not protection. */
  protected abstract readonly retriedCode: CheckpointCode;
  protected abstract attach(): Promise<T>;
  /** QMP and the disks are ready; nothing is sent yet. */
  protected abstract started(): void;
  /** Just before the full copy: every write from here on must show in its closing pause. */
  protected abstract armForFullCopy(): void;
  /** One checkpoint's pause and shipping; `continued`: the full copy already sent its BEGIN and bulk. */
  protected abstract checkpoint(epoch: number, kind: 'full' | 'incremental', continued?: boolean): Promise<void>;

  constructor(opts: CheckpointerOptions, mode: 'basic' | 'cow') {
    this.opts = opts;
    this.log = vmLog(opts.vm);
    this.status = {
      vm: opts.vm,
      store: opts.store,
      generation: opts.generation,
      state: 'starting',
      pid: process.pid,
      mode,
      ...(mode === 'basic' && opts.cowRefused ? { cowRefused: opts.cowRefused } : {}),
      configuredIntervalMs: opts.intervalMs,
      committedEpoch: 0,
      lastCommitAt: null,
      recent: summarize([]),
      updatedAt: Date.now(),
    };
  }

  /** Ask the loop to end after the current checkpoint. */
  stop(): void {
    this.stopped = true;
    this.wake?.();
  }

  get recentHistory(): readonly CheckpointStats[] {
    return this.history;
  }

  /** Mode-specific fields every status update carries. */
  protected statusExtras(): Partial<ProtectionStatus> {
    return {};
  }

  /** Extra fields of the log line when a connection is retried. */
  protected retryContext(): Record<string, unknown> {
    return {};
  }

  /** The tracker is closed: nothing of this process holds guest writes any more. */
  protected untracked(): void {}

  /** The next incremental checkpoint; a mode may absorb its own give-ups here. */
  protected async incremental(epoch: number): Promise<void> {
    await this.checkpoint(epoch, 'incremental');
  }

  protected publish(patch: Partial<ProtectionStatus> = {}): void {
    Object.assign(this.status, patch, { recent: summarize(this.history), ...this.statusExtras(), updatedAt: Date.now() });
    this.opts.onStatus?.(this.status);
  }

  protected async sleep(ms: number): Promise<void> {
    if (this.stopped || ms <= 0) return;
    await new Promise<void>((resolve) => {
      const t = setTimeout(resolve, ms);
      this.wake = () => { clearTimeout(t); resolve(); };
    });
    this.wake = undefined;
  }

  async run(): Promise<void> {
    const { vm } = this.opts;
    this.qemuStartTime = processStartTime(this.opts.qemuPid);
    this.tracker = await this.attach();
    try {
      this.qmp = await connectWhenReady(this.opts.qmpSocket, { label: `VM ${vm}`, deadlineMs: 5000 });
      this.qmp.on('closed', (err: Error) => {
        this.qmpLost = err;
        this.wake?.();
      });
      if (this.opts.disks && this.opts.disks.paths.length > 0) {
        // Shares the checkpointer's QMP connection: a QMP monitor serves one client.
        this.freezer = await DiskFreezer.open({ vm, qmp: this.qmp, disks: this.opts.disks.paths, layerDir: this.opts.disks.layerDir });
        await this.freezer.prepare();
      }
      this.bounce = this.tracker.allocStaging(BATCH_BYTES);
      this.started();
      let backoff = 250;
      while (!this.stopped) {
        try {
          await this.connectStore();
          if (this.needFull) await this.fullCheckpoint();
          backoff = 250;
          while (!this.stopped) {
            const wait = this.lastStart === null ? 0 : this.lastStart + this.opts.intervalMs - Date.now();
            await this.sleep(wait);
            if (this.qmpLost) throw this.qmpLost;
            if (this.stopped) break;
            await this.incremental(this.status.committedEpoch + 1);
          }
        } catch (err) {
          if (!retryable(err, this.retriedCode)) throw err;
          this.log.warn({ err: (err as Error).message, ...this.retryContext() }, 'store connection failed; retrying');
          this.publish({ state: 'retrying', reason: (err as Error).message });
          // The connection already failed; closing it only frees the socket.
          await this.client?.close().catch(() => undefined);
          this.client = undefined;
          await this.sleep(backoff);
          if (this.qmpLost) throw this.qmpLost;
          backoff = Math.min(backoff * 2, 5000);
        }
      }
      this.publish({ state: 'stopped', reason: 'unprotected' });
    } catch (err) {
      if (err instanceof HydraError && err.code === 'HYDRA_STORE_STALE_GENERATION') {
        const fenced = killFencedQemu({ vm, generation: this.opts.generation, qemuPid: this.opts.qemuPid, qemuStartTime: this.qemuStartTime }, err, this.log);
        this.publish({ state: 'failed', reason: fenced.message });
        throw fenced;
      }
      this.publish({ state: 'failed', reason: (err as Error).message });
      throw err;
    } finally {
      // Un-protect first: no guest write may wait on a handler that is going away.
      this.tracker.close();
      this.untracked();
      await this.client?.close().catch((e: Error) => this.log.debug({ err: e.message }, 'closing the store connection'));
      // Unprotected on request: fold the disk layers back into the VM's own disks.
      await this.freezer?.close({ flatten: this.stopped }).catch((e: Error) => this.log.warn({ err: e.message }, 'closing the disk freezer'));
      this.qmp?.close();
    }
  }

  private async connectStore(): Promise<void> {
    const joined = await joinStore(this.opts, this.status.committedEpoch, this.log);
    this.client = joined.client;
    this.status.store = joined.address;
    if (joined.needFull) {
      this.needFull = true;
      this.status.committedEpoch = joined.storeEpoch;
    }
  }

  /** Full checkpoint: copy the populated RAM while the VM runs, then one pause closes it. */
  private async fullCheckpoint(): Promise<void> {
    const client = this.client!;
    const epoch = this.status.committedEpoch + 1;
    this.armForFullCopy();
    // Only pages the memfd holds: reading never-touched pages through the mapping would allocate them all.
    const copied = await streamFullCopy({
      client, epoch, ramSize: this.tracker.ramSize, config: this.opts.config, runs: this.tracker.populatedRuns(),
      copyRuns: (batch, dst) => this.tracker.copyRuns(batch, dst), bounce: this.bounce,
      stopped: () => this.stopped, publish: (p) => this.publish(p), log: this.log,
      closingPause: () => this.checkpoint(epoch, 'full', true),
    });
    if (copied) this.needFull = false;
  }

  /** A checkpoint the store acknowledged: history, status, disk merge progress. */
  protected recordCommit(stats: CheckpointStats): void {
    this.history.push(stats);
    if (this.history.length > 200) this.history.shift();
    this.opts.onCheckpoint?.(stats);
    const merge = this.freezer?.status().merge;
    this.publish({
      state: 'protected', reason: undefined, committedEpoch: stats.epoch, lastCommitAt: Date.now(), last: stats,
      diskMerges: merge && { merges: merge.merges, layersMerged: merge.layersMerged, lastMergeMs: merge.lastMergeMs, totalMergeMs: merge.totalMergeMs, cancelled: merge.cancelled },
    });
    this.log.debug(stats, 'checkpoint committed');
  }
}
