import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { checkpointMarkdown, writeCheckpointDoc, DOC_BEGIN, DOC_END, type CheckpointBenchJson, type CheckpointModeResult } from './checkpoint-report.js';
import { BenchError } from '../errors.js';
import { summary } from './harness.js';

function result(memory: string, ws: number, mode: string, pauses: number[], vmPaused: number[], collect: number): CheckpointModeResult {
  const z = summary([0]);
  return {
    memory, workingSetMb: ws, mode, checkpoints: pauses.length,
    pauseMs: summary(pauses), vmPausedMs: summary(vmPaused),
    parts: { stopMs: z, collectMs: summary([collect]), copyMs: z, devstateMs: z, diskMs: z, contMs: z },
    mb: summary([ws]), commitMs: z, sendMs: z, precopyRounds: 0,
    cowCopies: null, faults: null, serviceMeanUs: null, serviceMaxUs: null,
  };
}

const run: CheckpointBenchJson = {
  benchmark: 'checkpoint', date: '2026-11-30T14:00:00.000Z', host: { cpus: 2, memGiB: 24, kernel: 'k' },
  command: 'hydravm bench checkpoint', guest: { memories: ['512M', '4G'], intervalS: 1 }, paper: { basicPauseMs: '70-80', cowPauseMs: '5-7' },
  results: [
    result('512M', 64, 'basic', [10, 12, 30], [9, 11, 29], 1.0),
    result('4G', 64, 'basic', [10, 12, 14], [9, 11, 13], 1.5),
    result('512M', 64, 'cow 64K', [6, 7, 8], [2, 3, 4], 0.2),
    result('4G', 64, 'cow 64K', [6, 7, 30], [2, 3, 12], 0.3),
  ],
  slowdown: [{ rateMb: 32, mode: 'basic', stepsPerS: 100, slowdownPct: 6 }], disk: null,
};

test('the targets are computed from the numbers, never typed in', () => {
  const md = checkpointMarkdown(run);
  assert.match(md, /\| CoW pause <= 5 ms median, <= 10 ms p99 \(4G, 64 MB, cow 64K\) \| VM paused 3\.0 ms \/ 12\.0 ms; .* \| missed \|/);
  assert.match(md, /\| basic pause p99 <= 2x median \(512M, 64 MB\) \| 12\.0 ms \/ 30\.0 ms = 2\.50x.* \| missed \|/);
  assert.match(md, /\| basic pause p99 <= 2x median \(4G, 64 MB\) \| .* = 1\.17x.* \| met \|/);
  assert.match(md, /\| collect 4G at most 1 ms above 512M \(basic, 64 MB\) \| 1\.50 vs 1\.00 ms \(difference 0\.50 ms\) \| met \|/);
  assert.match(md, /\| guest slowdown 32 MB\/s, basic <= 5 % \| 6\.0 % \| missed \|/);
  assert.match(md, /Paper \(Xen, 512 MB VM\): pause 70-80 ms basic, 5-7 ms copy-on-write/);
});

test('checkpoint-page replaces only the generated section, and refuses a page without one or a file that is no run', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ckpt-page-'));
  try {
    const json = path.join(dir, 'checkpoint.json');
    fs.writeFileSync(json, JSON.stringify(run));
    const doc = path.join(dir, 'b.md');
    fs.writeFileSync(doc, `# B\n\nbefore\n\n${DOC_BEGIN}\nold table\n${DOC_END}\n\nafter\n`);
    writeCheckpointDoc(json, doc);
    const once = fs.readFileSync(doc, 'utf8');
    assert.doesNotMatch(once, /old table/);
    assert.match(once, /^# B\n\nbefore\n\n/);
    assert.match(once, /\nafter\n$/);
    assert.match(once, /Command: `hydravm bench checkpoint`/);
    writeCheckpointDoc(json, doc);
    assert.equal(fs.readFileSync(doc, 'utf8'), once, 'idempotent');

    fs.writeFileSync(path.join(dir, 'plain.md'), '# no markers\n');
    assert.throws(() => writeCheckpointDoc(json, path.join(dir, 'plain.md')), (e: unknown) => e instanceof BenchError && e.code === 'HYDRA_BENCH_BAD_RESULTS' && /plain\.md: no generated checkpoint section/.test(e.message));
    fs.writeFileSync(path.join(dir, 'other.json'), JSON.stringify({ benchmark: 'protocol' }));
    assert.throws(() => writeCheckpointDoc(path.join(dir, 'other.json'), doc), (e: unknown) => e instanceof BenchError && /other\.json: not a checkpoint benchmark result \(benchmark: protocol\)/.test(e.message));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
