import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { makeLab, startStore, readJson, until, pidAlive, assertFullVerify } from './support/lab.js';
import { waitForMemcheckStep, countViolations, readSerial } from '../src/vm/serial.js';
import { restoreVm } from '../src/restore/index.js';
import type { StoreProcess } from '../src/store/index.js';

// The store process dies while a restored VM's memory is still streaming in (network mode, prefetch on).
const lab = makeLab('pgf');
const storeDir = path.join(lab.home, 'store');
let store: StoreProcess;
let standby: Promise<StoreProcess> | undefined;

before(async () => {
  store = await startStore(lab, storeDir);
});
after(async () => {
  await store?.stop();
  await (await standby)?.stop();
  lab.cleanup();
});

const protection = (vm: string) => readJson<{ committedEpoch: number; pid: number }>(path.join(lab.home, 'vms', vm, 'protection.json'));
const vmState = (vm: string) => readJson<{ qemuPid: number; lifecycle: string }>(path.join(lab.home, 'vms', vm, 'state.json'))!;
const serialOf = (vm: string) => path.join(lab.home, 'vms', vm, 'serial.log');

/** A protected VM with a 64 MB working set, killed after a few commits; resolves once its checkpointer is gone. */
async function protectedThenKilled(vm: string, storeAddress: string): Promise<void> {
  const spec = lab.writeSpec(vm, { memory: '256M', cmdline: 'console=ttyS0 quiet hydra.run=memcheck memcheck.mb=64 memcheck.rate=8' });
  assert.equal(lab.cli(['vm', 'start', spec]).code, 0);
  await waitForMemcheckStep(serialOf(vm), 1, 60_000);
  const p = await lab.cliAsync(['protect', vm, '--store', storeAddress, '--interval', '1s']);
  assert.equal(p.code, 0, p.stderr);
  await until('epoch 3', () => (protection(vm)?.committedEpoch ?? 0) >= 3, 60_000);
  process.kill(vmState(vm).qemuPid, 'SIGKILL');
  await until('crash recorded', () => vmState(vm).lifecycle === 'crashed', 10_000);
  await until('checkpointer exits', () => !pidAlive(protection(vm)!.pid), 10_000);
}

test('the store dies while memory streams in: the pager moves to a standby store and the guest runs on with zero violations', async () => {
  const vm = 'sb1';
  await protectedThenKilled(vm, store.address);
  const offset = fs.statSync(serialOf(vm)).size;
  let asked = 0;
  // Slow stream (16 MB/s for 256 MB): the store is killed long before memory is complete.
  const r = await restoreVm({
    vm, store: store.address, secret: lab.env.HYDRAVM_SECRET!, mode: 'network',
    paging: {
      maxBytesPerS: 16e6,
      // The standby: a new store process on the same directory, started when the pager asks (as one registered in etcd would be found).
      alternates: async () => {
        asked++;
        standby ??= startStore(lab, storeDir);
        return [(await standby).address];
      },
    },
  });
  assert.ok(r.pager, 'network mode pages');
  await waitForMemcheckStep(serialOf(vm), 1, 60_000, offset);
  assert.equal(r.pager.stats.completeMs, null, 'memory still streaming when the store dies');
  store.proc.kill('SIGKILL');
  const stats = await r.pager.done;
  assert.ok(asked >= 1, 'the pager asked for another store');
  assert.ok(stats.reconnects >= 1, `connections replaced: ${stats.reconnects}`);
  assert.equal(stats.pagesPresent, stats.pagesTotal, 'all memory arrived');
  assert.ok(pidAlive(vmState(vm).qemuPid), 'the VM runs on');
  const resumed = await waitForMemcheckStep(serialOf(vm), 1, 30_000, offset);
  await waitForMemcheckStep(serialOf(vm), resumed.step + 3, 60_000, offset);
  assert.equal(countViolations(serialOf(vm), offset), 0, readSerial(serialOf(vm)).split('\n').filter((l) => /VIOLATION/.test(l)).slice(0, 5).join('\n'));
  await assertFullVerify(serialOf(vm), offset);
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
});

test('the store dies while memory streams in and no other store answers: the VM is stopped, never run on a wrong page', async () => {
  const vm = 'nosb1';
  const dir = path.join(lab.home, 'store-b');
  const only = await startStore(lab, dir);
  try {
    await protectedThenKilled(vm, only.address);
    const offset = fs.statSync(serialOf(vm)).size;
    const r = await restoreVm({ vm, store: only.address, secret: lab.env.HYDRAVM_SECRET!, mode: 'network', paging: { maxBytesPerS: 16e6, reconnectMs: 2000 } });
    assert.ok(r.pager);
    await waitForMemcheckStep(serialOf(vm), 1, 60_000, offset);
    assert.equal(r.pager.stats.completeMs, null, 'memory still streaming when the store dies');
    only.proc.kill('SIGKILL');
    await assert.rejects(r.pager.done, (err: Error & { code?: string }) => {
      assert.equal(err.code, 'HYDRA_RESTORE_PAGE_FETCH');
      assert.match(err.message, /cannot fetch guest pages/);
      return true;
    });
    await until('the VM is stopped', () => !pidAlive(vmState(vm).qemuPid) || undefined, 10_000);
    await until('recorded as crashed (the HA manager restores it again)', () => vmState(vm).lifecycle === 'crashed' || undefined, 10_000);
    assert.equal(countViolations(serialOf(vm), offset), 0, 'the guest never ran on a wrong page');
  } finally {
    await only.stop();
  }
});
