import fs from 'node:fs';
import os from 'node:os';
import { CheckpointError, HydraError } from '../errors.js';
import { vmPaths } from '../vm/index.js';
import { connectWhenReady, type QmpClient } from '../qmp/index.js';
import { DirtyTracker, processStartTime } from '../tracker/index.js';
import type { StoreClient } from '../protocol/index.js';
import { vmLog } from '../util/log.js';
import { DiskFreezer } from '../disk/index.js';
import { beginPause, joinStore, openCheckpoint, retryable, streamFullCopy } from './full-copy.js';
import { batchRuns, mergeRuns, totalBytes, type Run } from './runs.js';
import { summarize, type CheckpointStats, type ProtectionStatus } from './stats.js';
import { CheckpointFaults } from './faults.js';
import { killFencedQemu } from './fenced-qemu.js';

const PAGE = 4096;
/** Page data per protocol frame. */
const BATCH_BYTES = 8 * 1024 * 1024;
/** Staging to start with, and the most it grows to by default. */
const STAGING_START = 64 * 1024 * 1024;
const STAGING_CAP = 1024 * 1024 * 1024;
/** Pre-copy rounds before a pause whose dirty set would not fit the staging buffer. */
const MAX_PRECOPY_ROUNDS = 3;
/** Copy threads inside the pause (the device-state save runs in QEMU at the same time). */
const PAUSE_COPY_THREADS = Math.max(1, os.availableParallelism() - 1);

export interface CheckpointerOptions {
  vm: string;
  qemuPid: number;
  /** QMP monitor reserved for the checkpointer. */
  qmpSocket: string;
  /** Where QEMU writes the device state during the pause (small, rewritten each time). */
  devstateFile: string;
  store: string;
  /** In a cluster: the active store's address, asked on every (re)connection (see joinStore). */
  resolveStore?: () => Promise<string>;
  secret: string;
  generation: number;
  intervalMs: number;
  /** The VM's launch configuration, kept with the image so a restore can start the same devices. */
  config: unknown;
  /**
   * Pre-faulted staging buffer the pause copies into: its first size (default
   * 64 MiB); it grows, outside the pause, to the dirty sets it sees, up to
   * stagingCapBytes (default 1 GiB, at most the RAM size).
   */
  stagingBytes?: number;
  stagingCapBytes?: number;
  /** Called after every state change and commit. */
  onStatus?: (status: ProtectionStatus) => void;
  /** Called with each committed checkpoint's measurements. */
  onCheckpoint?: (stats: CheckpointStats) => void;
  /**
   * The VM's qcow2 disks: one layer is frozen per checkpoint, inside the pause,
   * so every committed epoch has a disk state that matches its memory.
   */
  disks?: { paths: { path: string }[]; layerDir: string };
  /** Copy-on-write was asked for and could not be given (why): basic checkpoints, and the status says so. */
  cowRefused?: string;
}

/**
 * The checkpoint daemon of one VM (the paper's `hacp`): one full checkpoint
 * taken while the VM runs, then every interval an incremental one:
 * stop -> collect and copy dirty pages -> device state -> cont -> ship.
 * A checkpoint starts only when its predecessor is durable on the store.
 */
export class Checkpointer {
  private readonly opts: CheckpointerOptions;
  private readonly log;
  private tracker!: DirtyTracker;
  private freezer: DiskFreezer | undefined;
  private qmp!: QmpClient;
  private client: StoreClient | undefined;
  private staging!: Buffer;
  private bounce!: Buffer;
  private stopped = false;
  private wake: (() => void) | undefined;
  /**
   * Runs collected (re-protected) but not yet acknowledged by the store. They
   * are owed from the instant they are collected: a checkpoint that fails at
   * any step leaves them here, and the next one sends them again, re-read from
   * memory in its pause.
   */
  private unacked: Run[] = [];
  /** Test-only fault injection (HYDRAVM_CKPT_FAULT, see faults.ts). */
  private readonly faults = new CheckpointFaults(process.env.HYDRAVM_CKPT_FAULT);
  /** QEMU's start time (/proc stat), so a fenced checkpointer never kills a process that reused its pid. */
  private qemuStartTime: number | undefined;
  private needFull = true;
  private history: CheckpointStats[] = [];
  private lastStart: number | null = null;
  readonly status: ProtectionStatus;

  constructor(opts: CheckpointerOptions) {
    this.opts = opts;
    this.log = vmLog(opts.vm);
    this.status = {
      vm: opts.vm,
      store: opts.store,
      generation: opts.generation,
      state: 'starting',
      pid: process.pid,
      mode: 'basic',
      ...(opts.cowRefused ? { cowRefused: opts.cowRefused } : {}),
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

  private publish(patch: Partial<ProtectionStatus> = {}): void {
    Object.assign(this.status, patch, { recent: summarize(this.history), updatedAt: Date.now() });
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
    this.qemuStartTime = processStartTime(this.opts.qemuPid);
    this.tracker = await DirtyTracker.attach(this.opts.qemuPid);
    try {
      this.qmp = await connectWhenReady(this.opts.qmpSocket, { label: `VM ${vm}`, deadlineMs: 5000 });
      if (this.opts.disks && this.opts.disks.paths.length > 0) {
        // Shares the checkpointer's QMP connection: a QMP monitor serves one client.
        this.freezer = await DiskFreezer.open({ vm, qmp: this.qmp, disks: this.opts.disks.paths, layerDir: this.opts.disks.layerDir });
        await this.freezer.prepare();
      }
      this.staging = this.tracker.allocStaging(Math.min(this.opts.stagingBytes ?? STAGING_START, this.stagingCap()));
      this.bounce = this.tracker.allocStaging(BATCH_BYTES);
      this.log.info({ ramSize: this.tracker.ramSize, store: this.opts.store, generation: this.opts.generation }, 'protection started');
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
            await this.checkpoint(this.status.committedEpoch + 1, 'incremental');
          }
        } catch (err) {
          if (!this.retryable(err)) throw err;
          this.log.warn({ err: (err as Error).message, unackedBytes: totalBytes(this.unacked) }, 'store connection failed; retrying');
          this.publish({ state: 'retrying', reason: (err as Error).message });
          // The connection already failed; closing it only frees the socket.
          await this.client?.close().catch(() => undefined);
          this.client = undefined;
          await this.sleep(backoff);
          backoff = Math.min(backoff * 2, 5000);
        }
      }
      this.publish({ state: 'stopped', reason: 'unprotected' });
    } catch (err) {
      if (err instanceof HydraError && err.code === 'HYDRA_STORE_STALE_GENERATION') {
        const fenced = killFencedQemu({ vm: this.opts.vm, generation: this.opts.generation, qemuPid: this.opts.qemuPid, qemuStartTime: this.qemuStartTime }, err, this.log);
        this.publish({ state: 'failed', reason: fenced.message });
        throw fenced;
      }
      this.publish({ state: 'failed', reason: (err as Error).message });
      throw err;
    } finally {
      // Ending anyway; a close that fails only leaves a socket the exit frees.
      await this.client?.close().catch(() => undefined);
      // Unprotected on request: fold the disk layers back into the VM's own disks.
      await this.freezer?.close({ flatten: this.stopped }).catch(() => undefined);
      this.qmp?.close();
      this.tracker.close();
    }
  }

  private stagingCap(): number {
    return Math.min(this.opts.stagingCapBytes ?? STAGING_CAP, this.tracker.ramSize);
  }

  /** Grow the staging buffer (pre-faulted, never inside a pause) towards `need` bytes, up to the cap. */
  private growStaging(need: number): void {
    const cap = this.stagingCap();
    if (this.staging.length >= cap || need <= this.staging.length) return;
    const MB2 = 2 * 1024 * 1024;
    const size = Math.min(cap, Math.max(this.staging.length * 2, Math.ceil((need * 1.25) / MB2) * MB2));
    this.log.info({ from: this.staging.length, to: size }, 'growing the checkpoint staging buffer');
    this.staging = this.tracker.allocStaging(size);
  }

  /**
   * While the VM runs: if the pages written since the last checkpoint would
   * not fit the staging buffer, grow it; if they still would not, send them
   * now (re-arming their tracking) and look again, like a migration's
   * pre-copy rounds. The pause then copies only what was written since.
   * Returns the rounds taken and the bytes they sent.
   */
  private async precopy(client: StoreClient): Promise<{ rounds: number; bytes: number }> {
    let bytes = 0;
    for (let round = 0; round < MAX_PRECOPY_ROUNDS; round++) {
      const pending = this.tracker.peekWrittenBytes() + (round === 0 ? totalBytes(this.unacked) : 0);
      this.growStaging(pending);
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
    return { rounds: MAX_PRECOPY_ROUNDS, bytes };
  }

  /** QEMU gone or this incarnation fenced: stop. Store trouble (or an injected test fault): retry. */
  private retryable(err: unknown): boolean {
    return retryable(err, 'HYDRA_CKPT_INJECTED');
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


  /** Full checkpoint: copy all RAM while the VM runs, then one pause captures what changed meanwhile. */
  private async fullCheckpoint(): Promise<void> {
    const client = this.client!;
    const epoch = this.status.committedEpoch + 1;
    // Re-arm first so every write after this instant shows up in the closing pause.
    this.tracker.collect();
    // Only pages the memfd holds: reading never-touched pages through the mapping would allocate them all.
    const copied = await streamFullCopy({
      client, epoch, ramSize: this.tracker.ramSize, config: this.opts.config, runs: this.tracker.populatedRuns(),
      copyRuns: (batch, dst) => this.tracker.copyRuns(batch, dst), bounce: this.bounce,
      stopped: () => this.stopped, publish: (p) => this.publish(p), log: this.log,
      closingPause: () => this.checkpoint(epoch, 'full', true),
    });
    if (copied) this.needFull = false;
  }

  /**
   * One checkpoint's pause and shipping. `continued`: the BEGIN (and the bulk
   * of the pages) were already sent by the full checkpoint.
   */
  private async checkpoint(epoch: number, kind: 'full' | 'incremental', continued = false): Promise<void> {
    const client = this.client!;
    const { startedAt, intervalMs } = await openCheckpoint({ client, qmp: this.qmp, freezer: this.freezer, epoch, kind, ramSize: this.tracker.ramSize, continued, lastStart: this.lastStart });
    this.lastStart = startedAt;
    const pre = await this.precopy(client);

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
    if (totalBytes(runs) > this.staging.length * 0.75) this.growStaging(totalBytes(runs) * 1.5);
    const stats: CheckpointStats = {
      epoch, kind, startedAt,
      pauseMs: t5 - t0, vmPausedMs, stopMs: t1 - t0, collectMs, copyMs, devstateMs, diskMs, contMs,
      pages: bytes / PAGE, bytes, devstateBytes: devstate.length,
      sendMs: te - ts, commitMs: tc - te, intervalMs,
      diskChainLength: this.freezer?.chainLength() ?? 0,
      precopyRounds: pre.rounds, stagingBytes: this.staging.length,
    };
    this.history.push(stats);
    this.opts.onCheckpoint?.(stats);
    if (this.history.length > 200) this.history.shift();
    const merge = this.freezer?.status().merge;
    this.publish({
      state: 'protected', reason: undefined, committedEpoch: epoch, lastCommitAt: Date.now(), last: stats,
      diskMerges: merge && { merges: merge.merges, layersMerged: merge.layersMerged, lastMergeMs: merge.lastMergeMs, totalMergeMs: merge.totalMergeMs, cancelled: merge.cancelled },
    });
    this.log.debug(stats, 'checkpoint committed');
  }

  get recentHistory(): readonly CheckpointStats[] {
    return this.history;
  }
}
