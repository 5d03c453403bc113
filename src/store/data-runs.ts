// Which parts of an image file hold data: the holes read as zeros, so a restore fills those pages itself instead of streaming them.
import fs from 'node:fs';
import { fileDataRunsOf } from '../tracker/index.js';
import { MAX_DATA_RUN_BYTES, type PageRun } from '../protocol/index.js';

/**
 * The data runs of `file` within [0, size) (SEEK_DATA / SEEK_HOLE), widened
 * to whole pages, each at most MAX_DATA_RUN_BYTES. Without the native addon
 * (no lseek with SEEK_DATA from Node), or when the runs cannot be read, the whole range counts as data: always
 * correct, only slower to restore.
 */
export function fileDataRuns(file: string, size: number, pageSize: number): PageRun[] {
  const fd = fs.openSync(file, 'r');
  let data: PageRun[];
  try {
    data = fileDataRunsOf(fd, size);
  } catch {
    return split([{ offset: 0, length: size }]);
  } finally {
    fs.closeSync(fd);
  }
  // File-system blocks may be smaller than a page: widen to whole pages (a union merges what then touches).
  const widened = data.map((r) => {
    const start = Math.floor(r.offset / pageSize) * pageSize;
    return { offset: start, length: Math.min(size, Math.ceil((r.offset + r.length) / pageSize) * pageSize) - start };
  });
  return unionDataRuns(widened, []);
}

/** Ascending union of two ascending run lists, split into runs of at most MAX_DATA_RUN_BYTES. */
export function unionDataRuns(a: readonly PageRun[], b: readonly PageRun[]): PageRun[] {
  const all = [...a, ...b].sort((x, y) => x.offset - y.offset);
  const out: PageRun[] = [];
  for (const r of all) {
    const last = out.at(-1);
    if (last && last.offset + last.length >= r.offset) last.length = Math.max(last.length, r.offset + r.length - last.offset);
    else out.push({ ...r });
  }
  return split(out);
}

function split(runs: readonly PageRun[]): PageRun[] {
  const out: PageRun[] = [];
  for (const r of runs) {
    for (let o = r.offset; o < r.offset + r.length; o += MAX_DATA_RUN_BYTES) out.push({ offset: o, length: Math.min(MAX_DATA_RUN_BYTES, r.offset + r.length - o) });
  }
  return out;
}
