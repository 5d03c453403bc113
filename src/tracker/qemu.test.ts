import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { ensureNativeBuilt } from '../../test/fixtures/dirtier.js';
import { haveQemu, ramBlockHva, startMiniVm, type MiniVm } from '../../test/support/mini-qemu.js';
import { TrackerError } from '../errors.js';
import { DirtyTracker, findGuestRam, type DirtyRun } from './index.js';

const skip = haveQemu() ? false : 'qemu-system-x86_64 not installed';
const vms: MiniVm[] = [];
before(() => {
  if (!skip) ensureNativeBuilt();
});
after(async () => {
  await Promise.all(vms.map((v) => v.kill()));
});

function apply(image: Buffer, runs: DirtyRun[], staging: Buffer): void {
  let pos = 0;
  for (const r of runs) {
    staging.copy(image, r.offset, pos, pos + r.length);
    pos += r.length;
  }
}

/** Full copy of what the guest has touched, then rounds of cont / stop / collect; the image must equal RAM each time. */
async function checkpointRounds(vm: MiniVm, rounds: number): Promise<number[]> {
  const t = await DirtyTracker.attach(vm.pid, { ramId: 'ram0' });
  try {
    const image = Buffer.alloc(t.ramSize);
    const populated = t.populatedRuns();
    const staging = t.allocStaging(t.ramSize);
    t.copyRuns(populated, staging);
    apply(image, populated, staging);
    assert.ok(image.equals(t.ram), 'full copy equals RAM');
    const pages: number[] = [];
    for (let i = 0; i < rounds; i++) {
      await vm.qmp.execute('cont');
      await new Promise((r) => setTimeout(r, 300));
      await vm.qmp.execute('stop');
      const runs = t.collect();
      t.copyRuns(runs, staging);
      apply(image, runs, staging);
      pages.push(t.lastCollect.pages);
      console.log(`checkpoint ${i}: ${t.lastCollect.pages} pages in ${t.lastCollect.runs} runs, ${t.lastCollect.scanCalls} scan calls, ${t.lastCollect.ms.toFixed(2)} ms`);
      assert.ok(image.equals(t.ram), `image equals RAM after checkpoint ${i}`);
      assert.deepEqual(t.collect(), [], 'stopped VM: nothing written between two collects');
    }
    return pages;
  } finally {
    t.close();
  }
}

describe('DirtyTracker on a real QEMU', { skip }, () => {
  it('finds the RAM block QEMU reports and keeps a checkpoint image equal to RAM', async () => {
    const vm = await startMiniVm();
    vms.push(vm);
    const hva = await ramBlockHva(vm.qmp, 'ram0');
    assert.equal(findGuestRam(vm.pid).start, hva);
    assert.equal(findGuestRam(vm.pid, { ramId: 'ram0' }).start, hva);
    const pages = await checkpointRounds(vm, 3);
    assert.ok(pages[0]! > 0, `SeaBIOS wrote pages after cont (${pages.join(', ')})`);
    const t = await DirtyTracker.attach(vm.pid, { ramStart: hva });
    await vm.kill();
    assert.throws(() => t.collect(), (e: unknown) => e instanceof TrackerError && e.code === 'HYDRA_TRACKER_PROCESS_GONE');
    t.close();
  });

  it('works with QEMU -daemonize (the shim re-creates its uffds after fork)', async () => {
    const vm = await startMiniVm({ daemonize: true });
    vms.push(vm);
    const pages = await checkpointRounds(vm, 1);
    assert.ok(pages[0]! > 0);
  });
});
