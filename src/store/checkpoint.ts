// A checkpoint being received by the store, from BEGIN to COMMIT (or abort).
/**
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
import { StoreError } from '../errors.js';
import { decodePages, type Begin, type PageRun, type StoreMeta } from '../protocol/index.js';
import { pwriteAll, step } from './fsutil.js';
import type { GenerationImage, PendingEpoch } from './generation-image.js';
import { writeRuns, checkRuns } from './image.js';
import { RecordType, type JournalWriter } from './journal.js';
import { writeMeta } from './meta.js';
import { MAX_EPOCH_STATS, META_FILE, devstateFileName } from './recovery.js';
import { countRegions, heatEpoch } from './heat.js';

export interface CommitResult {
  epoch: number;
  /** Wall-clock ms (Date.now()) when the checkpoint became durable and visible. */
  durableAt: number;
  /** ms from COMMIT to durable meta. */
  applyMs: number;
  pages: number;
  bytes: number;
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
  /** Journal mode: the received bodies, kept until the apply is done (served to readers meanwhile, see PendingEpoch). */
  private readonly received: { pages: { runs: PageRun[]; data: Buffer }[]; devstate: Buffer[] } = { pages: [], devstate: [] };

  constructor(private readonly g: GenerationImage, b: Begin, private readonly pageSize: number, target: { journal: JournalWriter } | DirectTarget) {
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
    if (this.journal) {
      await this.journal.append(RecordType.PAGES, payload, crc);
      this.received.pages.push({ runs, data });
    } else await writeRuns(this.direct!.mfh, this.direct!.memoryPath, runs, data, this.g.store.faults, 'full-write');
    this.bytes += data.length;
  }

  async addDeviceState(chunk: Buffer, crc: number): Promise<void> {
    this.check();
    if (this.journal) {
      await this.journal.append(RecordType.DEVSTATE, chunk, crc);
      this.received.devstate.push(chunk);
    } else await pwriteAll(this.direct!.dfh, chunk, this.dsSize, this.direct!.dsPath, this.g.store.faults, 'devstate-write');
    this.dsHash.update(chunk);
    this.dsSize += chunk.length;
  }

  async setDisks(ids: string[]): Promise<void> {
    this.check();
    if (this.journal) await this.journal.append(RecordType.DISKS, Buffer.from(JSON.stringify({ ids }), 'utf8'));
    this.disks = [...ids];
  }

  /**
   * Make the checkpoint durable and visible. Resolves when the journal END is
   * durable (commitAck 'journal') or when meta.json names this epoch.
   *
   * The fence is checked holding the generation's lock right before the
   * journal END, again before the first write into the image and again before
   * meta.json; END and the apply run in one hold of the lock. A registration of
   * a newer generation takes the same lock, so either this epoch is complete
   * before the fence (and the registration waited for it), or it is refused.
   */
  async commit(): Promise<CommitResult> {
    this.check();
    const g = this.g;
    const t0 = performance.now();
    if (this.dsSize === 0) throw new StoreError('HYDRA_STORE_NO_DEVSTATE', `VM ${g.vm} checkpoint ${this.epoch}: COMMIT without device state`);
    const dsSha = this.dsHash.digest('hex');
    const pages = this.bytes / this.pageSize;
    try {
      if (this.journal) {
        const journal = this.journal;
        let journalled!: () => void;
        const ended = new Promise<void>((resolve) => (journalled = resolve));
        const applied = (async () => {
          const end = await g.lock.run(async () => {
            this.check();
            await g.checkUnfenced();
            this.done = true;
            await g.store.faults.delay('commit-before-end');
            const end = await journal.end({ pages, bytes: this.bytes, devstateSize: this.dsSize, devstateSha256: dsSha });
            // Durable now (recovery would replay it).
            try {
              await g.checkUnfenced();
            } catch (err) {
              // Fenced by another process between the check and END: the epoch must never be replayed.
              await g.resetJournal();
              throw err;
            }
            // Committed: from here every reader and registration sees this epoch, served from
            // what was received plus the image, without waiting for the apply below.
            g.pending = this.pendingEpoch(g.meta!, dsSha);
            return end;
          });
          const journalMs = performance.now() - t0;
          journalled();
          await g.store.faults.delay('commit-before-apply');
          const ta = performance.now();
          const r = await g.applyJournalled(journal, this, end);
          await g.resetJournal();
          const ms = performance.now() - ta;
          const last = g.meta!.epochs[g.meta!.epochs.length - 1];
          if (last) last.applyMs = Math.round(ms * 10) / 10; // in-memory; persisted with the next meta write
          g.store.metrics?.applySeconds.observe(ms / 1000);
          g.log.debug({ epoch: this.epoch, pages, journalMs: Math.round(journalMs), applyMs: Math.round(ms), phases: r.phases }, 'checkpoint applied');
        })();
        // The commit itself awaits `applied` (or the next BEGIN does, through the lock); this only records that it settled.
        g.pendingApply = applied.catch(() => undefined);
        await Promise.race([ended, applied]);
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

  /** This epoch as readers see it until the apply is done: the meta the apply will write, the received bodies. */
  private pendingEpoch(prev: StoreMeta, dsSha: string): PendingEpoch {
    const pages = new Map<number, Buffer>();
    for (const { runs, data } of this.received.pages) {
      let pos = 0;
      for (const r of runs) {
        for (let off = 0; off < r.length; off += this.pageSize) pages.set((r.offset + off) / this.pageSize, data.subarray(pos + off, pos + off + this.pageSize));
        pos += r.length;
      }
    }
    const now = new Date().toISOString();
    const meta: StoreMeta = {
      ...prev,
      committedEpoch: this.epoch,
      devstate: { file: devstateFileName(this.epoch), size: this.dsSize, sha256: dsSha },
      disks: this.disks ?? prev.disks,
      config: this.config !== undefined ? this.config : prev.config,
      committedAt: now,
      epochs: [...prev.epochs, { epoch: this.epoch, kind: this.kind, pages: this.bytes / this.pageSize, bytes: this.bytes, committedAt: now, applyMs: 0 }].slice(-MAX_EPOCH_STATS),
    };
    const counts = new Map<number, number>();
    for (const { runs } of this.received.pages) countRegions(runs, this.pageSize, counts);
    return { meta, devstate: Buffer.concat(this.received.devstate), pages, heat: heatEpoch(this.epoch, counts) };
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
    if (this.epoch > 0xffffffff) throw new StoreError('HYDRA_STORE_EPOCH_MISMATCH', `VM ${g.vm}: epoch ${this.epoch} exceeds the u32 range`);
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
      this.check();
      await g.checkUnfenced();
      this.done = true;
      await writeMeta(path.join(g.dir, META_FILE), meta, faults);
      g.meta = meta;
      if (prev) {
        // meta.json no longer names these files; recovery removes any that remain.
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
      // Discarding the checkpoint: the files are removed next, and recovery removes what remains.
      await d.mfh.close().catch(() => undefined);
      await d.dfh.close().catch(() => undefined);
      if (this.g.meta?.memoryFile !== d.memoryFile) await fs.rm(d.memoryPath, { force: true }).catch(() => undefined);
      if (this.g.meta?.devstate.file !== path.basename(d.dsPath)) await fs.rm(d.dsPath, { force: true }).catch(() => undefined);
    }
  }
}
