import { test } from 'node:test';
import assert from 'node:assert/strict';
import { placeVm, reservations } from './placement.js';
import { staleReason } from './fence.js';
import { vmDeath, type LocalVm } from './local-vm.js';
import type { HostRecord, VmRecord } from './cluster.js';

const MiB = 1024 * 1024;
const host = (name: string, freeMiB: number): HostRecord => ({
  name, address: name, agentPid: 1, home: `/tmp/${name}`, totalMemoryBytes: 8192 * MiB, freeMemoryBytes: freeMiB * MiB, vms: [], leaseId: '1', startedAt: 0, updatedAt: 0,
});

test('placement picks the live host with the most memory left', () => {
  const r = placeVm({ vm: 'a', memoryBytes: 512 * MiB, headroomBytes: 0 }, [host('h1', 1000), host('h2', 3000), host('h3', 2000)]);
  assert.deepEqual(r.ok && r.host, 'h2');
});

test('placement skips excluded hosts and uses avoided ones only as a last resort', () => {
  const hosts = [host('h1', 4000), host('h2', 1000)];
  assert.equal((placeVm({ vm: 'a', memoryBytes: 512 * MiB, exclude: ['h1'] }, hosts) as { host: string }).host, 'h2');
  assert.equal((placeVm({ vm: 'a', memoryBytes: 512 * MiB, avoid: ['h1'] }, hosts) as { host: string }).host, 'h2');
  assert.equal((placeVm({ vm: 'a', memoryBytes: 2048 * MiB, avoid: ['h1'] }, hosts) as { host: string }).host, 'h1');
});

test('placement prefers a host with an idle restore shell of the VM\'s configuration, among those that fit and are not avoided', () => {
  const warm = { ...host('h1', 1000), shells: [{ key: 'm512M-k', idle: 1 }, { key: 'm256M-k', idle: 2 }] };
  const hosts = [warm, host('h2', 3000)];
  assert.equal((placeVm({ vm: 'a', memoryBytes: 512 * MiB, shellKey: 'm512M-k' }, hosts) as { host: string }).host, 'h1');
  // Another configuration's shells do not count; without a key the most room wins as before.
  assert.equal((placeVm({ vm: 'a', memoryBytes: 512 * MiB, shellKey: 'm1G-k' }, hosts) as { host: string }).host, 'h2');
  assert.equal((placeVm({ vm: 'a', memoryBytes: 512 * MiB }, hosts) as { host: string }).host, 'h2');
  // A shell does not make room, nor outweigh a host the VM just failed on.
  assert.equal((placeVm({ vm: 'a', memoryBytes: 2048 * MiB, shellKey: 'm512M-k' }, hosts) as { host: string }).host, 'h2');
  assert.equal((placeVm({ vm: 'a', memoryBytes: 512 * MiB, shellKey: 'm512M-k', avoid: ['h1'] }, hosts) as { host: string }).host, 'h2');
  const r = placeVm({ vm: 'a', memoryBytes: 512 * MiB, shellKey: 'm256M-k' }, hosts);
  assert.equal(r.candidates.find((c) => c.host === 'h1')?.warmShells, 2);
});

test('placement counts restores in flight and explains a refusal', () => {
  const vms = [{ state: 'restoring', host: 'h1', memoryBytes: 900 * MiB }, { state: 'protected', host: 'h1', memoryBytes: 900 * MiB }] as VmRecord[];
  const res = reservations(vms);
  assert.equal(res.get('h1'), 900 * MiB);
  const r = placeVm({ vm: 'big', memoryBytes: 512 * MiB }, [host('h1', 1000)], res);
  assert.equal(r.ok, false);
  assert.match((r as { reason: string }).reason, /no host has 576 MiB free for VM "big" \(h1: 100 MiB\)/);
  assert.match((placeVm({ vm: 'x', memoryBytes: 1 }, []) as { reason: string }).reason, /no live host/);
});

const local = (over: Partial<LocalVm>): LocalVm => ({ name: 'v', dir: '/x', qemuAlive: true, supervisorAlive: true, live: true, ...over });

test('VM death classification from state.json and pids', () => {
  const st = { name: 'v', supervisorPid: 1, qemuPid: 2 };
  assert.equal(vmDeath(local({ state: { ...st, lifecycle: 'running' } })).kind, 'alive');
  assert.equal(vmDeath(local({ state: { ...st, lifecycle: 'crashed', endedAt: new Date(5000).toISOString() } })).kind, 'crashed');
  assert.equal(vmDeath(local({ state: { ...st, lifecycle: 'running' }, qemuAlive: false })).kind, 'crashed');
  assert.equal(vmDeath(local({ state: { ...st, lifecycle: 'stopped' }, live: false, qemuAlive: false, supervisorAlive: false })).kind, 'stopped');
  assert.equal(vmDeath(local({ state: { ...st, lifecycle: 'stopping' } })).kind, 'alive');
  assert.equal(vmDeath(local({})).kind, 'unknown');
});

test('a local copy is stale when etcd names a newer generation or another host', () => {
  const rec = (generation: number, h: string) => ({ name: 'v', host: h, generation, state: 'protected' } as VmRecord);
  const v = local({ ha: { vm: 'v', host: 'h1', generation: 3, updatedAt: 0 } });
  assert.equal(staleReason(v, rec(3, 'h1'), 'h1'), undefined);
  assert.match(staleReason(v, rec(4, 'h2'), 'h1')!, /generation 3 is stale/);
  assert.match(staleReason(v, rec(3, 'h2'), 'h1')!, /belongs to host h2/);
  assert.equal(staleReason(v, undefined, 'h1'), undefined);
  assert.equal(staleReason(local({}), rec(9, 'h2'), 'h1'), undefined, 'unknown generation: not ours to judge');
});
