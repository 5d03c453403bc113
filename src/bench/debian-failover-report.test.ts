// The Debian fail-over bench's report: the tables from observations, and the generated docs section replaced in place.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { renderDebianFailover, updateDocs, DOCS_BEGIN, DOCS_END, type DebianFailoverBenchOptions } from './debian-failover-bench.js';
import type { FailoverObservation } from './debian-netns.js';

const opts: DebianFailoverBenchOptions = { outDir: '/nonexistent', runs: 1, intervalsMs: [1000, 500], memory: '512M', windowS: 10, prefix: 'x-', subnet: '198.18.110.0/24', log: () => {} };
const obs = (kind: 'qemu' | 'host', intervalMs: number, gap: number, lost: number): FailoverObservation => ({
  kind, fromHost: 'host2', toHost: 'host3', intervalMs, killAt: 1, firstReplyAfterKillMs: gap + 10, longestGapMs: gap,
  ackedBeforeKill: 100, found: 100 - lost, lostAcked: lost, ackedAtCheckpoint: 90, connectedAfterKillMs: gap, runningAfterKillMs: 1500, generation: 2,
});

test('the report: outage per failure kind, loss per interval, checkpoint windows, every fail-over', () => {
  const fos = [obs('qemu', 1000, 4000, 10), obs('host', 1000, 9000, 20), obs('qemu', 500, 3000, 4), obs('host', 500, 7000, 6)];
  const r = renderDebianFailover(opts, { startedAt: 'now', durationS: 600, bootS: 120, loadBefore: [1, 2, 3], loadAfter: [1, 2, 3], image: 'abc' }, fos, [
    { label: 'idle', intervalMs: 1000, pauseMs: [10, 20, 30], bytes: [4096, 8192, 4096] },
    { label: 'client load', intervalMs: 500, pauseMs: [40], bytes: [1024 * 100] },
  ]);
  assert.match(r.markdown, /\| QEMU SIGKILL \| 2 \| 3000 \(max 4000\) \| 3010 \(max 4010\) \| 1500 \(max 1500\) \| 3000 \(max 4000\) \| 4 \(max 10\) \|/);
  assert.match(r.markdown, /\| 0\.5 s \| 2 \| 4 \(max 6\) \| 4 \(qemu\), 6 \(host\) \|/);
  assert.match(r.markdown, /\| idle \(client stopped\) \| 1 s \| 3 \| 20\.0 \(30\.0\) \| 4 \(8\) \|/);
  assert.match(r.markdown, /\| under the client's load \| 0\.5 s \| 1 \| 40\.0 \(40\.0\) \| 100 \(100\) \|/);
  assert.equal((r.json.loss as Record<string, { median: number }>)['1000']!.median, 10, 'the lower median of two, as summary() gives everywhere');
});

test('updateDocs replaces only the generated section, and appends it once when absent', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hv-docs-'));
  try {
    const f = path.join(dir, 'b.md');
    fs.writeFileSync(f, `# B\n\nbefore\n\n${DOCS_BEGIN}\nold numbers\n${DOCS_END}\n\nafter\n`);
    updateDocs(f, 'new numbers\n');
    assert.equal(fs.readFileSync(f, 'utf8'), `# B\n\nbefore\n\n${DOCS_BEGIN}\nnew numbers\n${DOCS_END}\n\nafter\n`);
    fs.writeFileSync(f, '# B\n');
    updateDocs(f, 'n1\n');
    updateDocs(f, 'n2\n');
    assert.equal(fs.readFileSync(f, 'utf8'), `# B\n\n${DOCS_BEGIN}\nn2\n${DOCS_END}\n`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
