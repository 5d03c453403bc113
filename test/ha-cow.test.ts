// Copy-on-write protection through the cluster: `cluster protect --cow` reaches the agent, and survives a fail-over.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FailoverManager } from '../src/ha/manager.js';
import { protectInCluster } from '../src/ha/client.js';
import type { ProtectRequest } from '../src/ha/restore-adapter.js';
import fs from 'node:fs';
import path from 'node:path';
import { GiB, crashFakeVm, etcdLab, fakeRestore, fakeVm, inProcessAgent, quiet, until, skipWithoutEtcd } from './support/ha.js';

const skip = skipWithoutEtcd();

test('cluster protect with copy-on-write: the agent protects with the grain asked, and the restored incarnation too', { skip }, async () => {
  const lab = await etcdLab('cow');
  try {
    const calls: { host: string; req: ProtectRequest }[] = [];
    const recorder = (host: string) => async (req: ProtectRequest) => {
      calls.push({ host, req });
      return { generation: req.generation };
    };
    const h1 = await inProcessAgent(lab, 'h1', { memoryBytes: 1 * GiB, protect: recorder('h1') });
    // A restore that leaves the VM unprotected (as the real one does without --protect): the agent protects it.
    const h2home = path.join(lab.dir, 'hosts', 'h2');
    const restore = fakeRestore(h2home, 'h2');
    await inProcessAgent(lab, 'h2', {
      memoryBytes: 2 * GiB, protect: recorder('h2'),
      restore: async (req) => {
        const out = await restore(req);
        fs.rmSync(path.join(h2home, 'vms', req.vm, 'protection.json'), { force: true });
        return out;
      },
    });
    const m = new FailoverManager({ etcd: lab.etcd.url, id: 'mgr', leaderTtlSec: 1, logger: quiet });
    lab.defer(() => m.stop());
    await m.start();
    await m.waitLeader();
    const vm = fakeVm(h1.home, 'db', 1, 'h1', 256 << 20);
    const rec = await protectInCluster(lab.cluster, { vm: 'db', host: 'h1', store: '127.0.0.1:1', cow: { grain: 256 * 1024 } }, { timeoutMs: 10_000 });
    assert.equal(rec.state, 'protected');
    assert.deepEqual(rec.cow, { grain: 256 * 1024 });
    assert.deepEqual(calls.find((c) => c.host === 'h1')?.req.cow, { grain: 256 * 1024 }, 'h1 protects copy-on-write');
    crashFakeVm(vm);
    await until('restored and protected on h2', async () => {
      const r = (await lab.cluster.vm('db'))?.value;
      return r && r.host === 'h2' && r.state === 'protected' ? r : undefined;
    }, 15_000);
    assert.deepEqual(calls.find((c) => c.host === 'h2')?.req.cow, { grain: 256 * 1024 }, 'the restored incarnation is protected copy-on-write as well');
  } finally {
    await lab.cleanup();
  }
});
