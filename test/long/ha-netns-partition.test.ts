// A host partitioned on a namespaced cluster: it self-fences, the majority restores its VM, its minority etcd member accepts nothing.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { until, pidAlive } from '../support/lab.js';
import { cliEntry } from '../../src/config/paths.js';
import { startNetnsCluster, protectInCluster, waitForFailover, forgetVm, processInNetns, inNetns, setHostLink, type EmbeddedCluster } from '../../src/ha/index.js';
import { readState } from '../../src/vm/runtime.js';
import { readProtection } from '../../src/checkpoint/protection.js';
import { waitForMemcheckStep, countViolations, readSerial } from '../../src/vm/serial.js';
import { netnsRig } from '../support/netns-rig.js';

/**
 * host2 runs a protected memcheck VM; its veth goes down. host2's agent can
 * reach only its own etcd member, which has no quorum: it self-fences (QEMU
 * killed) before the majority (host1, host3 and two members) restores the VM,
 * so there is never a second running copy. A write through the minority
 * member fails. After the heal host2 comes back without its VM, which stays
 * where it was restored, and the guest's memory checker saw no violation.
 * Then the etcd member of another host is killed: nothing is fenced, and
 * a QEMU death is still failed over by the two members left.
 */
// Overridable, so runs beside other namespaced clusters on this machine take their own names and addresses.
const vm = 'nspvm';
const rig = netnsRig('nspt', { prefix: 'hv9p-', subnet: '198.18.102.0/24' });
const { lab, hostOf, withHome } = rig;
const PREFIX = rig.prefix;
const SUBNET = rig.subnet;
const serialOn = (host: string) => rig.serialOn(host, vm);

test('partitioned host: self-fence before the restore on the majority, minority member writes nothing, heal brings the host back without the VM; then one etcd member dies and fail-over still works', { timeout: 480_000 }, async (t) => {
  const cluster = rig.cluster();
  const ns = hostOf('host2').netns!;
  const spec = lab.writeSpec(vm, {});
  const r = spawnSync(inNetns(ns)[0]!, [...inNetns(ns).slice(1), process.execPath, cliEntry, 'vm', 'start', spec], { env: { ...lab.env, HYDRAVM_HOME: hostOf('host2').home }, encoding: 'utf8', timeout: 120_000 });
  assert.equal(r.status, 0, r.stderr);
  const qemu = withHome('host2', () => readState(vm))!.qemuPid!;
  assert.ok(processInNetns(qemu, ns));
  await waitForMemcheckStep(serialOn('host2'), 1, 60_000);
  const rec = await protectInCluster(cluster.cluster, { vm, host: 'host2', store: cluster.store!.address, mode: 'network', intervalMs: 1000 }, { timeoutMs: 120_000 });
  await until('three commits', () => (withHome('host2', () => readProtection(vm))?.committedEpoch ?? 0) >= 3, 90_000);

  const offsets = new Map(cluster.hosts.map((h) => [h.host, fs.existsSync(serialOn(h.host)) ? fs.statSync(serialOn(h.host)).size : 0]));
  let fencedAt = 0;
  const watch = setInterval(() => { if (!fencedAt && !pidAlive(qemu)) fencedAt = Date.now(); }, 10);
  const cutAt = Date.now();
  setHostLink(cluster.netns!, 'host2', false);
  try {
    const { record, timing } = await waitForFailover(cluster.cluster, vm, rec.generation, { timeoutMs: 120_000 });
    assert.ok(record.host === 'host1' || record.host === 'host3', `restored on the majority side, not ${record.host}`);
    assert.ok(fencedAt > 0, 'host2 killed its QEMU (self-fence)');
    assert.ok(timing?.restoreStartedAt, 'restore timing recorded');
    assert.ok(fencedAt <= timing!.restoreStartedAt!, `fenced ${fencedAt - cutAt} ms after the cut, before the restore started (${timing!.restoreStartedAt! - cutAt} ms)`);

    t.diagnostic(`self-fence ${fencedAt - cutAt} ms after the cut; restore started ${timing!.restoreStartedAt! - cutAt} ms, running ${timing!.runningAt! - cutAt} ms after it, on ${record.host}`);
    // The minority member, asked from inside host2, takes no write.
    const put = spawnSync(inNetns(ns)[0]!, [...inNetns(ns).slice(1), 'etcdctl', '--endpoints', `http://${hostOf('host2').address}:2379`, '--command-timeout=3s', 'put', '/hydravm-partition-probe', 'x'], { encoding: 'utf8', env: { ...process.env, ETCDCTL_API: '3' } });
    assert.notEqual(put.status, 0, `a write through the minority member must fail: ${put.stdout}${put.stderr}`);

    const serial = serialOn(record.host);
    const offset = offsets.get(record.host) ?? 0;
    const resumed = await waitForMemcheckStep(serial, 1, 60_000, offset);
    await waitForMemcheckStep(serial, resumed.step + 3, 90_000, offset);
    assert.equal(countViolations(serial, offset), 0, readSerial(serial).slice(offset).split('\n').filter((l) => /VIOLATION/.test(l)).slice(0, 3).join('\n'));
  } finally {
    clearInterval(watch);
    setHostLink(cluster.netns!, 'host2', true);
  }

  // Healed: host2 is back, the probe never landed, the VM stays where the majority put it.
  await until('host2 back', async () => (await cluster.cluster.hosts()).has('host2'), 60_000);
  const probe = await cluster.cluster.etcd.get('/hydravm-partition-probe').string();
  assert.equal(probe, null, 'the minority write did not survive the heal');
  const now = await cluster.cluster.vm(vm);
  assert.notEqual(now?.value.host, 'host2');
  assert.ok(!pidAlive(qemu), 'the old copy stays dead');

  // One etcd member of three dies (that of a host without the VM): nothing is fenced, and a fail-over still works.
  const where = now!.value.host;
  const other = ['host1', 'host3'].find((h) => h !== where)!;
  const member = cluster.etcdMembers!.find((m) => m.netns === hostOf(other).netns)!;
  process.kill(member.pid, 'SIGKILL');
  const qemu2 = withHome(where, () => readState(vm))!.qemuPid!;
  await new Promise((res) => setTimeout(res, 3000));
  assert.ok(pidAlive(qemu2), `the VM on ${where} survives the death of ${other}'s etcd member`);
  const before = await cluster.cluster.vm(vm);
  const offsets2 = new Map(cluster.hosts.map((h) => [h.host, fs.existsSync(serialOn(h.host)) ? fs.statSync(serialOn(h.host)).size : 0]));
  process.kill(qemu2, 'SIGKILL');
  const again = await waitForFailover(cluster.cluster, vm, before!.value.generation, { timeoutMs: 120_000 });
  assert.notEqual(again.record.host, where);
  t.diagnostic(`with 2 of 3 members: QEMU death on ${where}, running on ${again.record.host} ${again.timing?.totalMs} ms after`);
  const serial2 = serialOn(again.record.host);
  const resumed2 = await waitForMemcheckStep(serial2, 1, 60_000, offsets2.get(again.record.host) ?? 0);
  await waitForMemcheckStep(serial2, resumed2.step + 3, 90_000, offsets2.get(again.record.host) ?? 0);
  assert.equal(countViolations(serial2, offsets2.get(again.record.host) ?? 0), 0);
  await forgetVm(cluster.cluster, vm);
});
