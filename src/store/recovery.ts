/**
 * Applying a journalled checkpoint to the image (the commit's second half and
 * crash recovery are the same code), and recovering a generation directory on
 * open. Rules:
 *
 *  - meta.json's committedEpoch is the truth.
 *  - A complete journalled checkpoint with epoch = committed+1 is replayed
 *    (idempotent: the same pages and device state are written again).
 *  - A complete checkpoint with epoch <= committed is stale (its truncation was
 *    lost after the meta advanced): dropped.
 *  - A torn tail (no END, bad CRC, wrong seq/epoch) is discarded with a log line.
 *  - Files no committed meta refers to (devstate-*.bin, memory-*.img, temp
 *    files) are removed. A generation without meta.json has no image.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { StoreError } from '../errors.js';
import { decodePages, type StoreMeta } from '../protocol/index.js';
import type { Logger } from 'pino';
import type { FaultInjector } from './faults.js';
import { log as rootLog } from '../util/log.js';
import { pidAlive } from '../util/pid.js';
import { fsyncDir, openPrivate, preadAll, pwriteAll, step, writeFilePrivate } from './fsutil.js';
import { HEAT_FILE, countRegions, recordHeat } from './heat.js';
import { writeRuns, checkRuns } from './image.js';
import { JOURNAL_HEADER_SIZE, RecordType, scanJournal, encodeJournalHeader, type JournalCheckpoint, type JournalRecordRef } from './journal.js';
import { readMeta, writeMeta } from './meta.js';
import { sleep } from '../util/sleep.js';

export const MEMORY_FILE = 'memory.img';
export const META_FILE = 'meta.json';
export const JOURNAL_FILE = 'journal';
export const APPLYING_FILE = 'APPLYING';
export const MAX_EPOCH_STATS = 32;

export function devstateFileName(epoch: number): string {
  return `devstate-${epoch}.bin`;
}

export interface ApplyResult {
  meta: StoreMeta;
  pages: number;
  bytes: number;
  /** ms per phase: write (runs into the image), sync (image fdatasync), devstate, meta, heat. */
  phases: Record<string, number>;
}

/**
 * Apply a complete, durable journalled checkpoint on top of `prev`: page runs
 * into the image, fdatasync; device state into devstate-<epoch>.bin, fsync;
 * then atomically advance meta.json. Holds the APPLYING marker meanwhile so
 * other processes know the image is in flux. Every record's body is checked
 * against its CRC again as it is read back: a record that changed on disk
 * since it was journalled stops the apply (HYDRA_STORE_JOURNAL_CORRUPT) before
 * its bytes reach the image. `guard` (a live commit's fence check) runs before
 * the first write into the image and before meta.json is written.
 */
export async function applyJournalCheckpoint(genDir: string, prev: StoreMeta, cp: JournalCheckpoint, faults?: FaultInjector, guard?: () => Promise<void>): Promise<ApplyResult> {
  const journalPath = path.join(genDir, JOURNAL_FILE);
  const memoryPath = path.join(genDir, prev.memoryFile);
  const epoch = cp.begin.epoch;
  const marker = path.join(genDir, APPLYING_FILE);
  const checkCrc = (rec: JournalRecordRef, body: Buffer) => {
    const crc = crc32(body);
    if (crc !== rec.bodyCrc) {
      throw new StoreError('HYDRA_STORE_JOURNAL_CORRUPT', `${journalPath}: record ${rec.seq} of epoch ${epoch} (${RecordType[rec.type]}, ${rec.bodyLen} bytes at offset ${rec.bodyPos}) fails its CRC at apply (crc32 ${crc.toString(16)}, journalled ${rec.bodyCrc.toString(16)}); the apply stops before writing it`);
    }
  };
  await guard?.();
  await step('create marker', marker, () => writeFilePrivate(marker, `${process.pid} ${epoch}\n`));
  const jfh = await step('open', journalPath, () => fs.open(journalPath, 'r'));
  let pages = 0;
  let bytes = 0;
  /** 2 MiB region index -> pages this epoch wrote there (for heat.bin). */
  const heat = new Map<number, number>();
  const phases: Record<string, number> = {};
  let tp = performance.now();
  const lap = (name: string) => {
    const now = performance.now();
    phases[name] = Math.round((now - tp) * 10) / 10;
    tp = now;
  };
  try {
    // Every record first, before a byte reaches the image: a bad one must leave the image at `prev`.
    let vbuf = Buffer.alloc(0);
    for (const rec of cp.records) {
      if (rec.type === RecordType.END) continue;
      if (vbuf.length < rec.bodyLen) vbuf = Buffer.allocUnsafe(rec.bodyLen);
      const body = vbuf.subarray(0, rec.bodyLen);
      await preadAll(jfh, body, rec.bodyPos, journalPath);
      checkCrc(rec, body);
    }
    lap('verify');
    const mfh = await step('open', memoryPath, () => fs.open(memoryPath, 'r+'));
    try {
      let buf = Buffer.alloc(0);
      for (const rec of cp.records) {
        if (rec.type !== RecordType.PAGES) continue;
        if (buf.length < rec.bodyLen) buf = Buffer.allocUnsafe(rec.bodyLen);
        const body = buf.subarray(0, rec.bodyLen);
        await preadAll(jfh, body, rec.bodyPos, journalPath);
        const { runs, data } = decodePages(body);
        checkRuns(runs, prev.ramSize, prev.pageSize, `journal of ${prev.vm} epoch ${epoch}`);
        await writeRuns(mfh, memoryPath, runs, data, faults, 'apply-write');
        countRegions(runs, prev.pageSize, heat);
        bytes += data.length;
      }
      pages = bytes / prev.pageSize;
      lap('write');
      faults?.hit('apply-fsync');
      await step('fdatasync', memoryPath, () => mfh.datasync());
      lap('sync');
    } finally {
      await mfh.close();
    }

    const dsName = devstateFileName(epoch);
    const dsPath = path.join(genDir, dsName);
    const hash = createHash('sha256');
    let dsSize = 0;
    const dfh = await step('create', dsPath, () => openPrivate(dsPath, 'w'));
    try {
      for (const rec of cp.records) {
        if (rec.type !== RecordType.DEVSTATE) continue;
        const body = Buffer.allocUnsafe(rec.bodyLen);
        await preadAll(jfh, body, rec.bodyPos, journalPath);
        checkCrc(rec, body);
        await pwriteAll(dfh, body, dsSize, dsPath, faults, 'devstate-write');
        hash.update(body);
        dsSize += body.length;
      }
      faults?.hit('devstate-fsync');
      await step('fsync', dsPath, () => dfh.sync());
    } finally {
      await dfh.close();
    }
    const dsSha = hash.digest('hex');
    if (dsSize !== cp.end.devstateSize || dsSha !== cp.end.devstateSha256) {
      throw new StoreError('HYDRA_STORE_JOURNAL_CORRUPT', `device state of epoch ${epoch} in ${journalPath}: ${dsSize} bytes sha256 ${dsSha}, END record says ${cp.end.devstateSize} / ${cp.end.devstateSha256}`);
    }

    lap('devstate');
    const now = new Date().toISOString();
    const meta: StoreMeta = {
      ...prev,
      committedEpoch: epoch,
      devstate: { file: dsName, size: dsSize, sha256: dsSha },
      disks: cp.disks ?? prev.disks,
      config: cp.begin.config !== undefined ? cp.begin.config : prev.config,
      committedAt: now,
      epochs: [...prev.epochs, { epoch, kind: cp.begin.kind, pages, bytes, committedAt: now, applyMs: 0 }].slice(-MAX_EPOCH_STATS),
    };
    if (guard) await faults?.delay('apply-before-meta');
    await guard?.();
    await writeMeta(path.join(genDir, META_FILE), meta, faults);
    // meta.json no longer names the old device state; the next recovery removes it otherwise.
    if (prev.devstate.file !== dsName) await fs.rm(path.join(genDir, prev.devstate.file), { force: true }).catch(() => undefined);
    await fs.rm(marker, { force: true }).catch(() => undefined);
    lap('meta');
    // Advisory, after the commit point: never fails the apply (recordHeat logs and returns).
    await recordHeat(genDir, epoch, heat, rootLog.child({ vm: prev.vm, generation: prev.generation }));
    lap('heat');
    return { meta, pages, bytes, phases };
  } finally {
    await jfh.close();
  }
}

/** Truncate the journal to its header (not required to be durable). */
export async function resetJournalFile(genDir: string, generation: number): Promise<void> {
  const p = path.join(genDir, JOURNAL_FILE);
  await step('truncate', p, async () => {
    try {
      const fh = await fs.open(p, 'r+');
      try {
        await fh.truncate(JOURNAL_HEADER_SIZE);
        await fh.write(encodeJournalHeader(generation), 0, JOURNAL_HEADER_SIZE, 0);
      } finally {
        await fh.close();
      }
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
  });
}

/**
 * Bring a generation directory to a consistent state and return its committed
 * meta (null when no checkpoint was ever committed). Throws HYDRA_STORE_META_CORRUPT
 * for a corrupt meta.json: the VM is refused, never reset.
 */
export async function recoverGeneration(genDir: string, vm: string, generation: number, logger: Logger, faults?: FaultInjector): Promise<StoreMeta | null> {
  let meta = await readMeta(path.join(genDir, META_FILE));
  if (meta && (meta.vm !== vm || meta.generation !== generation)) {
    throw new StoreError('HYDRA_STORE_META_CORRUPT', `${path.join(genDir, META_FILE)} names VM ${meta.vm} generation ${meta.generation}, expected ${vm} generation ${generation}; refusing to use it`);
  }
  const scan = await scanJournal(path.join(genDir, JOURNAL_FILE), generation);
  if (scan.torn) {
    logger.warn({ generation, journal: path.join(genDir, JOURNAL_FILE), reason: scan.torn, validBytes: scan.validBytes, fileSize: scan.fileSize }, 'discarding torn journal tail');
  }
  const cp = scan.checkpoint;
  if (cp) {
    const epoch = cp.begin.epoch;
    if (meta && epoch === meta.committedEpoch + 1 && cp.begin.kind === 'incremental' && cp.begin.ramSize === meta.ramSize) {
      const t0 = performance.now();
      const r = await applyJournalCheckpoint(genDir, meta, cp, faults);
      meta = r.meta;
      logger.info({ generation, epoch, pages: r.pages, ms: Math.round(performance.now() - t0) }, 'replayed journalled checkpoint');
    } else if (meta && epoch <= meta.committedEpoch) {
      logger.debug({ generation, epoch, committed: meta.committedEpoch }, 'dropping journalled checkpoint already applied');
    } else {
      logger.warn({ generation, epoch, committed: meta?.committedEpoch ?? null }, 'dropping journalled checkpoint that does not follow the committed epoch');
    }
  }
  if (scan.fileSize > JOURNAL_HEADER_SIZE || scan.torn) {
    faults?.hit('journal-reset');
    await resetJournalFile(genDir, generation);
  }
  await removeOrphans(genDir, meta, logger);
  return meta;
}

async function removeOrphans(genDir: string, meta: StoreMeta | null, logger: Logger): Promise<void> {
  let names: string[];
  try {
    names = await fs.readdir(genDir);
  } catch {
    return;
  }
  const removed: string[] = [];
  for (const n of names) {
    const orphan =
      n.startsWith(`${META_FILE}.tmp`) ||
      n.startsWith(`${HEAT_FILE}.tmp`) ||
      n === APPLYING_FILE ||
      (meta !== null && /^devstate-\d+\.bin$/.test(n) && n !== meta.devstate.file) ||
      (meta !== null && /^memory(-\d+)?\.img$/.test(n) && n !== meta.memoryFile);
    if (orphan) {
      // An orphan no meta names: removed again by the next recovery if this fails.
      await fs.rm(path.join(genDir, n), { force: true }).catch(() => undefined);
      removed.push(n);
    }
  }
  if (removed.length > 0) {
    logger.info({ dir: genDir, removed }, 'removed files no committed epoch refers to');
    // Only makes the removals durable; undone removals are redone by the next recovery.
    await fsyncDir(genDir).catch(() => undefined);
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
    // Empty or partial: the store is writing the marker right now (it is not written atomically).
    if (!Number.isInteger(pid) || pid <= 0) {
      if (Date.now() > deadline) return 'stale';
      await sleep(10);
      continue;
    }
    if (!pidAlive(pid)) return 'stale'; // left by a crashed store: only its recovery (journal replay) may clear it
    if (Date.now() > deadline) throw new StoreError('HYDRA_STORE_BUSY', `${dir}: a checkpoint is still being applied by process ${pid} after ${timeoutMs} ms`);
    await sleep(10);
  }
}
