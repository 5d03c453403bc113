// A checkpoint that fails at any step loses no dirty page: faults injected at every step, then the image is compared with guest RAM byte for byte.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { labWithStore, readJson, until } from './support/lab.js';
import { QmpClient } from '../src/qmp/index.js';
import { waitForMemcheckStep, countViolations } from '../src/vm/serial.js';
import { findGuestRam } from '../src/tracker/guest-ram.js';
import { openVmImage } from '../src/store/index.js';
import { protectVm } from '../src/checkpoint/protection.js';
import { CKPT_FAULT_STEPS } from '../src/checkpoint/faults.js';

const { lab, storeDir, store } = labWithStore('ckf');

interface Protection { committedEpoch: number; generation: number; state: string; pid: number }
const protection = (vm: string) => readJson<Protection>(path.join(lab.home, 'vms', vm, 'protection.json'));
const vmDir = (vm: string) => path.join(lab.home, 'vms', vm);

function guestRam(qemuPid: number): Buffer {
  const ram = findGuestRam(qemuPid);
  return fs.readFileSync(`/proc/${qemuPid}/map_files/${ram.start.toString(16)}-${ram.end.toString(16)}`);
}

/** The steps faults were injected at so far, in order (from the checkpointer's log). */
function injected(vm: string): string[] {
  const log = fs.readFileSync(path.join(vmDir(vm), 'checkpointer.log'), 'utf8');
  const steps: string[] = [];
  for (const line of log.split('\n')) {
    const m = /injected fault at checkpoint step \\?"([a-z]+)\\?"/.exec(line);
    // One fault can be logged twice (the failure, then the retry): count each attempt once.
    const a = /attempt[" :]+(\d+)/.exec(line);
    if (m && a && !steps.includes(`${m[1]}@${a[1]}`)) steps.push(`${m[1]}@${a[1]}`);
  }
  return steps.map((s) => s.split('@')[0]!);
}

/** Failed attempts the checkpointer logged (each after it resumed the guest). */
function retries(vm: string): number {
  return fs.readFileSync(path.join(vmDir(vm), 'checkpointer.log'), 'utf8').split('\n').filter((l) => l.includes('store connection failed; retrying')).length;
}

function comparePages(img: Buffer, ram: Buffer): number {
  let diff = 0;
  for (let i = 0; i < ram.length; i += 4096) if (!img.subarray(i, i + 4096).equals(ram.subarray(i, i + 4096))) diff++;
  return diff;
}

test('a failure at every checkpoint step (collect, copy, devstate, freeze, overflow send, send, commit, ack) loses no page: image == RAM right after each', async () => {
  const vm = 'faults';
  const spec = lab.writeSpec(vm, { cmdline: 'console=ttyS0 quiet hydra.run=memcheck memcheck.mb=32 memcheck.rate=8' });
  assert.equal(lab.cli(['vm', 'start', spec]).code, 0);
  await waitForMemcheckStep(path.join(vmDir(vm), 'serial.log'), 1, 60_000);
  // Attempt 1 is the full checkpoint's closing pause; then one step fails every 20 attempts (or the first after that reaching it).
  const plan = CKPT_FAULT_STEPS.map((step, i) => `${step}@${4 + 20 * i}`).join(',');
  process.env.HYDRAVM_CKPT_FAULT = plan;
  try {
    // A staging buffer capped at 64 KiB: every checkpoint sends pages beyond it (pre-copy rounds while the
    // VM runs, or the pause's overflow after `cont`), so that send is a step that can fail.
    await protectVm({ vm, store: store.address, intervalMs: 300, generation: 1, stagingBytes: 64 * 1024, stagingCapBytes: 64 * 1024 });
  } finally {
    delete process.env.HYDRAVM_CKPT_FAULT;
  }
  const qemuPid = readJson<{ qemuPid: number }>(path.join(vmDir(vm), 'state.json'))!.qemuPid;
  const qmp = await QmpClient.connect(path.join(vmDir(vm), 'qmp.sock'));
  const checked: string[] = [];
  let seenRetries = retries(vm);
  for (const step of CKPT_FAULT_STEPS) {
    // The failed attempt is over (its pause ended with `cont`) once its retry is logged.
    await until(`the fault at step "${step}" (${plan})`, () => (injected(vm).length > checked.length && retries(vm) > seenRetries) || undefined, 120_000);
    seenRetries = retries(vm);
    // Stop the guest at once: the pages the failed checkpoint collected are never written again,
    // so only the checkpointer's own bookkeeping can bring them to the image.
    await qmp.execute('stop');
    const got = injected(vm)[checked.length]!;
    assert.equal(got, step, `faults fire in plan order (${plan})`);
    const e = protection(vm)!.committedEpoch;
    await until(`two commits after the "${step}" fault`, () => (protection(vm)!.committedEpoch >= e + 2 && protection(vm)!.state === 'protected') || undefined, 60_000);
    assert.equal((await qmp.execute<{ status: string }>('query-status')).status, 'paused', 'the guest stayed paused while the image was compared');
    const p = protection(vm)!;
    const image = await openVmImage(storeDir, vm, p.generation);
    const diff = comparePages(fs.readFileSync(image.memoryPath), guestRam(qemuPid));
    assert.equal(diff, 0, `${diff} pages of the image differ from guest RAM at epoch ${image.meta.committedEpoch} after a fault at step "${step}"`);
    checked.push(step);
    await qmp.execute('cont');
  }
  qmp.close();
  assert.deepEqual(checked, [...CKPT_FAULT_STEPS]);
  assert.equal(countViolations(path.join(vmDir(vm), 'serial.log')), 0);
  assert.equal(lab.cli(['unprotect', vm]).code, 0);
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
});
