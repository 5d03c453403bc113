// Fail-over on namespaced hosts: a 3-member etcd, QEMU killed, then a whole host killed; `cluster down` leaves nothing.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { until, pidAlive } from '../support/lab.js';
import { cliEntry } from '../../src/config/paths.js';
import { startNetnsCluster, protectInCluster, waitForFailover, waitForVm, forgetVm, processInNetns, inNetns, type EmbeddedCluster } from '../../src/ha/index.js';
import { readState } from '../../src/vm/runtime.js';
import { readProtection } from '../../src/checkpoint/protection.js';
import { waitForMemcheckStep, countViolations, readSerial } from '../../src/vm/serial.js';
import { netnsRig } from '../support/netns-rig.js';

/**
 * `cluster up --netns`: three hosts, each a network namespace with its own
 * etcd member, agent and VMs. A memcheck VM started in host1's namespace is
 * protected; its QEMU is SIGKILLed and it comes back on another host (in that
 * host's namespace); then that whole host dies (agent, supervisor, QEMU,
 * checkpointer and etcd member at once) and the two remaining members, a
 * majority, carry the fail-over to the last host. The guest's memory checker
 * sees no violation, and `cluster down` removes every namespace, link and
 * process.
 */
// Overridable, so runs beside other namespaced clusters on this machine take their own names and addresses.
const vm = 'nsvm';
const rig = netnsRig('nsfo', { prefix: 'hv9f-', subnet: '198.18.101.0/24' });
const { lab, hostOf, withHome } = rig;
const PREFIX = rig.prefix;
const SUBNET = rig.subnet;
const serialOn = (host: string) => rig.serialOn(host, vm);
const ourNetns = () => spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout.split('\n').filter((l) => l.startsWith(PREFIX));
const ourLinks = () => spawnSync('ip', ['-o', 'link', 'show'], { encoding: 'utf8' }).stdout.split('\n').filter((l) => new RegExp(`^\\d+:\\s+${PREFIX}`).test(l));

async function checkResumed(host: string, offset: number): Promise<void> {
  const serial = serialOn(host);
  const resumed = await waitForMemcheckStep(serial, 1, 60_000, offset);
  await waitForMemcheckStep(serial, resumed.step + 3, 90_000, offset);
  assert.doesNotMatch(readSerial(serial).slice(offset), /memcheck: start/, 'no reboot');
  assert.equal(countViolations(serial, offset), 0, readSerial(serial).slice(offset).split('\n').filter((l) => /VIOLATION/.test(l)).slice(0, 3).join('\n'));
}
const serialSize = (host: string) => (fs.existsSync(serialOn(host)) ? fs.statSync(serialOn(host)).size : 0);

test('namespaced 3-host cluster: 3-member etcd, QEMU death and host death fail over, cluster down leaves nothing', { timeout: 540_000 }, async (t) => {
  const cluster = rig.cluster();
  // Three started members, one per namespace address; every daemon in its own namespace.
  const members = await cluster.cluster.etcd.cluster.memberList({ linearizable: true });
  assert.equal(members.members.length, 3, JSON.stringify(members.members));
  assert.deepEqual(members.members.map((m) => m.name).sort(), ['host1', 'host2', 'host3'], 'every member started (a member not started yet has no name)');
  assert.deepEqual(members.members.map((m) => m.clientURLs[0]).sort(), [11, 12, 13].map((i) => `http://${SUBNET.replace(/0\/24$/, String(i))}:2379`));
  for (const h of cluster.hosts) {
    assert.ok(processInNetns(h.pid, h.netns!), `agent of ${h.host} runs in ${h.netns}`);
    const m = cluster.etcdMembers!.find((x) => x.netns === h.netns)!;
    assert.ok(processInNetns(m.pid, h.netns!), `etcd member of ${h.host} runs in ${h.netns}`);
  }
  assert.ok(processInNetns(cluster.store!.pid, `${PREFIX}host1`), 'the store runs in host1');

  // The VM starts in host1's namespace, as `hydravm vm start` run there would.
  const spec = lab.writeSpec(vm, {});
  const r = spawnSync(inNetns(`${PREFIX}host1`)[0]!, [...inNetns(`${PREFIX}host1`).slice(1), process.execPath, cliEntry, 'vm', 'start', spec], { env: { ...lab.env, HYDRAVM_HOME: hostOf('host1').home }, encoding: 'utf8', timeout: 120_000 });
  assert.equal(r.status, 0, r.stderr);
  const qemu1 = withHome('host1', () => readState(vm))!.qemuPid!;
  assert.ok(processInNetns(qemu1, `${PREFIX}host1`), 'QEMU runs in host1');
  await waitForMemcheckStep(serialOn('host1'), 1, 60_000);
  const rec = await protectInCluster(cluster.cluster, { vm, host: 'host1', store: cluster.store!.address, mode: 'network', intervalMs: 1000 }, { timeoutMs: 120_000 });
  await until('three commits on host1', () => (withHome('host1', () => readProtection(vm))?.committedEpoch ?? 0) >= 3, 90_000);

  // 1. QEMU dies: restored on another host, inside that host's namespace.
  let offsets = new Map(cluster.hosts.map((h) => [h.host, serialSize(h.host)]));
  process.kill(qemu1, 'SIGKILL');
  const first = await waitForFailover(cluster.cluster, vm, rec.generation, { timeoutMs: 120_000 });
  assert.notEqual(first.record.host, 'host1');
  const second = first.record.host;
  t.diagnostic(`QEMU death: detected ${first.timing?.detectionMs} ms, running on ${second} ${first.timing?.totalMs} ms after the failure`);
  const st2 = withHome(second, () => readState(vm))!;
  assert.ok(processInNetns(st2.qemuPid!, hostOf(second).netns!), `restored QEMU runs in ${second}'s namespace`);
  await checkResumed(second, offsets.get(second) ?? 0);

  // 2. The whole host dies, its etcd member with it: the other two members are a majority.
  const prot = await waitForVm(cluster.cluster, vm, (v) => v.generation === first.record.generation && v.state === 'protected', 120_000);
  await until(`three commits on ${second}`, () => (withHome(second, () => readProtection(vm))?.committedEpoch ?? 0) >= 3, 90_000);
  offsets = new Map(cluster.hosts.map((h) => [h.host, serialSize(h.host)]));
  const cp = withHome(second, () => readProtection(vm));
  const member = cluster.etcdMembers!.find((m) => m.netns === hostOf(second).netns)!;
  for (const pid of [hostOf(second).pid, st2.supervisorPid, st2.qemuPid, cp?.pid, member.pid]) if (pid && pidAlive(pid)) process.kill(pid, 'SIGKILL');
  const third = await waitForFailover(cluster.cluster, vm, prot.generation, { timeoutMs: 120_000 });
  assert.notEqual(third.record.host, second);
  t.diagnostic(`host death (agent, QEMU, etcd member): detected ${third.timing?.detectionMs} ms, running on ${third.record.host} ${third.timing?.totalMs} ms after the failure`);
  const st3 = withHome(third.record.host, () => readState(vm))!;
  assert.ok(processInNetns(st3.qemuPid!, hostOf(third.record.host).netns!), 'restored QEMU runs in its host\'s namespace');
  await checkResumed(third.record.host, offsets.get(third.record.host) ?? 0);
  const left = await cluster.cluster.etcd.cluster.memberList({ linearizable: true });
  assert.equal(left.members.length, 3, 'the dead member is still a member (2 of 3 alive)');

  await forgetVm(cluster.cluster, vm);

  // 3. `cluster down` removes every namespace, link and process it created.
  const pids = [cluster.manager!.pid, cluster.store!.pid, ...cluster.hosts.map((h) => h.pid), ...cluster.etcdMembers!.map((m) => m.pid), st3.qemuPid!, st3.supervisorPid!];
  await cluster.stop();
  assert.deepEqual(ourNetns(), []);
  assert.deepEqual(ourLinks(), []);
  for (const pid of pids) assert.ok(!pidAlive(pid), `pid ${pid} is gone`);
});
