import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileDataRuns, unionDataRuns } from './data-runs.js';
import { MAX_DATA_RUN_BYTES } from '../protocol/index.js';

const PAGE = 4096;

test('data runs of a sparse image: exactly the written parts, whole pages, nothing of the holes', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hv-datarun-'));
  try {
    const file = path.join(dir, 'memory.img');
    const size = 64 * 1024 * 1024;
    const fd = fs.openSync(file, 'w');
    fs.ftruncateSync(fd, size);
    fs.writeSync(fd, Buffer.alloc(PAGE, 1), 0, PAGE, 8 * 1024 * 1024);
    fs.writeSync(fd, Buffer.alloc(3 * PAGE, 2), 0, 3 * PAGE, 40 * 1024 * 1024 + PAGE);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    const runs = fileDataRuns(file, size, PAGE);
    const covered = (o: number) => runs.some((r) => o >= r.offset && o < r.offset + r.length);
    assert.ok(covered(8 * 1024 * 1024) && covered(40 * 1024 * 1024 + 3 * PAGE), `written pages are data: ${JSON.stringify(runs)}`);
    assert.ok(!covered(0) && !covered(20 * 1024 * 1024) && !covered(size - PAGE), 'holes are not');
    const total = runs.reduce((s, r) => s + r.length, 0);
    assert.ok(total < 2 * 1024 * 1024, `only the written neighbourhood (file-system blocks) counts: ${total} bytes`);
    for (const r of runs) assert.equal(r.offset % PAGE, 0);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('data runs: a union merges overlaps and splits runs longer than the wire allows', () => {
  assert.deepEqual(unionDataRuns([{ offset: 0, length: 2 * PAGE }], [{ offset: PAGE, length: 2 * PAGE }, { offset: 10 * PAGE, length: PAGE }]), [{ offset: 0, length: 3 * PAGE }, { offset: 10 * PAGE, length: PAGE }]);
  const big = unionDataRuns([{ offset: 0, length: 2 * MAX_DATA_RUN_BYTES + PAGE }], []);
  assert.deepEqual(big.map((r) => r.length), [MAX_DATA_RUN_BYTES, MAX_DATA_RUN_BYTES, PAGE]);
});
