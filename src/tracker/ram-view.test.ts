import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { loadNative } from '../native/index.js';
import { RamView } from './ram-view.js';

const PAGE = 4096;

test('a RAM view in several mappings copies runs across their boundaries exactly as one mapping would', () => {
  const native = loadNative();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hv-ramview-'));
  try {
    const file = path.join(dir, 'ram');
    const size = 10 * PAGE * 4 + 3 * PAGE; // not a multiple of the chunk
    const data = crypto.randomBytes(size);
    fs.writeFileSync(file, data);
    const fd = fs.openSync(file, 'r');
    const view = RamView.map(native, fd, 0, size, 4 * PAGE);
    assert.equal(view.chunks.length, 11);
    assert.equal(view.whole(), undefined, 'no single Buffer over several mappings');
    // Runs inside one chunk, across one boundary, across several, and the last partial chunk.
    const runs = [[0, PAGE], [3 * PAGE, 2 * PAGE], [7 * PAGE, 10 * PAGE], [20 * PAGE, PAGE], [size - 2 * PAGE, 2 * PAGE]];
    const flat = Float64Array.from(runs.flat());
    const total = runs.reduce((s, [, l]) => s + l!, 0);
    const dst = Buffer.alloc(total + 100);
    assert.equal(view.copyRuns(flat, dst, 100), total);
    const want = Buffer.concat(runs.map(([o, l]) => data.subarray(o!, o! + l!)));
    assert.ok(dst.subarray(100).equals(want), 'bytes and order as in RAM');
    assert.throws(() => view.copyRuns(Float64Array.from([size - PAGE, 2 * PAGE]), dst), 'a run past the end is refused');
    view.release();
    fs.closeSync(fd);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
