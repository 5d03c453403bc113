// Copy-on-write fail-over under random kills: of the checkpointer (the copier dies mid-copy) and of QEMU, each followed by a full memcheck verification.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { labWithStore, readJson, until, sleep, pidAlive, assertFullVerify } from './support/lab.js';
import { lastMemcheckProgress, waitForMemcheckStep, readSerial } from '../src/vm/serial.js';
import { readCheckpointHistory } from '../src/checkpoint/protection.js';

/**
 * One VM whose spec asks for copy-on-write checkpoints (64 KiB grains), its
 * guest rewriting 32 MB at 16 MB/s, so a kill at a random moment within a
 * second of a commit often lands in the background copy. Each round:
 *   1. SIGKILL the checkpointer at a random moment: the supervisor lifts the
 *      write protection, the guest goes on, every page verifies; protected
 *      again (a full checkpoint, copy-on-write).
 *   2. SIGKILL QEMU at a random moment: restore (network mode) from the last
 *      copy-on-write epoch, protected again copy-on-write by the restore; the
 *      guest resumes at or after what it had printed before that checkpoint's
 *      pause, never reboots, and every page of its working set verifies.
 * The next round kills the restored incarnation.
 *
 * HYDRAVM_TEST_COW_ROUNDS raises the number of rounds (default 2, about
 * 100 s each on a loaded 2-core machine).
 */
const ROUNDS = Math.max(1, Number(process.env.HYDRAVM_TEST_COW_ROUNDS ?? 2) || 2);

const { lab, storeDir, store } = labWithStore('cfo');

interface Protection { committedEpoch: number; generation: number; state: string; mode?: string; pid: number }
const vmDir = (vm: string) => path.join(lab.home, 'vms', vm);
const protection = (vm: string) => readJson<Protection>(path.join(vmDir(vm), 'protection.json'));
const vmState = (vm: string) => readJson<{ qemuPid?: number; lifecycle: string }>(path.join(vmDir(vm), 'state.json'))!;
const serialOf = (vm: string) => path.join(vmDir(vm), 'serial.log');

/** `n` more commits of the current generation by a live copy-on-write checkpointer. */
async function waitCommits(vm: string, n: number, timeoutMs = 60_000): Promise<Protection> {
  const p0 = await until(`${vm} protected`, () => { const p = protection(vm); return p?.state === 'protected' && pidAlive(p.pid) ? p : undefined; }, 60_000);
  assert.equal(p0.mode, 'cow', `${vm} is protected copy-on-write`);
  return until(`${n} commits of ${vm} after epoch ${p0.committedEpoch}`, () => {
    const p = protection(vm);
    return p && p.generation === p0.generation && p.committedEpoch >= p0.committedEpoch + n ? p : undefined;
  }, timeoutMs);
}

test(`CoW fail-over: ${ROUNDS} rounds of a checkpointer kill and a QEMU kill at random moments, every page verified after each`, { timeout: 120_000 + ROUNDS * 150_000 }, async () => {
  const vm = 'cfo';
  const spec = lab.writeSpec(vm, { memory: '256M', cmdline: 'console=ttyS0 quiet hydra.run=memcheck memcheck.mb=32 memcheck.rate=16', protection: { cow: true, grain: '64K' } });
  assert.equal(lab.cli(['vm', 'start', spec]).code, 0);
  await waitForMemcheckStep(serialOf(vm), 1, 120_000);
  const p = await lab.cliAsync(['protect', vm, '--store', store.address, '--interval', '1s']);
  assert.equal(p.code, 0, p.stderr);
  assert.match(p.stdout, /copy-on-write/);

  // What the guest has printed over time: the floor a restore from a given checkpoint must reach.
  const samples: { at: number; step: number }[] = [];
  const sampler = setInterval(() => {
    const m = lastMemcheckProgress(serialOf(vm));
    if (m) samples.push({ at: Date.now(), step: m.step });
  }, 20);
  const rounds: { round: number; cpDelayMs: number; qemuDelayMs: number; killedAtEpoch: number; restoredEpoch: number }[] = [];
  try {
    let logFrom = 0;
    for (let round = 1; round <= ROUNDS; round++) {
      // 1. The copier dies: its process is SIGKILLed at a random moment.
      await waitCommits(vm, 2);
      const cpDelayMs = Math.floor(Math.random() * 1000);
      await sleep(cpDelayMs);
      const cp = protection(vm)!;
      process.kill(cp.pid, 'SIGKILL');
      await until('checkpointer dead', () => !pidAlive(cp.pid), 10_000);
      await until('protection released by the supervisor', () => !fs.existsSync(path.join(vmDir(vm), 'cow-guard.json')), 10_000);
      const step = lastMemcheckProgress(serialOf(vm), logFrom)!.step;
      await waitForMemcheckStep(serialOf(vm), step + 3, 60_000, logFrom);
      await assertFullVerify(serialOf(vm), logFrom);
      assert.equal(lab.cli(['unprotect', vm]).code, 0);
      const again = await lab.cliAsync(['protect', vm, '--store', store.address, '--interval', '1s']);
      assert.equal(again.code, 0, again.stderr);
      assert.match(again.stdout, /copy-on-write/);

      // 2. QEMU dies at a random moment, often inside a background copy.
      const before = await waitCommits(vm, 2);
      const qemuDelayMs = Math.floor(Math.random() * 1000);
      await sleep(qemuDelayMs);
      const killedAt = fs.statSync(serialOf(vm)).size;
      const { pid: cpPid, committedEpoch: killedAtEpoch } = protection(vm)!;
      process.kill(vmState(vm).qemuPid!, 'SIGKILL');
      await until('crash recorded', () => vmState(vm).lifecycle === 'crashed', 10_000);
      await until('checkpointer exits after its VM died', () => !pidAlive(cpPid), 15_000);

      const r = await lab.cliAsync(['restore', vm, '--store', store.address, '--mode', 'network', '--protect', '--interval', '1s'], { timeoutMs: 120_000 });
      assert.equal(r.code, 0, `round ${round}: restore failed: ${r.stderr}`);
      const m = new RegExp(`VM ${vm} restored from generation (\\d+) epoch (\\d+) \\(network mode\\)`).exec(r.stdout);
      assert.ok(m, r.stdout);
      const restoredGen = Number(m[1]);
      const restoredEpoch = Number(m[2]);
      assert.equal(restoredGen, before.generation, 'restored the generation that was killed');
      assert.ok(restoredEpoch >= killedAtEpoch, `restored epoch ${restoredEpoch} >= the one committed before the kill (${killedAtEpoch})`);
      const ckpt = readCheckpointHistory(vm).find((h) => h.generation === restoredGen && h.epoch === restoredEpoch);
      assert.ok(ckpt?.cow, `generation ${restoredGen} epoch ${restoredEpoch} was a copy-on-write checkpoint`);
      const floor = samples.filter((x) => x.at < ckpt.startedAt - 50).at(-1)?.step ?? 0;
      const resumed = await waitForMemcheckStep(serialOf(vm), 1, 60_000, killedAt);
      assert.ok(resumed.step >= floor, `round ${round}: memcheck resumed at step ${resumed.step}, but had reached ${floor} before checkpoint ${restoredEpoch}`);
      await waitForMemcheckStep(serialOf(vm), resumed.step + 5, 60_000, killedAt);
      assert.doesNotMatch(readSerial(serialOf(vm)).slice(killedAt), /memcheck: start|hydra-guest: ready/, `round ${round}: the guest did not reboot`);
      await assertFullVerify(serialOf(vm), killedAt);
      logFrom = killedAt;
      rounds.push({ round, cpDelayMs, qemuDelayMs, killedAtEpoch, restoredEpoch });
    }
    // The last restored incarnation checkpoints copy-on-write too.
    await waitCommits(vm, 2);
  } finally {
    clearInterval(sampler);
  }
  console.log(JSON.stringify(rounds));
  assert.equal(lab.cli(['unprotect', vm]).code, 0);
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
});
