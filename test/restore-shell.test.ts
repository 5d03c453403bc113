// Restore shells with real QEMU: fail-over into a warm shell (both modes) and a cold start beside a mismatched one.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { labWithStore, readJson, until, sleep, pidAlive, assertFullVerify, assertGuestContinues } from './support/lab.js';
import { waitForMemcheckStep, readSerial } from '../src/vm/serial.js';
import { loadSpecFile, chooseAccel, shellConfigOf, shellKey, startShell, listShells, adoptShell, stopAllShells, type ShellConfig } from '../src/vm/index.js';

const { lab, storeDir, store } = labWithStore('shell', { beforeStop: stopAllShells });

interface Protection { committedEpoch: number; generation: number; pid: number }
const protection = (vm: string) => readJson<Protection>(path.join(lab.home, 'vms', vm, 'protection.json'));
const vmState = (vm: string) => readJson<{ qemuPid: number; lifecycle: string; shell?: string }>(path.join(lab.home, 'vms', vm, 'state.json'))!;
const serialOf = (vm: string) => path.join(lab.home, 'vms', vm, 'serial.log');

function configOf(specFile: string): ShellConfig {
  const spec = loadSpecFile(specFile);
  const c = shellConfigOf(spec, chooseAccel(spec.accel, spec.name), []);
  assert.ok('config' in c);
  return c.config;
}

/** Boot a memcheck VM, protect it, let checkpoints commit, SIGKILL its QEMU; returns the serial offset at the kill. */
async function protectAndKill(vm: string, specFile: string): Promise<number> {
  assert.equal(lab.cli(['vm', 'start', specFile]).code, 0);
  await waitForMemcheckStep(serialOf(vm), 1, 30_000);
  const p = await lab.cliAsync(['protect', vm, '--store', store.address, '--interval', '1s']);
  assert.equal(p.code, 0, p.stderr);
  await until('epoch 3', () => (protection(vm)?.committedEpoch ?? 0) >= 3, 60_000);
  const killedAt = fs.statSync(serialOf(vm)).size;
  process.kill(vmState(vm).qemuPid, 'SIGKILL');
  await until('crash recorded', () => vmState(vm).lifecycle === 'crashed', 10_000);
  await until('checkpointer gone', () => !pidAlive(protection(vm)!.pid), 10_000);
  return killedAt;
}

const verifyContinues = (vm: string, killedAt: number) => assertGuestContinues(serialOf(vm), killedAt);

for (const mode of ['network', 'file'] as const) {
  test(`fail-over into a warm restore shell (${mode} mode): the shell's QEMU becomes the VM, memcheck verifies every page`, async () => {
    const vm = `warm-${mode}`;
    const specFile = lab.writeSpec(vm, { cmdline: 'console=ttyS0 quiet hydra.run=memcheck memcheck.mb=32 memcheck.rate=8' });
    const shell = await startShell(configOf(specFile));
    // An idle shell holds no guest memory: its memfd is untouched.
    const rss = Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${shell.state!.qemuPid}/status`, 'utf8'))![1]) * 1024;
    assert.ok(rss < 200 * 1024 * 1024, `idle shell RSS ${rss} is below the guest's 256 MiB`);
    const killedAt = await protectAndKill(vm, specFile);
    const args = ['restore', vm, '--store', store.address, '--mode', mode];
    if (mode === 'file') args.push('--store-dir', storeDir);
    const r = await lab.cliAsync(args);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`VM ${vm} restored into restore shell ${shell.id} \\(${shell.key}\\): hand-off`), r.stdout);
    const st = vmState(vm);
    assert.equal(st.qemuPid, shell.state!.qemuPid, 'the shell\'s QEMU runs the VM');
    assert.equal(st.shell, shell.id);
    assert.ok(!listShells().some((s) => s.id === shell.id), 'the used shell is gone from the pool directory');
    await verifyContinues(vm, killedAt);
    assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
    assert.ok(!pidAlive(st.qemuPid), 'vm stop ends the adopted QEMU');
  });
}

test('a mismatched shell is never used: adoption refused with the reason, the restore starts cold and verifies clean', async () => {
  const vm = 'mismatch';
  const specFile = lab.writeSpec(vm, { cmdline: 'console=ttyS0 quiet hydra.run=memcheck memcheck.mb=32 memcheck.rate=8' });
  const cfg = configOf(specFile);
  const other = await startShell({ ...cfg, memoryBytes: 128 * 1024 * 1024 });
  const spec = loadSpecFile(specFile);
  await assert.rejects(adoptShell(other.id, spec, { accel: cfg.accel, ram: { kind: 'memfd' }, incomingDefer: true }, shellKey(cfg)),
    (err: Error & { code?: string }) => err.code === 'HYDRA_VM_SHELL_BUSY' && /is for m128M.*needs m256M/.test(err.message));
  const killedAt = await protectAndKill(vm, specFile);
  const r = await lab.cliAsync(['restore', vm, '--store', store.address, '--mode', 'network']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, new RegExp(`VM ${vm} started cold: no idle restore shell for ${shellKey(cfg).replace(/[+]/g, '\\+')}`));
  assert.notEqual(vmState(vm).qemuPid, other.state!.qemuPid);
  assert.ok(listShells().some((s) => s.id === other.id && s.idle), 'the mismatched shell is still idle');
  await verifyContinues(vm, killedAt);
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
});

test('an idle shell ends itself when its owner dies, and leaves no process behind', async () => {
  const spec = lab.writeSpec('owner', {});
  const owner = (await import('node:child_process')).spawn('sleep', ['30']);
  const s = await startShell(configOf(spec), { ownerPid: owner.pid! });
  assert.ok(pidAlive(s.state!.qemuPid));
  owner.kill('SIGKILL');
  await until('shell QEMU gone', () => !pidAlive(s.state!.qemuPid) && !pidAlive(s.state!.supervisorPid), 10_000);
  await sleep(100);
  assert.ok(!listShells().find((x) => x.id === s.id)?.live);
});

test('the pool replaces a shell killed while idle, and keeps only the configurations it is asked for', async () => {
  const { ShellPool } = await import('../src/ha/shell-pool.js');
  const { log } = await import('../src/util/log.js');
  const cfg = configOf(lab.writeSpec('pooled', {}));
  const pool = new ShellPool(log, 'h1', { configs: [cfg], perConfig: 1 });
  const round = () => pool.reconcile([], 'h1');
  try {
    round();
    const first = await until('a shell is ready', () => listShells().find((s) => s.key === shellKey(cfg) && s.idle && s.owner === 'h1'), 30_000);
    assert.deepEqual(pool.status().find((x) => x.key === shellKey(cfg)), { key: shellKey(cfg), idle: 1 });
    process.kill(first.state!.qemuPid!, 'SIGKILL');
    await until('the dead shell is noticed', () => { round(); return !listShells().some((s) => s.id === first.id) || undefined; }, 10_000);
    const second = await until('a replacement is ready', () => { round(); return listShells().find((s) => s.key === shellKey(cfg) && s.idle && s.owner === 'h1' && s.id !== first.id); }, 30_000);
    assert.ok(pidAlive(second.state!.qemuPid!));
    assert.equal(listShells().filter((s) => s.key === shellKey(cfg) && s.owner === 'h1' && s.live).length, 1, 'one live shell of the pool for the configuration');
  } finally {
    await pool.close();
  }
  await until('the pool\'s shells are gone', () => listShells().every((s) => s.owner !== 'h1' || !s.live) || undefined, 10_000);
});
