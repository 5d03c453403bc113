import { randomBytes } from 'node:crypto';
import { constants as fsc } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { QmpClient } from '../qmp/index.js';
import { vmLog } from '../util/log.js';
import { DiskError } from '../errors.js';
import { encodeLayerId } from './layer-id.js';
import { fsyncFileAndDir, isNoSpace, qemuImg, type ImageInfo } from './qemu-img.js';
import { PIN_ALL, pinnedFiles } from './pins.js';
import { sleep } from '../util/sleep.js';
import { writeFileAtomic } from '../util/atomic-write.js';

/**
 * Disk state consistent with every checkpoint (docs/disk.md).
 *
 * Each protected disk is a qcow2 chain in the running QEMU:
 *
 *   base (the VM's own disk file) <- L1 <- ... <- Lk <- active
 *
 * - prepare() (VM running): `qemu-img create -u -b <active> -F qcow2 NEXT`
 *   with the backing name written into NEXT's header, then QMP blockdev-add
 *   of NEXT with "backing": null.
 * - freeze(epoch) (VM paused): one QMP `transaction` of blockdev-snapshot
 *   {node: active, overlay: NEXT} for all disks. The old active is now the
 *   frozen layer of `epoch`: its chain is exactly the disk at that pause.
 * - committed(epoch): layers strictly below the committed frozen layer (and
 *   below any layer a running restore pinned) are merged into the base by a
 *   QMP block-commit in the background. The chain stays valid during the job
 *   (the merged data is shadowed by the layers above until QEMU relinks the
 *   overlay's header to the base at completion); merged files are deleted only
 *   after that, so a crash at any point leaves a usable chain.
 *
 * QEMU's commit job relinks the overlay's header before it flushes the base
 * (the flush comes with the base's reopen read-only, after the relink), so a
 * QEMU killed in between leaves a frozen layer whose chain skips the merged
 * data: the base's new clusters were still in QEMU's qcow2 metadata cache. So
 * jobs run with auto-finalize off: once a job has copied everything (state
 * "pending") the base node is flushed, and only then is the job finalized.
 *
 * A running commit job blocks snapshots of the active layer (QEMU: "block
 * device is in use by block job"), so freeze() cancels a running merge
 * (cancelling leaves the chain as it was) unless the chain has reached
 * `maxLayers`, when it waits for the merge instead (the pause grows, the chain
 * does not). Merges usually finish well inside one checkpoint interval.
 */

export interface DiskFreezerOptions {
  vm: string;
  /** A connected QMP client (shared with the checkpointer) or the path of a QMP socket. */
  qmp: QmpClient | string;
  /** The VM's disks in device order (vblk0, vblk1, ...): each the file its chain is based on. */
  disks: { path: string }[];
  /** Shared storage directory for layers; a subdirectory per VM is created. */
  layerDir: string;
  /** Hard bound on layers per disk (base + frozen + active); at it freeze waits for the merge. Default 6. */
  maxLayers?: number;
  /** Delay after a freeze before preparing the next overlay (keeps qemu-img off the pause). Default 20 ms. */
  prepareDelayMs?: number;
  /** Longest a freeze waits for a prepare already in flight. Default 1000 ms. */
  prepareWaitMs?: number;
  /** Do not merge automatically on committed() (tests). */
  manualMerge?: boolean;
}

interface Layer {
  node: string;
  file: string;
  /** Epoch this layer was frozen for; null for the base, the active layer, or layers found at open. */
  epoch: number | null;
}

interface DiskChain {
  index: number;
  /** qdev path of the device's block backend, from query-block. */
  qdev: string;
  size: number;
  /** [0] = base (merge target, the disk's own file) ... last = active. */
  layers: Layer[];
  /** Layers below the base (the disk's own backing files): never touched. */
  below: number;
  next: Layer | undefined;
  /** The root node the device is attached to when it is a filter above the active layer (a VM restored into a restore shell). */
  root?: string;
}

export interface MergeStats {
  merges: number;
  cancelled: number;
  layersMerged: number;
  lastMergeMs: number | null;
  totalMergeMs: number;
  waitsInFreeze: number;
}

export interface DiskStatus {
  vm: string;
  chainLength: number;
  disks: { index: number; layers: { file: string; epoch: number | null }[]; prepared: string | null }[];
  committedEpoch: number | null;
  merging: boolean;
  lastError: string | null;
  merge: MergeStats;
}

interface BlockInfo {
  qdev?: string;
  device?: string;
  inserted?: { 'node-name': string; ro: boolean; file: string; image: ImageInfo & { 'backing-image'?: unknown } };
}
interface NamedNode {
  'node-name': string;
  drv: string;
  file: string;
  ro: boolean;
}
interface BlockGraph {
  nodes: { id: number; name: string; type: string }[];
  edges: { parent: number; child: number; name: string }[];
}
interface JobInfo {
  id: string;
  type: string;
  status: string;
  error?: string;
}

const NODE_PREFIX = 'hv';
const JOB_PREFIX = 'hvm';

async function realpathOr(p: string): Promise<string> {
  try {
    return await fs.realpath(p);
  } catch {
    return path.resolve(p);
  }
}

/** Validate a disk file before protection: it must exist, be qcow2 and be writable. */
export async function checkDiskFile(file: string): Promise<ImageInfo> {
  const unsupported = (why: string) => new DiskError('HYDRA_DISK_UNSUPPORTED', `disk ${file}: ${why}; HydraVM protects writable qcow2 disks only, refusing to start protection`);
  try {
    await fs.access(file, fsc.F_OK);
  } catch {
    throw unsupported('does not exist');
  }
  const r = await qemuImg(['info', '-U', '--output=json', file]);
  if (r.code !== 0) throw unsupported(`qemu-img info failed: ${r.stderr}`);
  const info = JSON.parse(r.stdout) as ImageInfo;
  if (info.format !== 'qcow2') throw unsupported(`is ${info.format}, not qcow2 (convert it: qemu-img convert -O qcow2 ${file} NEW.qcow2)`);
  // access(W_OK) is true for root whatever the mode bits, so look at them too (a read-only mount still fails access with EROFS).
  const st = await fs.stat(file);
  let writable = (st.mode & 0o222) !== 0;
  try {
    await fs.access(file, fsc.W_OK);
  } catch {
    writable = false;
  }
  if (!writable) throw unsupported('is read-only');
  return info;
}

export class DiskFreezer {
  private readonly vm: string;
  private readonly qmp: QmpClient;
  private readonly ownsQmp: boolean;
  private readonly dir: string;
  private readonly maxLayers: number;
  private readonly prepareDelayMs: number;
  private readonly prepareWaitMs: number;
  private readonly manualMerge: boolean;
  private readonly chains: DiskChain[];
  private readonly log;
  /** Unique per freezer instance: names never collide with an earlier incarnation's leftovers. */
  private readonly token = randomBytes(3).toString('hex');
  private seq = 0;
  private jobSeq = 0;
  private closed = false;
  private prepareTask: Promise<void> | null = null;
  private prepareTimer: NodeJS.Timeout | undefined;
  private lastPrepareError: Error | null = null;
  private committedEpoch: number | null = null;
  private mergeTask: Promise<void> | null = null;
  private mergeAgain = false;
  /** Jobs of the merge in flight. */
  private jobs: string[] = [];
  private cancelRequested = false;
  /** A freeze is in progress: no merge job may start (it would block the snapshot). */
  private freezing = false;
  private lastError: string | null = null;
  readonly mergeStats: MergeStats = { merges: 0, cancelled: 0, layersMerged: 0, lastMergeMs: null, totalMergeMs: 0, waitsInFreeze: 0 };

  private constructor(vm: string, qmp: QmpClient, ownsQmp: boolean, dir: string, chains: DiskChain[], opts: DiskFreezerOptions) {
    this.vm = vm;
    this.qmp = qmp;
    this.ownsQmp = ownsQmp;
    this.dir = dir;
    this.chains = chains;
    this.maxLayers = Math.max(4, opts.maxLayers ?? 6);
    this.prepareDelayMs = opts.prepareDelayMs ?? 20;
    this.prepareWaitMs = opts.prepareWaitMs ?? 1000;
    this.manualMerge = opts.manualMerge ?? false;
    this.log = vmLog(vm);
  }

  /**
   * Validate the disks (writable qcow2, attached to the VM), learn each
   * device's current chain from QEMU (a restarted freezer continues the chain
   * it finds, after letting an interrupted merge finish), and clean up
   * overlays an earlier incarnation prepared but never used.
   */
  static async open(opts: DiskFreezerOptions): Promise<DiskFreezer> {
    if (opts.disks.length === 0) throw new DiskError('HYDRA_DISK_UNSUPPORTED', `VM ${opts.vm}: no disks to protect`);
    const sizes: number[] = [];
    for (const d of opts.disks) sizes.push((await checkDiskFile(d.path))['virtual-size']);

    const dir = path.join(path.resolve(opts.layerDir), opts.vm);
    await fs.mkdir(dir, { recursive: true });
    const ownsQmp = typeof opts.qmp === 'string';
    const qmp = typeof opts.qmp === 'string' ? await QmpClient.connect(opts.qmp, { label: `VM ${opts.vm}` }) : opts.qmp;
    try {
      // An interrupted merge of an earlier incarnation: let it finish (the chain is valid either way).
      await waitOurJobs(qmp, opts.vm);
      const chains = await readChains(qmp, opts.vm, opts.disks.map((d) => d.path), sizes);
      const freezer = new DiskFreezer(opts.vm, qmp, ownsQmp, dir, chains, opts);
      await freezer.collectGarbage();
      await freezer.writeRecord();
      return freezer;
    } catch (err) {
      if (ownsQmp) qmp.close();
      throw err;
    }
  }

  /** Longest chain over the disks, counting the base and the active layer. */
  chainLength(): number {
    return Math.max(...this.chains.map((c) => c.layers.length));
  }

  status(): DiskStatus {
    return {
      vm: this.vm,
      chainLength: this.chainLength(),
      disks: this.chains.map((c) => ({ index: c.index, layers: c.layers.map((l) => ({ file: l.file, epoch: l.epoch })), prepared: c.next?.file ?? null })),
      committedEpoch: this.committedEpoch,
      merging: this.mergeTask !== null,
      lastError: this.lastError,
      merge: { ...this.mergeStats },
    };
  }

  /** Files of the current chain of disk `i`, base first (tests, status). */
  chainFiles(i: number): string[] {
    return this.chains[i]!.layers.map((l) => l.file);
  }

  /**
   * Outside the pause: create and attach the next overlay of every disk that
   * has none. Idempotent; concurrent calls share one run. A full filesystem
   * gives HYDRA_DISK_NO_SPACE and changes nothing in the chain.
   */
  prepare(): Promise<void> {
    if (this.prepareTimer) {
      clearTimeout(this.prepareTimer);
      this.prepareTimer = undefined;
    }
    if (!this.prepareTask) {
      this.prepareTask = this.doPrepare().finally(() => { this.prepareTask = null; });
    }
    return this.prepareTask;
  }

  private async doPrepare(): Promise<void> {
    try {
      for (const chain of this.chains) {
        if (chain.next || this.closed) continue;
        const active = chain.layers[chain.layers.length - 1]!;
        const seq = ++this.seq;
        const file = path.join(this.dir, `d${chain.index}-${this.token}-${seq}.qcow2`);
        const node = `${NODE_PREFIX}${chain.index}-${this.token}-${seq}`;
        const r = await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', active.file, '-F', 'qcow2', file, String(chain.size)]);
        if (r.code !== 0) {
          await fs.rm(file, { force: true });
          if (isNoSpace(r.stderr)) {
            throw new DiskError('HYDRA_DISK_NO_SPACE', `VM ${this.vm}: no space in ${this.dir} for the next disk layer (${r.stderr}); the last committed checkpoint's disk is unchanged, checkpoints cannot continue until space is freed`);
          }
          throw new DiskError('HYDRA_DISK_PREPARE_FAILED', `VM ${this.vm}: qemu-img create ${file} failed: ${r.stderr}`);
        }
        try {
          await fsyncFileAndDir(file);
          await this.qmp.execute('blockdev-add', {
            driver: 'qcow2',
            'node-name': node,
            file: { driver: 'file', filename: file },
            backing: null,
          });
        } catch (err) {
          await fs.rm(file, { force: true });
          const msg = (err as Error).message;
          if (isNoSpace(msg) || (err as NodeJS.ErrnoException).code === 'ENOSPC') {
            throw new DiskError('HYDRA_DISK_NO_SPACE', `VM ${this.vm}: no space in ${this.dir} for the next disk layer (${msg}); the last committed checkpoint's disk is unchanged`, { cause: err });
          }
          throw new DiskError('HYDRA_DISK_PREPARE_FAILED', `VM ${this.vm}: attaching ${file} failed: ${msg}`, { cause: err });
        }
        chain.next = { node, file, epoch: null };
      }
      this.lastPrepareError = null;
    } catch (err) {
      this.lastPrepareError = err as Error;
      this.lastError = (err as Error).message;
      throw err;
    }
  }

  private schedulePrepare(): void {
    if (this.closed || this.prepareTimer) return;
    this.prepareTimer = setTimeout(() => {
      this.prepareTimer = undefined;
      this.prepare().catch((err) => this.log.warn({ err: (err as Error).message }, 'preparing the next disk layer failed; will retry at the next checkpoint'));
    }, this.prepareDelayMs);
  }

  /**
   * Inside the pause: freeze every disk's active layer as the disk of `epoch`
   * in one atomic QMP transaction. Returns one layer id per disk (device order)
   * for the store. Throws (changing nothing) when no overlay is prepared.
   */
  async freeze(epoch: number): Promise<string[]> {
    if (this.closed) throw new DiskError('HYDRA_DISK_FREEZE_FAILED', `VM ${this.vm}: disk freezer is closed`);
    if (this.chains.some((c) => !c.next) && this.prepareTask) {
      // A prepare already running (a very slow host, or a checkpoint right after the last one): its
      // qemu-img is nearly done, and waiting briefly beats failing the checkpoint. Never start one here.
      await Promise.race([this.prepareTask.catch(() => undefined), sleep(this.prepareWaitMs)]);
    }
    if (this.chains.some((c) => !c.next)) {
      // Preparing now would put qemu-img into the pause: fail this checkpoint, retry soon.
      const why = this.lastPrepareError?.message ?? (this.prepareTask ? 'the next overlay is still being prepared' : 'prepare() was not called');
      this.schedulePrepare();
      const code = this.lastPrepareError instanceof DiskError && this.lastPrepareError.code === 'HYDRA_DISK_NO_SPACE' ? 'HYDRA_DISK_NO_SPACE' : 'HYDRA_DISK_NOT_PREPARED';
      throw new DiskError(code, `VM ${this.vm}: cannot freeze disks for epoch ${epoch}: no prepared overlay (${why})`);
    }
    this.freezing = true;
    try {
      if (this.jobs.length > 0) await this.yieldMerge();
      const actions = this.chains.map((c) => ({ type: 'blockdev-snapshot', data: { node: c.layers[c.layers.length - 1]!.node, overlay: c.next!.node } }));
      try {
        await this.qmp.execute('transaction', { actions });
      } catch (err) {
        throw new DiskError('HYDRA_DISK_FREEZE_FAILED', `VM ${this.vm}: disk snapshot transaction for epoch ${epoch} failed: ${(err as Error).message}`, { cause: err });
      }
    } finally {
      this.freezing = false;
    }
    const ids: string[] = [];
    for (const c of this.chains) {
      const frozen = c.layers[c.layers.length - 1]!;
      frozen.epoch = epoch;
      c.layers.push(c.next!);
      c.next = undefined;
      ids.push(encodeLayerId({ disk: c.index, epoch, layer: frozen.file }));
    }
    this.schedulePrepare();
    return ids;
  }

  /** A merge job holds the active layer: cancel it (chain unchanged), or wait for it when the chain is at its bound. */
  private async yieldMerge(): Promise<void> {
    if (this.chainLength() + 1 > this.maxLayers) {
      this.mergeStats.waitsInFreeze++;
      this.log.warn({ chainLength: this.chainLength(), maxLayers: this.maxLayers }, 'disk chain at its bound: checkpoint pause waits for the merge');
      // The merge reports its own failure (and logs it); here we only wait for it to end.
      await this.mergeTask?.catch(() => undefined);
      if (this.jobs.length === 0) return;
    }
    this.cancelRequested = true;
    for (const id of this.jobs) {
      // A job that already finished cannot be cancelled; the wait below sees every job stop.
      await this.qmp.execute('block-job-cancel', { device: id, force: true }).catch(() => undefined);
    }
    // Wait until QEMU released the nodes (the job left "running"); the merge task dismisses it.
    const deadline = Date.now() + 5000;
    for (;;) {
      const jobs = await this.qmp.execute<JobInfo[]>('query-jobs');
      const busy = jobs.filter((j) => this.jobs.includes(j.id) && !['concluded', 'null'].includes(j.status));
      if (busy.length === 0) break;
      if (Date.now() > deadline) throw new DiskError('HYDRA_DISK_FREEZE_FAILED', `VM ${this.vm}: merge job ${busy[0]!.id} did not stop within 5 s`);
      await sleep(1);
    }
    // Dismissing a job QEMU already dropped fails harmlessly.
    for (const id of this.jobs) await this.qmp.execute('job-dismiss', { id }).catch(() => undefined);
  }

  /**
   * The store acknowledged `epoch`: layers no committed epoch needs any more
   * are merged in the background (never the committed frozen layer itself,
   * nor a layer a running restore pinned).
   */
  committed(epoch: number): void {
    this.committedEpoch = epoch;
    if (!this.manualMerge) this.requestMerge();
  }

  /** Start (or queue) a merge; resolves when no merge is pending. */
  merge(): Promise<void> {
    this.requestMerge();
    return this.mergeTask ?? Promise.resolve();
  }

  private requestMerge(): void {
    if (this.closed) return;
    if (this.mergeTask) {
      this.mergeAgain = true;
      return;
    }
    this.mergeTask = (async () => {
      do {
        this.mergeAgain = false;
        try {
          await this.mergeOnce();
        } catch (err) {
          this.lastError = (err as Error).message;
          this.log.warn({ err: (err as Error).message }, 'disk layer merge failed; the chain is unchanged and stays usable');
        }
      } while (this.mergeAgain && !this.closed);
    })().finally(() => { this.mergeTask = null; });
  }

  /** Index (in layers) of the highest layer that may be merged into the base, per disk; 0 = none. */
  private async mergeTops(): Promise<number[]> {
    const pinned = await pinnedFiles(this.dir);
    return this.chains.map((c) => {
      if (this.committedEpoch === null) return 0;
      let limit = -1;
      for (let i = c.layers.length - 2; i >= 1; i--) {
        if (c.layers[i]!.epoch === this.committedEpoch) { limit = i; break; }
      }
      if (limit < 0 || pinned.has(PIN_ALL) || pinned.has(c.layers[0]!.file)) return 0;
      for (let i = 1; i < limit; i++) {
        if (pinned.has(c.layers[i]!.file)) { limit = i; break; }
      }
      return limit - 1;
    });
  }

  private async mergeOnce(): Promise<void> {
    const tops = await this.mergeTops();
    if (tops.every((t) => t < 1) || this.closed) return;
    const t0 = performance.now();
    this.cancelRequested = false;
    const started: { chain: DiskChain; top: number; job: string; active: string }[] = [];
    try {
      for (const chain of this.chains) {
        const top = tops[chain.index]!;
        if (top < 1) continue;
        if (this.freezing) throw new DiskError('HYDRA_DISK_BUSY', 'freeze in progress');
        const job = `${JOB_PREFIX}${chain.index}-${this.token}-${++this.jobSeq}`;
        const active = chain.layers[chain.layers.length - 1]!.node;
        this.jobs.push(job);
        await this.qmp.execute('block-commit', {
          'job-id': job,
          // block-commit names a root node; under a filter the active layer is not one.
          device: chain.root ?? active,
          'top-node': chain.layers[top]!.node,
          'base-node': chain.layers[0]!.node,
          'backing-file': chain.layers[0]!.file,
          'auto-finalize': false,
          'auto-dismiss': false,
        });
        started.push({ chain, top, job, active });
      }
      // Everything copied: make the base durable, then let QEMU relink the overlays onto it.
      const copied = await this.awaitCopied(started.map((s) => s.job));
      for (const s of started) {
        if (!copied.has(s.job)) continue;
        await flushNode(this.qmp, s.chain.layers[0]!.node, this.vm);
        await this.qmp.execute('job-finalize', { id: s.job });
      }
    } catch (err) {
      // A freeze may have cancelled between our commands, or QEMU refused: undo what started.
      for (const s of started) await this.qmp.execute('block-job-cancel', { device: s.job, force: true }).catch(() => undefined);
      await this.settle(started.map((s) => s.job));
      this.jobs = [];
      if (this.cancelRequested || this.freezing) { this.mergeStats.cancelled++; return; }
      throw err;
    }
    const results = await this.settle(started.map((s) => s.job));
    this.jobs = [];
    let merged = 0;
    for (const s of started) {
      const res = results.get(s.job);
      if (!res || res.error !== undefined) {
        if (this.cancelRequested) continue;
        this.log.warn({ job: s.job, err: res?.error ?? 'vanished' }, 'disk merge job did not complete; chain unchanged');
        continue;
      }
      // Completed: QEMU relinked layers[top+1] to the base. Drop the merged layers.
      const removed = s.chain.layers.splice(1, s.top);
      merged += removed.length;
      await this.syncFile(s.chain.layers[0]!.file);
      await this.syncFile(s.chain.layers[1]!.file);
      for (const l of removed.reverse()) {
        // QEMU may have removed the node with its job; the layer file is removed either way.
        await this.qmp.execute('blockdev-del', { 'node-name': l.node }).catch(() => undefined);
        if (path.dirname(l.file) === this.dir) await fs.rm(l.file, { force: true });
      }
    }
    if (this.cancelRequested && merged === 0) {
      this.mergeStats.cancelled++; // retried at the next committed()
      return;
    }
    const ms = performance.now() - t0;
    this.mergeStats.merges++;
    this.mergeStats.layersMerged += merged;
    this.mergeStats.lastMergeMs = ms;
    this.mergeStats.totalMergeMs += ms;
    await this.writeRecord();
  }

  /**
   * When protection ends, merge every layer back into the VM's own disk file
   * (an active block-commit, completed once QEMU mirrors new writes): otherwise
   * the VM would keep writing into a layer under .hydravm-layers and the disk
   * its spec names would go stale for the next start.
   */
  private async flatten(): Promise<void> {
    for (const chain of this.chains) {
      if (chain.layers.length < 2) continue;
      const job = `${JOB_PREFIX}flat${chain.index}-${this.token}-${++this.jobSeq}`;
      const active = chain.layers[chain.layers.length - 1]!.node;
      await this.qmp.execute('block-commit', { 'job-id': job, device: chain.root ?? active, 'top-node': active, 'base-node': chain.layers[0]!.node, 'auto-dismiss': false });
      const deadline = Date.now() + 300_000;
      for (;;) {
        const j = (await this.qmp.execute<JobInfo[]>('query-jobs')).find((x) => x.id === job);
        if (!j) throw new DiskError('HYDRA_DISK_MERGE_FAILED', `VM ${this.vm}: flatten job ${job} vanished`);
        if (j.status === 'ready') break;
        if (j.status === 'concluded') throw new DiskError('HYDRA_DISK_MERGE_FAILED', `VM ${this.vm}: flattening disk ${chain.index} failed: ${j.error ?? 'concluded early'}`);
        if (Date.now() > deadline) throw new DiskError('HYDRA_DISK_MERGE_FAILED', `VM ${this.vm}: flattening disk ${chain.index} not ready after 300 s`);
        await sleep(10);
      }
      await this.qmp.execute('job-complete', { id: job });
      const res = (await this.settle([job])).get(job);
      if (res?.error) throw new DiskError('HYDRA_DISK_MERGE_FAILED', `VM ${this.vm}: flattening disk ${chain.index} failed: ${res.error}`);
      // The VM now runs on the base; its merged clusters may still sit in QEMU's metadata cache.
      await flushNode(this.qmp, chain.layers[0]!.node, this.vm);
      const removed = chain.layers.splice(1);
      await this.syncFile(chain.layers[0]!.file);
      for (const l of removed.reverse()) {
        // QEMU may have removed the node with its job; the layer file is removed either way.
        await this.qmp.execute('blockdev-del', { 'node-name': l.node }).catch(() => undefined);
        if (path.dirname(l.file) === this.dir) await fs.rm(l.file, { force: true });
      }
      this.log.info({ disk: chain.index, layers: removed.length, file: chain.layers[0]!.file }, 'disk layers merged back into the VM disk');
    }
    await this.writeRecord();
  }

  /** Wait until each job has copied everything ("pending") or ended; returns the pending ones. */
  private async awaitCopied(ids: string[]): Promise<Set<string>> {
    const pendingJobs = new Set<string>();
    let waiting = ids.slice();
    let delay = 2;
    while (waiting.length > 0) {
      const jobs = await this.qmp.execute<JobInfo[]>('query-jobs');
      waiting = waiting.filter((id) => {
        const j = jobs.find((x) => x.id === id);
        if (j?.status === 'pending') pendingJobs.add(id);
        return j !== undefined && !['pending', 'concluded', 'null', 'aborting'].includes(j.status);
      });
      if (waiting.length) {
        await sleep(delay);
        delay = Math.min(delay * 2, 50);
      }
    }
    return pendingJobs;
  }

  /** Wait for jobs to leave the running states; return their final error (undefined = success) and dismiss them. */
  private async settle(ids: string[]): Promise<Map<string, { error: string | undefined }>> {
    const out = new Map<string, { error: string | undefined }>();
    let pending = ids.slice();
    let delay = 2;
    while (pending.length > 0) {
      const jobs = await this.qmp.execute<JobInfo[]>('query-jobs');
      const still: string[] = [];
      for (const id of pending) {
        const j = jobs.find((x) => x.id === id);
        if (!j) { out.set(id, { error: 'job dismissed before completion (cancelled by a freeze)' }); continue; }
        if (j.status === 'concluded') {
          out.set(id, { error: j.error });
          // Dismissing a job QEMU already dropped fails harmlessly; its error was read above.
          await this.qmp.execute('job-dismiss', { id }).catch(() => undefined);
        } else still.push(id);
      }
      pending = still;
      if (pending.length) {
        await sleep(delay);
        delay = Math.min(delay * 2, 50);
      }
    }
    return out;
  }

  private async syncFile(file: string): Promise<void> {
    try {
      const fh = await fs.open(file, 'r');
      try { await fh.datasync(); } finally { await fh.close(); }
    } catch { /* best effort: QEMU flushed on reopen */ }
  }

  /** Remove our nodes that are in no chain (prepared by an earlier incarnation, or merged before a crash). */
  private async collectGarbage(): Promise<void> {
    const inChain = new Set(this.chains.flatMap((c) => c.layers.map((l) => l.node)));
    const nodes = await this.qmp.execute<NamedNode[]>('query-named-block-nodes', { flat: true });
    const ours = nodes.filter((n) => n['node-name'].startsWith(NODE_PREFIX) && /^hv\d+-[0-9a-f]{6}-\d+$/.test(n['node-name']) && !inChain.has(n['node-name']));
    // Delete overlays before what they might reference; several passes handle small leftover chains.
    for (let pass = 0; pass < 4 && ours.length; pass++) {
      for (let i = ours.length - 1; i >= 0; i--) {
        const n = ours[i]!;
        try {
          await this.qmp.execute('blockdev-del', { 'node-name': n['node-name'] });
          if (path.dirname(n.file) === this.dir) await fs.rm(n.file, { force: true });
          ours.splice(i, 1);
        } catch { /* still referenced: next pass */ }
      }
    }
  }

  /** chain.json in the layer directory: for operators and status, written atomically. Not the source of truth (the qcow2 headers are). */
  private async writeRecord(): Promise<void> {
    try {
      await writeFileAtomic(path.join(this.dir, 'chain.json'), JSON.stringify({ ...this.status(), updatedAt: new Date().toISOString() }, null, 2) + '\n');
    } catch (err) {
      this.log.debug({ err: (err as Error).message }, 'writing chain.json failed');
    }
  }

  /**
   * Stop: no more prepares or merges (a merge in flight finishes), detach and
   * delete the prepared overlays. The VM keeps running on its chain.
   */
  async close(opts: { flatten?: boolean } = {}): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (opts.flatten) {
      // Background tasks log their own failures; closing only waits for them to end.
      await this.prepareTask?.catch(() => undefined);
      await this.mergeTask?.catch(() => undefined);
      try {
        await this.flatten();
      } catch (err) {
        this.log.error({ err: (err as Error).message }, 'merging the disk layers back into the VM\'s disk failed; the VM keeps running on its layer chain (see chain.json)');
      }
    }
    if (this.prepareTimer) clearTimeout(this.prepareTimer);
    // Background tasks log their own failures; closing only waits for them to end.
    await this.prepareTask?.catch(() => undefined);
    await this.mergeTask?.catch(() => undefined);
    for (const c of this.chains) {
      if (!c.next) continue;
      // The prepared overlay was never used; a node QEMU no longer has is already gone.
      await this.qmp.execute('blockdev-del', { 'node-name': c.next.node }).catch(() => undefined);
      await fs.rm(c.next.file, { force: true });
      c.next = undefined;
    }
    await this.writeRecord();
    if (this.ownsQmp) this.qmp.close();
  }
}

/** Wait for merge jobs of an earlier freezer on this QEMU, then dismiss them. */
async function waitOurJobs(qmp: QmpClient, vm: string): Promise<void> {
  const deadline = Date.now() + 120_000;
  for (;;) {
    const jobs = (await qmp.execute<JobInfo[]>('query-jobs')).filter((j) => j.id.startsWith(JOB_PREFIX));
    for (const j of jobs) {
      if (j.status === 'pending') {
        // A merge that copied everything and waits for the freezer that died: finish it the safe way.
        // Which node is its base is not reported, so every node is flushed (clean ones cost nothing).
        const nodes = await qmp.execute<NamedNode[]>('query-named-block-nodes', { flat: true });
        for (const n of nodes) await flushNode(qmp, n['node-name'], vm);
        // It may have been cancelled meanwhile; the loop below sees it end either way.
        await qmp.execute('job-finalize', { id: j.id }).catch(() => undefined);
      } else if (j.status === 'ready') {
        // A flatten waiting for its completion: cancel it, the VM keeps running on its chain.
        await qmp.execute('job-cancel', { id: j.id }).catch(() => undefined);
      }
    }
    const running = jobs.filter((j) => !['concluded', 'null'].includes(j.status));
    // Dismissing a job QEMU already dropped fails harmlessly.
    for (const j of jobs) if (j.status === 'concluded') await qmp.execute('job-dismiss', { id: j.id }).catch(() => undefined);
    if (running.length === 0) return;
    if (Date.now() > deadline) throw new DiskError('HYDRA_DISK_UNSUPPORTED', `merge job ${running[0]!.id} still running after 120 s`);
    await sleep(50);
  }
}

/**
 * Flush one block node: its data and qcow2 metadata reach the file and the file is synced.
 * QMP has no per-node flush (only `stop` flushes, for all nodes), so this uses HMP's qemu-io
 * on the node, which prints nothing on success and "Error..." or a failed-flush message otherwise.
 */
async function flushNode(qmp: QmpClient, node: string, vm: string): Promise<void> {
  const out = await qmp.execute<string>('human-monitor-command', { 'command-line': `qemu-io ${node} "flush"` });
  if (out.trim() !== '') throw new DiskError('HYDRA_DISK_MERGE_FAILED', `VM ${vm}: flushing disk node ${node} before relinking its overlay failed: ${out.trim()}`);
}

/** For each disk path, the device whose chain contains it, and the chain's node names from the block graph. */
async function readChains(qmp: QmpClient, vm: string, paths: string[], sizes: number[]): Promise<DiskChain[]> {
  const blocks = await qmp.execute<BlockInfo[]>('query-block');
  const graph = await qmp.execute<BlockGraph>('x-debug-query-block-graph');
  const named = await qmp.execute<NamedNode[]>('query-named-block-nodes', { flat: true });
  const fileOf = new Map(named.map((n) => [n['node-name'], n]));
  const byId = new Map(graph.nodes.map((n) => [n.id, n]));
  const nameToId = new Map(graph.nodes.filter((n) => n.type === 'block-driver').map((n) => [n.name, n.id]));
  const chains: DiskChain[] = [];
  const used = new Set<string>();
  for (let i = 0; i < paths.length; i++) {
    const want = await realpathOr(paths[i]!);
    let found: DiskChain | undefined;
    for (const b of blocks) {
      const ins = b.inserted;
      if (!ins) continue;
      const qdev = b.qdev ?? b.device ?? '';
      if (used.has(qdev)) continue;
      // Walk the backing chain: top node -> backing -> ...
      const nodes: Layer[] = [];
      let id = nameToId.get(ins['node-name']);
      // A VM restored into a restore shell has a throttle filter between device and qcow2 chain: start below it.
      if (id !== undefined && fileOf.get(ins['node-name'])?.drv === 'throttle') id = graph.edges.find((e) => e.parent === id && e.name === 'file')?.child;
      while (id !== undefined) {
        const n = byId.get(id)!;
        const info = fileOf.get(n.name);
        nodes.push({ node: n.name, file: info?.file ?? '', epoch: null });
        const edge = graph.edges.find((e) => e.parent === id && e.name === 'backing');
        id = edge?.child;
      }
      const files = await Promise.all(nodes.map((n) => realpathOr(n.file)));
      const at = files.indexOf(want);
      if (at < 0) continue;
      if (ins.ro) throw new DiskError('HYDRA_DISK_UNSUPPORTED', `disk ${paths[i]}: attached read-only to VM ${vm}; HydraVM protects writable qcow2 disks only, refusing to start protection`);
      // nodes[0] is the top; the merge base is the disk's own file, layers below it are left alone.
      const layers = nodes.slice(0, at + 1).reverse();
      const root = fileOf.get(ins['node-name'])?.drv === 'throttle' ? ins['node-name'] : undefined;
      found = { index: i, qdev, size: sizes[i]!, layers, below: nodes.length - at - 1, next: undefined, ...(root ? { root } : {}) };
      used.add(qdev);
      break;
    }
    if (!found) throw new DiskError('HYDRA_DISK_UNSUPPORTED', `disk ${paths[i]}: not attached to VM ${vm} (no block device of the running QEMU uses it); refusing to start protection`);
    chains.push(found);
  }
  return chains;
}
