// Basic mode without a cliff: a dirty set larger than the staging cap is pre-copied while the VM runs, and the image stays exact.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { labWithStore, readJson, until } from './support/lab.js';
import { QmpClient } from '../src/qmp/index.js';
import { waitForMemcheckStep } from '../src/vm/serial.js';
import { findGuestRam } from '../src/tracker/guest-ram.js';
import { protectVm, readCheckpointHistory, unprotectVm } from '../src/checkpoint/protection.js';

const { lab, storeDir, store } = labWithStore('prec');

const protection = (vm: string) => readJson<{ committedEpoch: number; generation: number }>(path.join(lab.home, 'vms', vm, 'protection.json'));

test('basic mode: dirty sets beyond the staging cap go out in pre-copy rounds while the VM runs; the image still equals RAM', async () => {
  const vm = 'prec1';
  const spec = lab.writeSpec(vm, { cmdline: 'console=ttyS0 quiet hydra.run=memcheck memcheck.mb=64 memcheck.rate=0' });
  assert.equal(lab.cli(['vm', 'start', spec]).code, 0);
  await waitForMemcheckStep(path.join(lab.home, 'vms', vm, 'serial.log'), 1, 120_000);
  // 4 MiB of staging, growing to at most 8 MiB, against a guest rewriting 64 MB unthrottled.
  await protectVm({ vm, store: store.address, intervalMs: 1000, generation: 1, stagingBytes: 4 << 20, stagingCapBytes: 8 << 20 });
  await until('epoch 4', () => (protection(vm)?.committedEpoch ?? 0) >= 4, 90_000);
  const hist = readCheckpointHistory(vm).filter((h) => h.kind === 'incremental');
  assert.ok(hist.some((h) => (h.precopyRounds ?? 0) > 0), `pre-copy rounds ran (${hist.map((h) => h.precopyRounds).join(', ')})`);
  assert.ok(hist.every((h) => (h.stagingBytes ?? 0) <= 8 << 20), 'staging stays within its cap');
  const qemuPid = readJson<{ qemuPid: number }>(path.join(lab.home, 'vms', vm, 'state.json'))!.qemuPid;
  const qmp = await QmpClient.connect(path.join(lab.home, 'vms', vm, 'qmp.sock'));
  for (let attempt = 0; ; attempt++) {
    await qmp.execute('stop');
    const e0 = protection(vm)!.committedEpoch;
    await until('two commits after pause', () => protection(vm)!.committedEpoch >= e0 + 2, 30_000);
    if ((await qmp.execute<{ status: string }>('query-status')).status === 'paused') break;
    assert.ok(attempt < 5, 'VM stays paused');
  }
  const ram = findGuestRam(qemuPid);
  const mem = fs.readFileSync(`/proc/${qemuPid}/map_files/${ram.start.toString(16)}-${ram.end.toString(16)}`);
  const img = fs.readFileSync(path.join(storeDir, 'vms', vm, `gen-${protection(vm)!.generation}`, 'memory.img'));
  assert.ok(img.equals(mem), 'image equals guest RAM');
  qmp.close();
  await unprotectVm(vm);
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
});

test('basic mode: the staging buffer is sized by the interval, not by the full checkpoint, and shrinks back when the guest goes quiet', async () => {
  const vm = 'prec2';
  const spec = lab.writeSpec(vm, { cmdline: 'console=ttyS0 quiet hydra.run=memcheck memcheck.mb=48 memcheck.rate=0' });
  assert.equal(lab.cli(['vm', 'start', spec]).code, 0);
  await waitForMemcheckStep(path.join(lab.home, 'vms', vm, 'serial.log'), 1, 120_000);
  const start = 4 << 20;
  await protectVm({ vm, store: store.address, intervalMs: 250, generation: 1, stagingBytes: start, stagingCapBytes: 32 << 20 });
  await until('staging grown by the interval', () => readCheckpointHistory(vm).some((h) => h.kind === 'incremental' && (h.stagingBytes ?? 0) > start), 90_000);
  const full = readCheckpointHistory(vm).find((h) => h.kind === 'full');
  assert.ok(full, 'a full checkpoint is in the history');
  // The guest rewrote far more than 4 MiB during the full copy: that alone must not have grown the buffer.
  assert.equal(full.stagingBytes, start, 'the full checkpoint left the staging buffer at its first size');
  const qmp = await QmpClient.connect(path.join(lab.home, 'vms', vm, 'qmp.sock'));
  await qmp.execute('stop');
  await until('staging back to its first size while the guest is quiet', () => {
    const last = readCheckpointHistory(vm).at(-1);
    return last?.kind === 'incremental' && last.stagingBytes === start;
  }, 60_000);
  await qmp.execute('cont');
  qmp.close();
  await unprotectVm(vm);
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
});
