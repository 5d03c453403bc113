/**
 * Disk faults on real (tiny) file systems: a full disk (tmpfs with size=) and a
 * read-only one (remount,ro). Needs root for mount; skipped otherwise.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { StoreClient } from '../protocol/index.js';
import { startStoreServer, openVmImage, type StoreServer } from './index.js';
import { PAGE, SECRET, applyToBuffer, prng, tmpDir } from '../../test/support/store-data.js';

const mounts: string[] = [];
const servers: StoreServer[] = [];
after(async () => {
  for (const s of servers) await s.close().catch(() => undefined);
  for (const m of mounts) {
    try {
      execFileSync('umount', [m], { stdio: 'ignore' });
      fs.rmSync(m, { recursive: true, force: true });
    } catch {
      // leave it: reported by the test output
    }
  }
});

function mountTmpfs(sizeBytes: number): string | null {
  const dir = tmpDir('hydra-tmpfs-');
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${sizeBytes}`, 'tmpfs', dir], { stdio: 'ignore' });
  } catch {
    fs.rmSync(dir, { recursive: true, force: true });
    return null;
  }
  mounts.push(dir);
  return dir;
}

const code = (c: string) => (e: unknown) => {
  assert.equal((e as { code?: string }).code, c, (e as Error).message);
  return true;
};

async function start(dir: string): Promise<StoreServer> {
  const s = await startStoreServer({ dir, listen: '127.0.0.1:0', secret: SECRET });
  servers.push(s);
  return s;
}

function connect(s: StoreServer, vm: string) {
  return StoreClient.connect({ address: s.address, secret: SECRET, vm, generation: 1, role: 'checkpointer' });
}

test('store dir full (ENOSPC): checkpoint fails clearly, last image intact, store keeps serving', async (t) => {
  const mnt = mountTmpfs(8 * 1024 * 1024);
  if (!mnt) return t.skip('cannot mount tmpfs (not root?)');
  const s = await start(path.join(mnt, 'store'));
  const RAM = 4 * 1024 * 1024;
  const c = await connect(s, 'full1');
  const img = prng(3, RAM);
  await c.begin(1, 'full', { ramSize: RAM });
  await c.sendPages([{ offset: 0, length: RAM }], img);
  await c.sendDeviceState(Buffer.from('ds1'));
  await c.commit();

  // ~4 MB free: an incremental of the whole RAM plus a filler does not fit in the journal.
  fs.writeFileSync(path.join(mnt, 'filler'), Buffer.alloc(2 * 1024 * 1024, 1));
  await c.begin(2, 'incremental', { ramSize: RAM });
  await c.sendPages([{ offset: 0, length: RAM }], prng(4, RAM)).catch(() => undefined);
  await c.sendDeviceState(Buffer.from('ds2')).catch(() => undefined);
  await assert.rejects(c.commit(), (e: unknown) => code('HYDRA_IO_NO_SPACE')(e) && /journal/.test((e as Error).message));
  let opened = await openVmImage(s.store.dir, 'full1');
  assert.equal(opened.meta.committedEpoch, 1);
  assert.ok(fs.readFileSync(opened.memoryPath).equals(img), 'epoch 1 intact');
  assert.equal(fs.statSync(path.join(path.dirname(opened.memoryPath), 'journal')).size, 16, 'the failed checkpoint left nothing in the journal');

  // A smaller checkpoint fits: the store kept serving.
  const small = prng(5, 16 * PAGE);
  await c.begin(2, 'incremental', { ramSize: RAM });
  await c.sendPages([{ offset: 8 * PAGE, length: 16 * PAGE }], small);
  await c.sendDeviceState(Buffer.from('ds2'));
  assert.equal((await c.commit()).epoch, 2);
  applyToBuffer(img, [{ offset: 8 * PAGE, length: 16 * PAGE }], small);
  opened = await openVmImage(s.store.dir, 'full1');
  assert.ok(fs.readFileSync(opened.memoryPath).equals(img));

  // A full checkpoint of a new VM that does not fit: refused, nothing left behind.
  const c2 = await connect(s, 'big');
  await c2.begin(1, 'full', { ramSize: 8 * 1024 * 1024 });
  await c2.sendPages([{ offset: 0, length: 8 * 1024 * 1024 }], prng(6, 8 * 1024 * 1024)).catch(() => undefined);
  await c2.sendDeviceState(Buffer.from('x')).catch(() => undefined);
  await assert.rejects(c2.commit(), code('HYDRA_IO_NO_SPACE'));
  assert.deepEqual(fs.readdirSync(path.join(s.store.dir, 'vms', 'big', 'gen-1')), [], 'partial full image removed');
  await c2.close();
  await c.close();
  fs.rmSync(path.join(mnt, 'filler'));
});

test('ENOSPC while applying (sparse image): never exposed half-applied, completed from the journal', async (t) => {
  const mnt = mountTmpfs(8 * 1024 * 1024);
  if (!mnt) return t.skip('cannot mount tmpfs (not root?)');
  const s = await start(path.join(mnt, 'store'));
  const RAM = 8 * 1024 * 1024;
  const c = await connect(s, 'sparse');
  const img = Buffer.alloc(RAM);
  const head = prng(7, 1024 * 1024);
  head.copy(img, 0);
  await c.begin(1, 'full', { ramSize: RAM });
  await c.sendPages([{ offset: 0, length: head.length }], head);
  await c.sendDeviceState(Buffer.from('ds1'));
  await c.commit();
  // Leave room for the 2 MB journal record but not for 2 MB more of image blocks.
  const free = fs.statfsSync(mnt).bavail * fs.statfsSync(mnt).bsize;
  const filler = path.join(mnt, 'filler');
  fs.writeFileSync(filler, Buffer.alloc(free - 3 * 1024 * 1024, 1));
  const inc = prng(8, 2 * 1024 * 1024);
  const runs = [{ offset: 4 * 1024 * 1024, length: inc.length }];
  await c.begin(2, 'incremental', { ramSize: RAM });
  await c.sendPages(runs, inc);
  await c.sendDeviceState(Buffer.from('ds2'));
  // COMMITTED once the journal is durable; the apply then fails on the full disk.
  assert.equal((await c.commit()).epoch, 2);
  // Readers are kept away from the mixed image while the disk is still full, and so is the next checkpoint.
  await assert.rejects(openVmImage(s.store.dir, 'sparse'), code('HYDRA_STORE_RECOVERY_PENDING'));
  await assert.rejects(c.begin(3, 'incremental', { ramSize: RAM }), code('HYDRA_STORE_RECOVERY_PENDING'));
  // Space comes back: epoch 2 is completed from the journal.
  fs.rmSync(filler);
  applyToBuffer(img, runs, inc);
  const opened = await openVmImage(s.store.dir, 'sparse');
  assert.equal(opened.meta.committedEpoch, 2);
  assert.ok(fs.readFileSync(opened.memoryPath).equals(img));
  assert.equal(fs.readFileSync(opened.devstatePath, 'utf8'), 'ds2');
  await c.begin(3, 'incremental', { ramSize: RAM });
  await c.sendPages([{ offset: 0, length: PAGE }], Buffer.alloc(PAGE, 3));
  await c.sendDeviceState(Buffer.from('ds3'));
  assert.equal((await c.commit()).epoch, 3);
  await c.close();
});

test('commitAck=applied: an apply failure is reported to COMMIT', async (t) => {
  const mnt = mountTmpfs(8 * 1024 * 1024);
  if (!mnt) return t.skip('cannot mount tmpfs (not root?)');
  const s = await startStoreServer({ dir: path.join(mnt, 'store'), listen: '127.0.0.1:0', secret: SECRET, commitAck: 'applied' });
  servers.push(s);
  const RAM = 8 * 1024 * 1024;
  const c = await connect(s, 'sparse2');
  await c.begin(1, 'full', { ramSize: RAM });
  await c.sendPages([{ offset: 0, length: PAGE }], Buffer.alloc(PAGE, 1));
  await c.sendDeviceState(Buffer.from('ds1'));
  await c.commit();
  const free = fs.statfsSync(mnt).bavail * fs.statfsSync(mnt).bsize;
  const filler = path.join(mnt, 'filler');
  fs.writeFileSync(filler, Buffer.alloc(free - 3 * 1024 * 1024, 1));
  await c.begin(2, 'incremental', { ramSize: RAM });
  await c.sendPages([{ offset: 4 * 1024 * 1024, length: 2 * 1024 * 1024 }], prng(8, 2 * 1024 * 1024));
  await c.sendDeviceState(Buffer.from('ds2'));
  await assert.rejects(c.commit(), (e: unknown) => code('HYDRA_STORE_APPLY_FAILED')(e) && /journal/.test((e as Error).message));
  fs.rmSync(filler);
  // Recovery completes epoch 2 (it was durable); the checkpointer learns it from the epoch check.
  await assert.rejects(c.begin(2, 'incremental', { ramSize: RAM }), (e: unknown) => code('HYDRA_STORE_EPOCH_MISMATCH')(e) && /committed epoch is 2/.test((e as Error).message));
  await c.close();
});

test('read-only store dir: checkpoint fails clearly, store keeps serving reads', async (t) => {
  const mnt = mountTmpfs(16 * 1024 * 1024);
  if (!mnt) return t.skip('cannot mount tmpfs (not root?)');
  const s = await start(path.join(mnt, 'store'));
  const RAM = 1024 * 1024;
  const c = await connect(s, 'rovm');
  const img = prng(9, RAM);
  await c.begin(1, 'full', { ramSize: RAM });
  await c.sendPages([{ offset: 0, length: RAM }], img);
  await c.sendDeviceState(Buffer.from('ds1'));
  await c.commit();
  execFileSync('mount', ['-o', 'remount,ro', mnt]);
  try {
    await assert.rejects(c.begin(2, 'incremental', { ramSize: RAM }), (e: unknown) => code('HYDRA_IO_READ_ONLY')(e) && /journal/.test((e as Error).message));
    await assert.rejects(c.begin(2, 'full', { ramSize: RAM }), code('HYDRA_IO_READ_ONLY'));
    const r = await StoreClient.connect({ address: s.address, secret: SECRET, vm: 'rovm', generation: 1, role: 'reader' });
    assert.equal((await r.getMeta())?.committedEpoch, 1);
    assert.ok((await r.readPages([{ offset: 0, length: RAM }])).equals(img));
    await r.close();
  } finally {
    execFileSync('mount', ['-o', 'remount,rw', mnt]);
  }
  const inc = prng(10, PAGE);
  await c.begin(2, 'incremental', { ramSize: RAM });
  await c.sendPages([{ offset: PAGE, length: PAGE }], inc);
  await c.sendDeviceState(Buffer.from('ds2'));
  assert.equal((await c.commit()).epoch, 2);
  await c.close();
});
