// The checkpoint store's root: per VM a fencing record and its generations, each opened on first use.
import fs from 'node:fs/promises';
import path from 'node:path';
import { StoreError } from '../errors.js';
import { vmLog } from '../util/log.js';
import { noFaults, type FaultInjector } from './faults.js';
import { DIR_MODE, Mutex, fsyncDir, mkdirOnce, mkdirPrivate, step } from './fsutil.js';
import { DirLock } from './dir-lock.js';
import { MAX_U32, staleGeneration } from './fencing.js';

export { MAX_U32, staleGeneration };
import { GenerationImage } from './generation-image.js';
import { readFence, writeFence } from './meta.js';
import type { StoreMetrics } from './metrics.js';

const VM_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

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
  /** Read-write only: the directory's exclusive lock, already taken by the caller (default: taken by open). */
  lock?: DirLock;
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
  gens: Map<number, Promise<GenerationImage>>;
  /** Generations with a connected checkpointer. */
  checkpointers: Set<number>;
}

export class Store {
  private readonly vms = new Map<string, VmState>();
  readonly faults: FaultInjector;
  readonly metrics: StoreMetrics | undefined;
  readonly readOnly: boolean;
  readonly commitAck: 'journal' | 'applied';

  private lock: DirLock | null;

  private constructor(readonly dir: string, opts: StoreOptions) {
    this.lock = opts.lock ?? null;
    this.commitAck = opts.commitAck ?? 'journal';
    this.faults = opts.faults ?? noFaults;
    this.metrics = opts.metrics;
    this.readOnly = opts.readOnly ?? false;
  }

  /**
   * Open a store directory. Read-write (the default) takes the directory's
   * exclusive lock first (HYDRA_STORE_DIR_BUSY if another process holds it),
   * creates it 0700 and tightens the modes of the root and vms/.
   */
  static async open(dir: string, opts: StoreOptions = {}): Promise<Store> {
    const abs = path.resolve(dir);
    if (opts.readOnly) return new Store(abs, opts);
    await mkdirPrivate(path.join(abs, 'vms'));
    const lock = opts.lock ?? (await DirLock.exclusive(abs));
    try {
      // A directory made before modes were enforced (or by hand): guest RAM stays owner-only.
      for (const d of [abs, path.join(abs, 'vms')]) await step('chmod', d, () => fs.chmod(d, DIR_MODE));
    } catch (err) {
      if (!opts.lock) await lock.release();
      throw err;
    }
    return new Store(abs, { ...opts, lock });
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

  /** Throw HYDRA_STORE_STALE_GENERATION if a newer generation than `generation` was registered (reads fence.json). */
  async checkFence(vm: string, generation: number): Promise<void> {
    const highest = await this.highestGeneration(vm);
    if (generation < highest) throw staleGeneration(vm, generation, highest);
  }

  /**
   * Register `generation` as the VM's current incarnation (fencing every older
   * one) and create its directory. Refuses an older generation.
   *
   * Fencing is atomic with every commit of an older generation: the fence is
   * written while holding the lock of each older generation this store has
   * open, and a commit checks the fence under that same lock before its
   * journal END and again before its meta.json write. So when this returns, an
   * older generation's apply in flight has finished (its epoch was durable
   * before the fence), its uncommitted checkpoint is discarded, and nothing
   * ever writes into an older generation's files again: a restore that reads
   * after this sees one frozen epoch.
   */
  async registerGeneration(vm: string, generation: number): Promise<number> {
    const s = this.state(vm);
    if (!Number.isInteger(generation) || generation < 1 || generation > MAX_U32) {
      throw new StoreError('HYDRA_STORE_BAD_GENERATION', `VM ${vm}: generation must be an integer from 1 to ${MAX_U32}, got ${generation}`);
    }
    if (this.readOnly) throw new StoreError('HYDRA_STORE_DIR_BUSY', `store directory ${this.dir} is opened read-only; register generations through the store that serves it`);
    return s.fenceLock.run(async () => {
      const t0 = performance.now();
      const highest = await this.highestGeneration(vm);
      if (generation < highest) throw staleGeneration(vm, generation, highest);
      await mkdirPrivate(this.vmDir(vm));
      // The new generation's directory and the fence sit in the same directory: the fence's own
      // directory fsync (writeFence: temp file fsync, rename, directory fsync) makes both entries
      // durable, one journal commit fewer on the restore's path than a separate fsync per entry.
      const created = await mkdirOnce(this.genDir(vm, generation));
      if (generation === highest && created) await fsyncDir(this.vmDir(vm));
      if (generation > highest) {
        const older: GenerationImage[] = [];
        for (const [g, p] of s.gens) {
          if (g >= generation) continue;
          // A generation that failed to open has no apply in flight.
          const gi = await p.catch(() => null);
          if (gi) older.push(gi);
        }
        // Where a slow registration spends its time (logged): older generations' locks, the fence's write, discarding their checkpoints.
        const t = { prepared: performance.now(), locked: 0, written: 0 };
        // Marked first: an apply of an epoch committed before this fence must not mistake it for another process's.
        const fence = async () => {
          t.locked = performance.now();
          for (const gi of older) gi.markFenced(generation);
          await writeFence(path.join(this.vmDir(vm), 'fence.json'), { vm, highestGeneration: generation, updatedAt: new Date().toISOString() });
          t.written = performance.now();
        };
        // Take every older generation's lock (waiting for a journal END in flight, not for the apply
        // after it: that epoch is committed, and readers see it), then write the fence inside all of them.
        const underLocks = (i: number): Promise<void> => (i === older.length ? fence() : older[i]!.lock.run(() => underLocks(i + 1)));
        await underLocks(0);
        for (const gi of older) await gi.fenced(generation);
        const ms = (a: number, b: number) => Math.round((b - a) * 10) / 10;
        vmLog(vm).info({ generation, previous: highest, ms: ms(t0, performance.now()), prepareMs: ms(t0, t.prepared), lockWaitMs: ms(t.prepared, t.locked), fenceWriteMs: ms(t.locked, t.written), discardMs: ms(t.written, performance.now()) }, 'registered new generation (older generations fenced)');
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
  async gen(vm: string, generation: number): Promise<GenerationImage> {
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
        const g = new GenerationImage(this, vm, generation, dir);
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

  /** Close open files (journals, checkpoints in progress are discarded) and release the directory lock. */
  async close(): Promise<void> {
    try {
      for (const s of this.vms.values()) {
        for (const p of s.gens.values()) {
          // A generation that failed to open has nothing to close.
          const g = await p.catch(() => null);
          if (g) await g.close();
        }
      }
    } finally {
      await this.lock?.release();
      this.lock = null;
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
      // Only makes the removal durable; a generation that reappears after a host crash is dropped again.
      await fsyncDir(this.vmDir(vm)).catch(() => undefined);
      s.gens.delete(generation);
      vmLog(vm).info({ generation }, 'dropped generation');
    };
    if (p) {
      // A generation that failed to open has no files open: drop it directly.
      const g = await p.catch(() => null);
      if (g) return g.lock.run(async () => {
        await g.close({ locked: true });
        await drop();
      });
    }
    await drop();
  }
}
