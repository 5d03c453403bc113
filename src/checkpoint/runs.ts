/** Page runs: [offset, offset+length) byte ranges of guest RAM, page aligned. */
export interface Run {
  offset: number;
  length: number;
}

/** Union of run lists, sorted and coalesced (touching or overlapping runs merge). */
export function mergeRuns(...lists: Run[][]): Run[] {
  const all = lists.flat().filter((r) => r.length > 0).sort((a, b) => a.offset - b.offset);
  const out: Run[] = [];
  for (const r of all) {
    const last = out[out.length - 1];
    if (last && r.offset <= last.offset + last.length) {
      last.length = Math.max(last.length, r.offset + r.length - last.offset);
    } else {
      out.push({ offset: r.offset, length: r.length });
    }
  }
  return out;
}

export function totalBytes(runs: Run[]): number {
  let n = 0;
  for (const r of runs) n += r.length;
  return n;
}

/**
 * Split runs into batches of at most `maxBytes` each (a run may be cut), so
 * each protocol frame stays bounded.
 */
export function* batchRuns(runs: Run[], maxBytes: number): Generator<Run[]> {
  let batch: Run[] = [];
  let size = 0;
  for (const r of runs) {
    let off = r.offset;
    let left = r.length;
    while (left > 0) {
      const take = Math.min(left, maxBytes - size);
      batch.push({ offset: off, length: take });
      size += take;
      off += take;
      left -= take;
      if (size === maxBytes) {
        yield batch;
        batch = [];
        size = 0;
      }
    }
  }
  if (batch.length) yield batch;
}
