// The store host dies on namespaced hosts: a standby store in another namespace takes the shared directory over, protection resumes, a fail-over restores from it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { until, pidAlive, assertFullVerify } from '../support/lab.js';
import { cliEntry } from '../../src/config/paths.js';
import { startNetnsCluster, protectInCluster, waitForFailover, forgetVm, processInNetns, inNetns, clusterStatus, type EmbeddedCluster } from '../../src/ha/index.js';
import { readState } from '../../src/vm/runtime.js';
import { readProtection } from '../../src/checkpoint/protection.js';
import { waitForMemcheckStep, countViolations, readSerial } from '../../src/vm/serial.js';
import { netnsRig } from '../support/netns-rig.js';

/**
 * `cluster up --netns` runs a checkpoint store in every host's namespace on
 * the shared directory; host1's is active. A memcheck VM on host2 is
 * protected with store `cluster`. Host1 dies as a whole (agent, etcd member,
 * store): a standby in another namespace takes the directory's lock, recovers
 * it and registers in etcd (2 of 3 members left, a majority); the checkpointer
 * in host2 looks it up and commits again within RESUME_BOUND_MS. Then QEMU is
 * killed and the fail-over restore reads from the new store: memcheck
 * verifies every page.
 */
// Overridable, so runs beside other namespaced clusters on this machine take their own names and addresses.
const vm = 'nssf';
const rig = netnsRig('nssf', { prefix: 'h9s-', subnet: '198.18.97.0/24' });
const { lab, hostOf, withHome } = rig;
const PREFIX = rig.prefix;
const SUBNET = rig.subnet;
const serialOn = (host: string) => rig.serialOn(host, vm);
const RESUME_BOUND_MS = 30_000;

test('namespaced cluster: the store host dies, a standby store in another namespace takes over, protection resumes, a fail-over restore from it passes memcheck', { timeout: 600_000 }, async (t) => {
  const cluster = rig.cluster();
  const stores = cluster.stores!;
  assert.equal(stores.length, 3, 'a store per host');
  for (const s of stores) assert.ok(processInNetns(s.pid, s.netns!), `${s.name} runs in ${s.netns}`);
  const initial = (await clusterStatus(cluster.cluster)).stores;
  assert.equal(initial.active?.name, 'store-host1');
  assert.equal(initial.active?.address, `${SUBNET.replace(/0\/24$/, '11')}:7000`);

  const spec = lab.writeSpec(vm, {});
  const r = spawnSync(inNetns(`${PREFIX}host2`)[0]!, [...inNetns(`${PREFIX}host2`).slice(1), process.execPath, cliEntry, 'vm', 'start', spec], { env: { ...lab.env, HYDRAVM_HOME: hostOf('host2').home }, encoding: 'utf8', timeout: 120_000 });
  assert.equal(r.status, 0, r.stderr);
  const st = withHome('host2', () => readState(vm))!;
  await waitForMemcheckStep(serialOn('host2'), 1, 90_000);
  const rec = await protectInCluster(cluster.cluster, { vm, host: 'host2', store: 'cluster', mode: 'network', intervalMs: 1000 }, { timeoutMs: 120_000 });
  await until('three commits', () => (withHome('host2', () => readProtection(vm))?.committedEpoch ?? 0) >= 3, 90_000);

  // Host1 dies as a whole: its agent, its etcd member and the active store.
  const atKill = withHome('host2', () => readProtection(vm))!.committedEpoch;
  const killedAt = Date.now();
  const member = cluster.etcdMembers!.find((m) => m.netns === `${PREFIX}host1`)!;
  for (const pid of [hostOf('host1').pid, member.pid, stores[0]!.pid]) if (pidAlive(pid)) process.kill(pid, 'SIGKILL');
  const active = await until('a standby registered active', async () => {
    const s = (await clusterStatus(cluster.cluster)).stores;
    return s.active && s.active.name !== 'store-host1' ? s.active : undefined;
  }, RESUME_BOUND_MS);
  const takeoverMs = Date.now() - killedAt;
  const resumed = await until('a new epoch committed to the new store', () => {
    const p = withHome('host2', () => readProtection(vm));
    return p && p.store === active.address && p.committedEpoch > atKill && p.state === 'protected' ? p : undefined;
  }, RESUME_BOUND_MS);
  t.diagnostic(`store host killed at epoch ${atKill}: ${active.name} active after ${takeoverMs} ms, epoch ${resumed.committedEpoch} committed to it after ${Date.now() - killedAt} ms (bound ${RESUME_BOUND_MS} ms)`);

  // QEMU dies: restored on host3 (host1 is dead, once its lease has expired) from the new store.
  await until('host1 seen dead by the cluster', async () => !(await cluster.cluster.hosts().catch(() => new Map([['host1', null]]))).has('host1'), 30_000);
  const offset = fs.existsSync(serialOn('host3')) ? fs.statSync(serialOn('host3')).size : 0;
  process.kill(st.qemuPid!, 'SIGKILL');
  const fo = await waitForFailover(cluster.cluster, vm, rec.generation, { timeoutMs: 120_000 });
  assert.equal(fo.record.host, 'host3');
  const serial = serialOn('host3');
  const step = await waitForMemcheckStep(serial, 1, 90_000, offset);
  await waitForMemcheckStep(serial, step.step + 3, 90_000, offset);
  assert.doesNotMatch(readSerial(serial).slice(offset), /memcheck: start/, 'no reboot');
  assert.equal(countViolations(serial, offset), 0);
  await assertFullVerify(serial, offset);
  await forgetVm(cluster.cluster, vm);
});
