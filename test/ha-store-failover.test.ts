import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { makeLab, until, assertFullVerify } from './support/lab.js';
import { startEmbeddedCluster, protectInCluster, waitForFailover, forgetVm, clusterStatus, restartDaemon, resolveStore, type EmbeddedCluster } from '../src/ha/index.js';
import { protectVm, unprotectVm } from '../src/checkpoint/protection.js';
import { restoreVm } from '../src/restore/index.js';
import { loadSpecFile } from '../src/vm/spec.js';
import { startVm, stopVm } from '../src/vm/manager.js';
import { readProtection, readCheckpointHistory } from '../src/checkpoint/protection.js';
import { pidAlive } from '../src/util/pid.js';
import { waitForMemcheckStep, countViolations, readSerial } from '../src/vm/serial.js';

/**
 * The store host dies while a protected VM runs: an embedded cluster with a
 * checkpoint store per host on one shared directory (host1's active), a VM
 * running memcheck on host2 protected with store `cluster`. The active store
 * is killed (SIGKILL); the standby takes the directory's lock, recovers it and
 * registers in etcd; the checkpointer looks it up and continues incrementally
 * (the committed epochs match). Then QEMU is killed and the fail-over restore
 * reads from the new store: memcheck verifies every page of guest memory.
 */
const lab = makeLab('hasfo');
let cluster: EmbeddedCluster;
/** Protection resumes (a new epoch committed to the standby) within this of the store's death. */
const RESUME_BOUND_MS = 30_000;

before(async () => {
  // Host leases of 3 s: a restore pages guest memory inside the agent, and on this loaded machine a 1 s lease
  // let the restored VM's watchdog (fed on lease proof) kill it now and then, which is not what is tested here.
  cluster = await startEmbeddedCluster({ dir: path.join(lab.home, 'cluster'), hosts: 2, stores: true, leaseTtlSec: 3, env: { HYDRAVM_SECRET: lab.env.HYDRAVM_SECRET } });
});
after(async () => {
  await cluster?.stop();
  lab.cleanup();
});

const homeOf = (host: string) => cluster.hosts.find((h) => h.host === host)!.home;
const serialOn = (host: string, vm: string) => path.join(homeOf(host), 'vms', vm, 'serial.log');
/** Library calls act on one host's HYDRAVM_HOME; async ones keep it until they settle. */
function withHome<T>(host: string, fn: () => T): T {
  const saved = process.env.HYDRAVM_HOME;
  process.env.HYDRAVM_HOME = homeOf(host);
  const restore = () => { process.env.HYDRAVM_HOME = saved; };
  let result: T;
  try {
    result = fn();
  } catch (err) {
    restore();
    throw err;
  }
  if (result instanceof Promise) return result.finally(restore) as T;
  restore();
  return result;
}

test('the active store is killed: the standby takes over, protection resumes incrementally, and a fail-over restore from the new store passes memcheck', { timeout: 300_000 }, async () => {
  const vm = 'hasf';
  const stores = cluster.stores!;
  assert.equal(stores.length, 2, 'a store per host');
  const before = await clusterStatus(cluster.cluster);
  assert.equal(before.stores.active?.name, 'store-host1');
  assert.deepEqual(before.stores.standbys.map((s) => s.name), ['store-host2']);
  const oldAddress = before.stores.active!.address;

  const spec = loadSpecFile(lab.writeSpec(vm, {}));
  const qemuPid = (await withHome('host2', () => startVm(spec))).qemuPid!;
  await waitForMemcheckStep(serialOn('host2', vm), 1, 120_000);
  const rec = await protectInCluster(cluster.cluster, { vm, host: 'host2', store: 'cluster', mode: 'network', intervalMs: 1000 }, { timeoutMs: 120_000 });
  assert.equal(rec.store, 'cluster');
  await until('three commits', () => (withHome('host2', () => readProtection(vm))?.committedEpoch ?? 0) >= 3, 60_000);
  assert.equal(withHome('host2', () => readProtection(vm))?.store, oldAddress, 'the checkpointer found the active store through etcd');

  // The store host's store dies.
  const atKill = withHome('host2', () => readProtection(vm))!.committedEpoch;
  const killedAt = Date.now();
  process.kill(stores[0]!.pid, 'SIGKILL');
  const active = await until('the standby registered active', async () => {
    const s = (await clusterStatus(cluster.cluster)).stores;
    return s.active?.name === 'store-host2' ? s.active : undefined;
  }, RESUME_BOUND_MS);
  const takeoverMs = Date.now() - killedAt;
  const resumed = await until('a new epoch committed to the new store', () => {
    const p = withHome('host2', () => readProtection(vm));
    return p && p.store === active.address && p.committedEpoch > atKill && p.state === 'protected' ? p : undefined;
  }, RESUME_BOUND_MS);
  const resumeMs = Date.now() - killedAt;
  console.log(`# active store killed at epoch ${atKill}: standby active after ${takeoverMs} ms, epoch ${resumed.committedEpoch} committed to it after ${resumeMs} ms (bound ${RESUME_BOUND_MS} ms)`);
  assert.notEqual(active.address, oldAddress);
  const after = withHome('host2', () => readCheckpointHistory(vm)).filter((h) => h.generation === rec.generation && h.startedAt >= killedAt);
  assert.ok(after.length >= 1, 'checkpoints after the store\'s death');
  const log = fs.readFileSync(path.join(homeOf('host2'), 'vms', vm, 'checkpointer.log'), 'utf8');
  // A full checkpoint only if the dead store had made an epoch durable without acknowledging it.
  if (!/store epoch differs from ours/.test(log)) {
    assert.deepEqual(after.map((h) => h.kind), after.map(() => 'incremental'), 'the new store continued the image incrementally');
  }
  assert.match(log, /continuing incrementally|store epoch differs/);
  await until('two more commits', () => (withHome('host2', () => readProtection(vm))?.committedEpoch ?? 0) >= resumed.committedEpoch + 2, 60_000);

  // QEMU dies: the restore on host1 finds the new store through etcd.
  const offset = fs.existsSync(serialOn('host1', vm)) ? fs.statSync(serialOn('host1', vm)).size : 0;
  process.kill(qemuPid, 'SIGKILL');
  const { record } = await waitForFailover(cluster.cluster, vm, rec.generation, { timeoutMs: 90_000 });
  assert.equal(record.host, 'host1', 'restored on the other host');
  const serial = serialOn('host1', vm);
  const step = await waitForMemcheckStep(serial, 1, 60_000, offset);
  await waitForMemcheckStep(serial, step.step + 3, 60_000, offset);
  assert.doesNotMatch(readSerial(serial).slice(offset), /memcheck: start/, 'no reboot');
  assert.equal(countViolations(serial, offset), 0);
  await assertFullVerify(serial, offset);
  // The restored incarnation is protected again, into the new store.
  await until('protected again', async () => (await cluster.cluster.vm(vm))?.value.state === 'protected', 120_000);
  assert.equal(withHome('host1', () => readProtection(vm))?.store, active.address);

  await forgetVm(cluster.cluster, vm);
  await withHome('host1', () => stopVm(vm));
});

test('a network-mode restore whose store dies while it pages reconnects to the standby that took over: memcheck verifies every page', { timeout: 300_000 }, async () => {
  const vm = 'hasr';
  // The store killed above comes back as a standby of the one that took over.
  restartDaemon(cluster.dir, 'store-host1', { HYDRAVM_SECRET: lab.env.HYDRAVM_SECRET });
  const stores = await until('store-host1 standby', async () => {
    const s = (await clusterStatus(cluster.cluster)).stores;
    return s.active && s.standbys.some((b) => b.name === 'store-host1') ? s : undefined;
  }, 30_000);
  const activeName = stores.active!.name;
  const activePid = cluster.stores!.find((s) => s.name === activeName)!.pid;

  // Protected by hand (not under HA: this test restores it itself), following the active store through etcd.
  const spec = loadSpecFile(lab.writeSpec(vm, {}));
  const qemuPid = (await withHome('host2', () => startVm(spec))).qemuPid!;
  await waitForMemcheckStep(serialOn('host2', vm), 1, 120_000);
  await withHome('host2', () => protectVm({ vm, store: stores.active!.address, storeDiscovery: { etcd: cluster.etcdUrl }, intervalMs: 1000, generation: 1 }));
  await until('two commits', () => (withHome('host2', () => readProtection(vm))?.committedEpoch ?? 0) >= 2, 60_000);
  process.kill(qemuPid, 'SIGKILL');
  await until('checkpointer gone', () => !pidAlive(withHome('host2', () => readProtection(vm))?.pid ?? 0), 30_000);

  // Restore on host1 with on-demand paging only: every page not touched yet must come through the store.
  const offset = fs.existsSync(serialOn('host1', vm)) ? fs.statSync(serialOn('host1', vm)).size : 0;
  const address = await resolveStore(cluster.cluster);
  const r = await withHome('host1', () => restoreVm({
    vm, store: address, resolveStore: () => resolveStore(cluster.cluster, 15_000),
    secret: lab.env.HYDRAVM_SECRET!, mode: 'network', prefetch: false, newGeneration: 2,
  }));
  assert.ok(r.pager, 'network mode pages on demand');
  const serial = serialOn('host1', vm);
  const step = await waitForMemcheckStep(serial, 1, 60_000, offset);
  const faultsBefore = r.pager!.stats.faults;
  const [firstConnection] = r.pager!.connections();
  process.kill(activePid, 'SIGKILL');
  await until('the standby registered active', async () => (await clusterStatus(cluster.cluster)).stores.active?.name === 'store-host1', 30_000);
  // The full verify reads every page of guest memory: most of them are fetched after the kill.
  await waitForMemcheckStep(serial, step.step + 3, 120_000, offset);
  await assertFullVerify(serial, offset);
  // On demand only, memory the guest never touches stays at the store: the pager is still serving, and has not failed.
  const outcome = await Promise.race([r.pager!.done.then(() => 'complete', (err: Error) => `failed: ${err.message}`), new Promise((res) => setTimeout(() => res('serving'), 100))]);
  assert.ok(outcome === 'serving' || outcome === 'complete', `pager ${String(outcome)}`);
  const stats = r.pager!.stats;
  console.log(`# restore paging across a store fail-over: ${faultsBefore} faults before the kill, ${stats.faults} in all, ${stats.pagesPresent} of ${stats.pagesTotal} pages present`);
  assert.ok(stats.faults > faultsBefore, 'pages were fetched after the store died');
  assert.ok(!r.pager!.connections().includes(firstConnection), 'the pager reads through a new connection');
  assert.equal(countViolations(serial, offset), 0);

  await withHome('host1', () => unprotectVm(vm));
  await withHome('host1', () => stopVm(vm));
  await r.pager!.stop();
});
