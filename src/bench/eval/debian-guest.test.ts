// The workload runner's console lines as the harness reads them: runs, steps, duplicates, errors, a failed job.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { WorkloadWatch } from './debian-guest.js';
import { vmPaths } from '../../vm/index.js';

function withVm(fn: (log: (s: string) => void) => Promise<void>): Promise<void> {
  const home = fs.mkdtempSync(path.join(os.tmpdir(), 'hv-watch-'));
  const prev = process.env.HYDRAVM_HOME;
  process.env.HYDRAVM_HOME = home;
  const file = vmPaths('w1').serialLog;
  fs.mkdirSync(path.dirname(file), { recursive: true });
  return fn((s) => fs.appendFileSync(file, s)).finally(() => {
    process.env.HYDRAVM_HOME = prev;
    fs.rmSync(home, { recursive: true, force: true });
  });
}

test('lines of two runs in one boot, with systemd prefixes, a duplicate and a line split across writes', () => withVm(async (log) => {
  const w = new WorkloadWatch('w1');
  try {
    log('[   28.6] hydra-workload[210]: hydra-workload: ready name=compile run=1\n');
    log('[   29.0] hydra-workload[210]: hydra-workload: start name=compile run=1\n');
    log('[   30.0] hydra-workload[219]: hydra-workload: name=compile step=1 of=4\nhydra-workload: name=compile step=1 of=4\n');
    log('[   31.0] hydra-workload[219]: hydra-workload: name=comp');
    w.poll();
    assert.equal(w.lines.filter((l) => l.kind === 'step').length, 1, 'a duplicate line counts once, a partial line not yet');
    log('ile step=2 of=4\n[   33.0] hydra-workload[210]: hydra-workload: done name=compile run=1 seconds=4.00 status=0\n');
    log('hydra-workload: ready name=compile run=2\nhydra-workload: start name=compile run=2\nhydra-workload: name=compile step=3 of=4\n');
    const done1 = await w.finished(1000, 1);
    assert.equal(done1.seconds, 4);
    assert.equal((await w.ready(2, 1000)).run, 2);
    assert.equal((await w.reached(0.5, 1000, 2)).step, 3, 'steps belong to the run whose start came last');
    assert.equal(w.fractionAt(performance.now(), 1), 0.5);
    await assert.rejects(w.finished(200, 2), /timed out after 0 s waiting for run 2 of the workload to finish/);
  } finally {
    w.close();
  }
}));

test('a failed job and a refused workload are errors naming the VM', () => withVm(async (log) => {
  const w = new WorkloadWatch('w1');
  try {
    log('hydra-workload: start name=transcode run=1\nhydra-workload: done name=transcode run=1 seconds=1.00 status=1\n');
    await assert.rejects(w.finished(1000), /VM w1: the workload failed \(exit status 1/);
  } finally {
    w.close();
  }
  const v = new WorkloadWatch('w1');
  try {
    log('hydra-workload: error name=bogus reason=unknown-workload\n');
    await assert.rejects(v.started(1000), /VM w1: the workload runner refused: hydra-workload: error name=bogus reason=unknown-workload/);
  } finally {
    v.close();
  }
}));
