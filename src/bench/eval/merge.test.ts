// Merging evaluation runs: each part from the last run that measured it, every run listed, quick and full never mixed.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mergeEvalDocuments } from './merge.js';
import type { EvalDocument, PartId, PartResult } from './types.js';

const load = { start: { at: '2026-01-01T00:00:00.000Z', loadavg: [1, 1, 1] }, end: { at: '2026-01-01T00:00:00.000Z', loadavg: [1, 1, 1] } };
const part = (id: PartId, status: PartResult['status'], tag: string): PartResult => ({ id, title: id, status, startedAt: '2026-01-01T00:00:00.000Z', durationS: 1, load, config: { tag }, samples: [] });
const doc = (startedAt: string, finishedAt: string, parts: PartResult[], quick = false, unfinished?: PartId[]): EvalDocument => ({
  schema: 'hydravm-eval/1', startedAt, finishedAt, durationS: (Date.parse(finishedAt) - Date.parse(startedAt)) / 1000, quick, command: ['hydravm', 'bench', 'eval', startedAt],
  environment: { machine: { cpuModel: 'x', cores: 2, memGiB: 1, kernel: 'k' }, qemu: { binary: 'q', version: 'v' }, accel: 'tcg', git: { commit: 'c'.repeat(40), dirty: false, branch: 'b' }, node: 'v20' },
  capabilities: { debianImage: true, debianWorkloads: true, cow: true, modes: ['basic', 'cow'] }, parts, ...(unfinished ? { unfinished } : {}),
});

test('each part comes from the last run that finished it, in the first run\'s order, and every run is listed', () => {
  const a = doc('2026-01-01T10:00:00.000Z', '2026-01-01T10:40:00.000Z', [part('paper', 'done', 'a'), part('overhead', 'done', 'a'), part('size', 'failed', 'a')], false, ['vms']);
  const b = doc('2026-01-01T10:05:00.000Z', '2026-01-01T10:20:00.000Z', [part('size', 'done', 'b')]);
  const m = mergeEvalDocuments([a, b]);
  assert.deepEqual(m.parts.map((p) => `${p.id}:${p.config.tag}`), ['paper:a', 'overhead:a', 'size:b']);
  assert.equal(m.startedAt, a.startedAt);
  assert.equal(m.finishedAt, a.finishedAt);
  assert.equal(m.durationS, 2400);
  assert.equal(m.unfinished, undefined);
  assert.deepEqual(m.runs?.map((r) => [r.parts, r.unfinished]), [[['paper', 'overhead', 'size'], ['vms']], [['size'], undefined]]);
  // A merged document merges again without losing its runs.
  assert.equal(mergeEvalDocuments([m]).runs?.length, 2);
});

test('a quick run and a full one are not merged', () => {
  assert.throws(() => mergeEvalDocuments([doc('2026-01-01T10:00:00.000Z', '2026-01-01T10:01:00.000Z', [], true), doc('2026-01-01T10:00:00.000Z', '2026-01-01T10:01:00.000Z', [])]), /cannot merge a --quick run with a full one/);
  assert.throws(() => mergeEvalDocuments([]), /no evaluation results given/);
});
