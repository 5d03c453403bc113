// One generation of one VM in the store: its committed image, the lock readers and applies share, and the checkpoint in progress.
import fs from 'node:fs/promises';
import path from 'node:path';
import { createHash } from 'node:crypto';
import type { Logger } from 'pino';
import { StoreError } from '../errors.js';
import { vmLog } from '../util/log.js';
import type { Begin, HotRegion, PageRun, StoreMeta } from '../protocol/index.js';
import { Checkpoint } from './checkpoint.js';
import { Mutex, openPrivate, step } from './fsutil.js';
import { checkRuns, createImage, readRuns } from './image.js';
import { HEAT_EPOCHS, loadHeat, scoreHeat, type HeatEpoch } from './heat.js';
import { JOURNAL_HEADER_SIZE, JournalWriter } from './journal.js';
import { readMeta } from './meta.js';
import { JOURNAL_FILE, MEMORY_FILE, META_FILE, applyJournalCheckpoint, devstateFileName, recoverGeneration, waitNoApplying } from './recovery.js';
import { MAX_U32, staleGeneration } from './fencing.js';
import type { Store } from './store.js';
import { fileDataRuns, unionDataRuns } from './data-runs.js';

export const DEFAULT_PAGE_SIZE = 4096;

/** A consistent view of a generation's committed image (valid inside withStableImage). */
export interface StableImage {
  meta: StoreMeta;
  genDir: string;
  memoryPath: string;
  devstatePath: string;
}

/**
 * The newest committed epoch while its apply still runs: acknowledged (its
 * journal END is durable) but not yet in the image. Readers are served its
 * meta, its device state and its pages from memory (the bodies the checkpoint
 * journalled) and every other page from the image, which this apply does not
 * touch: a restore right after a commit never waits for the apply.
 */
export interface PendingEpoch {
  meta: StoreMeta;
  devstate: Buffer;
  /** Page index -> its bytes (one page). */
  pages: Map<number, Buffer>;
  /** Its regions' write counts, as the apply will record them in heat.bin. */
  heat: HeatEpoch;
}

/** One generation of one VM: committed image, lock, at most one checkpoint in progress. */
export class GenerationImage {
  meta: StoreMeta | null = null;
  /** Held while the image is being changed (apply) and by readers (withStableImage). */
  readonly lock = new Mutex();
  /** Set when an apply failed after the journal was durable: the image is a mix until replayed. */
  private needsRecovery: Error | null = null;
  private journal: JournalWriter | null = null;
  current: Checkpoint | null = null;
  /** The committed image's read handle (readHandle), with the meta it was opened for. */
  private reader: { meta: StoreMeta; path: string; fh: fs.FileHandle } | null = null;
  /** The apply of the last journalled commit (settled: never rejects). */
  pendingApply: Promise<void> = Promise.resolve();
  /** Set from the journal END until the apply has put the epoch into the image (see PendingEpoch). */
  pending: PendingEpoch | null = null;
  /** Set once a newer generation was registered by this store: no checkpoint of this one begins or commits again. */
  private fencedBy: number | null = null;
  readonly log: Logger;

  constructor(readonly store: Store, readonly vm: string, readonly generation: number, readonly dir: string) {
    this.log = vmLog(vm).child({ generation });
  }

  get memoryPath(): string | null {
    return this.meta ? path.join(this.dir, this.meta.memoryFile) : null;
  }

  /** Run recovery (caller holds the lock). */
  async recover(): Promise<void> {
    if (this.store.readOnly) {
      if ((await waitNoApplying(this.dir)) === 'stale') {
        throw new StoreError('HYDRA_STORE_RECOVERY_PENDING', `${this.dir}: a crashed store left a checkpoint half-applied; the store daemon that owns the directory must replay its journal first`);
      }
      this.meta = await readMeta(path.join(this.dir, META_FILE));
      return;
    }
    if (this.journal) {
      await this.journal.close();
      this.journal = null;
    }
    this.meta = await recoverGeneration(this.dir, this.vm, this.generation, this.log, this.store.faults);
    this.needsRecovery = null;
    if (this.meta) this.store.metrics?.committedEpoch.set({ vm: this.vm }, this.meta.committedEpoch);
  }

  private async ensureRecovered(): Promise<void> {
    if (!this.needsRecovery) return;
    const why = this.needsRecovery;
    try {
      await this.recover();
      this.log.info({ committedEpoch: this.meta?.committedEpoch }, 'completed an interrupted apply by replaying the journal');
    } catch (err) {
      throw new StoreError('HYDRA_STORE_RECOVERY_PENDING', `VM ${this.vm} generation ${this.generation}: the image is being repaired after a failed apply (${why.message}) and the replay failed again: ${(err as Error).message}`, { cause: err });
    }
  }

  /**
   * Run `fn` with a committed, stable image: no apply runs meanwhile. Rejects
   * with HYDRA_STORE_NO_IMAGE when the generation has no committed checkpoint.
   */
  async withStableImage<T>(fn: (img: StableImage) => Promise<T>): Promise<T> {
    // The image file must hold the newest committed epoch: wait for a pending apply (and any that follows).
    for (;;) {
      await this.pendingApply;
      const r = await this.lock.run(async () => {
        if (this.pending && !this.needsRecovery) return { again: true as const };
        await this.ensureRecovered();
        if (!this.meta) throw new StoreError('HYDRA_STORE_NO_IMAGE', `VM ${this.vm} generation ${this.generation} has no committed checkpoint yet`);
        const meta = this.meta;
        return { value: await fn({ meta, genDir: this.dir, memoryPath: path.join(this.dir, meta.memoryFile), devstatePath: path.join(this.dir, meta.devstate.file) }) };
      });
      if (!('again' in r)) return r.value;
    }
  }

  /** The committed meta (null if none), after any pending recovery. */
  async committedMeta(): Promise<StoreMeta | null> {
    return this.lock.run(async () => {
      await this.ensureRecovered();
      return this.pending?.meta ?? this.meta;
    });
  }

  /** The committed meta once it is in the image too (readers of the image file itself, e.g. a file-mode restore). */
  async appliedMeta(epoch?: number): Promise<StoreMeta | null> {
    for (;;) {
      await this.pendingApply;
      const m = await this.metaAt(epoch);
      if (!this.pending) return m;
    }
  }

  /**
   * The 2 MiB regions written most in the last incremental epochs (heat.bin),
   * hottest first. Advisory: an unusable record reads as empty, never an error.
   * Waits for a running apply so a reply follows every acknowledged commit.
   */
  async hotRegions(limit?: number): Promise<HotRegion[]> {
    return this.lock.run(async () => {
      if (!this.meta) return [];
      const epochs = await loadHeat(this.dir, this.log);
      // A pending epoch's heat is not in heat.bin yet: its own counts stand in for it.
      const p = this.pending;
      const all = p ? [...epochs.filter((e) => e.epoch < p.heat.epoch), p.heat].slice(-HEAT_EPOCHS) : epochs;
      return scoreHeat(all, { upToEpoch: p?.meta.committedEpoch ?? this.meta.committedEpoch, ...(limit !== undefined ? { limit } : {}) });
    });
  }

  /**
   * A newer generation was registered (called by the store with the fence
   * written): the checkpoint in progress, never committed, is discarded.
   */
  async fenced(by: number): Promise<void> {
    this.fencedBy = Math.max(this.fencedBy ?? 0, by);
    if (this.current) await this.current.abort(`fenced: generation ${by} was registered`);
  }

  /**
   * Throw HYDRA_STORE_STALE_GENERATION when this generation is fenced. Commits
   * call it holding `lock`, before their journal END, before the first write
   * into the image and before meta.json: registration writes the fence holding
   * the same lock, so no commit of a fenced generation slips through.
   */
  async checkUnfenced(): Promise<void> {
    if (this.fencedBy !== null) throw staleGeneration(this.vm, this.generation, this.fencedBy);
    await this.store.checkFence(this.vm, this.generation);
  }

  /** Start a checkpoint. Aborts an unfinished one. */
  async begin(b: Begin): Promise<Checkpoint> {
    if (this.current) await this.current.abort('superseded by a new BEGIN');
    // The previous epoch must be in the image (and in `meta`) before the next one begins.
    await this.pendingApply;
    await this.checkUnfenced();
    if (b.epoch > MAX_U32) throw new StoreError('HYDRA_STORE_EPOCH_MISMATCH', `VM ${this.vm} generation ${this.generation}: checkpoint epoch ${b.epoch} exceeds ${MAX_U32}`);
    await this.lock.run(() => this.ensureRecovered());
    const pageSize = b.pageSize ?? DEFAULT_PAGE_SIZE;
    const meta = this.meta;
    const where = `VM ${this.vm} generation ${this.generation}`;
    if (pageSize !== DEFAULT_PAGE_SIZE) throw new StoreError('HYDRA_STORE_BAD_PAGE_SIZE', `${where}: page size ${pageSize} is not supported (only ${DEFAULT_PAGE_SIZE})`);
    if (b.ramSize % pageSize !== 0) throw new StoreError('HYDRA_STORE_BAD_RAM_SIZE', `${where}: RAM size ${b.ramSize} is not a multiple of the page size ${pageSize}`);
    if (b.kind === 'incremental') {
      if (!meta) throw new StoreError('HYDRA_STORE_NO_BASE_IMAGE', `${where}: incremental checkpoint ${b.epoch} refused: no full checkpoint has been committed for this generation`);
    }
    if (meta && b.epoch !== meta.committedEpoch + 1) {
      throw new StoreError('HYDRA_STORE_EPOCH_MISMATCH', `${where}: checkpoint epoch ${b.epoch} refused: committed epoch is ${meta.committedEpoch}, the next must be ${meta.committedEpoch + 1}`);
    }
    if (meta && b.kind === 'incremental' && b.ramSize !== meta.ramSize) {
      throw new StoreError('HYDRA_STORE_RAM_SIZE_MISMATCH', `${where}: incremental checkpoint with RAM size ${b.ramSize}, the image has ${meta.ramSize}`);
    }
    const cp = b.kind === 'full' ? await this.beginFull(b, pageSize) : await this.beginIncremental(b, pageSize);
    this.current = cp;
    return cp;
  }

  private async beginFull(b: Begin, pageSize: number): Promise<Checkpoint> {
    const memoryFile = this.meta ? `memory-${b.epoch}.img` : MEMORY_FILE;
    const memoryPath = path.join(this.dir, memoryFile);
    const dsPath = path.join(this.dir, devstateFileName(b.epoch));
    const mfh = await createImage(memoryPath, b.ramSize);
    let dfh: fs.FileHandle;
    try {
      dfh = await step('create', dsPath, () => openPrivate(dsPath, 'w'));
    } catch (err) {
      await mfh.close();
      // Undoing a failed begin: recovery removes an image meta.json does not name.
      await fs.rm(memoryPath, { force: true }).catch(() => undefined);
      throw err;
    }
    return new Checkpoint(this, b, pageSize, { memoryFile, memoryPath, mfh, dsPath, dfh });
  }

  private async beginIncremental(b: Begin, pageSize: number): Promise<Checkpoint> {
    if (!this.journal) this.journal = await JournalWriter.open(path.join(this.dir, JOURNAL_FILE), this.generation, this.store.faults);
    const j = this.journal;
    if (j.size > JOURNAL_HEADER_SIZE) await j.reset();
    await j.begin({ vm: this.vm, generation: this.generation, epoch: b.epoch, kind: b.kind, ramSize: b.ramSize, pageSize, ...(b.config !== undefined ? { config: b.config } : {}), startedAt: new Date().toISOString() });
    return new Checkpoint(this, b, pageSize, { journal: j });
  }

  /**
   * Apply the journalled checkpoint (called by Checkpoint.commit once its END is
   * durable and `pending` is set; not under the lock, so readers and a
   * registration never wait for it). Serialised with the next checkpoint by
   * `pendingApply`. A newer generation registered by this store after END does
   * not stop it: the epoch is committed, and every reader of this store sees it
   * the same way before and after (PendingEpoch). A fence on disk this store
   * did not write (another process) still stops it before the image changes.
   */
  async applyJournalled(j: JournalWriter, cp: Checkpoint, end: Awaited<ReturnType<JournalWriter['end']>>): Promise<{ pages: number; bytes: number; phases: Record<string, number> }> {
    const prev = this.meta!;
    try {
      const r = await applyJournalCheckpoint(this.dir, prev, {
        begin: { vm: this.vm, generation: this.generation, epoch: cp.epoch, kind: 'incremental', ramSize: prev.ramSize, pageSize: prev.pageSize, ...(cp.config !== undefined ? { config: cp.config } : {}), startedAt: '' },
        end,
        records: [...j.records],
        disks: cp.disks,
      }, this.store.faults, () => (this.fencedBy !== null ? Promise.resolve() : this.store.checkFence(this.vm, this.generation)));
      // One step: from here readers find this epoch in the image.
      this.meta = r.meta;
      this.pending = null;
      return r;
    } catch (err) {
      // The image may now hold part of this epoch: keep the journal, exclude readers until replayed.
      this.needsRecovery = err as Error;
      this.pending = null;
      this.log.error({ epoch: cp.epoch, err: (err as Error).message }, 'apply failed after the journal was durable; the journal is kept and will be replayed');
      throw new StoreError('HYDRA_STORE_APPLY_FAILED', `VM ${this.vm} generation ${this.generation}: checkpoint ${cp.epoch} is journalled but applying it failed (${(err as Error).message}); the store will complete it from the journal before serving this generation again`, { cause: err });
    }
  }

  /** A newer generation is being registered by this store (set before its fence is written). */
  markFenced(by: number): void {
    this.fencedBy = Math.max(this.fencedBy ?? 0, by);
  }

  /** `opts.locked`: the caller already holds this generation's lock (dropping it), which is not re-entrant. */
  async close(opts: { locked?: boolean } = {}): Promise<void> {
    // Closing: an abort that fails leaves files recovery removes.
    if (this.current) await this.current.abort('store closing').catch(() => undefined);
    await this.pendingApply;
    const closeReader = async () => {
      const r = this.reader;
      this.reader = null;
      // A read-only handle: closing it cannot lose data.
      if (r) await r.fh.close().catch(() => undefined);
    };
    if (opts.locked) await closeReader();
    else await this.lock.run(closeReader);
    if (this.journal) await this.journal.close();
    this.journal = null;
  }

  async resetJournal(): Promise<void> {
    if (this.journal) {
      try {
        await this.journal.reset();
      } catch (err) {
        this.log.warn({ err: (err as Error).message }, 'could not reset the journal (stale records are ignored on recovery)');
      }
    }
  }

  /**
   * Read runs of the committed image (into `into` when it is large enough). With `epoch`
   * (a pinned reader), refused with HYDRA_STORE_EPOCH_MOVED unless the committed epoch still is that one.
   */
  async readPages(runs: readonly PageRun[], epoch?: number, into?: Buffer): Promise<Buffer> {
    const pending = await this.lock.run(async () => (this.needsRecovery ? null : this.pending));
    if (pending) return this.readPendingPages(pending, runs, epoch);
    return this.withStableImage(async (img) => {
      this.checkEpoch(img.meta, epoch, 'READ_PAGES');
      checkRuns(runs, img.meta.ramSize, 1, `read of VM ${this.vm} generation ${this.generation}`);
      return readRuns(await this.readHandle(img), img.memoryPath, runs, into);
    });
  }

  /**
   * The committed image opened for reading, kept open across reads: a restore
   * pages a whole image in MiB-sized requests, and an open + close per request
   * cost as much CPU as the read. Reopened whenever the committed meta changed
   * (a commit may name a new image file); called inside withStableImage only.
   */
  private async readHandle(img: StableImage): Promise<fs.FileHandle> {
    const cached = this.reader;
    if (cached && cached.meta === img.meta && cached.path === img.memoryPath) return cached.fh;
    this.reader = null;
    // Replaced: a reader still holding the old handle has finished (the lock is held), so closing is safe.
    if (cached) await cached.fh.close().catch(() => undefined);
    const fh = await step('open', img.memoryPath, () => fs.open(img.memoryPath, 'r'));
    this.reader = { meta: img.meta, path: img.memoryPath, fh };
    return fh;
  }

  /**
   * Pages of a pending epoch: the image for every page, then this epoch's own
   * pages over them. The apply writes only this epoch's pages, so the image
   * pages read here are the committed ones whether the apply got to them or not.
   */
  private async readPendingPages(p: PendingEpoch, runs: readonly PageRun[], epoch: number | undefined): Promise<Buffer> {
    this.checkEpoch(p.meta, epoch, 'READ_PAGES');
    checkRuns(runs, p.meta.ramSize, 1, `read of VM ${this.vm} generation ${this.generation}`);
    const memoryPath = path.join(this.dir, p.meta.memoryFile);
    const fh = await step('open', memoryPath, () => fs.open(memoryPath, 'r'));
    let out: Buffer;
    try {
      out = await readRuns(fh, memoryPath, runs);
    } finally {
      await fh.close();
    }
    const ps = p.meta.pageSize;
    let pos = 0;
    for (const r of runs) {
      for (let off = r.offset; off < r.offset + r.length; off += ps) {
        const page = p.pages.get(off / ps);
        if (page) page.copy(out, pos + (off - r.offset));
      }
      pos += r.length;
    }
    return out;
  }

  /**
   * The runs of the committed image that may hold non-zero bytes: the image
   * file's data runs (a hole was never written by any checkpoint: zeros in
   * the guest too) and, while an epoch's apply is pending, that epoch's own
   * pages: the same sources READ_PAGES reads, so every byte it could return
   * as non-zero lies in these runs. With `epoch` (a pinned reader), refused
   * with HYDRA_STORE_EPOCH_MOVED unless that epoch is still the committed one.
   */
  async dataRuns(epoch?: number): Promise<PageRun[]> {
    const pending = await this.lock.run(async () => (this.needsRecovery ? null : this.pending));
    if (pending) {
      this.checkEpoch(pending.meta, epoch, 'GET_DATA_RUNS');
      const ps = pending.meta.pageSize;
      const own = [...pending.pages.keys()].sort((a, b) => a - b).map((i) => ({ offset: i * ps, length: ps }));
      return unionDataRuns(fileDataRuns(path.join(this.dir, pending.meta.memoryFile), pending.meta.ramSize, ps), own);
    }
    return this.withStableImage(async (img) => {
      this.checkEpoch(img.meta, epoch, 'GET_DATA_RUNS');
      return fileDataRuns(img.memoryPath, img.meta.ramSize, img.meta.pageSize);
    });
  }

  private checkEpoch(meta: StoreMeta, epoch: number | undefined, what: string): void {
    if (epoch !== undefined && meta.committedEpoch !== epoch) {
      throw new StoreError('HYDRA_STORE_EPOCH_MOVED', `VM ${this.vm} generation ${this.generation}: ${what} for epoch ${epoch} refused: the committed epoch is now ${meta.committedEpoch}`);
    }
  }

  /** The committed meta, refused with HYDRA_STORE_EPOCH_MOVED when `epoch` is given and differs. */
  async metaAt(epoch?: number): Promise<StoreMeta | null> {
    return this.lock.run(async () => {
      await this.ensureRecovered();
      if (this.pending) {
        if (epoch !== undefined) this.checkEpoch(this.pending.meta, epoch, 'GET_META');
        return this.pending.meta;
      }
      if (this.meta && epoch !== undefined) this.checkEpoch(this.meta, epoch, 'GET_META');
      if (!this.meta && epoch !== undefined) throw new StoreError('HYDRA_STORE_NO_IMAGE', `VM ${this.vm} generation ${this.generation} has no committed checkpoint (epoch ${epoch} asked)`);
      return this.meta;
    });
  }

  /** The committed device state, checked against meta; refused when `epoch` is given and differs. */
  async readDeviceState(epoch?: number): Promise<Buffer> {
    const pending = await this.lock.run(async () => (this.needsRecovery ? null : this.pending));
    if (pending) {
      this.checkEpoch(pending.meta, epoch, 'GET_DEVSTATE');
      return pending.devstate;
    }
    return this.withStableImage(async (img) => {
      this.checkEpoch(img.meta, epoch, 'GET_DEVSTATE');
      const buf = await step('read', img.devstatePath, () => fs.readFile(img.devstatePath));
      const sha = createHash('sha256').update(buf).digest('hex');
      if (buf.length !== img.meta.devstate.size || sha !== img.meta.devstate.sha256) {
        throw new StoreError('HYDRA_STORE_DEVSTATE_CORRUPT', `${img.devstatePath}: ${buf.length} bytes sha256 ${sha}, meta says ${img.meta.devstate.size} / ${img.meta.devstate.sha256}`);
      }
      return buf;
    });
  }
}
