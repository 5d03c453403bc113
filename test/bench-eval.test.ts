// `hydravm bench eval --quick` runs end to end (real QEMU guest) and writes well-formed JSON, Markdown, SVG and the docs page; no timing is asserted.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { makeLab } from './support/lab.js';

const lab = makeLab('evaltest');
after(() => lab.cleanup());

/** Every Markdown table has a header, a separator and rows with the header's cell count. */
function assertTablesWellFormed(md: string): number {
  const lines = md.split('\n');
  let tables = 0;
  for (let i = 0; i < lines.length; i++) {
    if (!lines[i]!.startsWith('|') || (i > 0 && lines[i - 1]!.startsWith('|'))) continue;
    const cells = (l: string) => l.replace(/\\\|/g, '').split('|').length;
    const width = cells(lines[i]!);
    assert.match(lines[i + 1] ?? '', /^\|(---\|)+$/, `table at line ${i + 1} lacks its separator row`);
    for (let j = i + 1; j < lines.length && lines[j]!.startsWith('|'); j++) {
      assert.equal(cells(lines[j]!), width, `table row at line ${j + 1} has a different number of cells than its header:\n${lines[j]}`);
    }
    tables++;
  }
  return tables;
}

test('bench eval --quick --only overhead,paper writes well-formed results and the page renders from them', { timeout: 600_000 }, async () => {
  const out = path.join(lab.home, 'eval');
  const r = await lab.cliAsync(['bench', 'eval', '--quick', '--only', 'overhead,paper', '--out', out], { timeoutMs: 590_000 });
  assert.equal(r.code, 0, `bench eval failed:\n${r.stderr.slice(-3000)}`);
  // The progress display names the part, the sample and an ETA.
  assert.match(r.stderr, /\[eval .* \| part 1\/2 paper \| sample (0|1)\/\d+ \| ETA \S+\]/);

  const doc = JSON.parse(fs.readFileSync(path.join(out, 'eval.json'), 'utf8'));
  assert.equal(doc.schema, 'hydravm-eval/1');
  assert.equal(doc.quick, true);
  assert.deepEqual(doc.command, ['hydravm', 'bench', 'eval', '--quick', '--only', 'overhead,paper', '--out', out]);
  assert.ok(doc.environment.machine.cores >= 1 && doc.environment.machine.memGiB > 0 && doc.environment.machine.cpuModel && doc.environment.machine.kernel);
  assert.match(doc.environment.qemu.version, /QEMU emulator version \d+/);
  assert.ok(['tcg', 'kvm'].includes(doc.environment.accel));
  assert.match(doc.environment.git.commit, /^[0-9a-f]{40}$/);
  assert.deepEqual(doc.parts.map((p: { id: string }) => p.id), ['paper', 'overhead'], 'the paper part runs first');
  for (const p of doc.parts) {
    for (const l of [p.load.start, p.load.end]) {
      assert.equal(l.loadavg.length, 3);
      assert.ok(l.loadavg.every((v: number) => Number.isFinite(v) && v >= 0));
    }
  }

  const [paper, overhead] = doc.parts;
  assert.equal(overhead.status, 'done', `overhead part: ${overhead.error}`);
  assert.equal(overhead.samples.length, doc.capabilities.modes.length, 'one round per protection mode');
  const s = overhead.samples[0];
  assert.ok(s.unprotectedStepsPerS > 0 && s.protectedStepsPerS > 0, 'memcheck made progress in both windows');
  assert.ok(s.checkpoints >= 1 && s.pauseMs.length === s.checkpoints, 'checkpoints were taken while protected');
  if (paper.status === 'waiting') {
    // Without the workload image cached, --quick does not build it (minutes of downloads) and says so.
    assert.match(paper.waitingFor.join(' '), /image build debian --workloads/);
    assert.equal(paper.samples.length, 0, 'a waiting part records no numbers');
  } else {
    // With it: one short transcode run twice unprotected and once per protection mode in one boot, then
    // protected in a boot of its own, killed past 50 % and slim-restored.
    assert.equal(paper.status, 'done', `paper part: ${paper.error}`);
    assert.equal(paper.errors, undefined, JSON.stringify(paper.errors));
    const of = (figure: string) => paper.samples.filter((x: { figure: string }) => x.figure === figure);
    assert.deepEqual(of('unprotected').map((x: { run: number }) => x.run), [1, 2]);
    for (const u of of('unprotected')) assert.ok(u.runS > 0 && u.lastHalfS > 0 && u.lastHalfS < u.runS && u.timeline.length > 0);
    assert.deepEqual(of('protected').map((x: { mode: string }) => x.mode), doc.capabilities.modes);
    for (const p of of('protected')) assert.ok(p.runS > 0 && p.protectedBeforeStart && p.checkpoints === p.pauses.length);
    const [fo] = of('failover');
    assert.ok(fo, 'a fail-over sample');
    assert.ok(fo.resumedAt >= 0.5 && fo.resumedAt < 1, `resumed at ${fo.resumedAt}`);
    assert.ok(fo.remainingS > 0 && fo.killToRunningMs > 0 && fo.pauses.length >= 1);
    assert.ok(fo.referenceS > 0, 'the unprotected run gives the never-failed time of the same remainder');
  }
  if (!doc.capabilities.cow) assert.ok(overhead.waiting.some((w: { needs: string[] }) => /--cow/.test(w.needs.join(' '))));

  const md = fs.readFileSync(path.join(out, 'eval.md'), 'utf8');
  assert.ok(assertTablesWellFormed(md) >= 3);
  assert.match(md, /## Beside the paper/);
  assert.match(md, /< 13 % kernel compile/, "the paper's numbers stand beside ours");
  if (doc.parts.some((p: { status: string; waiting?: unknown[] }) => p.status === 'waiting' || p.waiting?.length)) assert.match(md, /Waiting for|waiting:/);
  if (paper.status === 'done') assert.match(md, /Table II: the last 50 % after a slim restore/);
  const svg = fs.readFileSync(path.join(out, 'overhead.svg'), 'utf8');
  assert.match(svg, /^<svg [^>]*xmlns="http:\/\/www.w3.org\/2000\/svg"/);
  assert.match(svg, /<\/svg>$/);

  const page = path.join(lab.home, 'evaluation.md');
  const pr = lab.cli(['bench', 'eval-page', '--json', path.join(out, 'eval.json'), '--out', page]);
  assert.equal(pr.code, 0, pr.stderr);
  const text = fs.readFileSync(page, 'utf8');
  assert.match(text, /## Results/);
  assert.match(text, /a --quick run/);
  assertTablesWellFormed(text);
});

test('bench eval names an unknown part, and eval-page refuses a file that is not an evaluation', () => {
  const r = lab.cli(['bench', 'eval', '--quick', '--only', 'size,bogus', '--out', path.join(lab.home, 'x')]);
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /unknown part bogus \(parts: size, vms, baseline, overhead, paper\)/);
  const bad = path.join(lab.home, 'not-eval.json');
  fs.writeFileSync(bad, '{"schema":"other"}');
  const p = lab.cli(['bench', 'eval-page', '--json', bad, '--out', path.join(lab.home, 'p.md')]);
  assert.notEqual(p.code, 0);
  assert.match(p.stderr, /not-eval\.json is not a `hydravm bench eval` result/);
});
