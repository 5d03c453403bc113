// Which parts of an image file hold data: the holes read as zeros, so a restore fills those pages itself instead of streaming them.
import fs from 'node:fs';
import { loadNative } from '../native/index.js';
import { MAX_DATA_RUN_BYTES, type PageRun } from '../protocol/index.js';

/**
 * The data runs of `file` within [0, size) (SEEK_DATA / SEEK_HOLE), widened
 * to whole pages, each at most MAX_DATA_RUN_BYTES. Without the native addon
 * (no lseek with SEEK_DATA from Node) the whole range counts as data: always
 * correct, only slower to restore.
 */
export function fileDataRuns(file: string, size: number, pageSize: number): PageRun[] {
  let native: ReturnType<typeof loadNative>;
  try {
    native = loadNative();
  } catch {
    return split([{ offset: 0, length: size }]);
  }
  const fd = fs.openSync(file, 'r');
  try {
    const out: PageRun[] = [];
    let pos = 0;
    while (pos < size) {
      const data = native.lseek(fd, pos, 'data');
      if (data < 0 || data >= size) break;
      let hole = native.lseek(fd, data, 'hole');
      if (hole < 0 || hole > size) hole = size;
      const start = Math.floor(data / pageSize) * pageSize;
      const end = Math.min(size, Math.ceil(hole / pageSize) * pageSize);
      const last = out.at(-1);
      if (last && last.offset + last.length >= start) last.length = Math.max(last.length, end - last.offset);
      else out.push({ offset: start, length: end - start });
      pos = end;
    }
    return split(out);
  } finally {
    fs.closeSync(fd);
  }
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
