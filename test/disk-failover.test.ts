import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { labWithStore, readJson, until, sleep, pidAlive, assertFullVerify } from './support/lab.js';
import { lastMemcheckProgress, waitForMemcheckStep, waitForSerial, readSerial } from '../src/vm/serial.js';
import { readCheckpointHistory } from '../src/checkpoint/protection.js';
import { openVmImage } from '../src/store/index.js';
import { parseLayerId } from '../src/disk/index.js';
import { QmpClient } from '../src/qmp/index.js';
import { localShellConfig, startShell, stopAllShells } from '../src/vm/index.js';

/**
 * The end-to-end disk test, through the real CLI: a VM running
 * memcheck and diskcheck on one qcow2 disk is protected; its QEMU is
 * SIGKILLed at random moments over several rounds, and each time restored
 * (network mode) onto a fresh overlay of the frozen layer of the restored
 * epoch and protected again, so the next round kills the restored VM. Memory
 * and disk must never disagree (no DISKCHECK/MEMCHECK violations), the guest
 * never reboots and continues from the checkpoint, and the disk chain stays
 * bounded. Bad inputs: a raw disk is refused by `protect`, a deleted frozen
 * layer is refused by `restore`.
 *
 * HYDRAVM_TEST_DISK_ROUNDS raises the number of fail-overs (default 4).
 */
const ROUNDS = Math.max(1, Number(process.env.HYDRAVM_TEST_DISK_ROUNDS ?? 4) || 4);
/** Checkpoints the first generation runs before its kill, for the chain bound. */
const LONG_RUN_EPOCHS = 22;
const MAX_CHAIN = 6;
const CMDLINE = 'console=ttyS0 quiet hydra.run=memcheck+diskcheck memcheck.mb=16 memcheck.rate=4 diskcheck.rate=20';

const { lab, storeDir, store } = labWithStore('dfo', { beforeStop: stopAllShells });

interface Protection { committedEpoch: number; generation: number; state: string; pid: number }
interface StatusRow { vm: string; vmState: string; protection: string | null; generation: number | null; epoch: number | null; diskChainLength: number | null; lastDiskFreezeMs: number | null }
const vmDir = (vm: string) => path.join(lab.home, 'vms', vm);
const protection = (vm: string) => readJson<Protection>(path.join(vmDir(vm), 'protection.json'));
const vmState = (vm: string) => readJson<{ qemuPid?: number; supervisorPid?: number; lifecycle: string }>(path.join(vmDir(vm), 'state.json'))!;
const serialOf = (vm: string) => path.join(vmDir(vm), 'serial.log');

interface DiskProgress { records: number; run: string; violations: number }
const recordsRe = /diskcheck: records=(\d+) run=([0-9a-f]{16}) checked=\d+ violations=(\d+)/g;
function lastDiskProgress(file: string, fromOffset = 0): DiskProgress | undefined {
  let last: DiskProgress | undefined;
  for (const m of readSerial(file).slice(fromOffset).matchAll(recordsRe)) last = { records: Number(m[1]), run: m[2]!, violations: Number(m[3]) };
  return last;
}
async function waitForRecords(file: string, min: number, timeoutMs: number, fromOffset = 0): Promise<DiskProgress> {
  let p: DiskProgress | undefined;
  await waitForSerial(file, () => {
    p = lastDiskProgress(file, fromOffset);
    return !!p && p.records >= min;
  }, timeoutMs, fromOffset);
  return p!;
}

/** Every line that reports trouble: violation lines, checker errors, nonzero violation counters. */
function troubleLines(file: string): string[] {
  return readSerial(file).split('\n').filter((l) =>
    /VIOLATION|DISKCHECK ERROR|MEMCHECK ERROR/.test(l) || /\bviolations=[1-9]/.test(l));
}

function spawnOk(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  assert.equal(r.status, 0, `${cmd} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

function stats(xs: number[]): { n: number; median: number; p99: number; max: number } {
  const s = xs.slice().sort((a, b) => a - b);
  const at = (p: number) => s[Math.min(s.length - 1, Math.max(0, Math.ceil(p * s.length) - 1))] ?? NaN;
  const r = (x: number) => Math.round(x * 100) / 100;
  return { n: s.length, median: r(at(0.5)), p99: r(at(0.99)), max: r(s.at(-1) ?? NaN) };
}

/** diskcheck's records on a raw image of the disk: the run ids, the sequence numbers of intact records, torn ones. */
const MAGIC = 0x4859445241444b31n;
const REC = 4096;
const M64 = (1n << 64n) - 1n;
function diskRecords(buf: Buffer): { runs: Set<string>; seqs: number[]; torn: number } {
  const runs = new Set<string>();
  const seqs: number[] = [];
  let torn = 0;
  for (let off = 0; off + REC <= buf.length; off += REC) {
    if (buf.readBigUInt64LE(off) !== MAGIC) continue;
    let h = 0xcbf29ce484222325n;
    for (let w = 0; w < REC / 8 - 1; w++) h = ((h ^ buf.readBigUInt64LE(off + w * 8)) * 0x100000001b3n) & M64;
    if (h !== buf.readBigUInt64LE(off + REC - 8)) { torn++; continue; }
    runs.add(buf.readBigUInt64LE(off + 16).toString(16).padStart(16, '0'));
    seqs.push(Number(buf.readBigUInt64LE(off + 8)));
  }
  return { runs, seqs: seqs.sort((a, b) => a - b), torn };
}

/** Wait for the checkpointer of `vm` to commit `n` more epochs of its current generation. */
async function waitCommits(vm: string, n: number, timeoutMs: number): Promise<Protection> {
  const p0 = await until(`${vm} protected`, () => { const p = protection(vm); return p?.state === 'protected' ? p : undefined; }, 30_000);
  return until(`${n} commits of ${vm} after epoch ${p0.committedEpoch}`, () => {
    const p = protection(vm);
    return p && p.generation === p0.generation && p.committedEpoch >= p0.committedEpoch + n ? p : undefined;
  }, timeoutMs);
}

test(`disk fail-over: ${ROUNDS} rounds of SIGKILL at a random moment, restore onto the frozen layer, memory and disk agree, the chain stays bounded`, { timeout: 90_000 + ROUNDS * 60_000 }, async (t) => {
  const vm = 'dfo';
  const t0 = Date.now();
  const spec = lab.writeSpec(vm, { memory: '256M', cmdline: CMDLINE, disks: [{ path: 'd.qcow2', size: '64M' }] });
  const s = lab.cli(['vm', 'start', spec]);
  assert.equal(s.code, 0, s.stderr);
  assert.ok(fs.existsSync(path.join(lab.home, 'd.qcow2')), 'the disk was created beside the spec');
  await waitForMemcheckStep(serialOf(vm), 1, 60_000);
  const first = await waitForRecords(serialOf(vm), 1, 60_000);
  const runId = first.run;
  const p = await lab.cliAsync(['protect', vm, '--store', store.address, '--interval', '1s']);
  assert.equal(p.code, 0, p.stderr);
  assert.match(p.stdout, new RegExp(`VM ${vm} protected: generation \\d+, epoch 1 committed`));
  assert.ok(fs.existsSync(path.join(lab.home, '.hydravm-layers', vm)), 'layers go to .hydravm-layers beside the disk');

  // `hydravm status --json` sampled in the background, as an operator's monitoring would.
  const chainSeen: { gen: number | null; epoch: number | null; chain: number }[] = [];
  let polling = true;
  const poller = (async () => {
    while (polling) {
      const r = await lab.cliAsync(['status', '--json'], { timeoutMs: 20_000 });
      if (r.code === 0) {
        const row = (JSON.parse(r.stdout) as StatusRow[]).find((x) => x.vm === vm);
        if (row?.diskChainLength != null) chainSeen.push({ gen: row.generation, epoch: row.epoch, chain: row.diskChainLength });
      }
      await sleep(1000);
    }
  })();

  // What the guest has printed over time: the floor a restore from a given checkpoint must reach.
  const samples: { at: number; step: number; records: number }[] = [];
  const sampler = setInterval(() => {
    const m = lastMemcheckProgress(serialOf(vm));
    const d = lastDiskProgress(serialOf(vm));
    if (m && d) samples.push({ at: Date.now(), step: m.step, records: d.records });
  }, 20);

  const rounds: { round: number; gen: number; killedAtEpoch: number; delayMs: number; restoredGen: number; restoredEpoch: number; floorRecords: number; resumedRecords: number; restoreMs: number }[] = [];
  try {
    for (let round = 1; round <= ROUNDS; round++) {
      // The first generation runs long enough to show the chain bound over many merges.
      const before = await waitCommits(vm, round === 1 ? LONG_RUN_EPOCHS : 2, round === 1 ? 120_000 : 60_000);
      // Even rounds restore into a restore shell (its disk a placeholder until the hand-off opens the overlay), odd rounds start cold.
      const warm = round % 2 === 0;
      if (warm) {
        const cfg = localShellConfig(vm);
        assert.ok(cfg, 'the running VM has a restore-shell configuration (its disk size read from its overlay)');
        await startShell(cfg);
      }
      const delayMs = Math.floor(Math.random() * 1000);
      await sleep(delayMs);
      const killedAt = fs.statSync(serialOf(vm)).size;
      const st = vmState(vm);
      const { pid: cpPid, committedEpoch: killedAtEpoch } = protection(vm)!;
      process.kill(st.qemuPid!, 'SIGKILL');
      await until('crash recorded', () => vmState(vm).lifecycle === 'crashed', 10_000);
      await until('checkpointer exits after its VM died', () => !pidAlive(cpPid), 15_000);

      const tr = Date.now();
      const r = await lab.cliAsync(['restore', vm, '--store', store.address, '--mode', 'network', '--protect', '--interval', '1s'], { timeoutMs: 120_000 });
      const restoreMs = Date.now() - tr;
      assert.equal(r.code, 0, `round ${round}: restore failed: ${r.stderr}`);
      const m = new RegExp(`VM ${vm} restored from generation (\\d+) epoch (\\d+) \\(network mode\\)`).exec(r.stdout);
      assert.ok(m, r.stdout);
      if (warm) assert.match(r.stdout, new RegExp(`VM ${vm} restored into restore shell \\S+ \\(m256M-c1-\\w+-d64M-`), r.stdout);
      else assert.doesNotMatch(r.stdout, /restored into restore shell/);
      const restoredGen = Number(m[1]);
      const restoredEpoch = Number(m[2]);
      assert.equal(restoredGen, before.generation, 'restored the generation that was killed');
      assert.ok(restoredEpoch >= before.committedEpoch, `restored epoch ${restoredEpoch} is at least the one committed before the kill (${before.committedEpoch})`);
      assert.match(r.stdout, new RegExp(`protected again as generation ${restoredGen + 1}`));

      // The restored VM runs on a fresh overlay, not on the spec's disk nor any layer of the dead primary.
      const launch = readJson<{ launch: { diskFiles?: string[] } }>(path.join(vmDir(vm), 'spec.json'))!.launch;
      assert.equal(launch.diskFiles?.length, 1, 'the restored VM opens one overlay');
      assert.match(path.basename(launch.diskFiles![0]!), new RegExp(`^${vm}-disk0-r.*\\.qcow2$`));

      // The guest continues from the checkpoint: no reboot, both checkers resume at or after what they
      // had printed before that checkpoint's pause began, keep the same run, and go on.
      const ckpt = readCheckpointHistory(vm).find((h) => h.generation === restoredGen && h.epoch === restoredEpoch);
      assert.ok(ckpt, `checkpoints.jsonl has generation ${restoredGen} epoch ${restoredEpoch}`);
      const floor = samples.filter((x) => x.at < ckpt.startedAt - 50).at(-1) ?? { step: 0, records: 0 };
      const resumedDisk = await waitForRecords(serialOf(vm), 0, 60_000, killedAt);
      const resumedMem = await waitForMemcheckStep(serialOf(vm), 1, 60_000, killedAt);
      assert.equal(resumedDisk.run, runId, 'diskcheck keeps its run (it was not restarted)');
      assert.ok(resumedDisk.records >= floor.records, `round ${round}: diskcheck resumed at ${resumedDisk.records} records, but the guest had reached ${floor.records} before checkpoint ${restoredEpoch}`);
      assert.ok(resumedMem.step >= floor.step, `round ${round}: memcheck resumed at step ${resumedMem.step}, but had reached ${floor.step} before checkpoint ${restoredEpoch}`);
      await waitForRecords(serialOf(vm), resumedDisk.records + 10, 60_000, killedAt);
      await waitForMemcheckStep(serialOf(vm), resumedMem.step + 5, 60_000, killedAt);
      const after = readSerial(serialOf(vm)).slice(killedAt);
      assert.doesNotMatch(after, /memcheck: start|diskcheck: start|hydra-guest: ready/, `round ${round}: the guest did not reboot`);
      assert.deepEqual(troubleLines(serialOf(vm)), [], `round ${round}: no violations`);
      await assertFullVerify(serialOf(vm), killedAt);
      rounds.push({ round, gen: before.generation, killedAtEpoch, delayMs, restoredGen, restoredEpoch, floorRecords: floor.records, resumedRecords: resumedDisk.records, restoreMs });
    }
    // The last restored incarnation checkpoints too.
    await waitCommits(vm, 2, 60_000);
  } finally {
    clearInterval(sampler);
    polling = false;
    await poller;
  }
  assert.deepEqual(troubleLines(serialOf(vm)), [], 'no violations over the whole run');

  // Chain bound: every checkpoint of every generation, and what `status --json` showed.
  const history = readCheckpointHistory(vm);
  const longest = new Map<number, number>();
  for (const h of history) longest.set(h.generation, (longest.get(h.generation) ?? 0) + 1);
  assert.ok(Math.max(...longest.values()) >= 20, `one generation ran >= 20 checkpoints (${JSON.stringify([...longest])})`);
  const chainLens = history.map((h) => h.diskChainLength);
  assert.ok(chainLens.every((c) => c >= 2 && c <= MAX_CHAIN), `disk chain length within 2..${MAX_CHAIN} at every checkpoint: ${chainLens.join(',')}`);
  assert.ok(chainSeen.length >= 10, `status --json reported the chain ${chainSeen.length} times`);
  assert.ok(chainSeen.every((c) => c.chain <= MAX_CHAIN), `status --json diskChainLength <= ${MAX_CHAIN}: ${chainSeen.map((c) => c.chain).join(',')}`);

  // Host side: the disk the last incarnation leaves behind holds one run's records 0..N-1, without gaps,
  // at least as many as the guest last reported synced. Read through the chain QEMU has on top of the
  // device (protection keeps frozen layers above the restore overlay).
  const overlay = readJson<{ launch: { diskFiles: string[] } }>(path.join(vmDir(vm), 'spec.json'))!.launch.diskFiles[0]!;
  assert.equal(lab.cli(['unprotect', vm]).code, 0);
  const qmp = await QmpClient.connect(path.join(vmDir(vm), 'qmp.sock'));
  await qmp.execute('stop');
  const blocks = await qmp.execute<{ qdev?: string; inserted?: { file: string } }[]>('query-block');
  qmp.close();
  const inserted = blocks.find((b) => b.inserted && /vblk0/.test(b.qdev ?? ''))!.inserted!.file;
  // A VM restored into a restore shell has a throttle filter on top: QEMU names the root as a JSON descriptor.
  const fileBelow = (d: { filename?: string; file?: unknown }): string | undefined => d.filename ?? (d.file && typeof d.file === 'object' ? fileBelow(d.file as { filename?: string; file?: unknown }) : undefined);
  const top = inserted.startsWith('json:') ? fileBelow(JSON.parse(inserted.slice(5)) as { file?: unknown }) : inserted;
  if (inserted.startsWith('json:')) assert.match(inserted, /"driver": "throttle", "file": \{"driver": "qcow2"/, 'only the shell\'s throttle filter sits above the qcow2 node');
  // Unprotecting folded every frozen layer back into the disk the VM's configuration names.
  assert.equal(top, overlay, 'after unprotect the VM writes to its own disk again, not to a layer');
  const lastPrinted = lastDiskProgress(serialOf(vm))!;
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
  const readRecords = (file: string) => {
    const raw = path.join(lab.home, 'final.raw');
    spawnOk('qemu-img', ['convert', '-U', '-O', 'raw', file, raw]);
    const recs = diskRecords(fs.readFileSync(raw));
    fs.rmSync(raw, { force: true });
    return recs;
  };
  const chain = (JSON.parse(spawnOk('qemu-img', ['info', '-U', '--backing-chain', '--output=json', top])) as { filename: string }[]).map((c) => c.filename);
  assert.ok(chain.includes(overlay), `the device's chain ${chain.join(' <- ')} goes through the restore overlay ${overlay}`);
  const recs = readRecords(top);
  assert.deepEqual([...recs.runs], [runId], 'records of the one diskcheck run only');
  assert.ok(recs.torn <= 1, `${recs.torn} torn records`);
  const gaps = recs.seqs.filter((sq, i) => sq !== i);
  assert.deepEqual(gaps.slice(0, 5), [], 'records on disk are a gap-free prefix');
  assert.ok(recs.seqs.length >= lastPrinted.records, `disk holds ${recs.seqs.length} records, the guest reported ${lastPrinted.records} synced`);
  // The disk the VM's configuration names holds everything on its own after unprotect + stop.
  const overlayRecords = readRecords(overlay).seqs.length;
  assert.ok(overlayRecords >= lastPrinted.records, `the VM disk alone holds ${overlayRecords} records, the guest reported ${lastPrinted.records} synced`);

  const diskMs = history.map((h) => h.diskMs);
  const pauseMs = history.map((h) => h.pauseMs);
  const report = {
    rounds: ROUNDS,
    totalS: Math.round((Date.now() - t0) / 100) / 10,
    checkpoints: history.length,
    checkpointsPerGeneration: Object.fromEntries(longest),
    chainLengthAtCheckpoints: Object.fromEntries([...new Set(chainLens)].sort().map((c) => [c, chainLens.filter((x) => x === c).length])),
    chainLengthFromStatus: { max: Math.max(...chainSeen.map((c) => c.chain)), samples: chainSeen.length },
    qemuBackingChainAtEnd: chain.map((f) => path.relative(lab.home, f)),
    recordsInTopLayerChain: recs.seqs.length,
    recordsInOverlayAlone: overlayRecords,
    lastReportedSynced: lastPrinted.records,
    diskFreezeMs: stats(diskMs),
    pauseMs: stats(pauseMs),
    diskShareOfPause: Math.round((diskMs.reduce((a, b) => a + b, 0) / pauseMs.reduce((a, b) => a + b, 0)) * 1000) / 10 + '%',
    perRound: rounds,
  };
  t.diagnostic(JSON.stringify(report));
  console.log(`disk-failover report: ${JSON.stringify(report, null, 1)}`);
});

test('protect refuses a VM whose disk is a raw file, naming the file, and leaves the VM running', { timeout: 90_000 }, async () => {
  const vm = 'draw';
  const disk = path.join(lab.home, 'draw-disk.img');
  // QEMU opens HydraVM's disks as qcow2, so `vm start` itself refuses a raw file ...
  spawnOk('qemu-img', ['create', '-q', '-f', 'raw', disk, '16M']);
  const spec = lab.writeSpec(vm, { cmdline: 'console=ttyS0 quiet hydra.run=memcheck memcheck.mb=16 memcheck.rate=4', disks: [{ path: 'draw-disk.img' }] });
  const bad = lab.cli(['vm', 'start', spec]);
  assert.notEqual(bad.code, 0, 'vm start of a raw disk fails');
  assert.match(bad.stderr, new RegExp(`VM "draw": disk ${disk.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} is raw, not qcow2`));
  // ... so the raw file is what the disk path names by the time protect runs: QEMU still has the
  // qcow2 it opened (an operator converted the file in place behind the running VM).
  fs.rmSync(disk);
  spawnOk('qemu-img', ['create', '-q', '-f', 'qcow2', disk, '16M']);
  const s = lab.cli(['vm', 'start', spec]);
  assert.equal(s.code, 0, s.stderr);
  await waitForMemcheckStep(serialOf(vm), 1, 60_000);
  const tmpRaw = `${disk}.tmp`;
  spawnOk('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', disk, tmpRaw]);
  fs.renameSync(tmpRaw, disk);
  const qemuPid = vmState(vm).qemuPid!;

  const r = await lab.cliAsync(['protect', vm, '--store', store.address, '--interval', '1s'], { timeoutMs: 60_000 });
  assert.notEqual(r.code, 0, 'protect fails');
  assert.match(r.stderr, new RegExp(`disk ${disk.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: is raw, not qcow2`), r.stderr);
  assert.match(r.stderr, /qcow2 disks only/);
  assert.doesNotMatch(r.stderr, /unexpected error/);

  // The VM keeps running, unprotected, and the guest goes on.
  const st = vmState(vm);
  assert.equal(st.lifecycle, 'running');
  assert.equal(st.qemuPid, qemuPid);
  assert.ok(pidAlive(qemuPid));
  const pr = protection(vm);
  assert.ok(!pr || !pidAlive(pr.pid), 'no checkpointer left running');
  const status = (JSON.parse(lab.cli(['status', '--json']).stdout) as StatusRow[]).find((x) => x.vm === vm)!;
  assert.equal(status.vmState, 'running');
  assert.notEqual(status.protection, 'protected');
  const off = fs.statSync(serialOf(vm)).size;
  const now = lastMemcheckProgress(serialOf(vm))!.step;
  await waitForMemcheckStep(serialOf(vm), now + 5, 30_000, off);
  assert.deepEqual(troubleLines(serialOf(vm)), []);
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
});

test('restore refuses a checkpoint whose frozen disk layer was deleted, naming the layer, and leaves nothing running', { timeout: 120_000 }, async () => {
  const vm = 'dgone';
  const spec = lab.writeSpec(vm, { cmdline: CMDLINE, disks: [{ path: 'dgone.qcow2', size: '64M' }] });
  assert.equal(lab.cli(['vm', 'start', spec]).code, 0);
  await waitForRecords(serialOf(vm), 1, 60_000);
  const p = await lab.cliAsync(['protect', vm, '--store', store.address, '--interval', '1s']);
  assert.equal(p.code, 0, p.stderr);
  await waitCommits(vm, 3, 60_000);
  const cpPid = protection(vm)!.pid;
  process.kill(vmState(vm).qemuPid!, 'SIGKILL');
  await until('checkpointer exits', () => !pidAlive(cpPid), 15_000);

  // The layer the store's newest committed checkpoint names.
  const gen = protection(vm)!.generation;
  const { meta } = await openVmImage(storeDir, vm, gen);
  assert.equal(meta.disks.length, 1);
  const layer = parseLayerId(meta.disks[0]!).layer;
  assert.notEqual(path.resolve(layer), path.join(lab.home, 'dgone.qcow2'), 'a layer file, not the base');
  fs.rmSync(layer);
  const restoredDir = path.join(path.dirname(layer), 'restored');
  const before = fs.existsSync(restoredDir) ? fs.readdirSync(restoredDir) : [];

  const r = await lab.cliAsync(['restore', vm, '--store', store.address, '--mode', 'network', '--protect', '--interval', '1s'], { timeoutMs: 60_000 });
  assert.notEqual(r.code, 0, 'restore fails');
  assert.match(r.stderr, new RegExp(`frozen layer ${layer.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} is missing`), r.stderr);
  assert.doesNotMatch(r.stderr, /unexpected error/);

  // Nothing running: no QEMU, no supervisor, no checkpointer; no overlay left behind.
  const st = vmState(vm);
  assert.notEqual(st.lifecycle, 'running');
  for (const pid of [st.qemuPid, st.supervisorPid]) if (pid) assert.ok(!pidAlive(pid), `pid ${pid} is gone`);
  const pr = protection(vm);
  assert.ok(!pr || !pidAlive(pr.pid), 'no checkpointer');
  const list = JSON.parse(lab.cli(['vm', 'list', '--json']).stdout) as { name: string; state: string; live: boolean }[];
  const row = list.find((x) => x.name === vm);
  assert.ok(!row || (!row.live && row.state !== 'running'), `vm list: ${JSON.stringify(row)}`);
  const afterFiles = fs.existsSync(restoredDir) ? fs.readdirSync(restoredDir) : [];
  assert.deepEqual(afterFiles, before, 'no restore overlay left behind');
  const ps = spawnSync('pgrep', ['-f', `${vmDir(vm)}/`], { encoding: 'utf8' });
  assert.equal(ps.stdout.trim(), '', `no process of VM ${vm}: ${ps.stdout}`);
});
