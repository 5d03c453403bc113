/**
 * `gen-<g>/heat.bin`: where the VM wrote in its last HEAT_EPOCHS incremental
 * checkpoints, per 2 MiB region of guest RAM. A network-mode restore asks for
 * it (GET_HOT) and prefetches the hottest regions first.
 *
 * The record is advisory. It is written after meta.json (atomically: temp file,
 * rename; no fsync), and a missing, unreadable or corrupt heat file never fails
 * a commit, a recovery or a restore: it is logged and treated as empty.
 *
 * Layout (all integers big-endian); changing it requires a HEAT_VERSION bump:
 *
 *   header (16 bytes)
 *     0  4  magic 'HVMH'
 *     4  2  version (HEAT_VERSION)
 *     6  2  epoch count n (<= HEAT_EPOCHS)
 *     8  4  region size in bytes (HEAT_REGION_BYTES)
 *     12 4  crc32 of header bytes 0..11 followed by the whole body
 *   body: n epoch blocks, oldest first, epochs strictly ascending
 *     0  4  epoch
 *     4  4  region count m
 *     8  6m m x { u32 region index (offset / region size), u16 pages written }, index ascending
 *
 * Memory stays bounded: only regions an epoch wrote are listed (at most
 * ramSize / 2 MiB per epoch, 512 Ki for a 1 TiB guest), and only HEAT_EPOCHS
 * epochs are kept. Nothing is cached between commits.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import type { Logger } from 'pino';
import { StoreError } from '../errors.js';
import type { HotRegion, PageRun } from '../protocol/index.js';
import { writeFileAtomic } from '../util/atomic-write.js';

export const HEAT_FILE = 'heat.bin';
export const HEAT_MAGIC = Buffer.from('HVMH', 'latin1');
export const HEAT_VERSION = 1;
/** Incremental epochs kept in the record. */
export const HEAT_EPOCHS = 8;
/** Granularity of the record: one 2 MiB region (the pager's prefetch unit). */
export const HEAT_REGION_BYTES = 2 * 1024 * 1024;
const HEADER_SIZE = 16;
const ENTRY_SIZE = 6;
const MAX_PAGES_FIELD = 0xffff;

/** One epoch of the record: regions written (ascending) and pages written in each. */
export interface HeatEpoch {
  epoch: number;
  regions: Uint32Array;
  pages: Uint16Array;
}

/** Add the pages of `runs` to per-region counts (region index -> pages). */
export function countRegions(runs: readonly PageRun[], pageSize: number, into: Map<number, number>): void {
  for (const r of runs) {
    let off = r.offset;
    const end = r.offset + r.length;
    while (off < end) {
      const region = Math.floor(off / HEAT_REGION_BYTES);
      const stop = Math.min(end, (region + 1) * HEAT_REGION_BYTES);
      const pages = Math.ceil((stop - off) / pageSize);
      into.set(region, (into.get(region) ?? 0) + pages);
      off = stop;
    }
  }
}

export function heatEpoch(epoch: number, counts: ReadonlyMap<number, number>): HeatEpoch {
  const keys = [...counts.keys()].sort((a, b) => a - b);
  const regions = new Uint32Array(keys.length);
  const pages = new Uint16Array(keys.length);
  keys.forEach((k, i) => {
    regions[i] = k;
    pages[i] = Math.min(MAX_PAGES_FIELD, counts.get(k)!);
  });
  return { epoch, regions, pages };
}

export function encodeHeat(epochs: readonly HeatEpoch[]): Buffer {
  if (epochs.length > 0xffff) throw new RangeError(`too many heat epochs: ${epochs.length}`);
  let size = HEADER_SIZE;
  for (const e of epochs) size += 8 + e.regions.length * ENTRY_SIZE;
  const b = Buffer.alloc(size);
  HEAT_MAGIC.copy(b, 0);
  b.writeUInt16BE(HEAT_VERSION, 4);
  b.writeUInt16BE(epochs.length, 6);
  b.writeUInt32BE(HEAT_REGION_BYTES, 8);
  let p = HEADER_SIZE;
  for (const e of epochs) {
    b.writeUInt32BE(e.epoch, p);
    b.writeUInt32BE(e.regions.length, p + 4);
    p += 8;
    for (let i = 0; i < e.regions.length; i++, p += ENTRY_SIZE) {
      b.writeUInt32BE(e.regions[i]!, p);
      b.writeUInt16BE(e.pages[i]!, p + 4);
    }
  }
  b.writeUInt32BE(crc32(b.subarray(HEADER_SIZE), crc32(b.subarray(0, 12))), 12);
  return b;
}

/** Decode a heat file; throws HYDRA_STORE_HEAT_CORRUPT for anything that is not a valid record. */
export function decodeHeat(b: Buffer, file = HEAT_FILE): HeatEpoch[] {
  const corrupt = (why: string) => new StoreError('HYDRA_STORE_HEAT_CORRUPT', `heat record ${file} is unusable (${why})`);
  if (b.length < HEADER_SIZE) throw corrupt(`${b.length} bytes, shorter than its header`);
  if (!b.subarray(0, 4).equals(HEAT_MAGIC)) throw corrupt('bad magic');
  if (b.readUInt16BE(4) !== HEAT_VERSION) throw corrupt(`format version ${b.readUInt16BE(4)}, this build reads ${HEAT_VERSION}`);
  if (b.readUInt32BE(8) !== HEAT_REGION_BYTES) throw corrupt(`region size ${b.readUInt32BE(8)}, expected ${HEAT_REGION_BYTES}`);
  if (crc32(b.subarray(HEADER_SIZE), crc32(b.subarray(0, 12))) !== b.readUInt32BE(12)) throw corrupt('checksum mismatch');
  const n = b.readUInt16BE(6);
  const out: HeatEpoch[] = [];
  let p = HEADER_SIZE;
  for (let k = 0; k < n; k++) {
    if (p + 8 > b.length) throw corrupt('truncated epoch block');
    const epoch = b.readUInt32BE(p);
    const m = b.readUInt32BE(p + 4);
    p += 8;
    if (p + m * ENTRY_SIZE > b.length) throw corrupt(`epoch ${epoch} lists ${m} regions past the end of the file`);
    if (out.length > 0 && epoch <= out[out.length - 1]!.epoch) throw corrupt('epochs not ascending');
    const regions = new Uint32Array(m);
    const pages = new Uint16Array(m);
    for (let i = 0; i < m; i++, p += ENTRY_SIZE) {
      regions[i] = b.readUInt32BE(p);
      pages[i] = b.readUInt16BE(p + 4);
      if (i > 0 && regions[i]! <= regions[i - 1]!) throw corrupt(`regions of epoch ${epoch} not ascending`);
    }
    out.push({ epoch, regions, pages });
  }
  if (p !== b.length) throw corrupt(`${b.length - p} trailing bytes`);
  return out;
}

/** The heat record of a generation directory ([] if none); throws for an unreadable or corrupt one. */
export async function readHeat(genDir: string): Promise<HeatEpoch[]> {
  const file = path.join(genDir, HEAT_FILE);
  let b: Buffer;
  try {
    b = await fs.readFile(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw new StoreError('HYDRA_STORE_HEAT_CORRUPT', `read heat record ${file}: ${(err as Error).message}`, { cause: err });
  }
  return decodeHeat(b, file);
}

/** Like readHeat, but never throws: an unusable record is logged and read as empty. */
export async function loadHeat(genDir: string, logger: Logger): Promise<HeatEpoch[]> {
  try {
    return await readHeat(genDir);
  } catch (err) {
    logger.warn({ err: (err as Error).message }, 'ignoring the unusable heat record (advisory: read as empty, hot-first prefetch falls back to address order)');
    return [];
  }
}

/**
 * Append incremental epoch `epoch` (region -> pages written) to the record,
 * keeping the newest HEAT_EPOCHS. Never throws: a failure is logged and the
 * commit goes on (the next commit rewrites the record).
 */
export async function recordHeat(genDir: string, epoch: number, counts: ReadonlyMap<number, number>, logger: Logger): Promise<void> {
  const file = path.join(genDir, HEAT_FILE);
  const tmp = `${file}.tmp-${process.pid}`;
  try {
    const prev = await loadHeat(genDir, logger);
    // A replayed or re-committed epoch replaces what was recorded for it and anything after it.
    const epochs = [...prev.filter((e) => e.epoch < epoch), heatEpoch(epoch, counts)].slice(-HEAT_EPOCHS);
    // Advisory: a crash may lose the newest record, so no fsync on the commit path.
    await writeFileAtomic(file, encodeHeat(epochs), { durable: false, mode: 0o600 });
  } catch (err) {
    logger.warn({ epoch, err: (err as Error).message }, 'could not update the heat record (advisory); the commit is unaffected');
    // The temporary file of a failed (advisory) heat write; recovery removes it otherwise.
    await fs.rm(tmp, { force: true }).catch(() => undefined);
  }
}

/**
 * Regions ordered hottest first. A region's score is the pages written to it
 * in each recorded epoch, weighted 2^-(age) where age is how many epochs
 * before the newest recorded one it was taken (the newest counts fully, the
 * one before half, ...). Ties go to the lower address. `upToEpoch` ignores
 * epochs after it (never newer than the committed image); `limit` caps the list.
 */
export function scoreHeat(epochs: readonly HeatEpoch[], opts: { upToEpoch?: number; limit?: number } = {}): HotRegion[] {
  const use = opts.upToEpoch === undefined ? epochs : epochs.filter((e) => e.epoch <= opts.upToEpoch!);
  if (use.length === 0) return [];
  const newest = use[use.length - 1]!.epoch;
  const scores = new Map<number, number>();
  for (const e of use) {
    const w = 2 ** -(newest - e.epoch);
    for (let i = 0; i < e.regions.length; i++) {
      const r = e.regions[i]!;
      scores.set(r, (scores.get(r) ?? 0) + e.pages[i]! * w);
    }
  }
  const out: HotRegion[] = [];
  for (const [r, score] of scores) if (score > 0) out.push({ offset: r * HEAT_REGION_BYTES, score });
  out.sort((a, b) => b.score - a.score || a.offset - b.offset);
  return opts.limit !== undefined && out.length > opts.limit ? out.slice(0, opts.limit) : out;
}
