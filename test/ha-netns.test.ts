// Namespaced hosts without VMs: the 3-member etcd, leftovers of a crashed run, refusals, and a `cluster down` that leaves nothing.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { makeLab, pidAlive } from './support/lab.js';
import { startNetnsCluster, readClusterInfo, processInNetns, listStores, Cluster, type EmbeddedCluster } from '../src/ha/index.js';

const PREFIX = 'hv9n-';
const SUBNET = '198.18.100.0/24';
const lab = makeLab('netns');
const dir = path.join(lab.home, 'cluster');
const isRoot = process.getuid?.() === 0;
let cluster: EmbeddedCluster | undefined;
after(async () => {
  await cluster?.stop();
  spawnSync('ip', ['netns', 'del', `${PREFIX}stray`]);
  spawnSync('ip', ['link', 'del', `${PREFIX}dummy`]);
  lab.cleanup();
});

const ourNetns = () => spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout.split('\n').map((l) => l.split(' ')[0]!).filter((n) => n.startsWith(PREFIX)).sort();
const ourLinks = () => spawnSync('ip', ['-o', 'link', 'show'], { encoding: 'utf8' }).stdout.split('\n').map((l) => /^\d+:\s+([^:@\s]+)/.exec(l)?.[1]).filter((n): n is string => !!n && n.startsWith(PREFIX)).sort();
const allPids = (c: { manager?: { pid: number }; stores?: { pid: number }[]; hosts: { pid: number }[]; etcdMembers?: { pid: number }[] }) =>
  [c.manager!.pid, ...c.stores!.map((st) => st.pid), ...c.hosts.map((h) => h.pid), ...c.etcdMembers!.map((m) => m.pid)];

test('bad subnets and prefixes are refused before anything is created', { skip: !isRoot && 'needs root' }, async () => {
  await assert.rejects(startNetnsCluster({ dir, prefix: PREFIX, subnet: '10.0.0.0/24' }), /inside 198\.18\.0\.0\/15/);
  await assert.rejects(startNetnsCluster({ dir, prefix: 'a-very-long-prefix-', subnet: SUBNET }), /prefix/);
  assert.deepEqual(ourNetns(), []);
});

test('3 namespaced hosts: 3 started etcd members, daemons in their namespaces; a crashed run is cleaned by the next up; down leaves nothing', { skip: !isRoot && 'needs root', timeout: 240_000 }, async () => {
  cluster = await startNetnsCluster({ dir, hosts: 3, prefix: PREFIX, subnet: SUBNET });
  assert.deepEqual(ourNetns(), ['hv9n-host1', 'hv9n-host2', 'hv9n-host3']);
  assert.deepEqual(ourLinks(), ['hv9n-br', 'hv9n-v1', 'hv9n-v2', 'hv9n-v3']);
  const { members } = await cluster.cluster.etcd.cluster.memberList({ linearizable: true });
  assert.deepEqual(members.map((m) => `${m.name} ${m.clientURLs.join()}`).sort(), [
    'host1 http://198.18.100.11:2379', 'host2 http://198.18.100.12:2379', 'host3 http://198.18.100.13:2379',
  ]);
  for (const h of cluster.hosts) assert.ok(processInNetns(h.pid, h.netns!), `agent ${h.host} in ${h.netns}`);
  // Each host's address is on its VM bridge br0, with eth0 (its link to the cluster's bridge) as a port and br0 keeping eth0's MAC.
  for (const h of cluster.hosts) {
    const show = (...args: string[]) => spawnSync('ip', ['-n', h.netns!, '-o', ...args], { encoding: 'utf8' }).stdout;
    assert.match(show('-4', 'addr', 'show', 'dev', 'br0'), new RegExp(`inet ${h.address!.replace(/\./g, '\\.')}/24`), `${h.host}: address on br0`);
    const eth0 = show('link', 'show', 'dev', 'eth0');
    assert.match(eth0, /master br0/, `${h.host}: eth0 is a port of br0`);
    assert.equal(/link\/ether (\S+)/.exec(show('link', 'show', 'dev', 'br0'))?.[1], /link\/ether (\S+)/.exec(eth0)?.[1], `${h.host}: br0 keeps eth0's MAC`);
  }
  for (const m of cluster.etcdMembers!) assert.ok(processInNetns(m.pid, m.netns), `${m.name} in ${m.netns}`);
  // A checkpoint store per host on the shared directory: host1's active, the others standbys.
  for (const st of cluster.stores!) assert.ok(processInNetns(st.pid, st.netns!), `${st.name} in ${st.netns}`);
  const stores = await listStores(cluster.cluster);
  assert.equal(stores.active?.name, 'store-host1');
  assert.deepEqual(stores.standbys.map((st) => st.name), ['store-host2', 'store-host3']);
  // Each member alone answers for the cluster (the CLI reaches them through the bridge).
  for (const m of cluster.etcdMembers!) {
    const c = new Cluster(m.url);
    try {
      assert.equal((await c.hosts()).size, 3, `${m.name} sees the three hosts`);
    } finally {
      c.close();
    }
  }

  // A second cluster on the same names is refused, naming what runs.
  await assert.rejects(startNetnsCluster({ dir, hosts: 3, prefix: PREFIX, subnet: SUBNET }), /still runs in/);
  // Another directory: refused with the exact commands that would clean the names.
  await assert.rejects(startNetnsCluster({ dir: path.join(lab.home, 'other'), hosts: 3, prefix: PREFIX, subnet: SUBNET }),
    (err: Error) => /ip netns del hv9n-host1/.test(err.message) && /ip link del hv9n-br/.test(err.message));

  // A crash: every process dies, the namespaces and links stay. The next `up` in the same directory cleans them.
  const crashed = allPids(cluster);
  cluster.cluster.close();
  for (const pid of crashed) process.kill(pid, 'SIGKILL');
  cluster = undefined;
  for (const pid of crashed) while (pidAlive(pid)) await new Promise((r) => setTimeout(r, 20));
  assert.equal(ourNetns().length, 3, 'the crash left the namespaces');
  cluster = await startNetnsCluster({ dir, hosts: 3, prefix: PREFIX, subnet: SUBNET });
  assert.equal((await cluster.cluster.hosts()).size, 3);

  const pids = allPids(cluster);
  await cluster.stop();
  cluster = undefined;
  assert.deepEqual(ourNetns(), []);
  assert.deepEqual(ourLinks(), []);
  for (const pid of pids) assert.ok(!pidAlive(pid), `pid ${pid} gone`);
  assert.ok(readClusterInfo(dir)?.netns, 'the record stays (down removes processes and links, not the logs)');
});

test('a namespace with the prefix that no cluster recorded is refused with the command that removes it', { skip: !isRoot && 'needs root' }, async () => {
  assert.equal(spawnSync('ip', ['netns', 'add', `${PREFIX}stray`]).status, 0);
  await assert.rejects(startNetnsCluster({ dir: path.join(lab.home, 'third'), hosts: 3, prefix: PREFIX, subnet: SUBNET }), /ip netns del hv9n-stray/);
  assert.deepEqual(ourNetns(), [`${PREFIX}stray`], 'nothing else created, the stray left alone');
  spawnSync('ip', ['netns', 'del', `${PREFIX}stray`]);
  assert.ok(!fs.existsSync(path.join(lab.home, 'third', 'cluster.json')));
});

test('a subnet already on an interface of this machine is refused, naming the address', { skip: !isRoot && 'needs root' }, async () => {
  assert.equal(spawnSync('ip', ['link', 'add', `${PREFIX}dummy`, 'type', 'bridge']).status, 0);
  try {
    assert.equal(spawnSync('ip', ['addr', 'add', '198.18.101.1/24', 'dev', `${PREFIX}dummy`]).status, 0);
    await assert.rejects(startNetnsCluster({ dir: path.join(lab.home, 'fourth'), hosts: 3, prefix: `${PREFIX}x`, subnet: '198.18.101.0/24' }),
      (err: Error & { code?: string }) => err.code === 'HYDRA_NETNS_ADDRESS_IN_USE' && /198\.18\.101\.1 on hv9n-dummy/.test(err.message));
    assert.deepEqual(ourNetns(), [], 'nothing created');
    assert.deepEqual(ourLinks(), [`${PREFIX}dummy`], 'only the test\'s own link');
  } finally {
    spawnSync('ip', ['link', 'del', `${PREFIX}dummy`]);
  }
});
