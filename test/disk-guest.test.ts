import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { DiskFreezer, makeDiskHook, parseLayerId, prepareRestoreDisks } from '../src/disk/index.js';
import { createQcow2, guestAvailable, GUEST_DIR, median, percentile, readDisk, sleep, startQemu, tmpDir, type Vm } from './support/disk-qemu.js';

/**
 * The real guest: diskcheck writes numbered 4 KiB records to /dev/vda with
 * O_DIRECT + fdatasync and keeps the count in guest memory. The primary is
 * checkpointed the way the checkpointer does it (stop, device state, freeze,
 * cont) ~30 times while merges run; every frozen layer must hold a gap-free
 * prefix of records; the last pause also copies guest RAM, then QEMU is
 * killed and restored onto a fresh overlay of the last frozen layer with that
 * RAM and device state: diskcheck in the restored guest compares its
 * in-memory count with the disk and must find nothing wrong.
 */
const MAGIC = 0x4859445241444b31n;
const REC = 4096;
const M64 = (1n << 64n) - 1n;

interface Records { run: bigint | null; count: number; torn: number; gaps: number[] }

function checksum(buf: Buffer, off: number): bigint {
  let h = 0xcbf29ce484222325n;
  for (let w = 0; w < REC / 8 - 1; w++) h = ((h ^ buf.readBigUInt64LE(off + w * 8)) * 0x100000001b3n) & M64;
  return h;
}

/** The diskcheck records on a raw disk image: which run, how many in a gap-free prefix, torn ones, gaps. */
function parseRecords(buf: Buffer): Records {
  const seqs: number[] = [];
  let run: bigint | null = null;
  let torn = 0;
  for (let off = 0; off + REC <= buf.length; off += REC) {
    if (buf.readBigUInt64LE(off) !== MAGIC) continue;
    if (checksum(buf, off) !== buf.readBigUInt64LE(off + REC - 8)) { torn++; continue; }
    const r = buf.readBigUInt64LE(off + 16);
    if (run === null) run = r;
    assert.equal(r, run, 'records of one run only');
    seqs.push(Number(buf.readBigUInt64LE(off + 8)));
  }
  seqs.sort((a, b) => a - b);
  const gaps: number[] = [];
  seqs.forEach((s, i) => { if (s !== i) gaps.push(i); });
  return { run, count: seqs.length, torn, gaps };
}

const dirs: string[] = [];
const vms: Vm[] = [];
after(async () => {
  for (const vm of vms) await vm.kill().catch(() => undefined);
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

async function waitSerial(file: string, re: RegExp, timeoutMs: number): Promise<RegExpMatchArray> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const text = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '';
    const m = text.match(re);
    if (m) return m;
    if (Date.now() > deadline) throw new Error(`no ${re} on ${file} within ${timeoutMs} ms; tail:\n${text.slice(-1500)}`);
    await sleep(100);
  }
}

function lastRecords(file: string): number {
  const all = [...fs.readFileSync(file, 'utf8').matchAll(/diskcheck: records=(\d+)/g)];
  return all.length ? Number(all[all.length - 1]![1]) : -1;
}

test('diskcheck guest: frozen layers are gap-free prefixes, merges keep the chain short, a restore onto the last layer continues with zero violations', { skip: guestAvailable() ? false : `guest kernel/initrd not built in ${GUEST_DIR} (run \`hydravm setup\`)`, timeout: 180_000 }, async () => {
  const dir = tmpDir('dguest');
  dirs.push(dir);
  const base = path.join(dir, 'disk0.qcow2');
  createQcow2(base, '64M');
  const ram = path.join(dir, 'ram.shared');
  const cmdline = 'console=ttyS0 quiet hydra.run=diskcheck diskcheck.rate=50';
  const memoryMb = 128;
  const vm = await startQemu({ dir, name: 'dg', disks: [base], cmdline, memoryMb, ramShareFile: ram });
  vms.push(vm);
  await waitSerial(vm.serialLog, /diskcheck: records=\d+/, 60_000);

  const freezer = await DiskFreezer.open({ vm: 'dg', qmp: vm.qmp, disks: [{ path: base }], layerDir: path.join(dir, 'layers') });
  await freezer.prepare();
  const hook = makeDiskHook(freezer);
  const devstate = path.join(dir, 'devstate');
  const ramCopy = path.join(dir, 'ram.committed');
  const freezeMs: number[] = [];
  const pauseMs: number[] = [];
  const counts: number[] = [];
  const chainLengths: number[] = [];
  const K = 30;
  let ids: string[] = [];
  for (let k = 1; k <= K; k++) {
    await sleep(250);
    const t0 = performance.now();
    await vm.qmp.execute('stop');
    if (k === K) fs.copyFileSync(ram, ramCopy); // memory of the epoch we will restore (the lead's part in production)
    await vm.qmp.execute('xen-save-devices-state', { filename: devstate, live: false });
    const tf = performance.now();
    ids = await hook.freezeDisks(k);
    freezeMs.push(performance.now() - tf);
    await vm.qmp.execute('cont');
    pauseMs.push(performance.now() - t0);
    hook.committed(k); // the store acknowledged epoch k
    chainLengths.push(freezer.chainLength());
    const recs = parseRecords(readDisk(parseLayerId(ids[0]!).layer, dir));
    assert.equal(recs.torn, 0, `epoch ${k}: torn records`);
    assert.deepEqual(recs.gaps, [], `epoch ${k}: records missing below the count`);
    if (counts.length) assert.ok(recs.count >= counts[counts.length - 1]!, `epoch ${k}: fewer records than the epoch before`);
    counts.push(recs.count);
  }
  const committedLayer = parseLayerId(ids[0]!).layer;
  const atCommit = counts[counts.length - 1]!;
  assert.ok(atCommit > counts[0]!, 'the guest kept writing between epochs');
  // The primary goes on writing into its newer layer, then its host "fails".
  await sleep(1500);
  const primaryLater = lastRecords(vm.serialLog);
  assert.ok(primaryLater > atCommit, `primary wrote past the checkpoint (${primaryLater} > ${atCommit})`);
  assert.equal(fs.readFileSync(vm.serialLog, 'utf8').match(/DISKCHECK VIOLATION/g), null, 'no violation on the primary');
  await vm.kill();
  const merge = freezer.status().merge;

  const tr = performance.now();
  const overlays = await prepareRestoreDisks(ids, { vm: 'dg', overlayDir: path.join(dir, 'restore') });
  const prepareRestoreMs = performance.now() - tr;
  const seen = parseRecords(readDisk(overlays[0]!, dir));
  assert.equal(seen.count, atCommit, 'the restore overlay sees exactly the committed layer, none of the later writes');

  const restored = await startQemu({ dir, name: 'dgr', disks: overlays, cmdline, memoryMb, ramPrivateFile: ramCopy, incoming: true });
  vms.push(restored);
  await restored.qmp.execute('migrate-incoming', { uri: `file:${devstate}` });
  for (let i = 0; i < 200; i++) {
    const st = await restored.qmp.execute<{ status: string }>('query-status');
    if (st.status === 'paused') await restored.qmp.execute('cont');
    if (st.status === 'running' || st.status === 'paused') break;
    await sleep(20);
  }
  // The guest resumes from the checkpoint (its clocks come from the device state, so no time-jump
  // full check): every write is followed by checks of the last 3 records (disk behind memory) and
  // of the next slot (disk ahead of memory), so a mismatch shows within the first records.
  await waitSerial(restored.serialLog, /diskcheck: records=\d+/, 30_000);
  await sleep(3000);
  const log = fs.readFileSync(restored.serialLog, 'utf8');
  assert.equal(log.match(/DISKCHECK (VIOLATION|ERROR).*/g), null, `restored guest found violations:\n${log.slice(-2000)}`);
  assert.doesNotMatch(log, /diskcheck: start/, 'the restored guest continued, it did not boot afresh');
  const first = log.match(/diskcheck: records=(\d+) run=([0-9a-f]+) checked=\d+ violations=(\d+)/)!;
  const resumedAt = Number(first[1]);
  assert.equal(first[2], seen.run!.toString(16).padStart(16, '0'), 'same diskcheck run as on the primary');
  assert.ok(resumedAt >= atCommit && resumedAt <= atCommit + 30, `guest resumed at record ${resumedAt}, committed disk had ${atCommit}`);
  const after = lastRecords(restored.serialLog);
  assert.ok(after > resumedAt, `restored guest goes on writing (${after} > ${resumedAt})`);
  await restored.kill();

  const summary = {
    freezes: freezeMs.length,
    freezeMedianMs: +median(freezeMs).toFixed(2),
    freezeP99Ms: +percentile(freezeMs, 99).toFixed(2),
    freezeMaxMs: +Math.max(...freezeMs).toFixed(2),
    freezeMaxIndex: freezeMs.indexOf(Math.max(...freezeMs)) + 1,
    freezeP99WithoutRamCopyEpochMs: +percentile(freezeMs.slice(0, -1), 99).toFixed(2),
    pauseMedianMs: +median(pauseMs).toFixed(2),
    chainLengthMax: Math.max(...chainLengths),
    merges: merge.merges, layersMerged: merge.layersMerged, mergeCancelled: merge.cancelled,
    mergeAvgMs: merge.merges ? +(merge.totalMergeMs / merge.merges).toFixed(1) : null,
    prepareRestoreMs: +prepareRestoreMs.toFixed(1),
    recordsAtCommit: atCommit, primaryLater, resumedAt, restoredLater: after,
    committedLayer: path.basename(committedLayer),
  };
  console.log(`# disk-guest: ${JSON.stringify(summary)}`);
  assert.ok(summary.chainLengthMax <= 5, `chain stayed short (max ${summary.chainLengthMax})`);
});
