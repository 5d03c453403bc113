import { test } from 'node:test';
import assert from 'node:assert/strict';
import { splitByZero } from './network-pager.js';

const PAGE = 4096;

test('a request splits into the pages without data (filled with zeros here) and those fetched, in order', () => {
  const zero = new Uint8Array(16).fill(1);
  zero.fill(0, 4, 8); // pages 4..7 hold data
  zero.fill(0, 12, 13);
  const s = splitByZero(zero, [{ offset: 2 * PAGE, length: 8 * PAGE }, { offset: 12 * PAGE, length: 4 * PAGE }]);
  assert.deepEqual(s.data, [{ offset: 4 * PAGE, length: 4 * PAGE }, { offset: 12 * PAGE, length: PAGE }]);
  assert.deepEqual(s.zero, [{ offset: 2 * PAGE, length: 2 * PAGE }, { offset: 8 * PAGE, length: 2 * PAGE }, { offset: 13 * PAGE, length: 3 * PAGE }]);
});
