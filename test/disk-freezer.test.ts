import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { DiskFreezer, prepareRestoreDisks, parseLayerId, releaseRestoreDisks, type DiskError } from '../src/disk/index.js';
import { QmpClient } from '../src/qmp/index.js';
import { chainOf, createQcow2, median, percentile, readDisk, sh, sleep, startQemu, tmpDir, type Vm } from './support/disk-qemu.js';

/**
 * Disk freezer against a real QEMU (no guest code: data is written through
 * the virtio-blk device's block backend with HMP qemu-io, so every epoch's
 * expected content is exact). Epoch k writes byte k over [k*64K, k*64K+64K)
 * and over the first 64K; the frozen layer of epoch k must read as exactly
 * the writes of epochs 1..k.
 */
const REGION = 65536;
const dirs: string[] = [];
const vms: Vm[] = [];
after(async () => {
  for (const vm of vms) await vm.kill().catch(() => undefined);
  for (const d of dirs) {
    spawnSync('umount', [path.join(d, 'small')]);
    fs.rmSync(d, { recursive: true, force: true });
  }
});

function lab(prefix: string): string {
  const d = tmpDir(prefix);
  dirs.push(d);
  return d;
}

async function vmOn(dir: string, disks: string[], extra: Partial<Parameters<typeof startQemu>[0]> = {}): Promise<Vm> {
  const vm = await startQemu({ dir, disks, ...extra });
  vms.push(vm);
  return vm;
}

async function writeEpoch(vm: Vm, k: number, disk = 0): Promise<void> {
  await vm.write(disk, k, k * REGION, REGION);
  await vm.write(disk, k, 0, REGION);
}

function assertEpoch(buf: Buffer, k: number, what: string): void {
  assert.equal(buf[0], k, `${what}: first region holds epoch ${buf[0]}, expected ${k}`);
  for (let j = 1; j <= k; j++) {
    assert.equal(buf[j * REGION], j, `${what}: region ${j} missing (got ${buf[j * REGION]})`);
    assert.equal(buf[j * REGION + REGION - 1], j, `${what}: region ${j} torn`);
  }
  assert.equal(buf[(k + 1) * REGION], 0, `${what}: holds a write of a later epoch (${buf[(k + 1) * REGION]})`);
}

function layerOf(id: string): string {
  return parseLayerId(id).layer;
}

async function rejectsCode(p: Promise<unknown>, code: string): Promise<DiskError> {
  try {
    await p;
  } catch (err) {
    assert.equal((err as DiskError).code, code, `expected ${code}, got ${(err as DiskError).code}: ${(err as Error).message}`);
    return err as DiskError;
  }
  assert.fail(`expected rejection with ${code}`);
}

test('each frozen layer holds exactly the writes up to its pause; a restore overlay sees layer k and none of the later writes', async () => {
  const dir = lab('dchain');
  const base = path.join(dir, 'base.qcow2');
  createQcow2(base);
  const vm = await vmOn(dir, [base]);
  const fz = await DiskFreezer.open({ vm: 'dchain', qmp: vm.qmp, disks: [{ path: base }], layerDir: path.join(dir, 'layers'), manualMerge: true });
  await fz.prepare();
  const ids: string[][] = [];
  for (let k = 1; k <= 6; k++) {
    await writeEpoch(vm, k);
    await vm.qmp.execute('stop');
    ids[k] = await fz.freeze(k);
    await vm.qmp.execute('cont');
    await fz.prepare();
  }
  // The disk's own file is the frozen layer of the first epoch: base(=epoch 1) + 5 frozen + active.
  assert.equal(fz.chainLength(), 7);
  assert.equal(layerOf(ids[1]![0]!), base);
  for (let k = 1; k <= 6; k++) {
    assert.equal(ids[k]!.length, 1);
    assertEpoch(readDisk(layerOf(ids[k]![0]!), dir), k, `frozen layer of epoch ${k}`);
    // The header names the backing file: the chain is complete without QEMU.
    const chain = chainOf(layerOf(ids[k]![0]!));
    assert.equal(chain.length, k);
    assert.equal(chain[chain.length - 1], base);
  }
  // The primary goes on writing, then dies.
  await writeEpoch(vm, 7);
  await vm.kill();

  const overlays = await prepareRestoreDisks(ids[4]!, { vm: 'dchain', overlayDir: path.join(dir, 'restore') });
  assert.equal(overlays.length, 1);
  assert.equal(chainOf(overlays[0]!)[1], layerOf(ids[4]![0]!));
  assertEpoch(readDisk(overlays[0]!, dir), 4, 'restore overlay of epoch 4');
  // The restored VM opens the overlay in the same device position and writes to it; the frozen layer stays as it was.
  const restored = await vmOn(dir, overlays, { name: 'dchainr' });
  await restored.write(0, 0xee, 0, REGION);
  await restored.qmp.execute('human-monitor-command', { 'command-line': `qemu-io -d ${restored.qdev(0)} "flush"` });
  const seen = readDisk(overlays[0]!, dir);
  assert.equal(seen[0], 0xee);
  assert.equal(seen[4 * REGION], 4);
  assertEpoch(readDisk(layerOf(ids[4]![0]!), dir), 4, 'frozen layer of epoch 4 after the restored VM wrote');
  await restored.kill();
});

test('several disks freeze in one transaction; merges keep the chain bounded and the data intact', async () => {
  const dir = lab('dmerge');
  const bases = [path.join(dir, 'a.qcow2'), path.join(dir, 'b.qcow2')];
  for (const b of bases) createQcow2(b);
  const vm = await vmOn(dir, bases);
  await vm.qmp.execute('cont');
  const fz = await DiskFreezer.open({ vm: 'dmerge', qmp: vm.qmp, disks: bases.map((p) => ({ path: p })), layerDir: path.join(dir, 'layers'), prepareDelayMs: 5 });
  await fz.prepare();
  const lengths: number[] = [];
  const freezeMs: number[] = [];
  let last: string[] = [];
  const N = 40;
  for (let k = 1; k <= N; k++) {
    await writeEpoch(vm, k, 0);
    await writeEpoch(vm, k, 1);
    await vm.qmp.execute('stop');
    const t0 = performance.now();
    last = await fz.freeze(k);
    freezeMs.push(performance.now() - t0);
    await vm.qmp.execute('cont');
    assert.equal(last.length, 2);
    assert.deepEqual(last.map((id) => parseLayerId(id).disk), [0, 1]);
    assert.deepEqual(last.map((id) => parseLayerId(id).epoch), [k, k]);
    fz.committed(k); // the store acknowledged epoch k
    lengths.push(fz.chainLength());
    await sleep(60); // the checkpoint interval (short, to stress merge/freeze overlap)
  }
  await fz.merge();
  const st = fz.status();
  console.log(`# merge: ${JSON.stringify(st.merge)} chain lengths max=${Math.max(...lengths)} freeze median=${median(freezeMs).toFixed(2)}ms p99=${percentile(freezeMs, 99).toFixed(2)}ms`);
  assert.ok(Math.max(...lengths) <= 6, `chain length stayed bounded (max ${Math.max(...lengths)})`);
  assert.ok(st.merge.layersMerged >= N - 3, `layers merged: ${st.merge.layersMerged}`);
  assert.equal(fz.chainLength(), 3, 'after the last merge: base, committed frozen layer, active');
  for (let d = 0; d < 2; d++) {
    assertEpoch(readDisk(layerOf(last[d]!), dir), N, `disk ${d} committed layer`);
    assertEpoch(readDisk(bases[d]!, dir), N - 1, `disk ${d} base after merges`);
    assert.deepEqual(chainOf(layerOf(last[d]!)), [layerOf(last[d]!), bases[d]]);
  }
  // Merged layers are gone from the layer directory: the chain's files, the prepared overlays, chain.json.
  const left = fs.readdirSync(path.join(dir, 'layers', 'dmerge')).filter((f) => f.endsWith('.qcow2'));
  assert.ok(left.length <= 6, `layer files left: ${left.join(', ')}`);
  const rec = JSON.parse(fs.readFileSync(path.join(dir, 'layers', 'dmerge', 'chain.json'), 'utf8'));
  assert.equal(rec.chainLength, 3);

  const overlays = await prepareRestoreDisks(last, { vm: 'dmerge', overlayDir: path.join(dir, 'restore') });
  for (let d = 0; d < 2; d++) assertEpoch(readDisk(overlays[d]!, dir), N, `restore overlay of disk ${d}`);
  await fz.close();
  await vm.kill();
});

test('a pinned restore chain is never merged; unpinned, it is', async () => {
  const dir = lab('dpin');
  const base = path.join(dir, 'base.qcow2');
  createQcow2(base);
  const vm = await vmOn(dir, [base]);
  const fz = await DiskFreezer.open({ vm: 'dpin', qmp: vm.qmp, disks: [{ path: base }], layerDir: path.join(dir, 'layers'), manualMerge: true });
  await fz.prepare();
  const ids: string[][] = [];
  for (let k = 1; k <= 3; k++) {
    await writeEpoch(vm, k);
    ids[k] = await fz.freeze(k);
    await fz.prepare();
  }
  // A restore drill of epoch 2 while the primary runs.
  const overlays = await prepareRestoreDisks(ids[2]!, { vm: 'dpin', overlayDir: path.join(dir, 'restore'), pin: true });
  for (let k = 4; k <= 6; k++) {
    await writeEpoch(vm, k);
    ids[k] = await fz.freeze(k);
    await fz.prepare();
  }
  fz.committed(6);
  await fz.merge();
  // Only epoch 1's layer (below the pinned one) was merged; the drill still reads epoch 2 exactly.
  assert.equal(fz.chainLength(), 7, fz.chainFiles(0).join(' '));
  assertEpoch(readDisk(overlays[0]!, dir), 2, 'pinned restore overlay');
  assertEpoch(readDisk(layerOf(ids[6]![0]!), dir), 6, 'committed layer');
  await releaseRestoreDisks(ids[2]!, overlays);
  await fz.merge();
  assert.equal(fz.chainLength(), 3);
  assertEpoch(readDisk(layerOf(ids[6]![0]!), dir), 6, 'committed layer after merge');
  await fz.close();
  await vm.kill();
});

test('a freezer restarted during a merge finds a valid chain, finishes the merge and goes on', async () => {
  const dir = lab('drestart');
  const base = path.join(dir, 'base.qcow2');
  createQcow2(base, '64M');
  const vm = await vmOn(dir, [base]);
  const sockets = fs.readdirSync(dir).filter((f) => f.endsWith('-hydra.sock'));
  const hydraSock = path.join(dir, sockets[0]!);
  const a = await DiskFreezer.open({ vm: 'drestart', qmp: vm.qmp, disks: [{ path: base }], layerDir: path.join(dir, 'layers'), manualMerge: true });
  await a.prepare();
  const ids: string[][] = [];
  for (let k = 1; k <= 5; k++) {
    await writeEpoch(vm, k);
    await vm.write(0, k, 16 * 1024 * 1024, 24 * 1024 * 1024); // big layers: the merge takes a while
    ids[k] = await a.freeze(k);
    await a.prepare();
  }
  a.committed(5);
  void a.merge().catch(() => undefined);
  // Watch from the user socket until the merge job runs, then "crash" the freezer (its QMP connection dies with it).
  const watch = await QmpClient.connect(path.join(dir, sockets[0]!.replace('-hydra.sock', '-user.sock')));
  let sawJob = false;
  for (let i = 0; i < 2000 && !sawJob; i++) {
    const jobs = await watch.execute<{ id: string; status: string }[]>('query-jobs');
    sawJob = jobs.some((j) => j.status === 'running');
    if (!sawJob) await sleep(1);
  }
  vm.qmp.close();
  console.log(`# restart: merge job ${sawJob ? 'was running' : 'had already finished'} when the freezer died`);
  const b = await DiskFreezer.open({ vm: 'drestart', qmp: hydraSock, disks: [{ path: base }], layerDir: path.join(dir, 'layers'), manualMerge: true });
  const files = b.chainFiles(0);
  assert.equal(files[0], base);
  assert.equal(files[files.length - 2], layerOf(ids[5]![0]!), 'the committed layer is in the chain under the active one');
  // Merged (3: base, committed, active) or, had the merge failed, untouched (6: base, 4 frozen, active).
  assert.ok(files.length === 3 || files.length === 6, `chain ${files.join(' ')}`);
  const nodes = await watch.execute<{ 'node-name': string }[]>('query-named-block-nodes', { flat: true });
  const ours = nodes.filter((n) => /^hv\d/.test(n['node-name'])).map((n) => n['node-name']);
  assert.equal(ours.length, files.length - 1, `left-over nodes were removed: ${ours.join(' ')}`);
  assertEpoch(readDisk(layerOf(ids[5]![0]!), dir), 5, 'committed layer after the restart');
  await b.prepare();
  // The test's own QMP client died with the first freezer: write through the watcher's monitor.
  for (const [off, len] of [[6 * REGION, REGION], [0, REGION]] as const) {
    assert.equal(await watch.execute('human-monitor-command', { 'command-line': `qemu-io -d ${vm.qdev(0)} "write -P 6 ${off} ${len}"` }), '');
  }
  const id6 = await b.freeze(6);
  b.committed(6);
  await b.merge();
  assert.equal(b.chainLength(), 3);
  assertEpoch(readDisk(layerOf(id6[0]!), dir), 6, 'layer of the first epoch after the restart');
  watch.close();
  await b.close();
  await vm.kill();
});

test('bad inputs: raw or read-only disks are refused; missing or corrupt layers are named', async () => {
  const dir = lab('dbad');
  const raw = path.join(dir, 'raw.img');
  sh('qemu-img', ['create', '-q', '-f', 'raw', raw, '8M']);
  const fakeQmp = '/nonexistent.sock';
  let e = await rejectsCode(DiskFreezer.open({ vm: 'dbad', qmp: fakeQmp, disks: [{ path: raw }], layerDir: dir }), 'HYDRA_DISK_UNSUPPORTED');
  assert.match(e.message, /raw\.img.*is raw, not qcow2/);
  e = await rejectsCode(DiskFreezer.open({ vm: 'dbad', qmp: fakeQmp, disks: [{ path: path.join(dir, 'nope.qcow2') }], layerDir: dir }), 'HYDRA_DISK_UNSUPPORTED');
  assert.match(e.message, /nope\.qcow2: does not exist/);
  const ro = path.join(dir, 'ro.qcow2');
  createQcow2(ro);
  fs.chmodSync(ro, 0o444);
  e = await rejectsCode(DiskFreezer.open({ vm: 'dbad', qmp: fakeQmp, disks: [{ path: ro }], layerDir: dir }), 'HYDRA_DISK_UNSUPPORTED');
  assert.match(e.message, /ro\.qcow2: is read-only/);
  // Writable file, but the VM opened it read-only.
  const rw = path.join(dir, 'rw.qcow2');
  createQcow2(rw);
  const vm = await vmOn(dir, [rw], { readOnlyDisks: true, name: 'dro' });
  e = await rejectsCode(DiskFreezer.open({ vm: 'dbad', qmp: vm.qmp, disks: [{ path: rw }], layerDir: dir }), 'HYDRA_DISK_UNSUPPORTED');
  assert.match(e.message, /rw\.qcow2: attached read-only/);
  await vm.kill();

  // Layers: make a chain, then break it in each way.
  const base = path.join(dir, 'base.qcow2');
  createQcow2(base);
  const l1 = path.join(dir, 'l1.qcow2');
  const l2 = path.join(dir, 'l2.qcow2');
  createQcow2(l1, '8M', base);
  createQcow2(l2, '8M', l1);
  const id = (f: string) => JSON.stringify({ v: 1, disk: 0, epoch: 3, layer: f });
  const opts = { vm: 'dbad', overlayDir: path.join(dir, 'ov') };
  assert.equal((await prepareRestoreDisks([id(l2)], opts)).length, 1);
  e = await rejectsCode(prepareRestoreDisks([id(path.join(dir, 'gone.qcow2'))], opts), 'HYDRA_DISK_LAYER_MISSING');
  assert.match(e.message, /frozen layer .*gone\.qcow2 is missing/);
  fs.renameSync(l1, `${l1}.away`);
  e = await rejectsCode(prepareRestoreDisks([id(l2)], opts), 'HYDRA_DISK_LAYER_MISSING');
  assert.match(e.message, /backing file .*l1\.qcow2 of frozen layer .*l2\.qcow2 is missing/);
  fs.renameSync(`${l1}.away`, l1);
  const bad = path.join(dir, 'bad.qcow2');
  fs.copyFileSync(l2, bad);
  const fd = fs.openSync(bad, 'r+');
  fs.writeSync(fd, Buffer.from([0xff, 0xff, 0xff, 0x01]), 0, 4, 40); // l1_table_offset: unaligned garbage
  fs.closeSync(fd);
  e = await rejectsCode(prepareRestoreDisks([id(bad)], opts), 'HYDRA_DISK_LAYER_CORRUPT');
  assert.match(e.message, /bad\.qcow2 is corrupt/);
  const notq = path.join(dir, 'notq.qcow2');
  fs.copyFileSync(l2, notq);
  const fd2 = fs.openSync(notq, 'r+');
  fs.writeSync(fd2, Buffer.from('JUNK'), 0, 4, 0);
  fs.closeSync(fd2);
  await rejectsCode(prepareRestoreDisks([id(notq)], opts), 'HYDRA_DISK_LAYER_CORRUPT');
  await rejectsCode(prepareRestoreDisks(['garbage'], opts), 'HYDRA_DISK_LAYER_ID_INVALID');
  // Nothing half-made is left behind by the failures.
  assert.equal(fs.readdirSync(path.join(dir, 'ov')).length, 1);
});

test('a full layer filesystem fails prepare clearly, the committed layer stays intact, and freezing resumes once space is back', async (t) => {
  const dir = lab('dfull');
  const small = path.join(dir, 'small');
  fs.mkdirSync(small);
  const m = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=2M', 'tmpfs', small], { encoding: 'utf8' });
  if (m.status !== 0) {
    t.skip(`cannot mount a tmpfs here: ${m.stderr}`);
    return;
  }
  const base = path.join(dir, 'base.qcow2');
  createQcow2(base);
  const vm = await vmOn(dir, [base]);
  const fz = await DiskFreezer.open({ vm: 'dfull', qmp: vm.qmp, disks: [{ path: base }], layerDir: small, manualMerge: true, prepareDelayMs: 1 });
  await fz.prepare();
  await writeEpoch(vm, 1);
  const id1 = await fz.freeze(1);
  fz.committed(1);
  await fz.prepare(); // the next overlay exists before the filesystem fills (a loaded host may not have run the scheduled one yet)
  // Fill the filesystem.
  const filler = path.join(small, 'filler');
  const fd = fs.openSync(filler, 'w');
  const chunk = Buffer.alloc(64 * 1024, 1);
  try { for (;;) fs.writeSync(fd, chunk); } catch { /* ENOSPC */ }
  try { for (;;) fs.writeSync(fd, chunk, 0, 4096); } catch { /* ENOSPC */ }
  fs.closeSync(fd);
  // The overlay prepared before the disk filled is used; the next prepare fails.
  const id2 = await fz.freeze(2);
  const e = await rejectsCode(fz.prepare(), 'HYDRA_DISK_NO_SPACE');
  assert.match(e.message, /no space in .*small/);
  const before = fz.chainLength();
  await rejectsCode(fz.freeze(3), 'HYDRA_DISK_NO_SPACE');
  assert.equal(fz.chainLength(), before, 'a failed freeze changes nothing');
  assertEpoch(readDisk(layerOf(id1[0]!), dir), 1, 'committed layer while the filesystem is full');
  assertEpoch(readDisk(layerOf(id2[0]!), dir), 1, 'layer frozen just before the filesystem filled');
  assert.deepEqual(fs.readdirSync(small).filter((f) => f.endsWith('.tmp')), []);
  fs.rmSync(filler);
  await fz.prepare();
  await writeEpoch(vm, 2);
  await writeEpoch(vm, 3);
  const id3 = await fz.freeze(3);
  assertEpoch(readDisk(layerOf(id3[0]!), dir), 3, 'first layer after space came back');
  await fz.close();
  await vm.kill();
});

test('a freeze during a running merge cancels it (chain unchanged) and the merge is redone later', async () => {
  const dir = lab('dcollide');
  const base = path.join(dir, 'base.qcow2');
  createQcow2(base, '64M');
  const vm = await vmOn(dir, [base]);
  const userSock = path.join(dir, fs.readdirSync(dir).find((f) => f.endsWith('-user.sock'))!);
  const fz = await DiskFreezer.open({ vm: 'dcollide', qmp: vm.qmp, disks: [{ path: base }], layerDir: path.join(dir, 'layers'), manualMerge: true });
  await fz.prepare();
  const ids: string[][] = [];
  for (let k = 1; k <= 4; k++) {
    await writeEpoch(vm, k);
    await vm.write(0, k, 16 * 1024 * 1024, 40 * 1024 * 1024);
    ids[k] = await fz.freeze(k);
    await fz.prepare();
  }
  await writeEpoch(vm, 5);
  fz.committed(4);
  const merging = fz.merge();
  const watch = await QmpClient.connect(userSock);
  let running = false;
  for (let i = 0; i < 2000 && !running; i++) {
    running = (await watch.execute<{ status: string }[]>('query-jobs')).some((j) => j.status === 'running');
    if (!running) await sleep(1);
  }
  const t0 = performance.now();
  const id5 = await fz.freeze(5);
  const ms = performance.now() - t0;
  await merging;
  const st = fz.status().merge;
  console.log(`# collision: job ${running ? 'running' : 'already done'} when freeze was called; freeze took ${ms.toFixed(1)} ms; ${JSON.stringify(st)}`);
  // Either the freeze cancelled the merge, or the merge finished just before the freeze got to it.
  assert.equal(st.cancelled + st.merges, 1);
  assertEpoch(readDisk(layerOf(id5[0]!), dir), 5, 'layer frozen during the merge');
  assertEpoch(readDisk(layerOf(ids[4]![0]!), dir), 4, 'committed layer after the cancelled merge');
  await fz.prepare();
  fz.committed(5);
  await fz.merge();
  assert.equal(fz.chainLength(), 3);
  assertEpoch(readDisk(layerOf(id5[0]!), dir), 5, 'committed layer after the merge was redone');
  watch.close();
  await fz.close();
  await vm.kill();
});
