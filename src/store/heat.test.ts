import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { StoreClient, type PageRun } from '../protocol/index.js';
import { startStoreServer, type StoreServer } from './index.js';
import { HEAT_EPOCHS, HEAT_FILE, HEAT_REGION_BYTES, countRegions, decodeHeat, encodeHeat, heatEpoch, scoreHeat } from './heat.js';
import { PAGE, SECRET, prng, spawnStore, tmpDir } from '../../test/support/store-data.js';

const MB2 = HEAT_REGION_BYTES;
const RAM = 32 * 1024 * 1024; // 16 regions

const servers: StoreServer[] = [];
after(async () => {
  for (const s of servers) await s.close();
});

async function start(dir = tmpDir()): Promise<StoreServer> {
  const s = await startStoreServer({ dir, listen: '127.0.0.1:0', secret: SECRET });
  servers.push(s);
  return s;
}

function connect(address: string, vm: string, generation: number, role: 'checkpointer' | 'reader' = 'checkpointer') {
  return StoreClient.connect({ address, secret: SECRET, vm, generation, role, timeoutMs: 5000 });
}

/** `pages` pages at the start of region `region` (plus `skip` pages in). */
function inRegion(region: number, pages: number, skip = 0): PageRun {
  return { offset: region * MB2 + skip * PAGE, length: pages * PAGE };
}

async function full(c: StoreClient, ram = RAM): Promise<void> {
  await c.begin(1, 'full', { ramSize: ram });
  await c.sendPages([{ offset: 0, length: ram }], prng(1, ram));
  await c.sendDeviceState(Buffer.from('ds-1'));
  await c.commit();
}

async function incremental(c: StoreClient, epoch: number, runs: PageRun[]): Promise<void> {
  runs = [...runs].sort((a, b) => a.offset - b.offset);
  const bytes = runs.reduce((n, r) => n + r.length, 0);
  await c.begin(epoch, 'incremental', { ramSize: RAM });
  if (runs.length > 0) await c.sendPages(runs, prng(epoch, bytes));
  await c.sendDeviceState(Buffer.from(`ds-${epoch}`));
  await c.commit();
}

const order = (hot: { offset: number }[]) => hot.map((h) => h.offset / MB2);

test('heat: count, encode/decode, score', () => {
  const m = new Map<number, number>();
  // 2 pages at the end of region 1 and 3 in region 2, in one run; 1 page in region 5.
  countRegions([{ offset: 2 * MB2 - 2 * PAGE, length: 5 * PAGE }, { offset: 5 * MB2, length: PAGE }], PAGE, m);
  assert.deepEqual([...m].sort((a, b) => a[0] - b[0]), [[1, 2], [2, 3], [5, 1]]);
  const epochs = [heatEpoch(3, m), heatEpoch(4, new Map([[5, 4], [0, 1]])), heatEpoch(6, new Map())];
  const dec = decodeHeat(encodeHeat(epochs));
  assert.deepEqual(dec.map((e) => [e.epoch, [...e.regions], [...e.pages]]), [[3, [1, 2, 5], [2, 3, 1]], [4, [0, 5], [1, 4]], [6, [], []]]);
  // newest 6: epoch 4 weighs 1/4, epoch 3 weighs 1/8.
  assert.deepEqual(scoreHeat(dec), [{ offset: 5 * MB2, score: 4 / 4 + 1 / 8 }, { offset: 2 * MB2, score: 3 / 8 }, { offset: 0, score: 1 / 4 }, { offset: MB2, score: 2 / 8 }]);
  assert.deepEqual(scoreHeat(dec, { limit: 1 }), [{ offset: 5 * MB2, score: 1.125 }]);
  // Only epochs up to 3: epoch 3 is the newest.
  assert.deepEqual(order(scoreHeat(dec, { upToEpoch: 3 })), [2, 1, 5]);
  // Any flipped byte is detected.
  const enc = encodeHeat(epochs);
  for (const i of [0, 5, 7, 9, 13, 16, 20, enc.length - 1]) {
    const bad = Buffer.from(enc);
    bad[i]! ^= 0x40;
    assert.throws(() => decodeHeat(bad), (e: unknown) => (e as { code?: string }).code === 'HYDRA_STORE_HEAT_CORRUPT', `byte ${i}`);
  }
  assert.throws(() => decodeHeat(enc.subarray(0, enc.length - 3)), /HEAT|unusable/);
});

test('GET_HOT returns the regions written most in the last epochs, hottest first', async () => {
  const s = await start();
  const c = await connect(s.address, 'hotvm', 1);
  assert.deepEqual(await c.getHotRegions(), [], 'no image yet: no heat');
  await full(c);
  assert.deepEqual(await c.getHotRegions(), [], 'a full checkpoint records no heat');
  // Region 3: 10 pages in every epoch 2..6. Region 0: 100 pages in epoch 2 only.
  // Region 12: 5 pages in epochs 5 and 6. Region 7: 40 pages in epoch 6 only.
  // Epoch 6 also writes one run across the 9|10 boundary: 2 pages in 9, 3 in 10.
  await incremental(c, 2, [inRegion(3, 10), inRegion(0, 100)]);
  await incremental(c, 3, [inRegion(3, 10, 20)]);
  await incremental(c, 4, [inRegion(3, 10, 40)]);
  await incremental(c, 5, [inRegion(3, 10), inRegion(12, 5)]);
  await incremental(c, 6, [inRegion(3, 10), inRegion(12, 5, 100), inRegion(7, 40), { offset: 10 * MB2 - 2 * PAGE, length: 5 * PAGE }]);
  const expected = [
    { offset: 7 * MB2, score: 40 },
    { offset: 3 * MB2, score: 10 * (1 + 1 / 2 + 1 / 4 + 1 / 8 + 1 / 16) },
    { offset: 12 * MB2, score: 5 + 5 / 2 },
    { offset: 0, score: 100 / 16 },
    { offset: 10 * MB2, score: 3 },
    { offset: 9 * MB2, score: 2 },
  ];
  assert.deepEqual(await c.getHotRegions(), expected);
  assert.deepEqual(await c.getHotRegions(1), expected, 'explicit generation');
  assert.deepEqual(await c.getHotRegions(1, 2), expected.slice(0, 2), 'limit');
  await c.close();
  // heat.bin is written by the apply, which follows the acknowledgement (GET_HOT served the pending epoch from memory).
  await (await s.store.gen('hotvm', 1)).pendingApply;
  const genDir = path.join(s.store.dir, 'vms', 'hotvm', 'gen-1');
  assert.ok(fs.existsSync(path.join(genDir, HEAT_FILE)));
  assert.deepEqual(decodeHeat(fs.readFileSync(path.join(genDir, HEAT_FILE))).map((e) => e.epoch), [2, 3, 4, 5, 6]);

  // A reader (generation 0 = newest) gets the same; an unknown generation is an error reply, not a dead connection.
  const r = await connect(s.address, 'hotvm', 0, 'reader');
  assert.deepEqual(await r.getHotRegions(), expected);
  await assert.rejects(r.getHotRegions(9), (e: unknown) => (e as { code?: string }).code === 'HYDRA_STORE_NO_GENERATION');
  assert.equal((await r.getMeta())?.committedEpoch, 6);
  await r.close();

  // The record survives a restart of the store.
  await s.close();
  const s2 = await start(s.store.dir);
  const r2 = await connect(s2.address, 'hotvm', 0, 'reader');
  assert.deepEqual(await r2.getHotRegions(), expected);
  await r2.close();
});

test('the heat record is bounded to the last HEAT_EPOCHS epochs', async () => {
  const s = await start();
  const c = await connect(s.address, 'bounded', 1);
  await full(c);
  // Epoch e writes 8 pages in region e-2 only (epochs 2..13: regions 0..11).
  for (let e = 2; e <= 13; e++) await incremental(c, e, [inRegion(e - 2, 8)]);
  const hot = await c.getHotRegions();
  assert.equal(hot.length, HEAT_EPOCHS);
  // Newest first: epochs 13..6, regions 11..4, halving each epoch back.
  assert.deepEqual(order(hot), [11, 10, 9, 8, 7, 6, 5, 4]);
  assert.deepEqual(hot.map((h) => h.score), [8, 4, 2, 1, 0.5, 0.25, 0.125, 0.0625]);
  await c.close();
  await (await s.store.gen('bounded', 1)).pendingApply;
  const file = path.join(s.store.dir, 'vms', 'bounded', 'gen-1', HEAT_FILE);
  const rec = decodeHeat(fs.readFileSync(file));
  assert.deepEqual(rec.map((e) => e.epoch), [6, 7, 8, 9, 10, 11, 12, 13]);
  assert.equal(fs.statSync(file).size, 16 + HEAT_EPOCHS * (8 + 6), 'one region per epoch, 8 epochs');
});

test('a corrupt or unwritable heat record is ignored: commits, GET_HOT and recovery go on', async () => {
  const s = await start();
  const c = await connect(s.address, 'corrupt', 1);
  await full(c);
  await incremental(c, 2, [inRegion(1, 4)]);
  await incremental(c, 3, [inRegion(2, 4)]);
  assert.deepEqual(order(await c.getHotRegions()), [2, 1]);
  // The file is the apply's to write, after the acknowledgement: let it finish before touching the file.
  await (await s.store.gen('corrupt', 1)).pendingApply;
  const genDir = path.join(s.store.dir, 'vms', 'corrupt', 'gen-1');
  const file = path.join(genDir, HEAT_FILE);

  // A flipped byte: GET_HOT answers "no heat" (not an error), the next commit starts a fresh record.
  const bytes = fs.readFileSync(file);
  bytes[bytes.length - 1]! ^= 0xff;
  fs.writeFileSync(file, bytes);
  assert.deepEqual(await c.getHotRegions(), []);
  await incremental(c, 4, [inRegion(5, 4)]);
  assert.deepEqual(order(await c.getHotRegions()), [5]);

  // Garbage, then a restart (recovery): still no error anywhere.
  await (await s.store.gen('corrupt', 1)).pendingApply;
  fs.writeFileSync(file, 'not a heat record');
  await c.close();
  await s.close();
  const s2 = await start(s.store.dir);
  const c2 = await connect(s2.address, 'corrupt', 1);
  assert.deepEqual(await c2.getHotRegions(), []);
  assert.equal((await c2.getMeta())?.committedEpoch, 4);

  // Unwritable (a directory in its place): the commit still succeeds, the image advances.
  fs.rmSync(file);
  fs.mkdirSync(file);
  await incremental(c2, 5, [inRegion(6, 4)]);
  await (await s2.store.gen('corrupt', 1)).pendingApply;
  assert.equal((await c2.getMeta())?.committedEpoch, 5);
  assert.deepEqual(await c2.getHotRegions(), []);
  assert.deepEqual(fs.readdirSync(genDir).filter((n) => n.includes('.tmp')), [], 'no temp file left behind');
  fs.rmdirSync(file);
  await incremental(c2, 6, [inRegion(7, 4)]);
  assert.deepEqual(order(await c2.getHotRegions()), [7]);
  await c2.close();
});

test('a checkpoint replayed by recovery is recorded too', async () => {
  const dir = tmpDir();
  // The store dies while applying epoch 3 (after its journal was durable): recovery replays it.
  const proc = await spawnStore(dir, { HYDRAVM_STORE_CRASH_AT: 'apply-fsync:2' });
  const c = await connect(proc.address, 'replay', 1);
  await full(c);
  await incremental(c, 2, [inRegion(1, 4)]);
  await incremental(c, 3, [inRegion(4, 9)]).catch(() => undefined);
  assert.equal(await proc.exited, 'SIGKILL');
  await c.close().catch(() => undefined);
  const s = await start(dir);
  const r = await connect(s.address, 'replay', 0, 'reader');
  assert.equal((await r.getMeta())?.committedEpoch, 3);
  assert.deepEqual(await r.getHotRegions(), [{ offset: 4 * MB2, score: 9 }, { offset: 1 * MB2, score: 2 }]);
  await r.close();
});

test('getHotRegions against a store without the feature rejects without sending anything', async () => {
  const s = await start();
  const c = await connect(s.address, 'oldstore', 1);
  assert.deepEqual(c.welcome.features, ['hot', 'data-runs']);
  c.welcome.features = undefined; // what an older store's WELCOME looks like
  await assert.rejects(c.getHotRegions(), (e: unknown) => (e as { code?: string }).code === 'HYDRA_STORE_UNSUPPORTED');
  assert.equal(await c.getMeta(), null, 'the connection is still in step');
  await c.close();
});
