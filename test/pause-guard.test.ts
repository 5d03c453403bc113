// A checkpointer that dies or hangs inside its pause does not leave the VM paused: real QEMU, real guest, real store.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { labWithStore, readJson, until, sleep, pidAlive, assertFullVerify } from './support/lab.js';
import { QmpClient } from '../src/qmp/index.js';
import { lastMemcheckProgress, waitForMemcheckStep } from '../src/vm/serial.js';

const PAUSE_LIMIT_MS = 1500;
const { lab, storeDir, store } = labWithStore('pguard', { env: { HYDRAVM_PAUSE_LIMIT_MS: String(PAUSE_LIMIT_MS) } });

interface Protection { committedEpoch: number; generation: number; state: string; pid: number }
const vmDir = (vm: string) => path.join(lab.home, 'vms', vm);
const protection = (vm: string) => readJson<Protection>(path.join(vmDir(vm), 'protection.json'));
const serialOf = (vm: string) => path.join(vmDir(vm), 'serial.log');
const guardOf = (vm: string) => path.join(vmDir(vm), 'pause-guard.json');

async function vmStatus(vm: string): Promise<string> {
  const qmp = await QmpClient.connect(path.join(vmDir(vm), 'qmp.sock'));
  try {
    return (await qmp.execute<{ status: string }>('query-status')).status;
  } finally {
    qmp.close();
  }
}

async function protect(vm: string): Promise<number> {
  const p = await lab.cliAsync(['protect', vm, '--store', store.address, '--interval', '200ms']);
  assert.equal(p.code, 0, p.stderr);
  await until('two commits', () => (protection(vm)?.committedEpoch ?? 0) >= 2, 60_000);
  return protection(vm)!.pid;
}

/**
 * SIGSTOP the checkpointer at random moments until it is caught inside a pause
 * (its guard record is on disk and QEMU reports the VM paused). Returns with
 * the checkpointer stopped there.
 */
async function catchInsidePause(vm: string, pid: number): Promise<number> {
  for (let attempt = 1; attempt <= 400; attempt++) {
    await sleep(Math.floor(Math.random() * 150));
    process.kill(pid, 'SIGSTOP');
    if (fs.existsSync(guardOf(vm)) && (await vmStatus(vm)) === 'paused') return attempt;
    process.kill(pid, 'SIGCONT');
  }
  throw new Error('never caught the checkpointer inside its pause in 400 tries');
}

test('a checkpointer killed inside its pause: the supervisor resumes the VM at once; one hung there is killed after the pause limit and the VM resumed', { timeout: 600_000 }, async () => {
  const vm = 'pguard';
  // A large, fast-written working set keeps each pause long enough to be caught in.
  const spec = lab.writeSpec(vm, { memory: '512M', cmdline: 'console=ttyS0 quiet hydra.run=memcheck memcheck.mb=128 memcheck.rate=0' });
  assert.equal(lab.cli(['vm', 'start', spec]).code, 0);
  await waitForMemcheckStep(serialOf(vm), 1, 120_000);

  // Died inside the pause.
  let pid = await protect(vm);
  let tries = await catchInsidePause(vm, pid);
  let step = lastMemcheckProgress(serialOf(vm))!.step;
  process.kill(pid, 'SIGKILL');
  const killedAt = Date.now();
  await until('VM running again', async () => (await vmStatus(vm)) === 'running', 10_000);
  console.log(`# died in the pause (caught after ${tries} tries): VM running again ${Date.now() - killedAt} ms after the kill`);
  assert.ok(!fs.existsSync(guardOf(vm)), 'the supervisor removed the guard record');
  assert.match(fs.readFileSync(path.join(vmDir(vm), 'supervisor.log'), 'utf8'), /checkpointer died inside its pause: VM resumed/);
  await waitForMemcheckStep(serialOf(vm), step + 3, 60_000);
  await until('protection recorded as ended', () => !pidAlive(protection(vm)?.pid), 10_000);

  // Hung inside the pause: left stopped, it is killed once the pause has lasted the limit.
  assert.equal(lab.cli(['unprotect', vm]).code, 0);
  pid = await protect(vm);
  tries = await catchInsidePause(vm, pid);
  const stoppedAt = Date.now();
  step = lastMemcheckProgress(serialOf(vm))!.step;
  try {
    await until('VM running again', async () => (await vmStatus(vm)) === 'running', PAUSE_LIMIT_MS + 10_000);
  } finally {
    if (pidAlive(pid)) process.kill(pid, 'SIGCONT');
  }
  const resumedMs = Date.now() - stoppedAt;
  console.log(`# hung in the pause (caught after ${tries} tries): VM running again ${resumedMs} ms after the stop (limit ${PAUSE_LIMIT_MS} ms)`);
  assert.ok(!pidAlive(pid), 'the hung checkpointer was killed before the VM was resumed');
  assert.match(fs.readFileSync(path.join(vmDir(vm), 'supervisor.log'), 'utf8'), /checkpointer held the VM paused for \d+ ms \(limit 1500 ms\): killed it and resumed the VM/);
  await waitForMemcheckStep(serialOf(vm), step + 3, 60_000);

  // An operator's pause is not the checkpointer's: the guard leaves it alone.
  assert.equal(lab.cli(['unprotect', vm]).code, 0);
  const qmp = await QmpClient.connect(path.join(vmDir(vm), 'qmp.sock'));
  try {
    await qmp.execute('stop');
    await sleep(PAUSE_LIMIT_MS + 500);
    assert.equal((await qmp.execute<{ status: string }>('query-status')).status, 'paused', 'a pause nobody guards stays');
    await qmp.execute('cont');
  } finally {
    qmp.close();
  }
  await assertFullVerify(serialOf(vm));
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
});
