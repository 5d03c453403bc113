// A stale checkpointer racing a restore: with the store's commit windows widened, the restored VM is exactly one committed epoch, and the fenced primary dies.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { makeLab, readJson, until, sleep, pidAlive } from './support/lab.js';
import { spawnStore, type StoreProcess } from '../src/store/spawn.js';
import { QmpClient } from '../src/qmp/index.js';
import { waitForMemcheckStep, countViolations, lastMemcheckProgress } from '../src/vm/serial.js';
import { findGuestRam } from '../src/tracker/guest-ram.js';
import { openVmImage } from '../src/store/index.js';

const lab = makeLab('race');
const storeDir = path.join(lab.home, 'store');
const storeLog = path.join(lab.home, 'store.log');
/** Further "hosts": their own HYDRAVM_HOME each, the same store. */
const homes: string[] = [];
let store: StoreProcess;

// Every commit of the stale primary spends a second between its journal END and its
// first image write and another between its image writes and meta.json; every
// registration waits 700 ms before the restore may read.
const DELAYS = 'commit-before-apply:1000,apply-before-meta:1000,register-after-fence:700';

before(async () => {
  store = await spawnStore({ dir: storeDir, listen: '127.0.0.1:0', env: { ...lab.env, HYDRAVM_STORE_DELAY: DELAYS }, logFile: storeLog });
});
after(async () => {
  for (const home of homes) killHome(home);
  await store?.stop();
  lab.cleanup();
  for (const home of homes) fs.rmSync(home, { recursive: true, force: true });
});

function newHome(): string {
  const home = fs.mkdtempSync(path.join('/tmp', 'hv-race2-'));
  homes.push(home);
  return home;
}

/** Kill what a test left running on a further host. */
function killHome(home: string): void {
  const vms = path.join(home, 'vms');
  for (const name of fs.existsSync(vms) ? fs.readdirSync(vms) : []) {
    const st = readJson<{ supervisorPid?: number; qemuPid?: number }>(path.join(vms, name, 'state.json'));
    const pr = readJson<{ pid?: number }>(path.join(vms, name, 'protection.json'));
    for (const pid of [pr?.pid, st?.supervisorPid, st?.qemuPid]) {
      // Already gone is fine: this is clean-up.
      if (pid) try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
    }
  }
}

const vmFile = (home: string, vm: string, file: string) => path.join(home, 'vms', vm, file);
const protection = (home: string, vm: string) => readJson<{ committedEpoch: number; generation: number; pid: number; state: string }>(vmFile(home, vm, 'protection.json'));
const qemuPidOf = (home: string, vm: string) => readJson<{ qemuPid: number }>(vmFile(home, vm, 'state.json'))!.qemuPid;

function delayCount(point: string): number {
  const text = fs.existsSync(storeLog) ? fs.readFileSync(storeLog, 'utf8') : '';
  return text.split('\n').filter((l) => l.includes('fault injection: delaying') && l.includes(`"point":"${point}"`)).length;
}

function guestRam(qemuPid: number): Buffer {
  const ram = findGuestRam(qemuPid);
  return fs.readFileSync(`/proc/${qemuPid}/map_files/${ram.start.toString(16)}-${ram.end.toString(16)}`);
}

/**
 * While the primary in `from` is inside `window` of a commit, restore the VM
 * paused on `to`. Then: the fenced primary's QEMU dies, the old generation's
 * image never moves again, and the restored RAM is exactly that image (one
 * epoch, the one the restore reports, whose device state it loaded).
 */
async function raceRestore(vm: string, from: string, to: string, window: string): Promise<void> {
  const oldQemu = qemuPidOf(from, vm);
  const oldGen = protection(from, vm)!.generation;
  const seen = delayCount(window);
  await until(`a commit inside ${window}`, () => delayCount(window) > seen || undefined, 60_000);
  const r = await lab.cliAsync(['restore', vm, '--store', store.address, '--mode', 'network', '--paused'], { env: { HYDRAVM_HOME: to } });
  assert.equal(r.code, 0, r.stderr);
  const m = /restored from generation (\d+) epoch (\d+)/.exec(r.stdout);
  assert.ok(m, r.stdout);
  assert.equal(Number(m[1]), oldGen);
  const epoch = Number(m[2]);
  assert.match(r.stdout, /memory complete after/);

  // The fenced primary kills its own QEMU at its next contact with the store.
  await until('the fenced primary\'s QEMU dies', () => !pidAlive(oldQemu) || undefined, 60_000);
  assert.match(fs.readFileSync(vmFile(from, vm, 'checkpointer.log'), 'utf8'), /fenced by a newer generation: killed its QEMU/);

  // One epoch: the old generation is frozen at the epoch the restore read, and RAM equals its image.
  const image = await openVmImage(storeDir, vm, oldGen);
  assert.equal(image.meta.committedEpoch, epoch, `generation ${oldGen} moved from epoch ${epoch} to ${image.meta.committedEpoch} after the restore registered`);
  const img = fs.readFileSync(image.memoryPath);
  const ram = guestRam(qemuPidOf(to, vm));
  assert.equal(ram.length, img.length);
  let diff = 0;
  for (let i = 0; i < ram.length; i += 4096) if (!img.subarray(i, i + 4096).equals(ram.subarray(i, i + 4096))) diff++;
  assert.equal(diff, 0, `${diff} pages of the restored RAM differ from the image of epoch ${epoch}`);
}

test('stale checkpointer racing a restore, at its END, inside its apply, and around the registration: the restore is exactly one committed epoch', async () => {
  const vm = 'race';
  const spec = lab.writeSpec(vm, { cmdline: 'console=ttyS0 quiet hydra.run=memcheck memcheck.mb=32 memcheck.rate=8' });
  assert.equal(lab.cli(['vm', 'start', spec]).code, 0);
  await waitForMemcheckStep(vmFile(lab.home, vm, 'serial.log'), 1, 60_000);
  const p = await lab.cliAsync(['protect', vm, '--store', store.address, '--interval', '300ms']);
  assert.equal(p.code, 0, p.stderr);
  await until('epoch 3', () => (protection(lab.home, vm)?.committedEpoch ?? 0) >= 3 || undefined, 120_000);

  // Round 1: the primary's checkpoint is journalled (END durable, acknowledged), its image not yet written.
  const second = newHome();
  await raceRestore(vm, lab.home, second, 'commit-before-apply');

  // The restored VM runs again, memcheck finds nothing wrong, and it is protected as a newer generation.
  const qmp = await QmpClient.connect(vmFile(second, vm, 'qmp.sock'));
  await qmp.execute('cont');
  qmp.close();
  const serial2 = vmFile(second, vm, 'serial.log');
  const from = fs.statSync(serial2).size;
  await until('memcheck runs on the restored VM', () => (lastMemcheckProgress(serial2, from)?.step ?? 0) > 0 || undefined, 60_000);
  assert.equal(countViolations(serial2), 0);
  const p2 = await lab.cliAsync(['protect', vm, '--store', store.address, '--interval', '300ms'], { env: { HYDRAVM_HOME: second } });
  assert.equal(p2.code, 0, p2.stderr);
  await until('epoch 3 of the restored VM', () => (protection(second, vm)?.committedEpoch ?? 0) >= 3 || undefined, 120_000);

  // Round 2: the primary's image writes are done, meta.json not yet written.
  const third = newHome();
  await raceRestore(vm, second, third, 'apply-before-meta');
  const qmp3 = await QmpClient.connect(vmFile(third, vm, 'qmp.sock'));
  await qmp3.execute('cont');
  qmp3.close();
  await sleep(2000);
  assert.equal(countViolations(vmFile(third, vm, 'serial.log')), 0);
  assert.ok(delayCount('register-after-fence') >= 2, 'the registrations were delayed too');
});
