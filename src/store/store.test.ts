import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { Registry } from 'prom-client';
import { StoreClient, encodeFrame, FrameType, FrameDecoder } from '../protocol/index.js';
import { startStoreServer, openVmImage, listVms, dropGeneration, fenceGeneration, type StoreServer } from './index.js';
import { PAGE, SECRET, commitFullCheckpoint, applyToBuffer, makeIncremental, prng, sha256, spawnStore, tmpDir } from '../../test/support/store-data.js';

const code = (c: string) => (e: unknown) => {
  assert.equal((e as { code?: string }).code, c, (e as Error).message);
  return true;
};

const servers: StoreServer[] = [];
after(async () => {
  for (const s of servers) await s.close();
});

async function start(dir = tmpDir(), registry?: Registry): Promise<StoreServer> {
  const s = await startStoreServer({ dir, listen: '127.0.0.1:0', secret: SECRET, ...(registry ? { metricsRegistry: registry } : {}) });
  servers.push(s);
  return s;
}

function connect(s: StoreServer, vm: string, generation: number, role: 'checkpointer' | 'reader' = 'checkpointer', secret = SECRET) {
  return StoreClient.connect({ address: s.address, secret, vm, generation, role, timeoutMs: 5000 });
}

test('end to end: 64 MB full checkpoint + incrementals, byte for byte', async () => {
  const registry = new Registry();
  const s = await start(tmpDir(), registry);
  const RAM = 64 * 1024 * 1024;
  const expected = prng(1, RAM);
  // Leave a zero hole: pages 100..4195 (16 MB) never sent.
  const HOLE = 4096 * PAGE;
  expected.fill(0, 100 * PAGE, 100 * PAGE + HOLE);
  const c = await connect(s, 'web1', 1);
  assert.equal(c.committedEpoch, null);
  await c.begin(1, 'full', { ramSize: RAM, config: { spec: { name: 'web1' } } });
  await c.sendPages([{ offset: 0, length: 100 * PAGE }, { offset: 100 * PAGE + HOLE, length: RAM - 100 * PAGE - HOLE }], Buffer.concat([expected.subarray(0, 100 * PAGE), expected.subarray(100 * PAGE + HOLE)]));
  const ds1 = prng(11, 32 * 1024);
  await c.sendDeviceState(ds1);
  await c.sendDisks(['layer-1']);
  const r1 = await c.commit();
  assert.equal(r1.epoch, 1);
  assert.ok(r1.durableAt > 0 && r1.applyMs >= 0);

  let ds = ds1;
  for (let e = 2; e <= 6; e++) {
    const inc = makeIncremental(RAM, 200 + e * 50, e);
    applyToBuffer(expected, inc.runs, inc.data);
    ds = prng(100 + e, 30 * 1024 + e);
    await c.begin(e, 'incremental', { ramSize: RAM });
    // send in two halves to exercise several PAGES frames
    const half = Math.floor(inc.runs.length / 2);
    const firstBytes = inc.runs.slice(0, half).reduce((n, r) => n + r.length, 0);
    await c.sendPages(inc.runs.slice(0, half), inc.data.subarray(0, firstBytes));
    await c.sendPages(inc.runs.slice(half), inc.data.subarray(firstBytes));
    await c.sendDeviceState(ds);
    await c.sendDisks([`layer-${e}`]);
    const r = await c.commit();
    assert.equal(r.epoch, e);
  }
  const meta = await c.getMeta();
  assert.ok(meta);
  assert.equal(meta.committedEpoch, 6);
  assert.equal(meta.generation, 1);
  assert.equal(meta.ramSize, RAM);
  assert.deepEqual(meta.disks, ['layer-6']);
  assert.deepEqual(meta.config, { spec: { name: 'web1' } });
  await c.close();

  const img = await openVmImage(s.store.dir, 'web1');
  assert.equal(img.generation, 1);
  assert.equal(img.meta.committedEpoch, 6);
  const onDisk = fs.readFileSync(img.memoryPath);
  assert.equal(onDisk.length, RAM);
  assert.ok(onDisk.equals(expected), 'memory.img equals the expected RAM');
  assert.ok(fs.readFileSync(img.devstatePath).equals(ds), 'devstate equals');
  assert.equal(path.basename(img.memoryPath), 'memory.img');
  // Only the committed devstate file remains (beside the advisory heat record); the journal is empty.
  const files = fs.readdirSync(path.dirname(img.memoryPath)).sort();
  assert.deepEqual(files, ['devstate-6.bin', 'heat.bin', 'journal', 'memory.img', 'meta.json']);
  assert.equal(fs.statSync(path.join(path.dirname(img.memoryPath), 'journal')).size, 16);
  // Sparse: most of the never-written hole takes no blocks (incrementals may have written into it).
  const st = fs.statSync(img.memoryPath);
  assert.ok(st.blocks * 512 <= RAM - HOLE / 2, `memory.img is sparse (${st.blocks * 512} bytes allocated)`);

  // Reader role over the network.
  const rd = await connect(s, 'web1', 0, 'reader');
  assert.equal(rd.welcome.generation, 1);
  const rm = await rd.getMeta();
  assert.equal(rm?.committedEpoch, 6);
  const runs = [{ offset: 0, length: 3 * PAGE }, { offset: 150 * PAGE, length: PAGE }, { offset: RAM - 40 * 1024 * 1024, length: 40 * 1024 * 1024 }];
  const got = await rd.readPages(runs);
  assert.ok(got.equals(Buffer.concat(runs.map((r) => expected.subarray(r.offset, r.offset + r.length)))));
  assert.ok((await rd.getDeviceState()).equals(ds));
  await assert.rejects(rd.begin(7, 'incremental', { ramSize: RAM }), /reader/);
  await rd.close().catch(() => undefined);

  const vms = await listVms(s.store.dir);
  assert.deepEqual(vms.map((v) => [v.vm, v.highestGeneration, v.generations.map((g) => g.committedEpoch)]), [['web1', 1, [6]]]);

  const metrics = await registry.getSingleMetricAsString('hydravm_store_committed_epoch');
  assert.match(metrics, /hydravm_store_committed_epoch\{vm="web1"\} 6/);
  assert.match(await registry.getSingleMetricAsString('hydravm_store_commits_total'), /\{vm="web1"\} 6/);
});

test('40 MB incremental checkpoints commit in sequence and read back exactly (store in its own process; speed is measured by bench checkpoint)', async () => {
  const proc = await spawnStore(tmpDir());
  try {
    const RAM = 512 * 1024 * 1024;
    const c = await StoreClient.connect({ address: proc.address, secret: SECRET, vm: 'perf', generation: 1, role: 'checkpointer' });
    await c.begin(1, 'full', { ramSize: RAM });
    const chunk = prng(5, 64 * 1024 * 1024);
    for (let off = 0; off < 128 * 1024 * 1024; off += chunk.length) await c.sendPages([{ offset: off, length: chunk.length }], chunk);
    await c.sendDeviceState(prng(6, 32 * 1024));
    await c.commit();
    const times: { total: number; commit: number }[] = [];
    let last: { runs: { offset: number; length: number }[]; data: Buffer } | undefined;
    for (let e = 2; e <= 7; e++) {
      const inc = makeIncremental(RAM, (40 * 1024 * 1024) / PAGE, e * 13, 64);
      await new Promise((r) => setTimeout(r, 200)); // checkpoints come every 1-2 s: let the previous apply finish
      const t0 = performance.now();
      await c.begin(e, 'incremental', { ramSize: RAM });
      await c.sendPages(inc.runs, inc.data);
      await c.sendDeviceState(prng(e, 32 * 1024));
      const t1 = performance.now();
      await c.commit();
      const t2 = performance.now();
      times.push({ total: t2 - t0, commit: t2 - t1 });
      last = inc;
    }
    // Visible to readers (after the apply) right away.
    const m = await c.getMeta();
    assert.equal(m?.committedEpoch, 7);
    assert.ok((await c.readPages(last!.runs)).equals(last!.data), 'the last incremental reads back byte for byte');
    await c.close();
    const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
    const summary = { beginToCommittedMs: Math.round(med(times.map((t) => t.total))), commitToCommittedMs: Math.round(med(times.map((t) => t.commit))), all: times.map((t) => Math.round(t.total)) };
    console.log(`# 40 MB incremental checkpoint, median of ${times.length}: ${JSON.stringify(summary)}`);
  } finally {
    proc.kill('SIGTERM');
    await proc.exited;
  }
});

test('wrong secret is refused with a clear error', async () => {
  const s = await start();
  await assert.rejects(connect(s, 'vm1', 1, 'checkpointer', 'wrong'), (e: unknown) => code('HYDRA_STORE_AUTH_FAILED')(e) && /secret/.test((e as Error).message));
});

test('version mismatch names both versions', async () => {
  const s = await start();
  await assert.rejects(
    StoreClient.connect({ address: s.address, secret: SECRET, vm: 'vm1', generation: 1, role: 'checkpointer', versions: [5, 6] }),
    (e: unknown) => code('HYDRA_PROTOCOL_VERSION')(e) && /5-6/.test((e as Error).message) && /2-2/.test((e as Error).message),
  );
});

test('a non-HydraVM peer gets a bad-magic error', async () => {
  const s = await start();
  const [host, port] = [s.address.split(':')[0]!, Number(s.address.split(':')[1])];
  const sock = net.connect({ host, port });
  const d = new FrameDecoder();
  const frames: ReturnType<FrameDecoder['push']> = [];
  sock.on('data', (b) => frames.push(...d.push(b)));
  sock.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
  await new Promise((r) => sock.on('close', r));
  assert.equal(frames[0]?.type, FrameType.ERROR);
  assert.match(frames[0]!.payload.toString(), /HYDRA_PROTOCOL_BAD_MAGIC/);
});


test('fencing: stale generation refused, newer generation fences a connected older checkpointer', async () => {
  const s = await start();
  const RAM = 1024 * 1024;
  const g1 = await connect(s, 'vmf', 1);
  await commitFullCheckpoint(g1, 1, RAM, 3);
  let g2 = await connect(s, 'vmf', 2);
  assert.equal(g2.welcome.highestGeneration, 2);
  // The old primary, still connected, may no longer checkpoint.
  await assert.rejects(g1.begin(2, 'incremental', { ramSize: RAM }), code('HYDRA_STORE_STALE_GENERATION'));
  // Nor reconnect.
  await assert.rejects(connect(s, 'vmf', 1), code('HYDRA_STORE_STALE_GENERATION'));
  // A second checkpointer for the same generation takes over the slot: the first connection is closed.
  const g2b = await connect(s, 'vmf', 2);
  await assert.rejects(g2.begin(1, 'incremental', { ramSize: RAM }), code('HYDRA_STORE_CONNECTION_LOST'));
  g2 = g2b;
  // The new generation needs a full checkpoint first.
  await assert.rejects(g2.begin(1, 'incremental', { ramSize: RAM }), code('HYDRA_STORE_NO_BASE_IMAGE'));
  const img2 = await commitFullCheckpoint(g2, 1, RAM, 9);
  // Older generation stays readable until dropped.
  const old = await openVmImage(s.store.dir, 'vmf', 1);
  assert.ok(fs.readFileSync(old.memoryPath).equals(prng(3, RAM)));
  const cur = await openVmImage(s.store.dir, 'vmf');
  assert.equal(cur.generation, 2);
  assert.ok(fs.readFileSync(cur.memoryPath).equals(img2));
  await assert.rejects(dropGeneration(s.store.dir, 'vmf', 1), code('HYDRA_STORE_GENERATION_BUSY'));
  await g1.close().catch(() => undefined);
  await new Promise((r) => setTimeout(r, 50));
  await dropGeneration(s.store.dir, 'vmf', 1);
  await assert.rejects(openVmImage(s.store.dir, 'vmf', 1), code('HYDRA_STORE_NO_GENERATION'));
  // Offline fencing (a restore agent registering generation 3) stops generation 2 at its next BEGIN.
  await fenceGeneration(s.store.dir, 'vmf', 3);
  await assert.rejects(g2.begin(2, 'incremental', { ramSize: RAM }), code('HYDRA_STORE_STALE_GENERATION'));
  await g1.close().catch(() => undefined);
  await g2.close().catch(() => undefined);
});

test('epoch rules and a checkpoint without device state', async () => {
  const s = await start();
  const RAM = 1024 * 1024;
  const c = await connect(s, 'vme', 1);
  await commitFullCheckpoint(c, 1, RAM, 4);
  await assert.rejects(c.begin(3, 'incremental', { ramSize: RAM }), (e: unknown) => code('HYDRA_STORE_EPOCH_MISMATCH')(e) && /next must be 2/.test((e as Error).message));
  await assert.rejects(c.begin(2, 'incremental', { ramSize: RAM * 2 }), code('HYDRA_STORE_RAM_SIZE_MISMATCH'));
  await c.begin(2, 'incremental', { ramSize: RAM });
  await c.sendPages([{ offset: 0, length: PAGE }], Buffer.alloc(PAGE, 7));
  await assert.rejects(c.commit(), code('HYDRA_STORE_NO_DEVSTATE'));
  // Misaligned run: unsolicited error, then commit rejects with it.
  await c.begin(2, 'incremental', { ramSize: RAM });
  await c.sendPages([{ offset: 100, length: PAGE }], Buffer.alloc(PAGE, 7));
  await c.sendDeviceState(Buffer.from('x'));
  await assert.rejects(c.commit(), code('HYDRA_STORE_BAD_RUN'));
  // After failures the store still works and epoch 1 is intact.
  const inc = makeIncremental(RAM, 10, 77);
  await c.begin(2, 'incremental', { ramSize: RAM });
  await c.sendPages(inc.runs, inc.data);
  await c.sendDeviceState(Buffer.from('ds2'));
  assert.equal((await c.commit()).epoch, 2);
  const expected = prng(4, RAM);
  applyToBuffer(expected, inc.runs, inc.data);
  const img = await openVmImage(s.store.dir, 'vme');
  assert.ok(fs.readFileSync(img.memoryPath).equals(expected));
  // A second full checkpoint in the same generation replaces the image atomically (new file).
  const img3 = await commitFullCheckpoint(c, 3, RAM, 21);
  const after3 = await openVmImage(s.store.dir, 'vme');
  assert.equal(path.basename(after3.memoryPath), 'memory-3.img');
  assert.ok(fs.readFileSync(after3.memoryPath).equals(img3));
  assert.ok(!fs.existsSync(img.memoryPath), 'the replaced image file is removed');
  await c.close();
});

test('peer disappearing mid-checkpoint: partial checkpoint discarded, client rejects pending', async () => {
  const s = await start();
  const RAM = 4 * 1024 * 1024;
  const c = await connect(s, 'vmd', 1);
  const base = await commitFullCheckpoint(c, 1, RAM, 8);
  await c.begin(2, 'incremental', { ramSize: RAM });
  await c.sendPages([{ offset: 0, length: RAM / 2 }], prng(99, RAM / 2));
  // Kill the connection abruptly from the client side in the middle of a frame.
  const sock = (c as unknown as { sock: net.Socket }).sock;
  sock.write(encodeFrame(FrameType.PAGES, Buffer.alloc(100)).subarray(0, 30));
  const pending = c.commit();
  sock.destroy();
  await assert.rejects(pending, code('HYDRA_STORE_CONNECTION_LOST'));
  await assert.rejects(c.sendDeviceState(Buffer.from('x')), code('HYDRA_STORE_CONNECTION_LOST'));
  // The store lets a new checkpointer connection in and still holds epoch 1.
  await new Promise((r) => setTimeout(r, 50));
  const c2 = await connect(s, 'vmd', 1);
  assert.equal(c2.committedEpoch, 1);
  const img = await openVmImage(s.store.dir, 'vmd');
  assert.ok(fs.readFileSync(img.memoryPath).equals(base));
  await c2.close();
});

test('store closing mid-request rejects the client with a clear error', async () => {
  const s = await start();
  const c = await connect(s, 'vmz', 1);
  await c.begin(1, 'full', { ramSize: 1024 * 1024 });
  const p = assert.rejects(c.commit(), code('HYDRA_STORE_CONNECTION_LOST'));
  await s.close();
  await p;
});

test('corrupt meta: the VM is refused, not reset', async () => {
  const dir = tmpDir();
  let s = await start(dir);
  const c = await connect(s, 'vmc', 1);
  await commitFullCheckpoint(c, 1, 1024 * 1024, 5);
  await c.close();
  await s.close();
  const metaPath = path.join(dir, 'vms', 'vmc', 'gen-1', 'meta.json');
  const text = fs.readFileSync(metaPath, 'utf8');
  fs.writeFileSync(metaPath, text.replace('"committedEpoch":1', '"committedEpoch":7'));
  s = await start(dir);
  await assert.rejects(connect(s, 'vmc', 1), (e: unknown) => code('HYDRA_STORE_META_CORRUPT')(e) && /meta.json/.test((e as Error).message));
  await assert.rejects(openVmImage(dir, 'vmc'), code('HYDRA_STORE_META_CORRUPT'));
  assert.equal(fs.readFileSync(metaPath, 'utf8'), text.replace('"committedEpoch":1', '"committedEpoch":7'), 'meta left as found');
  fs.writeFileSync(metaPath, '{"format":"hydravm-image-meta",');
  await assert.rejects(openVmImage(dir, 'vmc'), code('HYDRA_STORE_META_CORRUPT'));
});

test('two VMs checkpoint concurrently', async () => {
  const s = await start();
  const RAM = 8 * 1024 * 1024;
  const run = async (vm: string, seed: number) => {
    const c = await connect(s, vm, 1);
    const img = await commitFullCheckpoint(c, 1, RAM, seed);
    for (let e = 2; e <= 4; e++) {
      const inc = makeIncremental(RAM, 300, seed * 10 + e);
      applyToBuffer(img, inc.runs, inc.data);
      await c.begin(e, 'incremental', { ramSize: RAM });
      await c.sendPages(inc.runs, inc.data);
      await c.sendDeviceState(Buffer.from(`${vm}-${e}`));
      await c.commit();
    }
    await c.close();
    return img;
  };
  const [a, b] = await Promise.all([run('alpha', 31), run('beta', 47)]);
  assert.equal(sha256(fs.readFileSync((await openVmImage(s.store.dir, 'alpha')).memoryPath)), sha256(a));
  assert.equal(sha256(fs.readFileSync((await openVmImage(s.store.dir, 'beta')).memoryPath)), sha256(b));
});
