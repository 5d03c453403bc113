import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { labWithStore, startStore, readJson, until, sleep, pidAlive, assertFullVerify } from './support/lab.js';
import { QmpClient } from '../src/qmp/index.js';
import { lastMemcheckProgress, waitForMemcheckStep, countViolations, readSerial } from '../src/vm/serial.js';
import { findGuestRam } from '../src/tracker/guest-ram.js';
import { openVmImage } from '../src/store/index.js';
import { readCheckpointHistory } from '../src/checkpoint/protection.js';

const { lab, storeDir, store } = labWithStore('prot');

interface Protection { committedEpoch: number; generation: number; state: string; pid: number; last?: { pauseMs: number; bytes: number } }
const protection = (vm: string) => readJson<Protection>(path.join(lab.home, 'vms', vm, 'protection.json'));
const vmState = (vm: string) => readJson<{ qemuPid: number; lifecycle: string }>(path.join(lab.home, 'vms', vm, 'state.json'))!;
const serialOf = (vm: string) => path.join(lab.home, 'vms', vm, 'serial.log');

function sha(buf: Buffer): string {
  return crypto.createHash('sha256').update(buf).digest('hex');
}

/** Guest RAM as QEMU holds it, read through the memfd mapping. */
function guestRam(qemuPid: number): Buffer {
  const ram = findGuestRam(qemuPid);
  return fs.readFileSync(`/proc/${qemuPid}/map_files/${ram.start.toString(16)}-${ram.end.toString(16)}`);
}

async function startProtected(vm: string, mb = 32, interval = '1s'): Promise<void> {
  const spec = lab.writeSpec(vm, { cmdline: `console=ttyS0 quiet hydra.run=memcheck memcheck.mb=${mb} memcheck.rate=8` });
  const r = lab.cli(['vm', 'start', spec]);
  assert.equal(r.code, 0, r.stderr);
  await waitForMemcheckStep(serialOf(vm), 1, 30_000);
  const p = await lab.cliAsync(['protect', vm, '--store', store.address, '--interval', interval]);
  assert.equal(p.code, 0, p.stderr);
  assert.match(p.stdout, new RegExp(`VM ${vm} protected: generation \\d+, epoch 1 committed`));
}

test('image equals memory: after commits of a paused VM the image is byte for byte its RAM, device state too', async () => {
  await startProtected('img1');
  await until('epoch 4', () => (protection('img1')?.committedEpoch ?? 0) >= 4, 60_000);
  const st = vmState('img1');
  const qmp = await QmpClient.connect(path.join(lab.home, 'vms', 'img1', 'qmp.sock'));
  // Pause, then let two more checkpoints commit: the second started after the pause for sure.
  for (let attempt = 0; ; attempt++) {
    await qmp.execute('stop');
    const e0 = protection('img1')!.committedEpoch;
    await until('two commits after pause', () => protection('img1')!.committedEpoch >= e0 + 2, 30_000);
    // A checkpoint in flight when we paused may have resumed the VM: then try again.
    if ((await qmp.execute<{ status: string }>('query-status')).status === 'paused') break;
    assert.ok(attempt < 5, 'VM stays paused');
  }
  const p = protection('img1')!;
  const image = path.join(storeDir, 'vms', 'img1', `gen-${p.generation}`, 'memory.img');
  const ram = guestRam(st.qemuPid);
  const img = fs.readFileSync(image);
  assert.equal(img.length, ram.length, 'image size is RAM size');
  if (!img.equals(ram)) {
    let diff = 0;
    for (let i = 0; i < ram.length; i += 4096) if (!img.subarray(i, i + 4096).equals(ram.subarray(i, i + 4096))) diff++;
    assert.fail(`${diff} pages of the image differ from guest RAM at epoch ${p.committedEpoch}`);
  }
  // The committed device state equals a fresh save of the paused VM.
  const { meta } = await openVmImage(storeDir, 'img1', p.generation);
  const fresh = path.join(lab.home, 'fresh-devstate.bin');
  await qmp.execute('xen-save-devices-state', { filename: fresh, live: false });
  assert.equal(sha(fs.readFileSync(fresh)), meta.devstate.sha256, 'device state equals a fresh save');
  qmp.close();
  assert.equal(lab.cli(['unprotect', 'img1']).code, 0);
  assert.equal(lab.cli(['vm', 'stop', 'img1']).code, 0);
});

for (const mode of ['network', 'file'] as const) {
  test(`fail-over (${mode} mode): SIGKILL the primary's QEMU, restore, memcheck continues with zero violations`, async () => {
    const vm = `fo-${mode}`;
    await startProtected(vm);
    await until('epoch 3', () => (protection(vm)?.committedEpoch ?? 0) >= 3, 60_000);
    // Sample the guest's printed step over time, to know what it had reached when a checkpoint began.
    const samples: { at: number; step: number }[] = [];
    const sampler = setInterval(() => {
      const p = lastMemcheckProgress(serialOf(vm));
      if (p) samples.push({ at: Date.now(), step: p.step });
    }, 20);
    // Kill after a commit, at a moment that varies from run to run.
    const e = protection(vm)!.committedEpoch;
    await until('next commit', () => protection(vm)!.committedEpoch > e, 30_000);
    await sleep(Math.floor(Math.random() * 800));
    clearInterval(sampler);
    const killedAt = fs.statSync(serialOf(vm)).size;
    process.kill(vmState(vm).qemuPid, 'SIGKILL');
    await until('crash recorded', () => vmState(vm).lifecycle === 'crashed', 10_000);
    await until('checkpointer gives up on a dead VM', () => !pidAlive(protection(vm)!.pid), 10_000);

    const oldGen = protection(vm)!.generation;
    const oldGenDir = path.join(storeDir, 'vms', vm, `gen-${oldGen}`);
    const args = ['restore', vm, '--store', store.address, '--mode', mode];
    // File mode: RAM is the image mapped privately; protecting it again reads QEMU's copy-on-write pages.
    if (mode === 'file') args.push('--store-dir', storeDir, '--protect', '--interval', '1s');
    const r = await lab.cliAsync(args);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`VM ${vm} restored from generation \\d+ epoch \\d+ \\(${mode} mode\\)`));
    if (mode === 'network') {
      // A 256 MB guest with a 32 MB working set: most of its image is holes, filled with zeros without a fetch.
      const m = /memory complete after .*, (\d+) of them zeros the image holds no data for/.exec(r.stdout);
      assert.ok(m && Number(m[1]) > 0, `zero pages filled locally: ${r.stdout}`);
    }
    if (mode === 'file') {
      assert.match(r.stdout, /protected again as generation \d+/);
      const g = protection(vm)!.generation;
      // The image the restored VM maps privately is frozen: taken when the checkpoints of the new generation begin,
      // it is the same after several of them, which write their own files in their own directory.
      const frozen = () => fs.readdirSync(oldGenDir).sort().map((n) => `${n}:${sha(fs.readFileSync(path.join(oldGenDir, n)))}`).join(' ');
      const before = frozen();
      await until('file-mode VM checkpoints again', () => (protection(vm)?.generation === g && protection(vm)!.committedEpoch >= 3) || undefined, 60_000);
      assert.ok(g > oldGen);
      assert.equal(frozen(), before, `generation ${oldGen}'s files never change once generation ${g} runs`);
      assert.ok(fs.existsSync(path.join(storeDir, 'vms', vm, `gen-${g}`, 'memory.img')), 'the new generation writes its own image');
    }

    // The guest continues from the newest committed checkpoint: it had printed
    // at least `floor` before that checkpoint's pause began, so it resumes at or after it.
    const restoredEpoch = Number(/epoch (\d+)/.exec(r.stdout)![1]);
    const ckpt = readCheckpointHistory(vm).find((h) => h.epoch === restoredEpoch)!;
    assert.ok(ckpt, `history has epoch ${restoredEpoch}`);
    const floor = samples.filter((x) => x.at < ckpt.startedAt - 50).at(-1)?.step ?? 0;
    const resumed = await waitForMemcheckStep(serialOf(vm), 1, 30_000, killedAt);
    assert.ok(resumed.step >= floor, `resumed at step ${resumed.step}, but the guest had reached ${floor} before checkpoint ${restoredEpoch}`);
    await waitForMemcheckStep(serialOf(vm), resumed.step + 5, 60_000, killedAt);
    assert.equal(countViolations(serialOf(vm)), 0, readSerial(serialOf(vm)).split('\n').filter((l) => /VIOLATION/.test(l)).slice(0, 5).join('\n'));
    await assertFullVerify(serialOf(vm), killedAt);
    assert.doesNotMatch(readSerial(serialOf(vm)).slice(killedAt), /memcheck: start/, 'the guest did not reboot');
    assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
  });
}

test('restore refuses a VM that is still running, and a store without its image', async () => {
  await startProtected('ref1');
  const alive = lab.cli(['restore', 'ref1', '--store', store.address]);
  assert.notEqual(alive.code, 0);
  assert.match(alive.stderr, /VM "ref1" is still running on this host/);
  const none = lab.cli(['restore', 'nosuchvm', '--store', store.address]);
  assert.notEqual(none.code, 0);
  assert.match(none.stderr, /holds no committed image/);
  const unreachable = lab.cli(['restore', 'ref2', '--store', '127.0.0.1:1']);
  assert.notEqual(unreachable.code, 0);
  assert.match(unreachable.stderr, /cannot reach the store at 127\.0\.0\.1:1/);
  lab.cli(['unprotect', 'ref1']);
  lab.cli(['vm', 'stop', 'ref1']);
});

test('protected again: a restored VM checkpoints as a new generation, survives a second failure, and the old incarnation is fenced', async () => {
  const vm = 'again1';
  await startProtected(vm);
  await until('epoch 2', () => (protection(vm)?.committedEpoch ?? 0) >= 2, 60_000);
  const gen1 = protection(vm)!.generation;
  process.kill(vmState(vm).qemuPid, 'SIGKILL');
  await until('checkpointer exits', () => !pidAlive(protection(vm)!.pid), 10_000);
  const r1 = await lab.cliAsync(['restore', vm, '--store', store.address, '--mode', 'network', '--protect', '--interval', '1s']);
  assert.equal(r1.code, 0, r1.stderr);
  assert.match(r1.stdout, new RegExp(`protected again as generation ${gen1 + 1}`));

  // The old generation is fenced at the store: its checkpointer may not write any more.
  const { StoreClient } = await import('../src/protocol/index.js');
  const stale = await StoreClient.connect({ address: store.address, secret: lab.env.HYDRAVM_SECRET!, vm, generation: gen1, role: 'checkpointer' }).then(
    async (c) => { await c.close(); return null; },
    (err: Error) => err,
  );
  assert.ok(stale && /stale|fenced/i.test(stale.message), `old generation refused: ${stale?.message}`);

  await until('new generation epoch 3', () => (protection(vm)?.generation === gen1 + 1 && protection(vm)!.committedEpoch >= 3) || undefined, 60_000);
  const offset = fs.statSync(serialOf(vm)).size;
  const stepBefore = lastMemcheckProgress(serialOf(vm))!.step;
  process.kill(vmState(vm).qemuPid, 'SIGKILL');
  await until('checkpointer exits', () => !pidAlive(protection(vm)!.pid), 10_000);
  const r2 = await lab.cliAsync(['restore', vm, '--store', store.address, '--mode', 'network']);
  assert.equal(r2.code, 0, r2.stderr);
  assert.match(r2.stdout, new RegExp(`restored from generation ${gen1 + 1} epoch`));
  const resumed = await waitForMemcheckStep(serialOf(vm), 1, 30_000, offset);
  assert.ok(resumed.step > 0 && resumed.step >= stepBefore - 200, `resumed at ${resumed.step}, was at ${stepBefore}`);
  await waitForMemcheckStep(serialOf(vm), resumed.step + 5, 60_000, offset);
  assert.equal(countViolations(serialOf(vm)), 0);
  await assertFullVerify(serialOf(vm), offset);
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
});

test('a page fetch that fails mid-run stops the restored VM loudly instead of letting it run on a wrong page', async () => {
  const vm = 'pf1';
  const store2 = await startStore(lab, path.join(lab.home, 'store2'));
  try {
    const spec = lab.writeSpec(vm, {});
    assert.equal(lab.cli(['vm', 'start', spec]).code, 0);
    await waitForMemcheckStep(serialOf(vm), 1, 30_000);
    const p = await lab.cliAsync(['protect', vm, '--store', store2.address, '--interval', '1s']);
    assert.equal(p.code, 0, p.stderr);
    await until('epoch 2', () => (protection(vm)?.committedEpoch ?? 0) >= 2, 60_000);
    process.kill(vmState(vm).qemuPid, 'SIGKILL');
    await until('checkpointer exits', () => !pidAlive(protection(vm)!.pid), 10_000);
    // Pure demand paging, then the store dies while the guest still needs pages.
    const restoring = lab.cliAsync(['restore', vm, '--store', store2.address, '--mode', 'network', '--no-prefetch']);
    await until('restored VM running', () => vmState(vm)?.lifecycle === 'running' && pidAlive(vmState(vm).qemuPid) || undefined, 30_000);
    const offset = fs.statSync(serialOf(vm)).size;
    store2.proc.kill('SIGKILL');
    const r = await restoring;
    assert.notEqual(r.code, 0, 'restore reports the failure');
    assert.match(r.stderr, /cannot fetch guest pages: the connection to 127\.0\.0\.1:\d+ failed .* and no other store is known/);
    await until('the VM is stopped', () => !pidAlive(vmState(vm).qemuPid) || undefined, 10_000);
    assert.equal(vmState(vm).lifecycle, 'crashed');
    assert.equal(countViolations(serialOf(vm), offset), 0, 'the guest never ran on a wrong page');
  } finally {
    await store2.stop();
  }
});
