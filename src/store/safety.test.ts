// Store safety under partial failures: fencing atomic with commits, pinned reads, CRC at apply, directory lock, modes, u32 bounds.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { StoreClient } from '../protocol/index.js';
import { Store, startStoreServer, openVmImage, type StoreServer } from './index.js';
import { PAGE, SECRET, applyToBuffer, makeIncremental, prng, spawnStore, tmpDir } from '../../test/support/store-data.js';
import { JOURNAL_HEADER_SIZE, RECORD_HEADER_SIZE } from './journal.js';
import { readMeta } from './meta.js';

const code = (c: string) => (e: unknown) => {
  assert.equal((e as { code?: string }).code, c, (e as Error).message);
  return true;
};

const servers: StoreServer[] = [];
after(async () => {
  for (const s of servers) await s.close();
});

async function start(dir = tmpDir(), delayInjection?: string): Promise<StoreServer> {
  const s = await startStoreServer({ dir, listen: '127.0.0.1:0', secret: SECRET, ...(delayInjection ? { delayInjection } : {}) });
  servers.push(s);
  return s;
}

function connect(s: StoreServer, vm: string, generation: number, role: 'checkpointer' | 'reader' = 'checkpointer') {
  return StoreClient.connect({ address: s.address, secret: SECRET, vm, generation, role, timeoutMs: 10_000 });
}

const RAM = 1024 * 1024;

async function full(c: StoreClient, seed: number): Promise<Buffer> {
  const img = prng(seed, RAM);
  await c.begin(1, 'full', { ramSize: RAM });
  await c.sendPages([{ offset: 0, length: RAM }], img);
  await c.sendDeviceState(Buffer.from(`ds-1-${seed}`));
  await c.commit();
  return img;
}

async function incremental(c: StoreClient, epoch: number, img: Buffer): Promise<void> {
  const inc = makeIncremental(RAM, 40, epoch);
  await c.begin(epoch, 'incremental', { ramSize: RAM });
  await c.sendPages(inc.runs, inc.data);
  await c.sendDeviceState(Buffer.from(`ds-${epoch}`));
  await c.commit();
  applyToBuffer(img, inc.runs, inc.data);
}

test('registration does not wait for an older generation\'s apply in flight: the committed epoch is served from what was received, the apply completes', async () => {
  // Wide windows between END and the image writes and between the writes and meta.json.
  const dir = tmpDir();
  const s = await start(dir, 'commit-before-apply:400,apply-before-meta:400');
  const c = await connect(s, 'reg', 1);
  const img = await full(c, 1);
  const inc = makeIncremental(RAM, 40, 2);
  await c.begin(2, 'incremental', { ramSize: RAM });
  await c.sendPages(inc.runs, inc.data);
  await c.sendDeviceState(Buffer.from('ds-2'));
  // COMMITTED comes once the journal is durable; the apply is still in its delays.
  assert.equal((await c.commit()).epoch, 2);
  applyToBuffer(img, inc.runs, inc.data);
  const fence = await connect(s, 'reg', 2);
  // What a restore reads now is epoch 2, complete: meta, device state and pages, while the image file still holds epoch 1.
  const r = await connect(s, 'reg', 1, 'reader');
  const meta = await r.getMeta(1, { pin: true });
  assert.equal(meta?.committedEpoch, 2);
  assert.equal((await r.getDeviceState(1, 2)).toString(), 'ds-2');
  assert.ok((await r.readPages([{ offset: 0, length: RAM }])).equals(img), 'pages are exactly epoch 2');
  assert.equal((await readMeta(path.join(dir, 'vms', 'reg', 'gen-1', 'meta.json')))?.committedEpoch, 1, 'served before the apply reached meta.json');
  // The apply is not stopped by this store's own newer fence: the image file reaches epoch 2 and equals what was served.
  assert.equal((await r.getMeta(1, { applied: true }))?.committedEpoch, 2);
  const opened = await openVmImage(s.store.dir, 'reg', 1);
  assert.equal(opened.meta.committedEpoch, 2);
  assert.ok(fs.readFileSync(opened.memoryPath).equals(img), 'image file is exactly epoch 2');
  // The fenced generation commits nothing more.
  await assert.rejects(c.begin(3, 'incremental', { ramSize: RAM }), code('HYDRA_STORE_STALE_GENERATION'));
  await Promise.all([c.close(), fence.close(), r.close()]);
});

test('registration ends an older generation\'s uncommitted checkpoint: its COMMIT is refused and the image stays at the committed epoch', async () => {
  const s = await start();
  const c = await connect(s, 'unc', 1);
  const img = await full(c, 3);
  const inc = makeIncremental(RAM, 40, 4);
  await c.begin(2, 'incremental', { ramSize: RAM });
  await c.sendPages(inc.runs, inc.data);
  await c.sendDeviceState(Buffer.from('ds-2'));
  const fence = await connect(s, 'unc', 2);
  await assert.rejects(c.commit(), (e: unknown) => ['HYDRA_STORE_STALE_GENERATION', 'HYDRA_STORE_NO_CHECKPOINT'].includes((e as { code: string }).code));
  const opened = await openVmImage(s.store.dir, 'unc', 1);
  assert.equal(opened.meta.committedEpoch, 1);
  assert.ok(fs.readFileSync(opened.memoryPath).equals(img));
  await Promise.all([c.close(), fence.close()]);
});

test('a registration arriving while a commit holds the lock (fence checked, before END) waits: that epoch is complete before the fence', async () => {
  const s = await start(tmpDir(), 'commit-before-end:300');
  const c = await connect(s, 'end', 1);
  const img = await full(c, 5);
  const inc = makeIncremental(RAM, 40, 6);
  await c.begin(2, 'incremental', { ramSize: RAM });
  await c.sendPages(inc.runs, inc.data);
  await c.sendDeviceState(Buffer.from('ds-2'));
  const committing = c.commit();
  // Registration queues behind the commit's lock: the commit checked the fence first, so it completes; the fence follows.
  await new Promise((r) => setTimeout(r, 50));
  const fence = await connect(s, 'end', 2);
  assert.equal((await committing).epoch, 2);
  applyToBuffer(img, inc.runs, inc.data);
  const opened = await openVmImage(s.store.dir, 'end', 1);
  assert.equal(opened.meta.committedEpoch, 2);
  assert.ok(fs.readFileSync(opened.memoryPath).equals(img));
  await assert.rejects(c.begin(3, 'incremental', { ramSize: RAM }), code('HYDRA_STORE_STALE_GENERATION'));
  await Promise.all([c.close(), fence.close()]);
});

test('pinned readers: READ_PAGES and GET_DEVSTATE of a moved epoch are refused, never mixed', async () => {
  const s = await start();
  const c = await connect(s, 'pin', 1);
  const img = await full(c, 7);
  const r = await connect(s, 'pin', 1, 'reader');
  const meta = await r.getMeta(1, { pin: true });
  assert.equal(meta?.committedEpoch, 1);
  assert.ok((await r.readPages([{ offset: 0, length: 8 * PAGE }])).equals(img.subarray(0, 8 * PAGE)));
  await incremental(c, 2, img);
  await assert.rejects(r.readPages([{ offset: 0, length: PAGE }]), code('HYDRA_STORE_EPOCH_MOVED'));
  await assert.rejects(r.getDeviceState(1, 1), code('HYDRA_STORE_EPOCH_MOVED'));
  await assert.rejects(r.getMeta(1, { epoch: 1 }), code('HYDRA_STORE_EPOCH_MOVED'));
  // Stating the current epoch works, on a fresh connection too.
  const r2 = await connect(s, 'pin', 1, 'reader');
  assert.equal((await r2.getMeta(1, { epoch: 2, pin: true }))?.committedEpoch, 2);
  assert.equal((await r2.getDeviceState(1, 2)).toString(), 'ds-2');
  assert.ok((await r2.readPages([{ offset: 0, length: RAM }])).equals(img));
  await Promise.all([c.close(), r.close(), r2.close()]);
});

test('CRC re-checked at apply: a journal record that changed after END stops the apply before the image is touched', async () => {
  const dir = tmpDir();
  const s = await start(dir, 'commit-before-apply:500');
  const c = await connect(s, 'crc', 1);
  const img = await full(c, 9);
  const inc = makeIncremental(RAM, 40, 10);
  await c.begin(2, 'incremental', { ramSize: RAM });
  await c.sendPages(inc.runs, inc.data);
  await c.sendDeviceState(Buffer.from('ds-2'));
  assert.equal((await c.commit()).epoch, 2);
  // The journal is durable and acknowledged; flip one data byte of the PAGES record before the apply reads it back.
  const journal = path.join(dir, 'vms', 'crc', 'gen-1', 'journal');
  const fd = fs.openSync(journal, 'r+');
  const begin = Buffer.alloc(RECORD_HEADER_SIZE);
  fs.readSync(fd, begin, 0, RECORD_HEADER_SIZE, JOURNAL_HEADER_SIZE);
  const pagesAt = JOURNAL_HEADER_SIZE + RECORD_HEADER_SIZE + begin.readUInt32BE(12);
  const byteAt = pagesAt + RECORD_HEADER_SIZE + 4 + inc.runs.length * 12 + 5;
  const b = Buffer.alloc(1);
  fs.readSync(fd, b, 0, 1, byteAt);
  b[0] = b[0]! ^ 0xff;
  fs.writeSync(fd, b, 0, 1, byteAt);
  fs.closeSync(fd);
  // A reader of the applied image waits for the apply, which fails loudly; the replay finds the torn record and keeps epoch 1.
  const r = await connect(s, 'crc', 1, 'reader');
  const meta = await r.getMeta(1, { applied: true });
  assert.equal(meta?.committedEpoch, 1, 'the corrupt epoch is not applied');
  assert.ok((await r.readPages([{ offset: 0, length: RAM }])).equals(img), 'the image is exactly epoch 1: no garbage written');
  await Promise.all([c.close(), r.close()]);
});

test('store directory: 0700 directories and 0600 files whatever the umask', async () => {
  const old = process.umask(0);
  let dir: string;
  try {
    dir = tmpDir();
    const s = await start(dir);
    const c = await connect(s, 'modes', 1);
    const img = await full(c, 11);
    await incremental(c, 2, img);
    await c.close();
  } finally {
    process.umask(old);
  }
  const bad: string[] = [];
  const walk = (p: string) => {
    const st = fs.statSync(p);
    const mode = st.mode & 0o777;
    if (st.isDirectory()) {
      if (mode !== 0o700) bad.push(`${p} ${mode.toString(8)}`);
      for (const n of fs.readdirSync(p)) walk(path.join(p, n));
    } else if (mode !== 0o600) bad.push(`${p} ${mode.toString(8)}`);
  };
  walk(dir!);
  assert.deepEqual(bad, [], 'every directory is 0700 and every file 0600');
  assert.ok(fs.existsSync(path.join(dir!, 'vms', 'modes', 'gen-1', 'journal')), 'the walk saw the journal');
});

test('directory lock: a second store process is refused naming the directory and the holder; offline readers read while the store serves', async () => {
  const dir = tmpDir();
  const s = await start(dir);
  const c = await connect(s, 'lock', 1);
  const img = await full(c, 13);
  await c.close();
  await assert.rejects(spawnStore(dir), (e: unknown) => {
    const m = (e as Error).message;
    assert.match(m, /HYDRA_STORE_DIR_BUSY|already open read-write/);
    assert.ok(m.includes(dir), m);
    assert.match(m, new RegExp(`process ${process.pid} on host`));
    return true;
  });
  await s.close();
  servers.splice(servers.indexOf(s), 1);
  // Served by another process: this one reads, and never writes or takes the directory over.
  const p = await spawnStore(dir);
  try {
    const opened = await openVmImage(dir, 'lock');
    assert.ok(fs.readFileSync(opened.memoryPath).equals(img));
    await assert.rejects(startStoreServer({ dir, listen: '127.0.0.1:0', secret: SECRET }), code('HYDRA_STORE_DIR_BUSY'));
  } finally {
    p.kill('SIGTERM');
    await p.exited;
  }
  // The lock goes with its holder (even a SIGKILLed one): the directory opens again.
  const q = await spawnStore(dir);
  q.kill('SIGKILL');
  await q.exited;
  const again = await start(dir);
  assert.ok(again.address);
});

test('u32 bounds: a generation or an epoch above 2^32-1 is refused', async () => {
  const s = await start();
  // The wire schema refuses them first; the store's own check stands behind it.
  const direct = await Store.open(tmpDir());
  await assert.rejects(direct.registerGeneration('big', 2 ** 32), code('HYDRA_STORE_BAD_GENERATION'));
  await direct.close();
  await assert.rejects(connect(s, 'big', 2 ** 32), (e: unknown) => code('HYDRA_PROTOCOL_BAD_PAYLOAD')(e) && /generation/.test((e as Error).message));
  const c = await connect(s, 'big', 1);
  await full(c, 15);
  await assert.rejects(c.begin(2 ** 32, 'incremental', { ramSize: RAM }), (e: unknown) => code('HYDRA_PROTOCOL_BAD_PAYLOAD')(e) && /4294967295/.test((e as Error).message));
  await c.close();
});
