// The checkpoint daemon of one VM in copy-on-write mode: the pause only re-arms the dirty grains; they are copied after `cont`.
import fs from 'node:fs';
import { CheckpointError, HydraError } from '../errors.js';
import { connectWhenReady, type QmpClient } from '../qmp/index.js';
import { CowTracker, processStartTime } from '../tracker/index.js';
import type { StoreClient } from '../protocol/index.js';
import { vmLog } from '../util/log.js';
import { DiskFreezer } from '../disk/index.js';
import { beginPause, joinStore, openCheckpoint, retryable, streamFullCopy } from './full-copy.js';
import { batchRuns, totalBytes, type Run } from './runs.js';
import { summarize, type CheckpointStats, type ProtectionStatus } from './stats.js';
import type { CheckpointerOptions } from './checkpointer.js';
import { killFencedQemu } from './fenced-qemu.js';
import { vmPaths, writeCowGuard, clearCowGuard } from '../vm/index.js';

const PAGE = 4096;
/** Page data per protocol frame batch. */
const BATCH_BYTES = 8 * 1024 * 1024;

export interface CowSettings {
  /** Bytes protected and copied as one unit (power of two, 4 KiB .. 2 MiB). */
  grain: number;
  /**
   * Ring of staging slots between the copier and the store: its first size;
   * it grows (between checkpoints) to the dirty sets it sees, up to
   * stagingCapBytes (default 1 GiB, at most the RAM size).
   */
  stagingBytes: number;
  stagingCapBytes?: number;
  /** Spill memory for grains written before their ring slot was free; past it the checkpoint is given up. */
  maxSpillBytes: number;
}

/** Chosen from measurements under TCG (docs/benchmarks.md): a heavy writer pays little, a checkpoint carries < 2x a 4 KiB one. */
export const DEFAULT_COW_GRAIN = 64 * 1024;
export const DEFAULT_COW_STAGING = 64 * 1024 * 1024;
export const DEFAULT_COW_MAX_SPILL = 256 * 1024 * 1024;

/**
 * Copy-on-write checkpoints (the paper's second technique). The guest's
 * first write to a grain after a pause faults into the native handler,
 * which records the grain dirty and un-protects it. Just before the pause
 * (VM running) the dirty grains are write-protected again; in the pause:
 *   stop -> dirty grains become "pending copy" (those written since the
 *        pre-arm are protected again) -> device state (QEMU, concurrently)
 *        -> disk freeze -> cont.
 * After `cont` the native copier copies pending grains into a ring of
 * staging slots, drained here to the store. A guest write to a pending grain
 * is held in the handler until that grain is copied (into its slot, or into
 * spill memory when the slot is still in use), so the copy is exactly RAM as
 * of the pause and a writer never waits for the store. Past the spill limit
 * the checkpoint is aborted at the store and its grains are carried into the
 * next one.
 */
export class CowCheckpointer {
  private readonly opts: CheckpointerOptions;
  private readonly cow: CowSettings;
  private readonly log;
  private tracker!: CowTracker;
  private freezer: DiskFreezer | undefined;
  private qmp!: QmpClient;
  private client: StoreClient | undefined;
  private bounce!: Buffer;
  private stopped = false;
  private wake: (() => void) | undefined;
  private needFull = true;
  private history: CheckpointStats[] = [];
  private lastStart: number | null = null;
  private failures = 0;
  readonly status: ProtectionStatus;

  constructor(opts: CheckpointerOptions, cow: CowSettings) {
    this.opts = opts;
    this.cow = cow;
    this.log = vmLog(opts.vm);
    this.status = {
      vm: opts.vm, store: opts.store, generation: opts.generation, state: 'starting', mode: 'cow', pid: process.pid,
      configuredIntervalMs: opts.intervalMs, committedEpoch: 0, lastCommitAt: null, recent: summarize([]), updatedAt: Date.now(),
    };
  }

  stop(): void {
    this.stopped = true;
    this.wake?.();
  }

  private publish(patch: Partial<ProtectionStatus> = {}): void {
    Object.assign(this.status, patch, { recent: summarize(this.history), cowFailures: this.failures, updatedAt: Date.now() });
    this.opts.onStatus?.(this.status);
  }

  private async sleep(ms: number): Promise<void> {
    if (this.stopped || ms <= 0) return;
    await new Promise<void>((resolve) => {
      const t = setTimeout(resolve, ms);
      this.wake = () => { clearTimeout(t); resolve(); };
    });
    this.wake = undefined;
  }

  async run(): Promise<void> {
    const { vm } = this.opts;
    const qemuStartTime = processStartTime(this.opts.qemuPid);
    this.tracker = await CowTracker.attach(this.opts.qemuPid, { grain: this.cow.grain, stagingBytes: this.cow.stagingBytes, maxSpillBytes: this.cow.maxSpillBytes });
    try {
      this.qmp = await connectWhenReady(this.opts.qmpSocket, { label: `VM ${vm}`, deadlineMs: 5000 });
      if (this.opts.disks && this.opts.disks.paths.length > 0) {
        this.freezer = await DiskFreezer.open({ vm, qmp: this.qmp, disks: this.opts.disks.paths, layerDir: this.opts.disks.layerDir });
        await this.freezer.prepare();
      }
      // From here guest writes may wait on our handler: if this process dies, the VM's supervisor releases them.
      writeCowGuard(vmPaths(vm).cowGuard);
      this.bounce = this.tracker.allocStaging(BATCH_BYTES);
      this.log.info({ ramSize: this.tracker.ramSize, grain: this.cow.grain, staging: this.tracker.staging.length, store: this.opts.store, generation: this.opts.generation }, 'copy-on-write protection started');
      let backoff = 250;
      while (!this.stopped) {
        try {
          await this.connectStore();
          if (this.needFull) await this.fullCheckpoint();
          backoff = 250;
          while (!this.stopped) {
            const wait = this.lastStart === null ? 0 : this.lastStart + this.opts.intervalMs - Date.now();
            await this.sleep(wait);
            if (this.stopped) break;
            try {
              await this.checkpoint(this.status.committedEpoch + 1, 'incremental');
            } catch (err) {
              if (!(err instanceof CheckpointError && err.code === 'HYDRA_CKPT_COW_COPY_FAILED')) throw err;
              // The store drops the half-sent checkpoint; its grains are dirty again, so the next one carries them.
              this.failures++;
              this.log.warn({ err: err.message }, 'copy-on-write checkpoint given up; its pages go into the next one');
              await this.client!.abort();
              this.publish({ reason: err.message });
            }
          }
        } catch (err) {
          if (!this.retryable(err)) throw err;
          this.log.warn({ err: (err as Error).message }, 'store connection failed; retrying');
          this.publish({ state: 'retrying', reason: (err as Error).message });
          // Close errors are moot: the connection is being replaced.
          await this.client?.close().catch(() => undefined);
          this.client = undefined;
          await this.sleep(backoff);
          backoff = Math.min(backoff * 2, 5000);
        }
      }
      this.publish({ state: 'stopped', reason: 'unprotected' });
    } catch (err) {
      if (err instanceof HydraError && err.code === 'HYDRA_STORE_STALE_GENERATION') {
        const fenced = killFencedQemu({ vm, generation: this.opts.generation, qemuPid: this.opts.qemuPid, qemuStartTime }, err, this.log);
        this.publish({ state: 'failed', reason: fenced.message });
        throw fenced;
      }
      this.publish({ state: 'failed', reason: (err as Error).message });
      throw err;
    } finally {
      // Un-protect first: no guest write may wait on a handler that is going away.
      this.tracker.close();
      clearCowGuard(vmPaths(vm).cowGuard);
      await this.client?.close().catch((e: Error) => this.log.debug({ err: e.message }, 'closing the store connection'));
      await this.freezer?.close({ flatten: this.stopped }).catch((e: Error) => this.log.warn({ err: e.message }, 'closing the disk freezer'));
      this.qmp?.close();
    }
  }

  /** QEMU gone or this incarnation fenced: stop. Store trouble, or a given-up copy (the full checkpoint is taken again): retry. */
  private retryable(err: unknown): boolean {
    return retryable(err, 'HYDRA_CKPT_COW_COPY_FAILED');
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


  /** Full checkpoint: protect all RAM, copy what is populated while the VM runs, then one CoW pause closes it. */
  private async fullCheckpoint(): Promise<void> {
    const client = this.client!;
    const epoch = this.status.committedEpoch + 1;
    // A copy of a previous (failed) checkpoint may still be pending: give it up, the full copy covers it.
    this.tracker.fail('full checkpoint');
    this.tracker.armAll();
    const copied = await streamFullCopy({
      client, epoch, ramSize: this.tracker.ramSize, config: this.opts.config, runs: this.tracker.populatedRuns(),
      copyRuns: (batch, dst) => this.tracker.copyRuns(batch, dst), bounce: this.bounce,
      stopped: () => this.stopped, publish: (p) => this.publish(p), log: this.log,
      closingPause: () => this.checkpoint(epoch, 'full', true),
    });
    if (copied) this.needFull = false;
  }

  /**
   * One copy-on-write checkpoint: the pause only marks the dirty grains
   * pending and re-protects those written since the pre-arm; the copier and
   * the fault handler fill the ring after `cont`, and the ring drains to the
   * store while the guest runs.
   */
  private async checkpoint(epoch: number, kind: 'full' | 'incremental', continued = false): Promise<void> {
    const client = this.client!;
    const { startedAt, intervalMs } = await openCheckpoint({ client, qmp: this.qmp, freezer: this.freezer, epoch, kind, ramSize: this.tracker.ramSize, continued, lastStart: this.lastStart });
    this.lastStart = startedAt;

    // Re-protecting a large dirty set takes milliseconds: do it while the VM still runs.
    const prearm = this.tracker.prearm();
    const pause = await beginPause(this.qmp, this.opts.devstateFile, vmPaths(this.opts.vm).pauseGuard);
    const t0 = pause.sentAt;
    const t1 = pause.stoppedAt;
    let collected: ReturnType<CowTracker['collect']> | undefined;
    let collectMs = 0;
    let devstateMs = 0;
    let diskMs = 0;
    let contMs = 0;
    let disks: string[] | undefined;
    let t5 = t1;
    let contSentAt = 0;
    let vmPausedMs: number | undefined;
    const cont = () => {
      contSentAt ||= performance.now();
      return pause.cont();
    };
    let drained = false;
    try {
      try {
        collected = this.tracker.collect();
        collectMs = performance.now() - t1;
        // Without disks nothing else belongs in the pause: `cont` goes now and runs right after the save.
        if (!this.freezer) void cont().catch(() => undefined); // awaited in the finally below
        devstateMs = (await pause.devstate) - t1;
        if (this.freezer) {
          const td = performance.now();
          disks = await this.freezer.freeze(epoch);
          diskMs = performance.now() - td;
        }
      } finally {
        const saved = await pause.devstate.catch(() => performance.now()); // its failure is already thrown above
        t5 = await cont();
        // From the later of sending `cont` and the save's answer: what `cont` itself took.
        contMs = t5 - Math.max(contSentAt, saved);
        vmPausedMs = pause.vmPausedMs();
      }
      const devstate = fs.readFileSync(this.opts.devstateFile);

      // The VM runs: drain the copier's ring to the store.
      this.tracker.startCopy();
      const ts = performance.now();
      let copied = 0;
      while (collected.grains > 0) {
        const b = await this.tracker.nextBatch(BATCH_BYTES, 30_000);
        if (b.failed) throw new CheckpointError('HYDRA_CKPT_COW_COPY_FAILED', `VM ${this.opts.vm}: copy-on-write checkpoint ${epoch} given up: ${b.reason}`);
        if (b.grains === 0) throw new CheckpointError('HYDRA_CKPT_COW_COPY_FAILED', `VM ${this.opts.vm}: copy-on-write checkpoint ${epoch}: the copier made no progress`);
        const runs: Run[] = [];
        for (let i = 0; i < b.runs.length; i += 2) runs.push({ offset: b.runs[i]!, length: b.runs[i + 1]! });
        await client.sendPages(runs, this.tracker.staging.subarray(b.stagingOffset, b.stagingOffset + b.bytes));
        this.tracker.release(b);
        copied += b.bytes;
        if (b.done) break;
      }
      drained = true;
      const copyMs = performance.now() - ts;
      await client.sendDeviceState(devstate);
      if (disks) await client.sendDisks(disks);
      const te = performance.now();
      const ack = await client.commit();
      const tc = performance.now();
      if (ack.epoch !== epoch) throw new CheckpointError('HYDRA_CKPT_EPOCH_MISMATCH', `VM ${this.opts.vm}: store acknowledged epoch ${ack.epoch}, expected ${epoch}`);
      this.freezer?.committed(epoch);
      // A ring that holds the next dirty set keeps guest writes from waiting on the store.
      const cap = Math.min(this.cow.stagingCapBytes ?? 1024 ** 3, this.tracker.ramSize);
      if (copied > this.tracker.staging.length * 0.75 && this.tracker.staging.length < cap) {
        const MB2 = 2 * 1024 * 1024;
        const size = Math.min(cap, Math.max(this.tracker.staging.length * 2, Math.ceil((copied * 1.5) / MB2) * MB2));
        this.log.info({ from: this.tracker.staging.length, to: size }, 'growing the copy-on-write staging ring');
        this.tracker.growStaging(size);
      }
      const c = collected;
      const stats: CheckpointStats = {
        epoch, kind, startedAt,
        pauseMs: t5 - t0, vmPausedMs, stopMs: t1 - t0, collectMs, copyMs, devstateMs, diskMs, contMs,
        pages: copied / PAGE, bytes: copied, devstateBytes: devstate.length,
        sendMs: te - ts, commitMs: tc - te, intervalMs,
        diskChainLength: this.freezer?.chainLength() ?? 0,
        stagingBytes: this.tracker.staging.length,
        cow: { grain: this.cow.grain, faults: c.faults, cowCopies: c.cowCopies, spills: c.spills, serviceMeanUs: c.serviceMeanUs, serviceMaxUs: c.serviceMaxUs, prearmMs: prearm.ms, reprotectedInPause: c.reprotectedGrains },
      };
      this.history.push(stats);
      if (this.history.length > 200) this.history.shift();
      this.opts.onCheckpoint?.(stats);
      const merge = this.freezer?.status().merge;
      this.publish({
        state: 'protected', reason: undefined, committedEpoch: epoch, lastCommitAt: Date.now(), last: stats,
        diskMerges: merge && { merges: merge.merges, layersMerged: merge.layersMerged, lastMergeMs: merge.lastMergeMs, totalMergeMs: merge.totalMergeMs, cancelled: merge.cancelled },
      });
      this.log.debug(stats, 'checkpoint committed');
    } finally {
      // Anything not handed to the store goes into the next checkpoint, and no writer waits on it.
      if (!drained) this.tracker.fail(`checkpoint ${epoch} did not complete`);
    }
  }

  get recentHistory(): readonly CheckpointStats[] {
    return this.history;
  }
}
