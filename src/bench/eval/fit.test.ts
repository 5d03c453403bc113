// Unit test of the growth verdict: a clean line grows, scatter around a constant is flat, two points are not fitted.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { linearFit } from './fit.js';

test('a clean linear growth is reported with its slope per unit', () => {
  const f = linearFit([0.5, 1, 2, 4].map((x) => ({ x, y: 10 + 5 * x })), 'ms', 'GB');
  assert.equal(f.verdict, 'grows');
  assert.ok(Math.abs(f.slope! - 5) < 1e-9);
  assert.ok(Math.abs(f.intercept! - 10) < 1e-9);
  assert.match(f.text, /^\+5\.00 ms per GB/);
});

test('scatter around a constant is flat', () => {
  const ys = [10.2, 9.7, 10.4, 9.9, 10.1, 9.8, 10.3, 9.6];
  const f = linearFit(ys.map((y, i) => ({ x: [1, 2, 4, 8][i % 4]!, y })), 'ms', 'VM');
  assert.equal(f.verdict, 'flat');
  assert.match(f.text, /^flat/);
});

test('a falling line shrinks', () => {
  const f = linearFit([1, 2, 3, 4].map((x) => ({ x, y: 100 - 7 * x + (x % 2 ? 0.1 : -0.1) })), 'ms', 'VM');
  assert.equal(f.verdict, 'shrinks');
});

test('fewer than three points or one x value give no verdict', () => {
  assert.equal(linearFit([{ x: 1, y: 2 }, { x: 2, y: 3 }], 'ms', 'GB').verdict, 'too few points');
  assert.equal(linearFit([{ x: 1, y: 2 }, { x: 1, y: 3 }, { x: 1, y: 4 }], 'ms', 'GB').verdict, 'too few points');
  assert.equal(linearFit([{ x: 1, y: NaN }, { x: 2, y: 3 }, { x: 3, y: 4 }], 'ms', 'GB').n, 2);
});
