/**
 * The RAM image file (`memory.img`): guest RAM page i at offset i*pageSize,
 * nothing else, sparse where never written. QEMU maps this exact file
 * (memory-backend-file, share=off) for a file-mode restore.
 */
import fs from 'node:fs/promises';
import { StoreError } from '../errors.js';
import type { PageRun } from '../protocol/index.js';
import type { FaultInjector, CrashPoint } from './faults.js';
import { openPrivate, preadAll, pwriteAll, step } from './fsutil.js';

/** Create (or reset) an image: truncate to 0, then to ramSize, so it reads as zeros and is sparse. */
export async function createImage(file: string, ramSize: number): Promise<fs.FileHandle> {
  return step('create image', file, async () => {
    const fh = await openPrivate(file, 'w+');
    try {
      await fh.truncate(ramSize);
    } catch (err) {
      await fh.close();
      throw err;
    }
    return fh;
  });
}

export function checkRuns(runs: readonly PageRun[], ramSize: number, pageSize: number, what: string): void {
  for (const r of runs) {
    if (r.offset % pageSize !== 0 || r.length % pageSize !== 0 || r.offset + r.length > ramSize) {
      throw new StoreError('HYDRA_STORE_BAD_RUN', `${what}: page run offset=${r.offset} length=${r.length} is not ${pageSize}-aligned or lies outside RAM of ${ramSize} bytes`);
    }
  }
}

/** pwrites in flight at once (libuv's thread pool runs 4). */
const WRITE_CONCURRENCY = 4;

/**
 * Write runs (their bytes contiguous in `data`) at their offsets. Adjacent runs
 * are merged into one write; up to WRITE_CONCURRENCY writes run at once.
 * Runs that overlap an earlier run of the same call are written after it.
 */
export async function writeRuns(fh: fs.FileHandle, file: string, runs: readonly PageRun[], data: Buffer, faults?: FaultInjector, point?: CrashPoint): Promise<void> {
  const segs: { off: number; buf: Buffer }[] = [];
  let dpos = 0;
  let i = 0;
  let sorted = true;
  while (i < runs.length) {
    const start = runs[i]!.offset;
    let len = runs[i]!.length;
    let j = i + 1;
    while (j < runs.length && runs[j]!.offset === start + len) {
      len += runs[j]!.length;
      j++;
    }
    if (len > 0) {
      const prev = segs[segs.length - 1];
      if (prev && prev.off + prev.buf.length > start) sorted = false;
      segs.push({ off: start, buf: data.subarray(dpos, dpos + len) });
    }
    dpos += len;
    i = j;
  }
  if (!sorted || faults?.enabled) {
    // Overlapping runs must land in order; crash injection wants a deterministic order.
    for (const s of segs) await pwriteAll(fh, s.buf, s.off, file, faults, point);
    return;
  }
  let next = 0;
  let stop = false;
  const worker = async () => {
    while (next < segs.length && !stop) {
      const s = segs[next++]!;
      try {
        await pwriteAll(fh, s.buf, s.off, file);
      } catch (err) {
        stop = true;
        throw err;
      }
    }
  };
  const results = await Promise.allSettled(Array.from({ length: Math.min(WRITE_CONCURRENCY, segs.length) }, worker));
  const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
}

/** Read runs into one contiguous buffer (zeros past EOF): `into` when given (at least as large), else a new one. */
export async function readRuns(fh: fs.FileHandle, file: string, runs: readonly PageRun[], into?: Buffer): Promise<Buffer> {
  let total = 0;
  for (const r of runs) total += r.length;
  const out = into && into.length >= total ? into.subarray(0, total) : Buffer.allocUnsafe(total);
  let pos = 0;
  for (const r of runs) {
    await preadAll(fh, out.subarray(pos, pos + r.length), r.offset, file);
    pos += r.length;
  }
  return out;
}
