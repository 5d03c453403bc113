// The checkpoint daemon of one VM in copy-on-write mode: the pause only re-arms the dirty grains; they are copied after `cont`.
import fs from 'node:fs';
import { CheckpointError } from '../errors.js';
import { CowTracker } from '../tracker/index.js';
import { beginPause, openCheckpoint } from './full-copy.js';
import type { Run } from './runs.js';
import type { CheckpointStats, ProtectionStatus } from './stats.js';
import type { CheckpointerOptions } from './checkpointer-options.js';
import { BATCH_BYTES, CheckpointLoop } from './checkpoint-loop.js';
import { vmPaths, writeCowGuard, clearCowGuard } from '../vm/index.js';

const PAGE = 4096;

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
export class CowCheckpointer extends CheckpointLoop<CowTracker> {
  protected readonly retriedCode = 'HYDRA_CKPT_COW_COPY_FAILED' as const;
  private readonly cow: CowSettings;
  private failures = 0;

  constructor(opts: CheckpointerOptions, cow: CowSettings) {
    super(opts, 'cow');
    this.cow = cow;
  }

  protected attach(): Promise<CowTracker> {
    return CowTracker.attach(this.opts.qemuPid, { grain: this.cow.grain, stagingBytes: this.cow.stagingBytes, maxSpillBytes: this.cow.maxSpillBytes });
  }

  protected started(): void {
    // From here guest writes may wait on our handler: if this process dies, the VM's supervisor releases them.
    writeCowGuard(vmPaths(this.opts.vm).cowGuard);
    this.log.info({ ramSize: this.tracker.ramSize, grain: this.cow.grain, staging: this.tracker.staging.length, store: this.opts.store, generation: this.opts.generation }, 'copy-on-write protection started');
  }

  protected armForFullCopy(): void {
    // A copy of a previous (failed) checkpoint may still be pending: give it up, the full copy covers it.
    this.tracker.fail('full checkpoint');
    this.tracker.armAll();
  }

  protected override statusExtras(): Partial<ProtectionStatus> {
    return { cowFailures: this.failures };
  }

  protected override untracked(): void {
    clearCowGuard(vmPaths(this.opts.vm).cowGuard);
  }

  protected override async incremental(epoch: number): Promise<void> {
    try {
      await this.checkpoint(epoch, 'incremental');
    } catch (err) {
      if (!(err instanceof CheckpointError && err.code === 'HYDRA_CKPT_COW_COPY_FAILED')) throw err;
      // The store drops the half-sent checkpoint; its grains are dirty again, so the next one carries them.
      this.failures++;
      this.log.warn({ err: err.message }, 'copy-on-write checkpoint given up; its pages go into the next one');
      await this.client!.abort();
      this.publish({ reason: err.message });
    }
  }

  /**
   * One copy-on-write checkpoint: the pause only marks the dirty grains
   * pending and re-protects those written since the pre-arm; the copier and
   * the fault handler fill the ring after `cont`, and the ring drains to the
   * store while the guest runs.
   */
  protected async checkpoint(epoch: number, kind: 'full' | 'incremental', continued = false): Promise<void> {
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
      // A ring that holds the next dirty set keeps guest writes from waiting on the store. Not sized
      // after the full checkpoint's closing pause: that one holds the writes of the whole bulk copy.
      const cap = Math.min(this.cow.stagingCapBytes ?? 1024 ** 3, this.tracker.ramSize);
      if (kind === 'incremental' && copied > this.tracker.staging.length * 0.75 && this.tracker.staging.length < cap) {
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
      this.recordCommit(stats);
    } finally {
      // Anything not handed to the store goes into the next checkpoint, and no writer waits on it.
      if (!drained) this.tracker.fail(`checkpoint ${epoch} did not complete`);
    }
  }

}
