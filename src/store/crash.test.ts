/**
 * Crash consistency: the store runs as a separate process with
 * HYDRAVM_STORE_CRASH_AT=<point>:<n> and SIGKILLs itself there while a
 * checkpointer streams a full checkpoint and incrementals. After a restart
 * (without the env) the image, device state and meta must be exactly the
 * epoch being committed or the one before, never a mix, and the store must
 * accept the next checkpoint.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { StoreClient } from '../protocol/index.js';
import { CRASH_POINTS } from './faults.js';
import { startStoreServer } from './server.js';
import { PAGE, SECRET, applyToBuffer, makeIncremental, prng, sha256, spawnStore, tmpDir } from '../../test/support/store-data.js';

const RAM = 2 * 1024 * 1024;
const EPOCHS = 4;

/** Expected image and device state after each epoch (index = epoch). */
const expected: { mem: string; ds: Buffer }[] = [{ mem: '', ds: Buffer.alloc(0) }];
const incrementals = new Map<number, ReturnType<typeof makeIncremental>>();
{
  const img = prng(1, RAM);
  expected.push({ mem: sha256(img), ds: prng(1001, 5000) });
  for (let e = 2; e <= EPOCHS; e++) {
    const inc = makeIncremental(RAM, 60 + 10 * e, 500 + e, 8);
    incrementals.set(e, inc);
    applyToBuffer(img, inc.runs, inc.data);
    expected.push({ mem: sha256(img), ds: prng(1000 + e, 5000 + e) });
  }
}

/** Send epochs 1..EPOCHS; returns the epoch in flight when the store died (EPOCHS+1 if it never did). */
async function drive(address: string): Promise<number> {
  let c: StoreClient;
  try {
    c = await StoreClient.connect({ address, secret: SECRET, vm: 'crashvm', generation: 1, role: 'checkpointer', timeoutMs: 5000 });
  } catch {
    return 1;
  }
  let epoch = 1;
  try {
    await c.begin(1, 'full', { ramSize: RAM, config: { n: 1 } });
    const img = prng(1, RAM);
    await c.sendPages([{ offset: 0, length: RAM / 2 }], img.subarray(0, RAM / 2));
    await c.sendPages([{ offset: RAM / 2, length: RAM / 2 }], img.subarray(RAM / 2));
    await c.sendDeviceState(expected[1]!.ds);
    await c.commit();
    for (epoch = 2; epoch <= EPOCHS; epoch++) {
      const inc = incrementals.get(epoch)!;
      await c.begin(epoch, 'incremental', { ramSize: RAM });
      // Three PAGES frames per checkpoint.
      const third = Math.ceil(inc.runs.length / 3);
      let dpos = 0;
      for (let i = 0; i < inc.runs.length; i += third) {
        const part = inc.runs.slice(i, i + third);
        const n = part.reduce((s, r) => s + r.length, 0);
        await c.sendPages(part, inc.data.subarray(dpos, dpos + n));
        dpos += n;
      }
      await c.sendDeviceState(expected[epoch]!.ds);
      await c.sendDisks([`disk-${epoch}`]);
      await c.commit();
    }
    await c.close();
    return EPOCHS + 1;
  } catch (err) {
    assert.equal((err as { code?: string }).code, 'HYDRA_STORE_CONNECTION_LOST', (err as Error).message);
    return epoch;
  }
}

/** Occurrences to crash at, per point (chosen to land in different checkpoints and record types). */
const NTH: Record<string, number[]> = {
  'journal-append': [1, 2, 4, 6, 9],
  'journal-fsync': [1, 2],
  'apply-write': [1, 5, 30],
  'apply-fsync': [1, 3],
  'devstate-write': [1, 2],
  'devstate-fsync': [1, 2, 3],
  'meta-write': [1, 2, 3],
  'meta-rename': [1, 2],
  'meta-dirsync': [1, 3],
  'journal-reset': [1, 2],
  'full-write': [1, 2],
  'full-fsync': [1],
};

test('crash consistency at every crash point', { timeout: 120_000 }, async () => {
  assert.deepEqual(Object.keys(NTH).sort(), [...CRASH_POINTS].sort(), 'every crash point is exercised');
  const cases = Object.entries(NTH).flatMap(([point, ns]) => ns.map((n) => `${point}:${n}`));
  const results: string[] = [];
  const runCase = async (spec: string) => {
    const dir = tmpDir('hydra-crash-');
    const { address, exited, kill } = await spawnStore(dir, { HYDRAVM_STORE_CRASH_AT: spec });
    const inFlight = await drive(address);
    if (inFlight > EPOCHS) kill();
    assert.equal(await exited, 'SIGKILL', `${spec}: the store died by SIGKILL`);
    // Restart without crash injection (in this process): recovery runs at start.
    const s = await startStoreServer({ dir, listen: '127.0.0.1:0', secret: SECRET, faultInjection: '' });
    try {
      const c = await StoreClient.connect({ address: s.address, secret: SECRET, vm: 'crashvm', generation: 1, role: 'checkpointer' });
      const meta = await c.getMeta();
      const committed = meta?.committedEpoch ?? 0;
      const allowed = inFlight <= EPOCHS ? [inFlight - 1, inFlight] : [EPOCHS];
      assert.ok(allowed.includes(committed), `${spec}: committed epoch ${committed}, expected one of ${allowed} (died during epoch ${inFlight})`);
      if (committed > 0) {
        const genDir = path.join(dir, 'vms', 'crashvm', 'gen-1');
        const mem = fs.readFileSync(path.join(genDir, meta!.memoryFile));
        assert.equal(mem.length, RAM);
        assert.equal(sha256(mem), expected[committed]!.mem, `${spec}: memory image is exactly epoch ${committed}`);
        assert.ok(fs.readFileSync(path.join(genDir, meta!.devstate.file)).equals(expected[committed]!.ds), `${spec}: device state is epoch ${committed}`);
        assert.deepEqual(meta!.disks, committed >= 2 ? [`disk-${committed}`] : []);
        const journal = path.join(genDir, 'journal');
        if (fs.existsSync(journal)) assert.equal(fs.statSync(journal).size, 16, `${spec}: journal reset after recovery`);
        const leftovers = fs.readdirSync(genDir).filter((n) => !['journal', 'meta.json', 'heat.bin', meta!.memoryFile, meta!.devstate.file].includes(n));
        assert.deepEqual(leftovers, [], `${spec}: no stray files`);
        // The store accepts the next checkpoint.
        const next = committed + 1;
        await c.begin(next, 'incremental', { ramSize: RAM });
        await c.sendPages([{ offset: 0, length: PAGE }], Buffer.alloc(PAGE, 0xab));
        await c.sendDeviceState(Buffer.from('next'));
        assert.equal((await c.commit()).epoch, next);
      } else {
        // Nothing committed: the full checkpoint can be redone from scratch.
        await c.begin(1, 'full', { ramSize: RAM });
        await c.sendPages([{ offset: 0, length: PAGE }], Buffer.alloc(PAGE, 1));
        await c.sendDeviceState(Buffer.from('ds'));
        await c.commit();
        const mem = fs.readFileSync(path.join(dir, 'vms', 'crashvm', 'gen-1', 'memory.img'));
        assert.ok(mem.subarray(PAGE).every((b) => b === 0), `${spec}: a redone full checkpoint starts from a clean image`);
      }
      await c.close();
      results.push(`${spec} died@${inFlight <= EPOCHS ? inFlight : '-'} -> ${committed}`);
    } finally {
      await s.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  };
  // Three at a time.
  const queue = [...cases];
  await Promise.all(Array.from({ length: 3 }, async () => {
    while (queue.length) await runCase(queue.shift()!);
  }));
  console.log(`# crash cases (${results.length}): ${results.sort().join('; ')}`);
  assert.equal(results.length, cases.length);
});
