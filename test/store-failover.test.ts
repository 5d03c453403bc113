import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { StoreClient } from '../src/protocol/index.js';
import { spawnStore, type StoreProcess } from '../src/store/index.js';
import { keys } from '../src/ha/cluster.js';
import { listStores, resolveStore } from '../src/ha/store-discovery.js';
import { etcdLab, partitionableProxy, until, skipWithoutEtcd } from './support/ha.js';
import { commitFullCheckpoint, prng } from './support/store-data.js';

/**
 * The store is no single point of failure (no QEMU here; the real-VM path is
 * in ha-store-failover.test.ts): real etcd, real store processes on one
 * shared directory. The active store registers in etcd only once it holds the
 * directory's lock; a standby takes the lock when it frees; a store cut off
 * from etcd fences itself (stops committing) before its lease can expire, and
 * only then can the standby take over.
 */
const skip = skipWithoutEtcd();
const SECRET = 'store-failover-secret-0123456789';
const TTL = 2;
const RAM = 1 << 20;

function storeArgs(etcd: string, name: string): string[] {
  return ['--etcd', etcd, '--name', name, '--lease-ttl', String(TTL)];
}

/** Begin, send a few pages, commit: one small incremental; returns its ack time. */
async function incremental(c: StoreClient, epoch: number): Promise<number> {
  await c.begin(epoch, 'incremental', { ramSize: RAM });
  await c.sendPages([{ offset: (epoch % 16) * 4096, length: 4096 }], prng(epoch, 4096));
  await c.sendDeviceState(prng(epoch + 1, 100));
  const ack = await c.commit();
  assert.equal(ack.epoch, epoch);
  return Date.now();
}

test('a standby store takes over the shared directory; a store cut off from etcd stops committing before its lease can expire', { skip, timeout: 120_000 }, async () => {
  const lab = await etcdLab('sfo');
  const env = { ...process.env, HYDRAVM_SECRET: SECRET, HYDRAVM_LOG_LEVEL: 'info' };
  const dir = path.join(lab.dir, 'shared-store');
  const stores: StoreProcess[] = [];
  lab.defer(() => Promise.all(stores.map((s) => s.stop())));
  const clients: StoreClient[] = [];
  lab.defer(() => Promise.all(clients.map((c) => c.close().catch(() => undefined))));
  try {
    // Store A reaches etcd through a link the test can cut; B directly.
    const link = await partitionableProxy(lab.etcd.url);
    lab.defer(() => link.close());
    const a = await spawnStore({ dir, env, logFile: path.join(lab.dir, 'store-a.log'), extraArgs: storeArgs(link.url, 'A') });
    stores.push(a);
    const b = await spawnStore({ dir, env, logFile: path.join(lab.dir, 'store-b.log'), extraArgs: storeArgs(lab.etcd.url, 'B'), standby: true });
    stores.push(b);
    assert.equal(b.address, '', 'B waits: A holds the directory');
    const both = await until('A active, B standby in etcd', async () => {
      const l = await listStores(lab.cluster);
      return l.active?.name === 'A' && l.standbys.some((s) => s.name === 'B') ? l : undefined;
    }, 20_000);
    assert.equal(both.active!.address, a.address, 'etcd names the store that holds the lock');
    assert.equal(await resolveStore(lab.cluster), a.address);

    // A plain store (no --standby) refuses a directory another store serves, naming the holder.
    await assert.rejects(spawnStore({ dir, env, extraArgs: storeArgs(lab.etcd.url, 'C'), timeoutMs: 20_000 }), /exited/);

    let c = await StoreClient.connect({ address: a.address, secret: SECRET, vm: 'v1', generation: 1, role: 'checkpointer' });
    clients.push(c);
    await commitFullCheckpoint(c, 1, RAM, 7);
    let epoch = 1;
    for (; epoch < 4;) await incremental(c, ++epoch);

    // Cut A off from etcd and keep committing to it, as a checkpointer would.
    const cutAt = Date.now();
    link.cut();
    let lastAckAt = 0;
    let refused: string | undefined;
    while (!refused) {
      try {
        lastAckAt = await incremental(c, epoch + 1);
        epoch++;
      } catch (err) {
        refused = `${(err as { code?: string }).code ?? ''} ${(err as Error).message}`;
      }
      await new Promise((r) => setTimeout(r, 50));
      assert.ok(Date.now() - cutAt < 20_000, 'A went on committing long after it lost etcd');
    }
    const fencedAfter = Date.now() - cutAt;
    console.log(`# A cut off from etcd: last commit acknowledged ${lastAckAt ? lastAckAt - cutAt : 0} ms after the cut, refused after ${fencedAfter} ms (lease TTL ${TTL} s): ${refused}`);
    // Its lease lives at etcd at least until the last keepalive sent before the cut + TTL: nothing may be acknowledged after that.
    assert.ok(lastAckAt < cutAt + TTL * 1000, `A acknowledged a commit ${lastAckAt - cutAt} ms after being cut off (TTL ${TTL * 1000} ms)`);
    const fenceLog = fs.readFileSync(path.join(lab.dir, 'store-a.log'), 'utf8');
    assert.match(fenceLog, /fencing: this store stops accepting checkpoints/);
    // Refused by the store (its commit-time check), or cut by its fence closing the connection.
    assert.match(refused, /HYDRA_STORE_NOT_ACTIVE|HYDRA_STORE_CONNECTION_LOST/);

    // B takes over: etcd names it, and it holds exactly what A acknowledged.
    const active = await until('B active', async () => {
      const l = await listStores(lab.cluster);
      return l.active?.name === 'B' ? l.active : undefined;
    }, 20_000);
    console.log(`# B registered active ${Date.now() - cutAt} ms after A was cut off`);
    assert.ok(active.since > lastAckAt, 'B served only after A\'s last acknowledged commit');
    assert.notEqual(active.address, a.address);
    c = await StoreClient.connect({ address: await resolveStore(lab.cluster), secret: SECRET, vm: 'v1', generation: 1, role: 'checkpointer' });
    clients.push(c);
    assert.equal((await c.getMeta())?.committedEpoch, epoch, 'the new store holds every acknowledged epoch and nothing more');
    await incremental(c, ++epoch);

    // Healed, A waits as a standby: it does not serve again while B holds the lock.
    link.heal();
    await until('A standby again', async () => (await listStores(lab.cluster)).standbys.some((s) => s.name === 'A'), 20_000);
    assert.equal((await listStores(lab.cluster)).active?.name, 'B');

    // kill -9 of the active store: the kernel frees the lock at once and A takes over.
    const killedAt = Date.now();
    b.proc.kill('SIGKILL');
    const back = await until('A active again', async () => {
      const l = await listStores(lab.cluster);
      return l.active?.name === 'A' ? l.active : undefined;
    }, 20_000);
    const takeoverMs = Date.now() - killedAt;
    console.log(`# active store killed -> standby registered active after ${takeoverMs} ms`);
    assert.ok(takeoverMs < 10_000, `takeover took ${takeoverMs} ms`);
    c = await StoreClient.connect({ address: back.address, secret: SECRET, vm: 'v1', generation: 1, role: 'checkpointer' });
    clients.push(c);
    assert.equal((await c.getMeta())?.committedEpoch, epoch, 'every acknowledged epoch survived the kill');
    await incremental(c, ++epoch);
    // The dead store's record is gone: the key names A on A's lease.
    const kv = await lab.cluster.etcd.get(keys.storeActive).exec();
    assert.equal(JSON.parse(kv.kvs[0]!.value.toString()).pid, a.proc.pid);
  } finally {
    await lab.cleanup();
  }
});
