// File-mode restore warms the image file in the background: after it, the guest's memory faults are minor.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { labWithStore, readJson, until, pidAlive, assertGuestContinues } from './support/lab.js';
import { waitForMemcheckStep } from '../src/vm/serial.js';
import { fileDataRunsOf, dropFileCache } from '../src/tracker/index.js';

const { lab, storeDir, store } = labWithStore('fwarm');
const serialOf = (vm: string) => path.join(lab.home, 'vms', vm, 'serial.log');
const protection = (vm: string) => readJson<{ committedEpoch: number; generation: number; pid: number }>(path.join(lab.home, 'vms', vm, 'protection.json'));

/** Bytes of the file in this host's page cache (util-linux fincore). */
const cachedBytes = (file: string) => Number(execFileSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', file], { encoding: 'utf8' }).trim());

/**
 * A protected memcheck VM over 160 MB (filled once, then rewritten slowly, so after a restore the guest itself
 * touches little of it), its QEMU killed, its image dropped from this host's page cache as if the host had
 * never read it (shared storage seen from another host).
 */
async function killedWithColdImage(vm: string): Promise<{ image: string; populated: number; killedAt: number }> {
  const spec = lab.writeSpec(vm, { cmdline: 'console=ttyS0 quiet hydra.run=memcheck memcheck.mb=160 memcheck.rate=4' });
  assert.equal(lab.cli(['vm', 'start', spec]).code, 0);
  await waitForMemcheckStep(serialOf(vm), 2, 120_000);
  const p = await lab.cliAsync(['protect', vm, '--store', store.address, '--interval', '1s']);
  assert.equal(p.code, 0, p.stderr);
  await until('epoch 3', () => (protection(vm)?.committedEpoch ?? 0) >= 3, 60_000);
  const killedAt = fs.statSync(serialOf(vm)).size;
  process.kill(readJson<{ qemuPid: number }>(path.join(lab.home, 'vms', vm, 'state.json'))!.qemuPid, 'SIGKILL');
  await until('checkpointer gone', () => !pidAlive(protection(vm)!.pid), 20_000);
  const image = path.join(storeDir, 'vms', vm, `gen-${protection(vm)!.generation}`, 'memory.img');
  const fd = fs.openSync(image, 'r');
  try {
    const populated = fileDataRunsOf(fd, fs.fstatSync(fd).size).reduce((s, r) => s + r.length, 0);
    assert.ok(populated > 150 * 2 ** 20, `the image holds the guest's 160 MB (${populated} bytes populated)`);
    // The store may still be applying the last checkpoint (its dirty pages stay): drop until well under half is cached.
    await until('image out of the page cache', () => {
      dropFileCache(fd);
      return cachedBytes(image) < populated * 0.3;
    }, 30_000);
    return { image, populated, killedAt };
  } finally {
    fs.closeSync(fd);
  }
}

test('file-mode restore reads the image into the page cache in the background, and the guest continues with its memory intact', async () => {
  const vm = 'fwarm1';
  const { image, populated, killedAt } = await killedWithColdImage(vm);
  const r = await lab.cliAsync(['restore', vm, '--store', store.address, '--mode', 'file', '--store-dir', storeDir]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /image file cached after [\d.]+ ms: \d+ MB/);
  const cached = cachedBytes(image);
  assert.ok(cached >= populated * 0.95, `after warming, ${cached} of ${populated} populated bytes are cached`);

  await assertGuestContinues(serialOf(vm), killedAt);
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
});

test('file-mode restore with --no-prefetch leaves the image to the guest\'s own faults', async () => {
  const vm = 'fwarm2';
  const { image, populated, killedAt } = await killedWithColdImage(vm);
  const r = await lab.cliAsync(['restore', vm, '--store', store.address, '--mode', 'file', '--store-dir', storeDir, '--no-prefetch']);
  assert.equal(r.code, 0, r.stderr);
  assert.doesNotMatch(r.stdout, /image file cached/);
  // The control for the test above: without warming, the guest that just resumed has touched little of its memory.
  const cached = cachedBytes(image);
  assert.ok(cached < populated * 0.6, `without warming only ${cached} of ${populated} bytes are cached`);
  await assertGuestContinues(serialOf(vm), killedAt);
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
});
