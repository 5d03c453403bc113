import { test } from 'node:test';
import assert from 'node:assert/strict';
import { warmOrder } from './image-warmer.js';

const M = 2 * 1024 * 1024;

test('warm order: hot regions first, then the populated rest in address order, every byte once, holes skipped', () => {
  const populated = [{ offset: 0, length: 3 * M }, { offset: 5 * M, length: M + 4096 }];
  const order = warmOrder(populated, [M + 123, 5 * M, 5 * M + 8192, 40 * M], 8 * M);
  assert.deepEqual(order.slice(0, 2), [{ offset: M, length: M }, { offset: 5 * M, length: M }], 'hot regions, deduplicated, out-of-range dropped');
  assert.deepEqual(order.slice(2), [{ offset: 0, length: M }, { offset: 2 * M, length: M }, { offset: 6 * M, length: 4096 }]);
  const bytes = new Set<number>();
  for (const r of order) for (let o = r.offset; o < r.offset + r.length; o += 4096) {
    assert.ok(!bytes.has(o), `page ${o} listed twice`);
    bytes.add(o);
  }
});

test('warm order: a hot region at the end of the file is cut at its size', () => {
  assert.deepEqual(warmOrder([{ offset: 0, length: M + 4096 }], [M], M + 4096), [{ offset: M, length: 4096 }, { offset: 0, length: M }]);
});
