// Basic-mode checkpoint daemon: the pause copies the dirty pages into a staging buffer; they are shipped after `cont`.
import fs from 'node:fs';
import os from 'node:os';
import { CheckpointError } from '../errors.js';
import { vmPaths } from '../vm/index.js';
import { DirtyTracker } from '../tracker/index.js';
import type { StoreClient } from '../protocol/index.js';
import { beginPause, openCheckpoint } from './full-copy.js';
import { batchRuns, mergeRuns, totalBytes, type Run } from './runs.js';
import type { CheckpointStats } from './stats.js';
import { CheckpointFaults } from './faults.js';
import { BATCH_BYTES, CheckpointLoop } from './checkpoint-loop.js';
import type { CheckpointerOptions } from './checkpointer-options.js';

export type { CheckpointerOptions } from './checkpointer-options.js';

const PAGE = 4096;
/** Staging to start with, and the most it grows to by default. */
const STAGING_START = 64 * 1024 * 1024;
const STAGING_CAP = 1024 * 1024 * 1024;
/** Incremental checkpoints looked at before the staging buffer may shrink. */
const SHRINK_WINDOW = 20;
const roundUp2M = (n: number) => Math.ceil(n / (2 * 1024 * 1024)) * 2 * 1024 * 1024;
/** Pre-copy rounds before a pause whose dirty set would not fit the staging buffer. */
const MAX_PRECOPY_ROUNDS = 3;
/** Copy threads inside the pause (the device-state save runs in QEMU at the same time). */
const PAUSE_COPY_THREADS = Math.max(1, os.availableParallelism() - 1);


/**
 * Basic-mode checkpoints: stop -> collect and copy the dirty pages into a
 * staging buffer -> device state -> cont -> ship. Dirty sets too large for
 * the buffer go out in pre-copy rounds while the VM still runs.
 */
export class Checkpointer extends CheckpointLoop<DirtyTracker> {
  protected readonly retriedCode = 'HYDRA_CKPT_INJECTED' as const;
  private staging!: Buffer;
  /** Dirty bytes of the last incremental checkpoints, for shrinking the staging buffer. */
  private recentDirty: number[] = [];
  /**
   * Runs collected (re-protected) but not yet acknowledged by the store. They
   * are owed from the instant they are collected: a checkpoint that fails at
   * any step leaves them here, and the next one sends them again, re-read from
   * memory in its pause.
   */
  private unacked: Run[] = [];
  /** Test-only fault injection (HYDRAVM_CKPT_FAULT, see faults.ts). */
  private readonly faults = new CheckpointFaults(process.env.HYDRAVM_CKPT_FAULT);

  constructor(opts: CheckpointerOptions) {
    super(opts, 'basic');
  }

  protected attach(): Promise<DirtyTracker> {
    return DirtyTracker.attach(this.opts.qemuPid);
  }

  protected started(): void {
    this.staging = this.tracker.allocStaging(Math.min(this.opts.stagingBytes ?? STAGING_START, this.stagingCap()));
    this.log.info({ ramSize: this.tracker.ramSize, store: this.opts.store, generation: this.opts.generation }, 'protection started');
  }

  protected armForFullCopy(): void {
    // Re-arm so every write after this instant shows up in the closing pause.
    this.tracker.collect();
  }

  protected override retryContext(): Record<string, unknown> {
    return { unackedBytes: totalBytes(this.unacked) };
  }

  private stagingCap(): number {
    return Math.min(this.opts.stagingCapBytes ?? STAGING_CAP, this.tracker.ramSize);
  }

  /** Grow the staging buffer (pre-faulted, never inside a pause) towards `need` bytes, up to the cap. */
  private growStaging(need: number): void {
    const cap = this.stagingCap();
    if (this.staging.length >= cap || need <= this.staging.length) return;
    const size = Math.min(cap, Math.max(this.staging.length * 2, roundUp2M(need * 1.25)));
    this.log.info({ from: this.staging.length, to: size }, 'growing the checkpoint staging buffer');
    this.replaceStaging(size);
  }

  /**
   * The staging buffer is memory held on the VM's host for as long as the VM
   * is protected, so it follows the dirty sets the interval actually sees:
   * when the last SHRINK_WINDOW incremental checkpoints all used under a
   * quarter of it, it shrinks to twice the largest of them (never below the
   * starting size). A burst later grows it again before its pause.
   */
  private maybeShrinkStaging(dirtyBytes: number): void {
    this.recentDirty.push(dirtyBytes);
    if (this.recentDirty.length > SHRINK_WINDOW) this.recentDirty.shift();
    if (this.recentDirty.length < SHRINK_WINDOW) return;
    const peak = Math.max(...this.recentDirty);
    const floor = Math.min(this.opts.stagingBytes ?? STAGING_START, this.stagingCap());
    if (peak * 4 > this.staging.length || this.staging.length <= floor) return;
    const size = Math.max(floor, roundUp2M(peak * 2));
    if (size >= this.staging.length) return;
    this.log.info({ from: this.staging.length, to: size, peakDirty: peak }, 'shrinking the checkpoint staging buffer');
    this.replaceStaging(size);
    this.recentDirty = [];
  }

  private replaceStaging(size: number): void {
    const next = this.tracker.allocStaging(size);
    const old = this.staging;
    this.staging = next;
    this.tracker.releaseStaging(old);
  }

  /**
   * While the VM runs: if the pages written since the last checkpoint would
   * not fit the staging buffer, grow it; if they still would not, send them
   * now (re-arming their tracking) and look again, like a migration's
   * pre-copy rounds. The pause then copies only what was written since.
   * Returns the rounds taken and the bytes they sent.
   */
  private async precopy(client: StoreClient, kind: 'full' | 'incremental'): Promise<{ rounds: number; bytes: number }> {
    let bytes = 0;
    // A full checkpoint's closing pause sees what the guest wrote during the
    // whole copy, not during an interval: sizing the buffer (held for as long
    // as the VM is protected) after it would keep up to a gigabyte resident
    // for nothing, so it converges by more pre-copy rounds instead.
    const grow = kind === 'incremental';
    const maxRounds = grow ? MAX_PRECOPY_ROUNDS : 2 * MAX_PRECOPY_ROUNDS;
    for (let round = 0; round < maxRounds; round++) {
      const pending = this.tracker.peekWrittenBytes() + (round === 0 ? totalBytes(this.unacked) : 0);
      if (grow) this.growStaging(pending);
      if (pending <= this.staging.length) return { rounds: round, bytes };
      const collected = this.tracker.collect();
      const runs = round === 0 ? mergeRuns(this.unacked, collected) : collected;
      // Sent in this checkpoint: if it is lost, they must go into the next one.
      this.unacked = round === 0 ? runs : mergeRuns(this.unacked, runs);
      // A dropped connection: the send below fails as a real one would.
      if (this.faults.drop('overflow', this.log)) await client.close();
      for (const batch of batchRuns(runs, BATCH_BYTES)) {
        const n = this.tracker.copyRuns(batch, this.bounce);
        await client.sendPages(batch, this.bounce.subarray(0, n));
        bytes += n;
      }
    }
    return { rounds: maxRounds, bytes };
  }

  /**
   * One checkpoint's pause and shipping. `continued`: the BEGIN (and the bulk
   * of the pages) were already sent by the full checkpoint.
   */
  protected async checkpoint(epoch: number, kind: 'full' | 'incremental', continued = false): Promise<void> {
    const client = this.client!;
    const { startedAt, intervalMs } = await openCheckpoint({ client, qmp: this.qmp, freezer: this.freezer, epoch, kind, ramSize: this.tracker.ramSize, continued, lastStart: this.lastStart });
    this.lastStart = startedAt;
    const pre = await this.precopy(client, kind);

    const pause = await beginPause(this.qmp, this.opts.devstateFile, vmPaths(this.opts.vm).pauseGuard);
    const t0 = pause.sentAt;
    const t1 = pause.stoppedAt;
    let contSentAt = 0;
    let vmPausedMs: number | undefined;
    const cont = () => {
      contSentAt ||= performance.now();
      return pause.cont();
    };
    let runs: Run[] = [];
    let stagedRuns: Run[] = [];
    let overflow: Run[] = [];
    let overflowBuf: Buffer | undefined;
    let collectMs = 0;
    let copyMs = 0;
    let devstateMs = 0;
    let diskMs = 0;
    let disks: string[] | undefined;
    let contMs = 0;
    let t5 = t1;
    this.faults.nextAttempt();
    try {
      let collected: Run[];
      try {
        collected = this.tracker.collect();
      } catch (err) {
        // A scan that failed part-way may have re-protected pages it never reported: only a full checkpoint is certain.
        this.needFull = true;
        throw err;
      }
      // After pre-copy rounds the carried-over runs were already sent in this checkpoint (and are owed already).
      runs = pre.rounds > 0 ? collected : mergeRuns(this.unacked, collected);
      // Owed from this instant, whatever fails below.
      this.unacked = pre.rounds > 0 ? mergeRuns(this.unacked, collected) : runs;
      this.faults.hit('collect');
      const t2 = performance.now();
      collectMs = t2 - t1;
      // What fits the staging buffer is copied now and sent after `cont`. A rest (the guest out-wrote
      // the pre-copy rounds and the cap) is copied to memory taken now: slower, but never network I/O.
      let staged = 0;
      let split = runs.length;
      for (let i = 0; i < runs.length; i++) {
        if (staged + runs[i]!.length > this.staging.length) { split = i; break; }
        staged += runs[i]!.length;
      }
      stagedRuns = runs.slice(0, split);
      overflow = runs.slice(split);
      // One copy thread: QEMU saves the device state meanwhile and needs the other core.
      this.tracker.copyRuns(stagedRuns, this.staging, 0, PAUSE_COPY_THREADS);
      this.faults.hit('copy');
      copyMs = performance.now() - t2;
      if (overflow.length > 0) {
        overflowBuf = Buffer.allocUnsafeSlow(totalBytes(overflow));
        this.tracker.copyRuns(overflow, overflowBuf);
      }
      // Without disks the pages are all there: `cont` goes now and runs right after the save.
      if (!this.freezer) void cont().catch(() => undefined); // awaited in the finally below
      devstateMs = (await pause.devstate) - t1;
      this.faults.hit('devstate');
      this.faults.hit('freeze');
      if (this.freezer) {
        const td = performance.now();
        disks = await this.freezer.freeze(epoch);
        diskMs = performance.now() - td;
      }
    } finally {
      // Only waits for QEMU to finish before the next step; a failed save already failed the checkpoint above.
      const saved = await pause.devstate.catch(() => performance.now());
      t5 = await cont();
      // From the later of sending `cont` and the save's answer: what `cont` itself took.
      contMs = t5 - Math.max(contSentAt, saved);
      vmPausedMs = pause.vmPausedMs();
    }
    const devstate = fs.readFileSync(this.opts.devstateFile);

    const ts = performance.now();
    let pos = 0;
    if (this.faults.drop('send', this.log)) await client.close();
    for (const batch of batchRuns(stagedRuns, BATCH_BYTES)) {
      const n = totalBytes(batch);
      await client.sendPages(batch, this.staging.subarray(pos, pos + n));
      pos += n;
    }
    pos = 0;
    // A dropped connection while the overflow is sent: the send below fails as a real one would.
    if (overflow.length > 0 && this.faults.drop('overflow', this.log)) await client.close();
    for (const batch of batchRuns(overflow, BATCH_BYTES)) {
      const n = totalBytes(batch);
      await client.sendPages(batch, overflowBuf!.subarray(pos, pos + n));
      pos += n;
    }
    await client.sendDeviceState(devstate);
    if (disks) await client.sendDisks(disks);
    const te = performance.now();
    this.faults.hit('commit');
    const ack = await client.commit();
    const tc = performance.now();
    this.faults.hit('ack');
    if (ack.epoch !== epoch) throw new CheckpointError('HYDRA_CKPT_EPOCH_MISMATCH', `VM ${this.opts.vm}: store acknowledged epoch ${ack.epoch}, expected ${epoch}`);
    this.unacked = [];
    this.freezer?.committed(epoch);

    const bytes = totalBytes(runs) + pre.bytes;
    // Grow for next time while nothing waits on it.
    if (kind === 'incremental') {
      if (totalBytes(runs) > this.staging.length * 0.75) this.growStaging(totalBytes(runs) * 1.5);
      else this.maybeShrinkStaging(bytes);
    }
    const stats: CheckpointStats = {
      epoch, kind, startedAt,
      pauseMs: t5 - t0, vmPausedMs, stopMs: t1 - t0, collectMs, copyMs, devstateMs, diskMs, contMs,
      pages: bytes / PAGE, bytes, devstateBytes: devstate.length,
      sendMs: te - ts, commitMs: tc - te, intervalMs,
      diskChainLength: this.freezer?.chainLength() ?? 0,
      precopyRounds: pre.rounds, stagingBytes: this.staging.length,
    };
    this.recordCommit(stats);
  }
}
