// Copy-on-write protection end to end: real QEMU, real guest, real store.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { labWithStore, readJson, until, sleep, pidAlive, assertFullVerify } from './support/lab.js';
import { QmpClient } from '../src/qmp/index.js';
import { lastMemcheckProgress, waitForMemcheckStep, countViolations, readSerial } from '../src/vm/serial.js';
import { findGuestRam } from '../src/tracker/guest-ram.js';
import { openVmImage } from '../src/store/index.js';
import { readCheckpointHistory } from '../src/checkpoint/protection.js';

const { lab, storeDir, store } = labWithStore('pcow');

interface Protection { committedEpoch: number; generation: number; state: string; mode?: string; pid: number; last?: { pauseMs: number; bytes: number; cow?: { cowCopies: number; faults: number } } }
const protection = (vm: string) => readJson<Protection>(path.join(lab.home, 'vms', vm, 'protection.json'));
const vmState = (vm: string) => readJson<{ qemuPid: number; lifecycle: string }>(path.join(lab.home, 'vms', vm, 'state.json'))!;
const serialOf = (vm: string) => path.join(lab.home, 'vms', vm, 'serial.log');

function guestRam(qemuPid: number): Buffer {
  const ram = findGuestRam(qemuPid);
  return fs.readFileSync(`/proc/${qemuPid}/map_files/${ram.start.toString(16)}-${ram.end.toString(16)}`);
}

/** memcheck rate 0 = as fast as the guest can write. */
async function startProtectedCow(vm: string, { mb = 32, rate = 8, grain = '64K', spec = false } = {}): Promise<void> {
  const fields: Record<string, unknown> = { cmdline: `console=ttyS0 quiet hydra.run=memcheck memcheck.mb=${mb} memcheck.rate=${rate}` };
  if (spec) fields.protection = { cow: true, grain };
  const file = lab.writeSpec(vm, fields);
  const r = lab.cli(['vm', 'start', file]);
  assert.equal(r.code, 0, r.stderr);
  await waitForMemcheckStep(serialOf(vm), 1, 120_000);
  const args = ['protect', vm, '--store', store.address, '--interval', '1s'];
  if (!spec) args.push('--cow', '--grain', grain);
  const p = await lab.cliAsync(args);
  assert.equal(p.code, 0, p.stderr);
  assert.match(p.stdout, new RegExp(`VM ${vm} protected: generation \\d+, epoch 1 committed .*copy-on-write`));
  assert.equal(protection(vm)!.mode, 'cow');
}

test('CoW image equals memory: the guest writes unthrottled; after commits of the paused VM the image is byte for byte its RAM', async () => {
  const vm = 'cimg';
  await startProtectedCow(vm, { mb: 64, rate: 0, grain: '256K', spec: true });
  await until('epoch 4', () => (protection(vm)?.committedEpoch ?? 0) >= 4, 90_000);
  const hist = readCheckpointHistory(vm).filter((h) => h.kind === 'incremental');
  assert.ok(hist.every((h) => h.cow && h.cow.grain === 256 * 1024), 'checkpoints are copy-on-write at the spec\'s grain');
  assert.ok(hist.some((h) => h.bytes > 16 * 1024 * 1024), `the guest dirtied memory between checkpoints (${hist.map((h) => h.bytes).join(', ')})`);
  const st = vmState(vm);
  const qmp = await QmpClient.connect(path.join(lab.home, 'vms', vm, 'qmp.sock'));
  for (let attempt = 0; ; attempt++) {
    await qmp.execute('stop');
    const e0 = protection(vm)!.committedEpoch;
    await until('two commits after pause', () => protection(vm)!.committedEpoch >= e0 + 2, 30_000);
    if ((await qmp.execute<{ status: string }>('query-status')).status === 'paused') break;
    assert.ok(attempt < 5, 'VM stays paused');
  }
  const p = protection(vm)!;
  const image = path.join(storeDir, 'vms', vm, `gen-${p.generation}`, 'memory.img');
  const ram = guestRam(st.qemuPid);
  const img = fs.readFileSync(image);
  assert.equal(img.length, ram.length, 'image size is RAM size');
  if (!img.equals(ram)) {
    let diff = 0;
    for (let i = 0; i < ram.length; i += 4096) if (!img.subarray(i, i + 4096).equals(ram.subarray(i, i + 4096))) diff++;
    assert.fail(`${diff} pages of the image differ from guest RAM at epoch ${p.committedEpoch}`);
  }
  const { meta } = await openVmImage(storeDir, vm, p.generation);
  const fresh = path.join(lab.home, 'fresh-devstate.bin');
  await qmp.execute('xen-save-devices-state', { filename: fresh, live: false });
  assert.equal((await import('node:crypto')).createHash('sha256').update(fs.readFileSync(fresh)).digest('hex'), meta.devstate.sha256, 'device state equals a fresh save');
  await qmp.execute('cont');
  qmp.close();
  assert.equal(lab.cli(['unprotect', vm]).code, 0);
  // Unprotected: nothing is write-protected any more, the guest runs on.
  const { step } = lastMemcheckProgress(serialOf(vm))!;
  await waitForMemcheckStep(serialOf(vm), step + 2, 60_000);
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
});

test('CoW fail-over: SIGKILL the primary\'s QEMU, restore from a copy-on-write checkpoint, memcheck continues with zero violations', async () => {
  const vm = 'cfo';
  await startProtectedCow(vm, { mb: 32, rate: 32, grain: '64K' });
  await until('epoch 3', () => (protection(vm)?.committedEpoch ?? 0) >= 3, 60_000);
  const samples: { at: number; step: number }[] = [];
  const sampler = setInterval(() => {
    const p = lastMemcheckProgress(serialOf(vm));
    if (p) samples.push({ at: Date.now(), step: p.step });
  }, 20);
  const e = protection(vm)!.committedEpoch;
  await until('next commit', () => protection(vm)!.committedEpoch > e, 30_000);
  // Often inside the next checkpoint's background copy.
  await sleep(Math.floor(Math.random() * 800));
  clearInterval(sampler);
  const killedAt = fs.statSync(serialOf(vm)).size;
  process.kill(vmState(vm).qemuPid, 'SIGKILL');
  await until('crash recorded', () => vmState(vm).lifecycle === 'crashed', 10_000);
  await until('checkpointer gives up on a dead VM', () => !pidAlive(protection(vm)!.pid), 10_000);

  const r = await lab.cliAsync(['restore', vm, '--store', store.address, '--mode', 'network']);
  assert.equal(r.code, 0, r.stderr);
  const restoredEpoch = Number(/epoch (\d+)/.exec(r.stdout)![1]);
  const ckpt = readCheckpointHistory(vm).find((h) => h.epoch === restoredEpoch)!;
  assert.ok(ckpt?.cow, `epoch ${restoredEpoch} was a copy-on-write checkpoint`);
  const floor = samples.filter((x) => x.at < ckpt.startedAt - 50).at(-1)?.step ?? 0;
  const resumed = await waitForMemcheckStep(serialOf(vm), 1, 30_000, killedAt);
  assert.ok(resumed.step >= floor, `resumed at step ${resumed.step}, but the guest had reached ${floor} before checkpoint ${restoredEpoch}`);
  // Every page of the working set, verified on request, not a sample.
  await waitForMemcheckStep(serialOf(vm), resumed.step + 5, 60_000, killedAt);
  await assertFullVerify(serialOf(vm), killedAt);
  assert.doesNotMatch(readSerial(serialOf(vm)).slice(killedAt), /memcheck: start/, 'the guest did not reboot');

  // The restored VM (memfd RAM, its first uffd used for missing pages) is protected copy-on-write again.
  const p = await lab.cliAsync(['protect', vm, '--store', store.address, '--interval', '1s', '--cow']);
  assert.equal(p.code, 0, p.stderr);
  await until('restored VM checkpoints copy-on-write', () => (protection(vm)?.committedEpoch ?? 0) >= 3 || undefined, 60_000);
  assert.equal(lab.cli(['unprotect', vm]).code, 0);
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
});

test('a SIGKILLed CoW checkpointer does not leave the guest blocked: its supervisor releases the write protection at once', async () => {
  const vm = 'ckill';
  await startProtectedCow(vm, { mb: 32, rate: 0, grain: '64K' });
  await until('epoch 2', () => (protection(vm)?.committedEpoch ?? 0) >= 2, 60_000);
  const guard = path.join(lab.home, 'vms', vm, 'cow-guard.json');
  assert.ok(fs.existsSync(guard), 'the running CoW checkpointer is named in cow-guard.json');
  const before = lastMemcheckProgress(serialOf(vm))!.step;
  process.kill(protection(vm)!.pid, 'SIGKILL');
  await until('checkpointer dead', () => !pidAlive(protection(vm)!.pid), 10_000);
  // No command: the supervisor sees the dead handler and lifts the protection, the guest goes on writing.
  await until('guard released', () => !fs.existsSync(guard), 10_000);
  await waitForMemcheckStep(serialOf(vm), before + 5, 60_000);
  assert.match(fs.readFileSync(path.join(lab.home, 'vms', vm, 'supervisor.log'), 'utf8'), /copy-on-write checkpointer died: guest RAM write protection released/);
  // And it can be protected again (the same sync uffd is taken over).
  assert.equal(lab.cli(['unprotect', vm]).code, 0);
  const p = await lab.cliAsync(['protect', vm, '--store', store.address, '--interval', '1s', '--cow']);
  assert.equal(p.code, 0, p.stderr);
  assert.equal(lab.cli(['unprotect', vm]).code, 0);
  assert.ok(!fs.existsSync(guard), 'a clean stop removes the guard');
  await assertFullVerify(serialOf(vm));
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
});

test('a stopped CoW checkpointer blocks a guest write at most the stall limit: the supervisor kills it and lifts the protection; the next protection starts full', async () => {
  const vm = 'cstall';
  await startProtectedCow(vm, { mb: 32, rate: 0, grain: '64K' });
  await until('epoch 3', () => (protection(vm)?.committedEpoch ?? 0) >= 3, 60_000);
  const guard = path.join(lab.home, 'vms', vm, 'cow-guard.json');
  const cpPid = protection(vm)!.pid;
  const generation = protection(vm)!.generation;
  const before = lastMemcheckProgress(serialOf(vm))!.step;
  // Alive but serving nothing: the unthrottled guest's next write to a protected grain waits.
  process.kill(cpPid, 'SIGSTOP');
  const stoppedAt = Date.now();
  try {
    await until('guard acts', () => !fs.existsSync(guard), 60_000);
  } finally {
    if (pidAlive(cpPid)) process.kill(cpPid, 'SIGCONT');
  }
  const actedMs = Date.now() - stoppedAt;
  const log = fs.readFileSync(path.join(lab.home, 'vms', vm, 'supervisor.log'), 'utf8');
  const m = /copy-on-write checkpointer stalled: a guest write waited (\d+) ms \(limit (\d+) ms\)/.exec(log);
  assert.ok(m, 'the supervisor logged the stall');
  assert.ok(Number(m[1]) >= Number(m[2]), `it acted on a wait of at least the limit (${m[1]} >= ${m[2]} ms)`);
  assert.ok(!pidAlive(cpPid), 'the stalled checkpointer was killed before the protection was lifted');
  console.log(`SIGSTOP -> protection lifted: ${actedMs} ms (guest write waited ${m[1]} ms, limit ${m[2]} ms)`);
  // The guest goes on and its memory is intact.
  await waitForMemcheckStep(serialOf(vm), before + 5, 60_000);
  await assertFullVerify(serialOf(vm));
  // Protected again: a new generation, starting with a full checkpoint.
  assert.equal(lab.cli(['unprotect', vm]).code, 0);
  const p = await lab.cliAsync(['protect', vm, '--store', store.address, '--interval', '1s', '--cow']);
  assert.equal(p.code, 0, p.stderr);
  assert.ok(protection(vm)!.generation > generation);
  assert.equal(readCheckpointHistory(vm).find((h) => h.generation === protection(vm)!.generation && h.epoch === 1)?.kind, 'full');
  assert.equal(lab.cli(['unprotect', vm]).code, 0);
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
});

test('a SIGKILLed basic checkpointer does not keep its VM from copy-on-write protection: its async registration is released', async () => {
  const vm = 'cb2c';
  const file = lab.writeSpec(vm, { cmdline: 'console=ttyS0 quiet hydra.run=memcheck memcheck.mb=16 memcheck.rate=8' });
  assert.equal(lab.cli(['vm', 'start', file]).code, 0);
  await waitForMemcheckStep(serialOf(vm), 1, 120_000);
  const b = await lab.cliAsync(['protect', vm, '--store', store.address, '--interval', '1s']);
  assert.equal(b.code, 0, b.stderr);
  assert.equal(protection(vm)!.mode, 'basic');
  const cp = protection(vm)!.pid;
  process.kill(cp, 'SIGKILL');
  await until('checkpointer dead', () => !pidAlive(cp), 10_000);
  const c = await lab.cliAsync(['protect', vm, '--store', store.address, '--interval', '1s', '--cow']);
  assert.equal(c.code, 0, c.stderr);
  assert.equal(protection(vm)!.mode, 'cow');
  await until('a copy-on-write commit', () => (protection(vm)?.committedEpoch ?? 0) >= 2 || undefined, 60_000);
  assert.equal(lab.cli(['unprotect', vm]).code, 0);
  await assertFullVerify(serialOf(vm));
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
});

test('bad CoW options are refused naming the problem', () => {
  const bad = lab.cli(['protect', 'nosuch', '--store', '127.0.0.1:1', '--cow', '--grain', '48K']);
  assert.notEqual(bad.code, 0);
  assert.match(bad.stderr, /--grain: 48K is not a power of two from 4K to 2M/);
  const noCow = lab.cli(['protect', 'nosuch', '--store', '127.0.0.1:1', '--grain', '64K']);
  assert.match(noCow.stderr, /--grain applies to copy-on-write checkpoints: add --cow/);
  const spec = lab.writeSpec('badspec', { protection: { cow: true, grain: '3M' } });
  const r = lab.cli(['vm', 'start', spec]);
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /protection\.grain: 3M is not a power of two from 4K to 2M/);
});
