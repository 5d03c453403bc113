/**
 * DirtyTracker on guest RAM that is a PRIVATE mapping of a regular file (a
 * file-mode restore: memory-backend-file,share=off): WP registration and
 * PAGEMAP_SCAN on the private mapping, copyRuns via process_vm_readv, and
 * populatedRuns = the file's data runs UNION the anonymous pages.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, openSync, readFileSync, readSync, rmSync, writeSync, ftruncateSync } from 'node:fs';
import path from 'node:path';
import { Dirtier, PAGE, ensureNativeBuilt } from '../../test/fixtures/dirtier.js';
import { haveQemu, ramBlockHva, startMiniVm, type MiniVm } from '../../test/support/mini-qemu.js';
import { TrackerError } from '../errors.js';
import { loadNative } from '../native/index.js';
import { CowTracker, DirtyTracker, findGuestRam, type DirtyRun } from './index.js';
import { listUffds, openPidfd } from './uffd.js';
import { tmpDir } from '../../test/support/tmp.js';

const dir = tmpDir('private-ram');
const live: Dirtier[] = [];
const vms: MiniVm[] = [];
const trackers: DirtyTracker[] = [];
before(() => {
  ensureNativeBuilt();
});
after(async () => {
  for (const t of trackers) t.close();
  await Promise.all(live.map((d) => d.kill()));
  await Promise.all(vms.map((v) => v.kill()));
  rmSync(dir, { recursive: true, force: true });
});

async function expectTrackerErrorAsync(p: Promise<unknown>, code: string, mentions: RegExp): Promise<void> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof TrackerError, `expected TrackerError ${code}, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    assert.match(err.message, mentions);
    return;
  }
  assert.fail(`expected TrackerError ${code}, nothing thrown`);
}

/** A sparse file of `size` bytes with `fill(offset)` content in the given [offset, length) regions, holes elsewhere. */
function makeImage(name: string, size: number, regions: DirtyRun[], fill: (pageOffset: number) => Buffer): string {
  const file = path.join(dir, name);
  const fd = openSync(file, 'w');
  try {
    ftruncateSync(fd, size);
    for (const r of regions) for (let o = r.offset; o < r.offset + r.length; o += PAGE) writeSync(fd, fill(o), 0, PAGE, o);
  } finally {
    closeSync(fd);
  }
  return file;
}

const filePage = (o: number) => Buffer.alloc(PAGE, 0x40 + ((o / PAGE) % 64));

function covers(runs: DirtyRun[], offset: number, length: number): boolean {
  return runs.some((r) => r.offset <= offset && offset + length <= r.offset + r.length);
}

function apply(image: Buffer, runs: DirtyRun[], staging: Buffer): void {
  let pos = 0;
  for (const r of runs) {
    staging.copy(image, r.offset, pos, pos + r.length);
    pos += r.length;
  }
}

/** Memory of `pid` at [addr, +len) read through /proc/PID/mem (independent of process_vm_readv). */
/** The first page-aligned offset from `base` at or past `from` that no mapping of `pid` covers. */
function unmappedOffsetAfter(pid: number, base: number, from: number): number {
  const maps = readFileSync(`/proc/${pid}/maps`, 'utf8').trim().split('\n')
    .map((l) => l.split(' ')[0]!.split('-').map((h) => parseInt(h, 16)) as [number, number])
    .sort((a, b) => a[0] - b[0]);
  let addr = base + from;
  for (const [start, end] of maps) if (addr >= start && addr < end) addr = end;
  return addr - base;
}

function procMem(pid: number, addr: number, len: number): Buffer {
  const fd = openSync(`/proc/${pid}/mem`, 'r');
  try {
    const b = Buffer.alloc(len);
    let done = 0;
    while (done < len) {
      const n = readSync(fd, b, done, Math.min(len - done, 16 << 20), addr + done);
      if (n <= 0) throw new Error(`short read of /proc/${pid}/mem at 0x${(addr + done).toString(16)}`);
      done += n;
    }
    return b;
  } finally {
    closeSync(fd);
  }
}

describe('processReadRuns (addon)', () => {
  it('reads runs of another process in IOV_MAX batches, and fails clearly on unmapped memory and gone processes', async () => {
    const n = loadNative();
    const pages = 3000; // > IOV_MAX (1024) runs of one page each with stride 2
    const file = makeImage('batch.img', pages * PAGE, [], filePage);
    const d = await Dirtier.start(pages, { privateFile: file });
    live.push(d);
    await d.write(0, pages / 2, 2, 7);
    const runs = new Float64Array(pages); // [p*2*PAGE, PAGE] for p < pages/2
    for (let i = 0; i < pages / 2; i++) { runs[2 * i] = 2 * i * PAGE; runs[2 * i + 1] = PAGE; }
    const dst = Buffer.alloc((pages / 2) * PAGE + 100);
    assert.equal(n.processReadRuns(d.pid, d.address, runs, dst, 100, pages * PAGE), (pages / 2) * PAGE);
    for (let i = 0; i < pages / 2; i++) {
      assert.ok(dst.subarray(100 + i * PAGE, 100 + (i + 1) * PAGE).equals(Dirtier.expectedPage(2 * i, 7)), `page ${2 * i}`);
    }
    assert.throws(() => n.processReadRuns(d.pid, d.address, new Float64Array([0, 2 * PAGE]), dst, 0, PAGE), /outside/);
    assert.throws(() => n.processReadRuns(d.pid, d.address, new Float64Array([0, 2 * PAGE]), Buffer.alloc(PAGE)), /dst too small/);
    // Beyond the mapping: a short read names the offset. The offset is one the process has no mapping at
    // (found in its maps), since what lies past a mapping depends on the random address layout.
    const hole = unmappedOffsetAfter(d.pid, d.address, pages * PAGE);
    assert.throws(() => n.processReadRuns(d.pid, d.address, new Float64Array([0, PAGE, hole, PAGE]), dst),
      (e: unknown) => (e as { code?: string }).code === 'EFAULT' && (e as { offset?: number }).offset === hole);
    await d.kill();
    assert.throws(() => n.processReadRuns(d.pid, d.address, new Float64Array([0, PAGE]), dst), (e: unknown) => (e as { code?: string }).code === 'ESRCH');
  });
});

describe('DirtyTracker on a private file mapping (dirtier fixture)', () => {
  it('finds it, tracks writes, copies via process_vm_readv and covers file data + anonymous pages', async () => {
    const pages = 64;
    const dataRegions = [{ offset: 8 * PAGE, length: 4 * PAGE }, { offset: 40 * PAGE, length: 2 * PAGE }];
    const file = makeImage('fixture.img', pages * PAGE, dataRegions, filePage);
    const before = readFileSync(file);
    const d = await Dirtier.start(pages, { privateFile: file });
    live.push(d);
    await d.write(50, 1, 1, 1); // written before attach: anonymous page in a hole

    const m = findGuestRam(d.pid);
    assert.equal(m.kind, 'private-file');
    assert.equal(m.start, d.address);
    assert.equal(m.size, pages * PAGE);
    assert.equal(m.path, file);
    assert.equal(findGuestRam(d.pid, { ramPath: file }).start, d.address);
    assert.equal(findGuestRam(d.pid, { ramSize: pages * PAGE }).start, d.address);

    const t = await DirtyTracker.attach(d.pid);
    trackers.push(t);
    assert.equal(t.mapping.kind, 'private-file');
    assert.equal(t.hasRamView, false);
    assert.throws(() => t.ram, (e: unknown) => e instanceof TrackerError && e.code === 'HYDRA_TRACKER_NO_RAM_VIEW');

    // Model of RAM: file content + page 50.
    const model = Buffer.alloc(pages * PAGE);
    before.copy(model);
    Dirtier.expectedPage(50, 1).copy(model, 50 * PAGE);

    let populated = t.populatedRuns();
    assert.deepEqual(populated, [{ offset: 8 * PAGE, length: 4 * PAGE }, { offset: 40 * PAGE, length: 2 * PAGE }, { offset: 50 * PAGE, length: PAGE }]);
    const image = Buffer.alloc(pages * PAGE);
    const staging = t.allocStaging(pages * PAGE);
    t.copyRuns(populated, staging);
    apply(image, populated, staging);
    assert.ok(image.equals(model), 'full copy equals RAM');

    for (let round = 0; round < 3; round++) {
      const written = [round, 20 + round, 9 + round, 41, 60 - round]; // holes and file data pages
      for (const p of written) await d.write(p, 1, 1, 100 + round);
      for (const p of written) Dirtier.expectedPage(p, 100 + round).copy(model, p * PAGE);
      const runs = t.collect();
      for (const p of written) assert.ok(covers(runs, p * PAGE, PAGE), `round ${round}: page ${p} reported written`);
      assert.equal(t.lastCollect.pages, new Set(written).size, `round ${round}: only the written pages`);
      t.copyRuns(runs, staging);
      apply(image, runs, staging);
      assert.ok(image.equals(model), `image equals RAM after round ${round}`);
      assert.deepEqual(t.collect(), [], 'nothing written between two collects');
      populated = t.populatedRuns();
      for (const p of written) assert.ok(covers(populated, p * PAGE, PAGE), `populatedRuns covers written page ${p}`);
      for (const r of dataRegions) assert.ok(covers(populated, r.offset, r.length), 'populatedRuns covers the file data');
      // A full copy of the populated runs alone rebuilds RAM (holes are zero).
      const full = Buffer.alloc(pages * PAGE);
      t.copyRuns(populated, staging);
      apply(full, populated, staging);
      assert.ok(full.equals(model), `full copy from populatedRuns equals RAM after round ${round}`);
    }
    // The independent view agrees, and the file itself was never written (private mapping).
    assert.ok(procMem(d.pid, d.address, pages * PAGE).equals(model));
    assert.ok(readFileSync(file).equals(before), 'image file untouched');

    await d.kill();
    assert.throws(() => t.copyRuns([{ offset: 0, length: PAGE }], staging), (e: unknown) => e instanceof TrackerError && e.code === 'HYDRA_TRACKER_PROCESS_GONE');
    assert.throws(() => t.collect(), (e: unknown) => e instanceof TrackerError && e.code === 'HYDRA_TRACKER_PROCESS_GONE');
    t.close();
  });
});

const skipQemu = haveQemu() ? false : 'qemu-system-x86_64 not installed';

describe('copy-on-write on a private file mapping (why a file-mode restore is checkpointed in basic mode)', () => {
  it('the kernel refuses sync write-protect there (only async, which cannot hold a write), and CowTracker says so', async () => {
    const pages = 256;
    const file = makeImage('cow-private.img', pages * PAGE, [{ offset: 0, length: pages * PAGE }], filePage);
    const d = await Dirtier.start(pages, { privateFile: file });
    live.push(d);
    await expectTrackerErrorAsync(CowTracker.attach(d.pid, { grain: 64 * 1024, stagingBytes: 1024 * 1024 }), 'HYDRA_TRACKER_COW_UNSUPPORTED', /private mapping .*cow-private\.img.*protect it without --cow/);
    // The kernel's own answer, on one of the shim's fresh uffds: UFFDIO_API without WP_ASYNC, then REGISTER in WP mode.
    const native = loadNative();
    const C = native.constants;
    const m = findGuestRam(d.pid);
    const pidfd = openPidfd(d.pid, native);
    const fd = native.pidfdGetfd(pidfd, listUffds(d.pid).find((u) => u.features === 0)!.targetFd);
    try {
      native.uffdApi(fd, C.UFFD_FEATURE_WP_UNPOPULATED | C.UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
      let err: unknown;
      try {
        native.uffdRegister(fd, m.start, m.size, C.UFFDIO_REGISTER_MODE_WP);
        native.uffdUnregister(fd, m.start, m.size);
      } catch (e) {
        err = e;
      }
      assert.ok(err, 'this kernel registered sync write-protect on a private file mapping: file-mode restores could now keep copy-on-write (lift the fallback in cow-mode.ts)');
      assert.match(String((err as Error).message), /EINVAL|Invalid argument/);
    } finally {
      native.close(fd);
      native.close(pidfd);
    }
  });
});

describe('DirtyTracker on a real QEMU with RAM = private file mapping (file-mode restore)', { skip: skipQemu }, () => {
  it('attaches, tracks SeaBIOS writes, copies exactly what QEMU holds, populatedRuns covers file data and hole writes', async () => {
    const MiB = 1 << 20;
    const size = 256 * MiB;
    const dataRegions = [{ offset: 2 * MiB, length: MiB }, { offset: 64 * MiB, length: 4 * MiB }, { offset: 255 * MiB, length: MiB }];
    const file = makeImage('qemu.img', size, dataRegions, filePage);
    const vm = await startMiniVm({ ramMiB: 256, privateFile: file });
    vms.push(vm);
    const hva = await ramBlockHva(vm.qmp, 'ram0');
    const m = findGuestRam(vm.pid);
    assert.equal(m.kind, 'private-file');
    assert.equal(m.start, hva);
    assert.equal(m.size, size);

    const t = await DirtyTracker.attach(vm.pid);
    trackers.push(t);
    const image = Buffer.alloc(size);
    const staging = t.allocStaging(size);
    let populated = t.populatedRuns();
    for (const r of dataRegions) assert.ok(covers(populated, r.offset, r.length), `populatedRuns covers file data at ${r.offset}`);
    t.copyRuns(populated, staging);
    apply(image, populated, staging);
    assert.ok(image.equals(procMem(vm.pid, hva, size)), 'full copy equals QEMU RAM');

    const pages: number[] = [];
    const zeros = Buffer.alloc(size);
    for (let i = 0; i < 3; i++) {
      await vm.qmp.execute('cont');
      await new Promise((r) => setTimeout(r, 300));
      await vm.qmp.execute('stop');
      const runs = t.collect();
      pages.push(t.lastCollect.pages);
      const collected = `${t.lastCollect.pages} pages in ${t.lastCollect.runs} runs, ${t.lastCollect.scanCalls} scan calls`;
      t.copyRuns(runs, staging);
      apply(image, runs, staging);
      const ram = procMem(vm.pid, hva, size);
      assert.ok(image.equals(ram), `image equals QEMU RAM after checkpoint ${i}`);
      assert.deepEqual(t.collect(), [], 'stopped VM: nothing written between two collects');
      populated = t.populatedRuns();
      for (const r of runs) assert.ok(covers(populated, r.offset, r.length), `populatedRuns covers written run ${r.offset}+${r.length}`);
      for (const r of dataRegions) assert.ok(covers(populated, r.offset, r.length), 'populatedRuns covers the file data');
      // Everything outside populatedRuns is zero in QEMU's RAM.
      let pos = 0;
      for (const r of [...populated, { offset: size, length: 0 }]) {
        if (r.offset > pos) assert.ok(ram.subarray(pos, r.offset).equals(zeros.subarray(0, r.offset - pos)), `RAM outside populatedRuns [${pos}, ${r.offset}) is zero`);
        pos = r.offset + r.length;
      }
      console.log(`checkpoint ${i}: ${collected}; populated ${populated.length} runs, ${populated.reduce((a, r) => a + r.length, 0) / PAGE} pages`);
    }
    assert.ok(pages[0]! > 0, `SeaBIOS wrote pages after cont (${pages.join(', ')})`);
    // Guest-written pages in holes of the file are covered (SeaBIOS writes low memory, the file has no data there).
    const holeWrites = populated.filter((r) => !dataRegions.some((d) => r.offset < d.offset + d.length && d.offset < r.offset + r.length));
    assert.ok(holeWrites.length > 0, 'some populated runs are guest writes in holes of the file');

    // Cross-check a RAM region above the legacy ranges with QMP pmemsave (guest-physical = RAM offset below 2 GiB on q35).
    const dump = path.join(dir, 'pmem.bin');
    await vm.qmp.execute('pmemsave', { val: MiB, size: 8 * MiB, filename: dump });
    assert.ok(readFileSync(dump).equals(image.subarray(MiB, 9 * MiB)), 'pmemsave of [1 MiB, 9 MiB) equals the image');
    t.close();
  });
});
