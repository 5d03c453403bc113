import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { Dirtier, PAGE, dirtierPool, ensureNativeBuilt } from '../../test/fixtures/dirtier.js';
import { TrackerError } from '../errors.js';
import { DirtyTracker, type DirtyRun } from './index.js';
import { findGuestRam, parseMaps } from './guest-ram.js';
import { listUffds } from './uffd.js';

/** Merged runs of a set of page numbers. */
function runsOf(pages: Iterable<number>): DirtyRun[] {
  const sorted = [...new Set(pages)].sort((a, b) => a - b);
  const out: DirtyRun[] = [];
  for (const p of sorted) {
    const last = out[out.length - 1];
    if (last && last.offset + last.length === p * PAGE) last.length += PAGE;
    else out.push({ offset: p * PAGE, length: PAGE });
  }
  return out;
}

function pagesOf(first: number, count: number, stride: number): number[] {
  return Array.from({ length: count }, (_, i) => first + i * stride);
}

async function expectTrackerError(p: Promise<unknown> | (() => unknown), code: string, mentions?: RegExp): Promise<TrackerError> {
  try {
    if (typeof p === 'function') await p();
    else await p;
  } catch (err) {
    assert.ok(err instanceof TrackerError, `expected TrackerError ${code}, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    if (mentions) assert.match(err.message, mentions);
    return err;
  }
  assert.fail(`expected TrackerError ${code}, nothing thrown`);
}

const pool = dirtierPool();
const dirtier = pool.start;
const trackers: DirtyTracker[] = [];
async function attach(pid: number): Promise<DirtyTracker> {
  const t = await DirtyTracker.attach(pid);
  trackers.push(t);
  return t;
}

before(() => {
  ensureNativeBuilt();
});
after(async () => {
  for (const t of trackers) t.close();
  await pool.killAll();
});

describe('guest RAM discovery', () => {
  it('parses maps lines with spaces in the path and merges split VMAs', () => {
    const text = [
      '7f0000000000-7f0000200000 rw-s 00000000 00:01 1029                       /memfd:memory-backend-memfd (deleted)',
      '7f0000200000-7f0001000000 rw-s 00200000 00:01 1029                       /memfd:memory-backend-memfd (deleted)',
      '7f0001000000-7f0001001000 rw-p 00000000 00:00 0 ',
    ].join('\n');
    const e = parseMaps(text);
    assert.equal(e.length, 3);
    assert.equal(e[0]!.path, '/memfd:memory-backend-memfd (deleted)');
    assert.equal(e[1]!.offset, 0x200000);
  });

  it('finds the memfd mapping of a process', async () => {
    const d = await dirtier(64, { name: 'ram0' });
    const m = findGuestRam(d.pid);
    assert.equal(m.start, d.address);
    assert.equal(m.size, 64 * PAGE);
    assert.equal(m.path, '/memfd:ram0 (deleted)');
    assert.equal(findGuestRam(d.pid, { ramId: 'ram0' }).start, d.address);
    assert.equal(findGuestRam(d.pid, { ramStart: d.address }).size, 64 * PAGE);
    await expectTrackerError(() => findGuestRam(d.pid, { ramStart: 4096 }), 'HYDRA_TRACKER_NO_RAM', new RegExp(`process ${d.pid}`));
  });

  it('the shim leaves two fresh userfaultfds in the process', async () => {
    const d = await dirtier(16);
    const u = listUffds(d.pid);
    assert.equal(u.length, 2);
    assert.ok(u.every((x) => x.features === 0));
  });
});

describe('DirtyTracker', () => {
  it('reports exactly the pages written, then nothing, then only the new ones', async () => {
    const d = await dirtier(1024);
    const t = await attach(d.pid);
    assert.equal(t.ramSize, 1024 * PAGE);
    assert.deepEqual(t.collect(), [], 'nothing written since arming');

    const round1 = [3, ...pagesOf(10, 5, 1), 100, 1023, 0];
    await d.write(3, 1, 1, 1);
    await d.write(10, 5, 1, 1);
    await d.write(100, 1, 1, 1);
    await d.write(1023, 1, 1, 1);
    await d.write(0, 1, 1, 1);
    const runs = t.collect();
    assert.deepEqual(runs, runsOf(round1));
    assert.deepEqual(runs.slice(0, 2), [{ offset: 0, length: PAGE }, { offset: 3 * PAGE, length: PAGE }]);

    // The copied bytes are what was written, packed in run order.
    const staging = t.allocStaging(64 * PAGE);
    const n = t.copyRuns(runs, staging);
    assert.equal(n, round1.length * PAGE);
    const expected = Buffer.concat([...new Set(round1)].sort((a, b) => a - b).map((p) => Dirtier.expectedPage(p, 1)));
    assert.ok(staging.subarray(0, n).equals(expected), 'staged bytes equal the written pages');

    assert.deepEqual(t.collect(), [], 're-armed: nothing new');
    assert.deepEqual(t.collect(), []);

    await d.write(500, 3, 2, 2); // 500, 502, 504
    await d.write(3, 1, 1, 2); // written again
    assert.deepEqual(t.collect(), runsOf([3, 500, 502, 504]));
    assert.deepEqual(t.collect(), []);
  });

  it('loses nothing on fragmented sets (every other page of 64 MB), however often PAGEMAP_SCAN stops', async () => {
    const pages = 16384;
    const d = await dirtier(pages);
    const t = await attach(d.pid);
    await d.write(0, pages / 2, 2, 7);
    const runs = t.collect();
    assert.equal(runs.length, pages / 2);
    assert.deepEqual(runs, runsOf(pagesOf(0, pages / 2, 2)));
    const calls1 = t.lastCollect.scanCalls;
    assert.ok(calls1 >= 2, `8192 regions with a 4096-entry vector need >= 2 calls, took ${calls1}`);
    assert.deepEqual(t.collect(), []);

    // Tiny vector: many early stops; still exact.
    await d.write(1, pages / 2, 2, 8);
    const flat = t.collectFlat(7);
    assert.ok(t.lastCollect.scanCalls >= pages / 2 / 7, `calls ${t.lastCollect.scanCalls}`);
    assert.equal(flat.length / 2, pages / 2);
    for (let i = 0; i < flat.length; i += 2) {
      assert.equal(flat[i], (1 + i) * PAGE);
      assert.equal(flat[i + 1], PAGE);
    }
    // Runs that merge across calls (vector of 1 region, contiguous pages in chunks of 3).
    await d.write(100, 30, 1, 9);
    const merged = t.collectFlat(1);
    assert.deepEqual([...merged], [100 * PAGE, 30 * PAGE]);
    assert.deepEqual(t.collect(), []);
    t.close();
  });

  it('keeps an image equal to guest RAM across rounds of random writes', async () => {
    const pages = 8192;
    const d = await dirtier(pages);
    const t = await attach(d.pid);
    const image = Buffer.from(t.ram); // full copy right after arming
    const staging = t.allocStaging(pages * PAGE);
    let seed = 12345;
    const rand = () => ((seed = (seed * 1103515245 + 12345) >>> 0) % pages);
    for (let round = 0; round < 6; round++) {
      const written = new Set<number>();
      for (let k = 0; k < 50; k++) {
        const first = rand();
        const count = 1 + (rand() % 20);
        const stride = 1 + (rand() % 3);
        await d.write(first, count, stride, 100 + round);
        for (const p of pagesOf(first, count, stride)) if (p < pages) written.add(p);
      }
      const runs = t.collect();
      assert.deepEqual(runs, runsOf(written), `round ${round}`);
      const n = t.copyRuns(runs, staging);
      let pos = 0;
      for (const r of runs) {
        staging.copy(image, r.offset, pos, pos + r.length);
        pos += r.length;
      }
      assert.equal(pos, n);
      assert.ok(image.equals(t.ram), `image equals RAM after round ${round}`);
    }
  });

  it('walks only the populated 2 MiB chunks of RAM, and finds writes into chunks populated since the last collect', async () => {
    const pages = 262144; // 1 GiB of memfd, sparse
    const MB2 = 2 * 1024 * 1024;
    const d = await dirtier(pages);
    const t = await attach(d.pid);
    assert.deepEqual(t.collect(), []);
    assert.equal(t.scannedBytes, 0, 'nothing populated: nothing to walk');
    await d.write(10, 4, 1, 1);
    await d.write(200000, 1, 1, 1);
    assert.deepEqual(t.collect(), runsOf([10, 11, 12, 13, 200000]));
    assert.equal(t.scannedBytes, 2 * MB2, 'two chunks walked, not 1 GiB');
    // A new chunk, a known one, the last page of RAM, and a run across a chunk boundary.
    await d.write(100000, 2, 1, 2);
    await d.write(11, 1, 1, 2);
    await d.write(pages - 1, 1, 1, 2);
    await d.write(511, 3, 1, 2); // pages 511..513: chunk 0 and chunk 1
    assert.deepEqual(t.collect(), runsOf([11, 100000, 100001, pages - 1, 511, 512, 513]));
    assert.equal(t.scannedBytes, 5 * MB2, 'chunks 0 and 1, and the three new ones');
    assert.deepEqual(t.collect(), []);
    // peekWrittenBytes sees new chunks too (and re-protects nothing).
    await d.write(150000, 3, 1, 3);
    assert.equal(t.peekWrittenBytes(), 3 * PAGE);
    assert.deepEqual(t.collect(), runsOf([150000, 150001, 150002]));
  });

  it('populatedRuns() lists only touched pages; staging is pre-faulted and writable', async () => {
    const d = await dirtier(4096);
    const t = await attach(d.pid);
    assert.deepEqual(t.populatedRuns(), []);
    await d.write(10, 4, 1, 1);
    await d.write(2000, 1, 1, 1);
    assert.deepEqual(t.populatedRuns(), runsOf([10, 11, 12, 13, 2000]));
    const s = t.allocStaging(3 * PAGE + 5);
    assert.equal(s.length, 3 * PAGE + 5);
    s.fill(0xab);
    assert.equal(s[3 * PAGE + 4], 0xab);
  });

  it('copyRuns() refuses runs outside RAM or a dst too small', async () => {
    const d = await dirtier(16);
    const t = await attach(d.pid);
    await expectTrackerError(() => t.copyRuns([{ offset: 15 * PAGE, length: 2 * PAGE }], Buffer.alloc(2 * PAGE)), 'HYDRA_TRACKER_COPY_FAILED', /outside src/);
    await expectTrackerError(() => t.copyRuns([{ offset: 0, length: 2 * PAGE }], Buffer.alloc(PAGE)), 'HYDRA_TRACKER_COPY_FAILED', /dst too small/);
  });

  it('re-attaches after close (the uffd is already set up) and closed trackers refuse', async () => {
    const d = await dirtier(256);
    const t1 = await DirtyTracker.attach(d.pid);
    await d.write(1, 1, 1, 1);
    assert.deepEqual(t1.collect(), runsOf([1]));
    t1.close();
    assert.equal(t1.ram[0], 0, 'released view reads zeros');
    await expectTrackerError(() => t1.collect(), 'HYDRA_TRACKER_CLOSED');
    await d.write(2, 1, 1, 1); // not tracked: nobody attached
    const t2 = await attach(d.pid);
    assert.deepEqual(t2.collect(), []);
    await d.write(7, 2, 1, 1);
    assert.deepEqual(t2.collect(), runsOf([7, 8]));
    assert.equal(listUffds(d.pid).filter((u) => u.features === 0).length, 1, 'still one fresh uffd left');
  });

  it('fails clearly for a process without the shim, without RAM, exited, or exiting under it', async () => {
    const plain = await dirtier(16, { shim: false });
    await expectTrackerError(DirtyTracker.attach(plain.pid), 'HYDRA_TRACKER_NO_UFFD', new RegExp(`process ${plain.pid} has no userfaultfd.*LD_PRELOAD`));

    const disabled = await dirtier(16, { env: { HYDRAVM_SHIM: '0' } });
    await expectTrackerError(DirtyTracker.attach(disabled.pid), 'HYDRA_TRACKER_NO_UFFD');

    // A process with the shim but no shared memfd RAM.
    ensureNativeBuilt();
    const { shimPath } = await import('../native/index.js');
    const sleeper = spawn('sleep', ['30'], { env: { ...process.env, LD_PRELOAD: shimPath }, stdio: 'ignore' });
    await new Promise((r) => setTimeout(r, 100));
    try {
      await expectTrackerError(DirtyTracker.attach(sleeper.pid!), 'HYDRA_TRACKER_NO_RAM', new RegExp(`process ${sleeper.pid}`));
    } finally {
      sleeper.kill('SIGKILL');
    }

    const gone = await dirtier(16);
    const pid = gone.pid;
    await gone.exit();
    await expectTrackerError(DirtyTracker.attach(pid), 'HYDRA_TRACKER_PROCESS_GONE', new RegExp(`process ${pid}`));

    const dying = await dirtier(64);
    const t = await attach(dying.pid);
    await dying.write(1, 1, 1, 1);
    await dying.kill();
    await expectTrackerError(() => t.collect(), 'HYDRA_TRACKER_PROCESS_GONE', new RegExp(`process ${dying.pid}`));
    assert.equal(t.isAlive(), false);
  });
});
