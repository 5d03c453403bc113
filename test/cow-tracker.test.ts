// CowTracker on a real QEMU running memcheck unthrottled: the copy made after `cont` equals RAM as of the pause.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { makeLab, readJson } from './support/lab.js';
import { waitForMemcheckStep } from '../src/vm/serial.js';
import { QmpClient } from '../src/qmp/index.js';
import { CowTracker } from '../src/tracker/index.js';

const lab = makeLab('cowt');
after(() => lab.cleanup());

const serialOf = (vm: string) => path.join(lab.home, 'vms', vm, 'serial.log');
const qemuPid = (vm: string) => readJson<{ qemuPid: number }>(path.join(lab.home, 'vms', vm, 'state.json'))!.qemuPid;

function applyBatch(image: Buffer, runs: Float64Array, staging: Buffer, at: number): void {
  let pos = at;
  for (let i = 0; i < runs.length; i += 2) {
    staging.copy(image, runs[i]!, pos, pos + runs[i + 1]!);
    pos += runs[i + 1]!;
  }
}

function firstDiff(a: Buffer, b: Buffer): string {
  let n = 0;
  let first = -1;
  for (let i = 0; i < a.length; i += 4096) {
    if (!a.subarray(i, i + 4096).equals(b.subarray(i, i + 4096))) {
      n++;
      if (first < 0) first = i;
    }
  }
  return `${n} pages differ, first at 0x${first.toString(16)}`;
}

for (const grain of [4096, 64 * 1024, 256 * 1024]) {
  test(`CoW grain ${grain / 1024} KiB: the guest writes as fast as it can during the background copy; the copy equals RAM as of the pause`, async () => {
    const vm = `cow${grain / 1024}`;
    // Unthrottled memcheck over 64 MB; a small ring (4 MB) so the copy wraps and the guest meets pending grains.
    const spec = lab.writeSpec(vm, { cmdline: 'console=ttyS0 quiet hydra.run=memcheck memcheck.mb=64 memcheck.rate=0' });
    assert.equal(lab.cli(['vm', 'start', spec]).code, 0);
    await waitForMemcheckStep(serialOf(vm), 1, 60_000);
    const pid = qemuPid(vm);
    const qmp = await QmpClient.connect(path.join(lab.home, 'vms', vm, 'qmp.sock'));
    const t = await CowTracker.attach(pid, { grain, stagingBytes: 4 * 1024 * 1024, maxSpillBytes: 256 * 1024 * 1024 });
    try {
      t.armAll();
      const image = Buffer.alloc(t.ramSize);
      const populated = t.populatedRuns();
      const bounce = t.allocStaging(t.ramSize);
      const n = t.copyRuns(populated, bounce);
      let pos = 0;
      for (const r of populated) { bounce.copy(image, r.offset, pos, pos + r.length); pos += r.length; }
      assert.equal(pos, n);
      let cowCopies = 0;
      let spills = 0;
      for (let round = 0; round < 4; round++) {
        await new Promise((r) => setTimeout(r, 700));
        // Odd rounds re-protect the dirty grains while the VM runs, as the checkpointer does; the pause then protects only the rest.
        if (round % 2 === 1) t.prearm();
        await qmp.execute('stop');
        const c = t.collect();
        // RAM as of the pause, read while the VM is stopped.
        const reference = Buffer.from(t.ram);
        await qmp.execute('cont');
        t.startCopy();
        let copied = 0;
        for (;;) {
          const b = await t.nextBatch(1024 * 1024, 30_000);
          assert.ok(!b.failed, `copy failed: ${b.reason}`);
          applyBatch(image, b.runs, t.staging, b.stagingOffset);
          copied += b.bytes;
          // Slow drain: the guest keeps writing pending grains meanwhile.
          await new Promise((r) => setTimeout(r, 2));
          t.release(b);
          if (b.done || c.grains === 0) break;
        }
        assert.equal(copied, c.bytes, 'every pending grain was copied once');
        assert.ok(image.equals(reference), `round ${round}: ${firstDiff(image, reference)}`);
        cowCopies += (round > 0 ? c.cowCopies : 0);
        spills += (round > 0 ? c.spills : 0);
        console.log(`grain ${grain / 1024} KiB round ${round}: ${c.grains} grains (${(c.bytes / 1048576).toFixed(1)} MB), protect ${c.protectMs.toFixed(2)} ms (${c.reprotectedGrains} grains), faults ${c.faults}, copies before a write ${c.cowCopies} (${c.spills} spilled), service mean ${c.serviceMeanUs.toFixed(1)} us max ${c.serviceMaxUs.toFixed(0)} us`);
        assert.ok(c.bytes > 0, 'the guest wrote between pauses');
      }
      // The handler copied grains the guest wrote before the copier reached them.
      await qmp.execute('stop');
      const last = t.collect();
      await qmp.execute('cont');
      t.fail('test done');
      assert.ok(cowCopies + last.cowCopies > 0, 'some writes met pending grains and were copied first');
      // The 4 MB ring is far smaller than the dirty set: grains written ahead of the drain went to spill memory.
      assert.ok(spills + last.spills > 0, 'the spill path was taken');
    } finally {
      t.close();
      qmp.close();
    }
    // The guest is not left blocked: it goes on after close().
    const { step } = await waitForMemcheckStep(serialOf(vm), 1, 10_000);
    await waitForMemcheckStep(serialOf(vm), step + 2, 60_000);
    assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
  });
}

test('a copier that falls behind (never started): the handler copies each pending grain the guest writes until the spill limit, then the checkpoint fails, the guest goes on, and the next copy carries every grain', async () => {
  const vm = 'cowlag';
  const grain = 64 * 1024;
  const spec = lab.writeSpec(vm, { cmdline: 'console=ttyS0 quiet hydra.run=memcheck memcheck.mb=64 memcheck.rate=0' });
  assert.equal(lab.cli(['vm', 'start', spec]).code, 0);
  await waitForMemcheckStep(serialOf(vm), 1, 60_000);
  const qmp = await QmpClient.connect(path.join(lab.home, 'vms', vm, 'qmp.sock'));
  // 16 ring slots and 32 grains of spill: far less than the 64 MB the guest rewrites.
  const t = await CowTracker.attach(qemuPid(vm), { grain, stagingBytes: 16 * grain, maxSpillBytes: 32 * grain });
  try {
    t.armAll();
    const image = Buffer.alloc(t.ramSize);
    const populated = t.populatedRuns();
    const bounce = t.allocStaging(t.ramSize);
    t.copyRuns(populated, bounce);
    let pos = 0;
    for (const r of populated) { bounce.copy(image, r.offset, pos, pos + r.length); pos += r.length; }

    await new Promise((r) => setTimeout(r, 700));
    await qmp.execute('stop');
    const c = t.collect();
    await qmp.execute('cont');
    assert.ok(c.grains > 48, `the guest dirtied more than ring + spill (${c.grains} grains)`);
    // No startCopy(): the copier never runs. Every write to a pending grain is copied by the handler
    // (ring slot, then spill) until the spill is full; then the checkpoint is given up and writes go on.
    const b = await t.nextBatch(1024 * 1024, 60_000);
    assert.ok(b.failed, 'the checkpoint was given up');
    assert.match(b.reason, /spill limit/);
    const step0 = (await waitForMemcheckStep(serialOf(vm), 1, 10_000)).step;
    await waitForMemcheckStep(serialOf(vm), step0 + 3, 60_000);

    // The next checkpoint carries the failed one's grains: the image becomes RAM as of this pause.
    t.growStaging(128 * 1024 * 1024);
    await qmp.execute('stop');
    const c2 = t.collect();
    const reference = Buffer.from(t.ram);
    await qmp.execute('cont');
    t.startCopy();
    for (;;) {
      const nb = await t.nextBatch(8 * 1024 * 1024, 30_000);
      assert.ok(!nb.failed, `copy failed: ${nb.reason}`);
      applyBatch(image, nb.runs, t.staging, nb.stagingOffset);
      t.release(nb);
      if (nb.done) break;
    }
    assert.ok(c2.grains >= c.grains, `the failed checkpoint's ${c.grains} grains are carried (${c2.grains})`);
    assert.ok(image.equals(reference), firstDiff(image, reference));
    assert.equal(t.stats().failures, 1);
  } finally {
    t.close();
    qmp.close();
  }
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
});
