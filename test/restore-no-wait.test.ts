// A restore right after a commit is served the new epoch while the store is still applying it (real QEMU, real store).
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { makeLab, readJson, until, pidAlive, assertFullVerify } from './support/lab.js';
import { spawnStore } from '../src/store/index.js';
import { readMeta } from '../src/store/meta.js';
import { restoreVm } from '../src/restore/index.js';
import { nextGeneration } from '../src/checkpoint/index.js';
import { waitForMemcheckStep } from '../src/vm/serial.js';

const lab = makeLab('nowait');
const storeDir = path.join(lab.home, 'store');
/** Every apply waits this long after its journal END was acknowledged. */
const APPLY_DELAY_MS = 15_000;
let store: Awaited<ReturnType<typeof spawnStore>>;

before(async () => {
  store = await spawnStore({ dir: storeDir, listen: '127.0.0.1:0', env: { ...lab.env, HYDRAVM_STORE_DELAY: `commit-before-apply:${APPLY_DELAY_MS}` } });
});
after(async () => {
  await store?.stop();
  lab.cleanup();
});

interface Protection { committedEpoch: number; generation: number; pid: number }
const protection = (vm: string) => readJson<Protection>(path.join(lab.home, 'vms', vm, 'protection.json'));
const serialOf = (vm: string) => path.join(lab.home, 'vms', vm, 'serial.log');

test('a restore issued right after a commit does not wait for the store\'s apply: it runs while meta.json still names the epoch before', async () => {
  const vm = 'nowait';
  const spec = lab.writeSpec(vm, { cmdline: 'console=ttyS0 quiet hydra.run=memcheck memcheck.mb=32 memcheck.rate=8' });
  assert.equal(lab.cli(['vm', 'start', spec]).code, 0);
  await waitForMemcheckStep(serialOf(vm), 1, 30_000);
  const p = await lab.cliAsync(['protect', vm, '--store', store.address, '--interval', '1s']);
  assert.equal(p.code, 0, p.stderr);
  // The first incremental epoch acknowledged: its apply now sleeps APPLY_DELAY_MS before touching the image.
  await until('epoch 2 acknowledged', () => (protection(vm)?.committedEpoch ?? 0) >= 2, 60_000);
  const acked = protection(vm)!;
  const killedAt = fs.statSync(serialOf(vm)).size;
  process.kill(readJson<{ qemuPid: number }>(path.join(lab.home, 'vms', vm, 'state.json'))!.qemuPid, 'SIGKILL');
  // The checkpointer may sit in its next BEGIN (which waits for the apply): the restore fences it, no need to wait for it.
  await until('VM gone', () => { const st = readJson<{ supervisorPid: number; qemuPid: number }>(path.join(lab.home, 'vms', vm, 'state.json'))!; return !pidAlive(st.supervisorPid) && !pidAlive(st.qemuPid); }, 10_000);
  const r = await restoreVm({ vm, store: store.address, secret: process.env.HYDRAVM_SECRET!, mode: 'network', newGeneration: await nextGeneration(vm, store.address) });
  // The proof: the guest runs, and the image file still has not got the epoch it runs from.
  const onDisk = (await readMeta(path.join(storeDir, 'vms', vm, `gen-${acked.generation}`, 'meta.json')))!.committedEpoch;
  assert.ok(r.epoch >= acked.committedEpoch, `restored epoch ${r.epoch}, acknowledged ${acked.committedEpoch}`);
  assert.ok(onDisk < r.epoch, `meta.json names epoch ${onDisk} once the restore of epoch ${r.epoch} runs (${Math.round(r.timings.totalMs)} ms, prepare ${Math.round(r.timings.prepareMs)} ms): the restore did not wait for the apply`);
  assert.ok(r.timings.prepareMs < APPLY_DELAY_MS, `prepare took ${Math.round(r.timings.prepareMs)} ms`);
  await r.pager!.done;
  await waitForMemcheckStep(serialOf(vm), 1, 30_000, killedAt);
  await assertFullVerify(serialOf(vm), killedAt);
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
  // And the apply does complete: the image of that generation reaches the restored epoch.
  await until('apply done', async () => ((await readMeta(path.join(storeDir, 'vms', vm, `gen-${acked.generation}`, 'meta.json')))!.committedEpoch >= r.epoch) || undefined, APPLY_DELAY_MS + 30_000, 200);
});
