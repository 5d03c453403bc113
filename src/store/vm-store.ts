/**
 * The checkpoint store's state: per VM a fencing record and generations, per
 * generation the committed image and at most one checkpoint in progress.
 *
 * Commit rules (see docs/formats.md):
 *  - Full checkpoint into a generation without a committed image (its first):
 *    pages go straight into a fresh memory.img, device state into
 *    devstate-<epoch>.bin; COMMIT = fdatasync both, then write meta.json. A crash
 *    before meta.json exists leaves a generation with no image: nothing earlier
 *    to protect, so no journal and no double write.
 *  - Full checkpoint into a generation that has a committed image: the same,
 *    into a new memory-<epoch>.img; meta.json switches to it atomically.
 *  - Incremental: every record is appended to the journal as it arrives; COMMIT
 *    = END record + fdatasync, then apply (pwrite runs, fdatasync image, write
 *    devstate-<epoch>.bin + fsync), then atomically advance meta.json, then reset
 *    the journal. Readers are excluded by the generation lock while applying.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { createHash } from 'node:crypto';
import type { Logger } from 'pino';
import { StoreError } from '../errors.js';
import { vmLog } from '../util/log.js';
import { decodePages, type Begin, type HotRegion, type PageRun, type StoreMeta } from '../protocol/index.js';
import { noFaults, type FaultInjector } from './faults.js';
import { Mutex, fsyncDir, mkdirDurable, pwriteAll, step } from './fsutil.js';
import { checkRuns, createImage, readRuns, writeRuns } from './image.js';
import { loadHeat, scoreHeat } from './heat.js';
import { JOURNAL_HEADER_SIZE, JournalWriter, RecordType } from './journal.js';
import { readFence, readMeta, writeFence, writeMeta } from './meta.js';
import type { StoreMetrics } from './metrics.js';
import { APPLYING_FILE, JOURNAL_FILE, MAX_EPOCH_STATS, MEMORY_FILE, META_FILE, applyJournalCheckpoint, devstateFileName, recoverGeneration } from './recovery.js';

export const DEFAULT_PAGE_SIZE = 4096;
const VM_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export interface CommitResult {
  epoch: number;
  /** Wall-clock ms (Date.now()) when the checkpoint became durable and visible. */
  durableAt: number;
  /** ms from COMMIT to durable meta. */
  applyMs: number;
  pages: number;
  bytes: number;
}

/** A consistent view of a generation's committed image (valid inside withStableImage). */
export interface StableImage {
  meta: StoreMeta;
  genDir: string;
  memoryPath: string;
  devstatePath: string;
}

export interface StoreOptions {
  faults?: FaultInjector;
  metrics?: StoreMetrics;
  /**
   * Another live process (the store daemon) owns the directory: never recover or
   * write; read meta.json as is, after waiting for any APPLYING marker to go.
   */
  readOnly?: boolean;
  /**
   * When COMMITTED is sent for a journalled checkpoint: 'journal' (default) as soon as
   * its journal records are durable, the apply then runs under the generation lock
   * (readers and the next BEGIN wait for it); 'applied' only after meta.json names it.
   */
  commitAck?: 'journal' | 'applied';
}

export interface VmSummary {
  vm: string;
  highestGeneration: number;
  generations: { generation: number; committedEpoch: number | null; ramSize: number | null; committedAt: string | null }[];
}

export function checkVmName(vm: string): void {
  if (!VM_NAME.test(vm)) throw new StoreError('HYDRA_STORE_BAD_VM_NAME', `bad VM name ${JSON.stringify(vm)}: letters, digits, . _ -, at most 64 characters`);
}

interface VmState {
  fenceLock: Mutex;
  gens: Map<number, Promise<GenStore>>;
  /** Generations with a connected checkpointer. */
  checkpointers: Set<number>;
}

export class Store {
  private readonly vms = new Map<string, VmState>();
  readonly faults: FaultInjector;
  readonly metrics: StoreMetrics | undefined;
  readonly readOnly: boolean;
  readonly commitAck: 'journal' | 'applied';

  private constructor(readonly dir: string, opts: StoreOptions) {
    this.commitAck = opts.commitAck ?? 'journal';
    this.faults = opts.faults ?? noFaults;
    this.metrics = opts.metrics;
    this.readOnly = opts.readOnly ?? false;
  }

  static async open(dir: string, opts: StoreOptions = {}): Promise<Store> {
    const abs = path.resolve(dir);
    if (!opts.readOnly) await step('mkdir', path.join(abs, 'vms'), () => fs.mkdir(path.join(abs, 'vms'), { recursive: true }));
    return new Store(abs, opts);
  }

  vmDir(vm: string): string {
    return path.join(this.dir, 'vms', vm);
  }

  genDir(vm: string, generation: number): string {
    return path.join(this.vmDir(vm), `gen-${generation}`);
  }

  private state(vm: string): VmState {
    checkVmName(vm);
    let s = this.vms.get(vm);
    if (!s) {
      s = { fenceLock: new Mutex(), gens: new Map(), checkpointers: new Set() };
      this.vms.set(vm, s);
    }
    return s;
  }

  /** The highest generation registered for `vm` (0 if none), read from disk every time (other processes may fence). */
  async highestGeneration(vm: string): Promise<number> {
    checkVmName(vm);
    const fence = await readFence(path.join(this.vmDir(vm), 'fence.json'));
    return fence?.highestGeneration ?? 0;
  }

  /** Throw HYDRA_STORE_STALE_GENERATION if a newer generation than `generation` was registered. */
  async checkFence(vm: string, generation: number): Promise<void> {
    const highest = await this.highestGeneration(vm);
    if (generation < highest) throw staleGeneration(vm, generation, highest);
  }

  /**
   * Register `generation` as the VM's current incarnation (fencing every older
   * one) and create its directory. Refuses an older generation.
   */
  async registerGeneration(vm: string, generation: number): Promise<number> {
    const s = this.state(vm);
    if (!Number.isInteger(generation) || generation < 1) throw new StoreError('HYDRA_STORE_BAD_GENERATION', `generation must be a positive integer, got ${generation}`);
    return s.fenceLock.run(async () => {
      const highest = await this.highestGeneration(vm);
      if (generation < highest) throw staleGeneration(vm, generation, highest);
      await step('mkdir', this.vmDir(vm), () => fs.mkdir(this.vmDir(vm), { recursive: true }));
      await mkdirDurable(this.genDir(vm, generation));
      if (generation > highest) {
        await writeFence(path.join(this.vmDir(vm), 'fence.json'), { vm, highestGeneration: generation, updatedAt: new Date().toISOString() });
        vmLog(vm).info({ generation, previous: highest }, 'registered new generation (older generations fenced)');
      }
      return generation;
    });
  }

  /** Claim the checkpointer slot of vm+generation (one at a time). Returns a release function. */
  claimCheckpointer(vm: string, generation: number): () => void {
    const s = this.state(vm);
    if (s.checkpointers.has(generation)) {
      throw new StoreError('HYDRA_STORE_CHECKPOINTER_BUSY', `VM ${vm} generation ${generation} already has a connected checkpointer; refusing a second one`);
    }
    s.checkpointers.add(generation);
    let released = false;
    return () => {
      if (!released) s.checkpointers.delete(generation);
      released = true;
    };
  }

  /** The generation's store, recovered on first use. Throws for a corrupt meta (and retries next time). */
  async gen(vm: string, generation: number): Promise<GenStore> {
    const s = this.state(vm);
    let p = s.gens.get(generation);
    if (!p) {
      p = (async () => {
        const dir = this.genDir(vm, generation);
        try {
          await fs.access(dir);
        } catch {
          throw new StoreError('HYDRA_STORE_NO_GENERATION', `VM ${vm} has no generation ${generation} in ${this.dir}`);
        }
        const g = new GenStore(this, vm, generation, dir);
        await g.lock.run(() => g.recover());
        return g;
      })();
      s.gens.set(generation, p);
      p.catch(() => s.gens.delete(generation));
    }
    return p;
  }

  /** Generation numbers present on disk for `vm`, ascending. */
  async generations(vm: string): Promise<number[]> {
    checkVmName(vm);
    let names: string[];
    try {
      names = await fs.readdir(this.vmDir(vm));
    } catch {
      return [];
    }
    return names.map((n) => /^gen-(\d+)$/.exec(n)).filter((m): m is RegExpExecArray => m !== null).map((m) => Number(m[1])).sort((a, b) => a - b);
  }

  /** The newest generation with a committed image, or null. */
  async latestCommittedGeneration(vm: string): Promise<number | null> {
    const gens = await this.generations(vm);
    for (let i = gens.length - 1; i >= 0; i--) {
      const g = await this.gen(vm, gens[i]!);
      if (g.meta) return gens[i]!;
    }
    return null;
  }

  async listVms(): Promise<VmSummary[]> {
    let names: string[];
    try {
      names = await fs.readdir(path.join(this.dir, 'vms'));
    } catch {
      return [];
    }
    const out: VmSummary[] = [];
    for (const vm of names.sort()) {
      if (!VM_NAME.test(vm)) continue;
      const gens = [];
      for (const g of await this.generations(vm)) {
        try {
          const gs = await this.gen(vm, g);
          gens.push({ generation: g, committedEpoch: gs.meta?.committedEpoch ?? null, ramSize: gs.meta?.ramSize ?? null, committedAt: gs.meta?.committedAt ?? null });
        } catch (err) {
          vmLog(vm).warn({ generation: g, err: (err as Error).message }, 'generation unreadable');
          gens.push({ generation: g, committedEpoch: null, ramSize: null, committedAt: null });
        }
      }
      out.push({ vm, highestGeneration: await this.highestGeneration(vm), generations: gens });
    }
    return out;
  }

  /** Close open files (journals, checkpoints in progress are discarded). */
  async close(): Promise<void> {
    for (const s of this.vms.values()) {
      for (const p of s.gens.values()) {
        const g = await p.catch(() => null);
        if (g) await g.close();
      }
    }
  }

  /** Delete a generation's directory. Refuses the highest generation while a checkpointer is connected to it. */
  async dropGeneration(vm: string, generation: number): Promise<void> {
    const s = this.state(vm);
    if (s.checkpointers.has(generation)) {
      throw new StoreError('HYDRA_STORE_GENERATION_BUSY', `VM ${vm} generation ${generation} has a connected checkpointer; cannot drop it`);
    }
    const p = s.gens.get(generation);
    const drop = async () => {
      await step('remove', this.genDir(vm, generation), () => fs.rm(this.genDir(vm, generation), { recursive: true, force: true }));
      await fsyncDir(this.vmDir(vm)).catch(() => undefined);
      s.gens.delete(generation);
      vmLog(vm).info({ generation }, 'dropped generation');
    };
    if (p) {
      const g = await p.catch(() => null);
      if (g) return g.lock.run(async () => {
        await g.close();
        await drop();
      });
    }
    await drop();
  }
}

/** Wait (bounded) until no process is applying a checkpoint to the generation in `dir`. */
export async function waitNoApplying(dir: string, timeoutMs = 30_000): Promise<'clear' | 'stale'> {
  const marker = path.join(dir, APPLYING_FILE);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    let text: string;
    try {
      text = await fs.readFile(marker, 'utf8');
    } catch {
      return 'clear';
    }
    const pid = Number(text.split(' ')[0]);
    if (!pidAlive(pid)) return 'stale'; // left by a crashed store: only its recovery (journal replay) may clear it
    if (Date.now() > deadline) throw new StoreError('HYDRA_STORE_BUSY', `${dir}: a checkpoint is still being applied by process ${pid} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

export function pidAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function staleGeneration(vm: string, generation: number, highest: number): StoreError {
  return new StoreError('HYDRA_STORE_STALE_GENERATION', `VM ${vm} generation ${generation} is stale: generation ${highest} has been registered, so this (older) incarnation is fenced and may not checkpoint`);
}

/** One generation of one VM: committed image, lock, at most one checkpoint in progress. */
export class GenStore {
  meta: StoreMeta | null = null;
  /** Held while the image is being changed (apply) and by readers (withStableImage). */
  readonly lock = new Mutex();
  /** Set when an apply failed after the journal was durable: the image is a mix until replayed. */
  private needsRecovery: Error | null = null;
  private journal: JournalWriter | null = null;
  current: Checkpoint | null = null;
  /** The apply of the last journalled commit (settled: never rejects). */
  pendingApply: Promise<void> = Promise.resolve();
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
    return this.lock.run(async () => {
      await this.ensureRecovered();
      if (!this.meta) throw new StoreError('HYDRA_STORE_NO_IMAGE', `VM ${this.vm} generation ${this.generation} has no committed checkpoint yet`);
      const meta = this.meta;
      return fn({ meta, genDir: this.dir, memoryPath: path.join(this.dir, meta.memoryFile), devstatePath: path.join(this.dir, meta.devstate.file) });
    });
  }

  /** The committed meta (null if none), after any pending recovery. */
  async committedMeta(): Promise<StoreMeta | null> {
    return this.lock.run(async () => {
      await this.ensureRecovered();
      return this.meta;
    });
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
      return scoreHeat(epochs, { upToEpoch: this.meta.committedEpoch, ...(limit !== undefined ? { limit } : {}) });
    });
  }

  /** Start a checkpoint. Aborts an unfinished one. */
  async begin(b: Begin): Promise<Checkpoint> {
    if (this.current) await this.current.abort('superseded by a new BEGIN');
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
      dfh = await step('create', dsPath, () => fs.open(dsPath, 'w'));
    } catch (err) {
      await mfh.close();
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

  /** Apply the journalled checkpoint (called by Checkpoint.commit with the lock). */
  async applyJournalled(j: JournalWriter, cp: Checkpoint, end: Awaited<ReturnType<JournalWriter['end']>>): Promise<{ pages: number; bytes: number; phases: Record<string, number> }> {
    const prev = this.meta!;
    try {
      const r = await applyJournalCheckpoint(this.dir, prev, {
        begin: { vm: this.vm, generation: this.generation, epoch: cp.epoch, kind: 'incremental', ramSize: prev.ramSize, pageSize: prev.pageSize, ...(cp.config !== undefined ? { config: cp.config } : {}), startedAt: '' },
        end,
        records: [...j.records],
        disks: cp.disks,
      }, this.store.faults);
      this.meta = r.meta;
      return r;
    } catch (err) {
      // The image may now hold part of this epoch: keep the journal, exclude readers until replayed.
      this.needsRecovery = err as Error;
      this.log.error({ epoch: cp.epoch, err: (err as Error).message }, 'apply failed after the journal was durable; the journal is kept and will be replayed');
      throw new StoreError('HYDRA_STORE_APPLY_FAILED', `VM ${this.vm} generation ${this.generation}: checkpoint ${cp.epoch} is journalled but applying it failed (${(err as Error).message}); the store will complete it from the journal before serving this generation again`, { cause: err });
    }
  }

  async close(): Promise<void> {
    if (this.current) await this.current.abort('store closing').catch(() => undefined);
    await this.pendingApply;
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

  async readPages(runs: readonly PageRun[]): Promise<Buffer> {
    return this.withStableImage(async (img) => {
      checkRuns(runs, img.meta.ramSize, 1, `read of VM ${this.vm} generation ${this.generation}`);
      const fh = await step('open', img.memoryPath, () => fs.open(img.memoryPath, 'r'));
      try {
        return await readRuns(fh, img.memoryPath, runs);
      } finally {
        await fh.close();
      }
    });
  }

  async readDeviceState(): Promise<Buffer> {
    return this.withStableImage(async (img) => {
      const buf = await step('read', img.devstatePath, () => fs.readFile(img.devstatePath));
      const sha = createHash('sha256').update(buf).digest('hex');
      if (buf.length !== img.meta.devstate.size || sha !== img.meta.devstate.sha256) {
        throw new StoreError('HYDRA_STORE_DEVSTATE_CORRUPT', `${img.devstatePath}: ${buf.length} bytes sha256 ${sha}, meta says ${img.meta.devstate.size} / ${img.meta.devstate.sha256}`);
      }
      return buf;
    });
  }
}

interface DirectTarget {
  memoryFile: string;
  memoryPath: string;
  mfh: fs.FileHandle;
  dsPath: string;
  dfh: fs.FileHandle;
}

/** A checkpoint being received. Calls must be serialised by the caller (one connection). */
export class Checkpoint {
  readonly epoch: number;
  readonly kind: 'full' | 'incremental';
  readonly ramSize: number;
  readonly config: unknown;
  disks: string[] | null = null;
  private bytes = 0;
  private dsSize = 0;
  private readonly dsHash = createHash('sha256');
  private done = false;
  private readonly journal: JournalWriter | null;
  private readonly direct: DirectTarget | null;

  constructor(private readonly g: GenStore, b: Begin, private readonly pageSize: number, target: { journal: JournalWriter } | DirectTarget) {
    this.epoch = b.epoch;
    this.kind = b.kind;
    this.ramSize = b.ramSize;
    this.config = b.config;
    this.journal = 'journal' in target ? target.journal : null;
    this.direct = 'journal' in target ? null : target;
  }

  private check(): void {
    if (this.done) throw new StoreError('HYDRA_STORE_NO_CHECKPOINT', `VM ${this.g.vm} checkpoint ${this.epoch} is no longer open`);
  }

  /** A PAGES frame payload; `crc` is its (verified) crc32. */
  async addPages(payload: Buffer, crc: number): Promise<void> {
    this.check();
    const { runs, data } = decodePages(payload);
    checkRuns(runs, this.ramSize, this.pageSize, `VM ${this.g.vm} checkpoint ${this.epoch}`);
    if (this.journal) await this.journal.append(RecordType.PAGES, payload, crc);
    else await writeRuns(this.direct!.mfh, this.direct!.memoryPath, runs, data, this.g.store.faults, 'full-write');
    this.bytes += data.length;
  }

  async addDeviceState(chunk: Buffer, crc: number): Promise<void> {
    this.check();
    if (this.journal) await this.journal.append(RecordType.DEVSTATE, chunk, crc);
    else await pwriteAll(this.direct!.dfh, chunk, this.dsSize, this.direct!.dsPath, this.g.store.faults, 'devstate-write');
    this.dsHash.update(chunk);
    this.dsSize += chunk.length;
  }

  async setDisks(ids: string[]): Promise<void> {
    this.check();
    if (this.journal) await this.journal.append(RecordType.DISKS, Buffer.from(JSON.stringify({ ids }), 'utf8'));
    this.disks = [...ids];
  }

  /** Make the checkpoint durable and visible. Resolves only when meta.json names this epoch. */
  async commit(): Promise<CommitResult> {
    this.check();
    const g = this.g;
    const t0 = performance.now();
    if (this.dsSize === 0) throw new StoreError('HYDRA_STORE_NO_DEVSTATE', `VM ${g.vm} checkpoint ${this.epoch}: COMMIT without device state`);
    await g.store.checkFence(g.vm, g.generation);
    this.done = true;
    const dsSha = this.dsHash.digest('hex');
    const pages = this.bytes / this.pageSize;
    try {
      if (this.journal) {
        const journal = this.journal;
        const end = await journal.end({ pages, bytes: this.bytes, devstateSize: this.dsSize, devstateSha256: dsSha });
        const journalMs = performance.now() - t0;
        // Durable now (recovery would replay it). Apply under the lock: every reader
        // queued from here on sees this epoch, never the image while it changes.
        const applied = g.lock.run(async () => {
          const ta = performance.now();
          const r = await g.applyJournalled(journal, this, end);
          await g.resetJournal();
          const ms = performance.now() - ta;
          const last = g.meta!.epochs[g.meta!.epochs.length - 1];
          if (last) last.applyMs = Math.round(ms * 10) / 10; // in-memory; persisted with the next meta write
          g.store.metrics?.applySeconds.observe(ms / 1000);
          g.log.debug({ epoch: this.epoch, pages, journalMs: Math.round(journalMs), applyMs: Math.round(ms), phases: r.phases }, 'checkpoint applied');
        });
        g.pendingApply = applied.catch(() => undefined);
        if (g.store.commitAck === 'applied') await applied;
      } else {
        await this.commitDirect(dsSha);
      }
    } catch (err) {
      if (g.current === this) g.current = null;
      if (!this.journal || (err as StoreError).code !== 'HYDRA_STORE_APPLY_FAILED') await this.cleanup();
      throw err;
    }
    g.current = null;
    const applyMs = performance.now() - t0;
    const m = g.store.metrics;
    m?.commits.inc({ vm: g.vm });
    m?.commitSeconds.observe(applyMs / 1000);
    m?.bytes.inc({ vm: g.vm }, this.bytes);
    m?.committedEpoch.set({ vm: g.vm }, this.epoch);
    g.log.debug({ epoch: this.epoch, kind: this.kind, pages, ms: Math.round(applyMs) }, 'checkpoint durable');
    return { epoch: this.epoch, durableAt: Date.now(), applyMs, pages, bytes: this.bytes };
  }

  private async commitDirect(dsSha: string): Promise<void> {
    const g = this.g;
    const d = this.direct!;
    const faults = g.store.faults;
    faults.hit('full-fsync');
    await step('fdatasync', d.memoryPath, () => d.mfh.datasync());
    faults.hit('devstate-fsync');
    await step('fsync', d.dsPath, () => d.dfh.sync());
    await d.mfh.close();
    await d.dfh.close();
    const now = new Date().toISOString();
    const prev = g.meta;
    const meta: StoreMeta = {
      vm: g.vm,
      generation: g.generation,
      committedEpoch: this.epoch,
      ramSize: this.ramSize,
      pageSize: this.pageSize,
      memoryFile: d.memoryFile,
      devstate: { file: path.basename(d.dsPath), size: this.dsSize, sha256: dsSha },
      disks: this.disks ?? prev?.disks ?? [],
      config: this.config !== undefined ? this.config : (prev?.config ?? null),
      createdAt: prev?.createdAt ?? now,
      committedAt: now,
      epochs: [...(prev?.epochs ?? []), { epoch: this.epoch, kind: this.kind, pages: this.bytes / this.pageSize, bytes: this.bytes, committedAt: now, applyMs: 0 }].slice(-MAX_EPOCH_STATS),
    };
    await g.lock.run(async () => {
      await writeMeta(path.join(g.dir, META_FILE), meta, faults);
      g.meta = meta;
      if (prev) {
        if (prev.memoryFile !== meta.memoryFile) await fs.rm(path.join(g.dir, prev.memoryFile), { force: true }).catch(() => undefined);
        if (prev.devstate.file !== meta.devstate.file) await fs.rm(path.join(g.dir, prev.devstate.file), { force: true }).catch(() => undefined);
      }
    });
  }

  /** Drop the checkpoint: the committed image is untouched. */
  async abort(reason: string): Promise<void> {
    if (this.g.current === this) this.g.current = null;
    if (this.done) return;
    this.done = true;
    this.g.log.info({ epoch: this.epoch, kind: this.kind, reason }, 'checkpoint discarded; the committed epoch is intact');
    await this.cleanup();
  }

  private async cleanup(): Promise<void> {
    if (this.journal) {
      await this.g.resetJournal();
    } else if (this.direct) {
      const d = this.direct;
      await d.mfh.close().catch(() => undefined);
      await d.dfh.close().catch(() => undefined);
      if (this.g.meta?.memoryFile !== d.memoryFile) await fs.rm(d.memoryPath, { force: true }).catch(() => undefined);
      if (this.g.meta?.devstate.file !== path.basename(d.dsPath)) await fs.rm(d.dsPath, { force: true }).catch(() => undefined);
    }
  }
}

