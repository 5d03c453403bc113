import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { Dirtier, PAGE, dirtierPool, ensureNativeBuilt } from '../../test/fixtures/dirtier.js';
import { TrackerError } from '../errors.js';
import { DirtyTracker } from '../tracker/index.js';
import { MissingPageHandler } from './page-fault-handler.js';

const pool = dirtierPool();
const dirtier = pool.start;
const handlers: MissingPageHandler[] = [];
async function handler(pid: number): Promise<MissingPageHandler> {
  const h = await MissingPageHandler.attach(pid);
  handlers.push(h);
  return h;
}
const settled = <T>(p: Promise<T>, ms: number) => Promise.race([p.then(() => true, () => true), new Promise<boolean>((r) => setTimeout(() => r(false), ms))]);

before(() => {
  ensureNativeBuilt();
});
after(async () => {
  for (const h of handlers) h.close();
  await pool.killAll();
});

describe('MissingPageHandler', () => {
  it('a touch of a missing page blocks until fill() serves it; the process sees the data', async () => {
    const d = await dirtier(256);
    const h = await handler(d.pid);
    assert.equal(h.ramSize, 256 * PAGE);
    assert.equal(h.isPopulated(5 * PAGE), false);

    const read = d.read(5);
    assert.equal(await settled(read, 150), false, 'the reader is blocked on the missing page');
    const faults = await h.waitFaults(2000);
    assert.deepEqual(faults, [5 * PAGE]);
    const r = h.fill(5 * PAGE, Dirtier.expectedPage(5, 77));
    assert.deepEqual(r, { copied: true, bytes: PAGE, existed: 0 });
    assert.deepEqual(await read, { index: 5, tag: 77, byte: (5 + 77) & 0xff });
    assert.equal(h.isPopulated(5 * PAGE), true);
    assert.equal(h.nextMissing(5 * PAGE), 6 * PAGE);
    assert.equal(h.nextMissing(0), 0);
  });

  it('fills a run around a fault, skipping pages already there, and wakes the waiter', async () => {
    const d = await dirtier(256);
    const h = await handler(d.pid);
    h.fill(20 * PAGE, Dirtier.expectedPage(20, 1)); // already in before the fault
    const read = d.read(18);
    const faults = await h.waitFaults(2000);
    assert.deepEqual(faults, [18 * PAGE]);
    const run = Buffer.concat(Array.from({ length: 16 }, (_, i) => Dirtier.expectedPage(16 + i, 2)));
    // Odd source offset: UFFDIO_COPY does not need an aligned source.
    const src = Buffer.alloc(run.length + 1);
    run.copy(src, 1);
    const r = h.fill(16 * PAGE, src, 1, run.length);
    assert.deepEqual(r, { copied: false, bytes: 15 * PAGE, existed: PAGE });
    assert.deepEqual(await read, { index: 18, tag: 2, byte: 20 });
    assert.deepEqual((await d.read(20)).tag, 1, 'the page already there was not overwritten');
    assert.deepEqual((await d.read(31)).tag, 2);
    assert.deepEqual(h.populatedRuns(), [{ offset: 16 * PAGE, length: 16 * PAGE }]);
    assert.equal(h.stats.bytesFilled, 16 * PAGE);
  });

  it('times out with [], close() ends a pending wait, and rejects bad ranges', async () => {
    const d = await dirtier(64);
    const h = await MissingPageHandler.attach(d.pid);
    const t0 = Date.now();
    assert.deepEqual(await h.waitFaults(100), []);
    assert.ok(Date.now() - t0 >= 90);
    const pending = h.waitFaults(10_000);
    setTimeout(() => h.close(), 50);
    const t1 = Date.now();
    assert.deepEqual(await pending, []);
    assert.ok(Date.now() - t1 < 5000, 'close() cut the wait short');
    assert.throws(() => h.fill(0, Buffer.alloc(PAGE)), (e: unknown) => e instanceof TrackerError && e.code === 'HYDRA_TRACKER_CLOSED');

    const h2 = await handler(d.pid); // re-attach to the uffd the first one set up
    assert.throws(() => h2.fill(100, Buffer.alloc(PAGE)), (e: unknown) => e instanceof TrackerError && e.code === 'HYDRA_TRACKER_BAD_RANGE');
    assert.throws(() => h2.fill(64 * PAGE, Buffer.alloc(PAGE)), (e: unknown) => e instanceof TrackerError && e.code === 'HYDRA_TRACKER_BAD_RANGE');
  });

  it('a new handler takes over faults left waiting by a closed one', async () => {
    const d = await dirtier(64);
    const h1 = await MissingPageHandler.attach(d.pid);
    const read = d.read(9);
    assert.deepEqual(await h1.waitFaults(2000), [9 * PAGE]);
    h1.close(); // fault read but not served: the reader stays blocked
    assert.equal(await settled(read, 150), false);
    const h2 = await handler(d.pid);
    // The fault was already read from the uffd: the new handler serves by scanning for what is missing.
    assert.equal(h2.nextMissing(0), 0);
    h2.fill(9 * PAGE, Dirtier.expectedPage(9, 5));
    assert.deepEqual(await read, { index: 9, tag: 5, byte: 14 });
  });

  it('rejects with PROCESS_GONE when the process dies during a wait', async () => {
    const d = await dirtier(64);
    const h = await handler(d.pid);
    const w = h.waitFaults(10_000);
    setTimeout(() => void d.kill(), 50);
    await assert.rejects(w, (e: unknown) => e instanceof TrackerError && e.code === 'HYDRA_TRACKER_PROCESS_GONE' && e.message.includes(String(d.pid)));
    assert.throws(() => h.fill(0, Buffer.alloc(PAGE)), (e: unknown) => e instanceof TrackerError && e.code === 'HYDRA_TRACKER_PROCESS_GONE');
  });

  it('after all memory is in and unregister(), the VM can be write-protect tracked with the second uffd', async () => {
    const d = await dirtier(32);
    const h = await handler(d.pid);
    await assert.rejects(DirtyTracker.attach(d.pid), (e: unknown) => e instanceof TrackerError && e.code === 'HYDRA_TRACKER_RANGE_BUSY');
    const all = Buffer.concat(Array.from({ length: 32 }, (_, i) => Dirtier.expectedPage(i, 3)));
    assert.equal(h.fill(0, all).copied, true);
    assert.equal(h.nextMissing(0), -1);
    h.unregister();
    h.close();
    const t = await DirtyTracker.attach(d.pid);
    try {
      assert.ok(t.ram.equals(all));
      await d.write(4, 2, 1, 9);
      assert.deepEqual(t.collect(), [{ offset: 4 * PAGE, length: 2 * PAGE }]);
    } finally {
      t.close();
    }
  });

  it('with a single shim uffd taken for restore, the tracker says none is free', async () => {
    const d = await dirtier(16, { env: { HYDRAVM_SHIM_UFFDS: '1' } });
    const h = await handler(d.pid);
    h.fill(0, Buffer.alloc(16 * PAGE));
    h.unregister();
    await assert.rejects(DirtyTracker.attach(d.pid), (e: unknown) => e instanceof TrackerError && e.code === 'HYDRA_TRACKER_NO_UFFD' && /no free userfaultfd/.test(e.message));
  });
});
