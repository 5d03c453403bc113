import { test } from 'node:test';
import assert from 'node:assert/strict';
import { batchRuns, mergeRuns, totalBytes } from './runs.js';

const P = 4096;

test('mergeRuns unions, sorts and coalesces', () => {
  assert.deepEqual(mergeRuns([{ offset: 8 * P, length: P }, { offset: 0, length: P }], [{ offset: P, length: 2 * P }, { offset: 8 * P, length: 2 * P }]),
    [{ offset: 0, length: 3 * P }, { offset: 8 * P, length: 2 * P }]);
  assert.deepEqual(mergeRuns([]), []);
});

test('batchRuns never exceeds the bound and covers every byte once', () => {
  const runs = [{ offset: 0, length: 10 * P }, { offset: 20 * P, length: 3 * P }, { offset: 40 * P, length: P }];
  const batches = [...batchRuns(runs, 4 * P)];
  for (const b of batches) assert.ok(totalBytes(b) <= 4 * P);
  assert.deepEqual(mergeRuns(...batches), runs);
  assert.equal(batches.reduce((n, b) => n + totalBytes(b), 0), totalBytes(runs));
});
