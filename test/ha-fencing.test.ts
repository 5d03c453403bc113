import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { makeLab, startStore, until } from './support/lab.js';
import { IncarnationSampler } from './support/ha.js';
import type { StoreProcess } from '../src/store/spawn.js';
import { startEmbeddedCluster, protectInCluster, waitForFailover, forgetVm, type EmbeddedCluster } from '../src/ha/index.js';
import { loadSpecFile } from '../src/vm/spec.js';
import { startVm, stopVm } from '../src/vm/manager.js';
import { readState, vmPaths } from '../src/vm/runtime.js';
import { readProtection } from '../src/checkpoint/protection.js';
import { requestFullVerify, waitForMemcheckStep, countViolations, readSerial } from '../src/vm/serial.js';
import { monoNow } from '../src/vm/watchdog.js';
import { pidAlive } from '../src/util/pid.js';

/**
 * Self-fencing without the agent, with real QEMU, a real store and a real
 * etcd: every supervisor kills its QEMU once its host agent can no longer
 * prove the host's lease, before the manager may restore the VM elsewhere.
 * A sampler reads /proc every 50 ms and must never see two live QEMUs of one VM.
 */
const lab = makeLab('hafence');
const clusters: EmbeddedCluster[] = [];
const stores: StoreProcess[] = [];
after(async () => {
  for (const c of clusters) await c.stop();
  for (const s of stores) await s.stop();
  lab.cleanup();
});

function homeOf(c: EmbeddedCluster, host: string): string {
  return c.hosts.find((h) => h.host === host)!.home;
}

/** Library calls act on one host's HYDRAVM_HOME; async ones keep it until they settle. */
async function onHost<T>(c: EmbeddedCluster, host: string, fn: () => T | Promise<T>): Promise<T> {
  const saved = process.env.HYDRAVM_HOME;
  process.env.HYDRAVM_HOME = homeOf(c, host);
  try {
    return await fn();
  } finally {
    process.env.HYDRAVM_HOME = saved;
  }
}

async function protectedVm(c: EmbeddedCluster, store: StoreProcess, vm: string, host: string): Promise<{ generation: number; qemuPid: number }> {
  const spec = loadSpecFile(lab.writeSpec(vm, {}));
  const qemuPid = (await onHost(c, host, () => startVm(spec))).qemuPid!;
  await waitForMemcheckStep(path.join(homeOf(c, host), 'vms', vm, 'serial.log'), 1, 120_000); // a boot on a loaded machine
  const rec = await protectInCluster(c.cluster, { vm, host, store: store.address, mode: 'network', intervalMs: 1000 }, { timeoutMs: 120_000 });
  await until(`two commits of ${vm}`, () => (readProtectionOn(c, host, vm)?.committedEpoch ?? 0) >= 2, 60_000);
  // The agent arms the VM's watchdog with its next lease proof.
  await until(`watchdog of ${vm} armed`, () => fs.existsSync(path.join(homeOf(c, host), 'vms', vm, 'watchdog.json')), 10_000);
  return { generation: rec.generation, qemuPid };
}

function readProtectionOn(c: EmbeddedCluster, host: string, vm: string) {
  const saved = process.env.HYDRAVM_HOME;
  process.env.HYDRAVM_HOME = homeOf(c, host);
  try {
    return readProtection(vm);
  } finally {
    process.env.HYDRAVM_HOME = saved;
  }
}

/** Full verification of every page of the restored guest: 0 violations, no reboot. */
async function proveGuest(c: EmbeddedCluster, host: string, vm: string, fromOffset: number): Promise<void> {
  const p = await onHost(c, host, () => vmPaths(vm));
  await waitForMemcheckStep(p.serialLog, 1, 60_000, fromOffset);
  const full = await requestFullVerify(p.serialLog, p.serialIn, 180_000);
  assert.equal(full.violations, 0, `memcheck full verification of ${vm} on ${host}: ${full.violations} violations`);
  assert.equal(full.pages, 8192, 'every page of the 32 MiB working set verified');
  assert.doesNotMatch(readSerial(p.serialLog).slice(fromOffset), /memcheck: start/, 'no reboot');
  assert.equal(countViolations(p.serialLog, fromOffset), 0);
}

function serialSize(c: EmbeddedCluster, host: string, vm: string): number {
  const f = path.join(homeOf(c, host), 'vms', vm, 'serial.log');
  return fs.existsSync(f) ? fs.statSync(f).size : 0;
}

test('agent-only SIGKILL: the old QEMU kills itself before the VM is restored elsewhere; never two live QEMUs', { timeout: 300_000 }, async () => {
  const c = await startEmbeddedCluster({ dir: path.join(lab.home, 'c1'), hosts: 2, env: { HYDRAVM_SECRET: lab.env.HYDRAVM_SECRET } });
  clusters.push(c);
  const store = await startStore(lab, path.join(lab.home, 'store1'));
  stores.push(store);
  const vm = 'fence1';
  const { generation, qemuPid } = await protectedVm(c, store, vm, 'host1');

  const sampler = new IncarnationSampler([vm], c.dir).start();
  await new Promise((r) => setTimeout(r, 500));
  const offset2 = serialSize(c, 'host2', vm);
  const agent = c.hosts.find((h) => h.host === 'host1')!;
  const killedMono = monoNow();
  process.kill(agent.pid, 'SIGKILL');

  await until('the old QEMU to die by itself', () => !pidAlive(qemuPid), 10_000);
  const deathMs = monoNow() - killedMono;
  const { record, timing } = await waitForFailover(c.cluster, vm, generation, { timeoutMs: 120_000 });
  assert.equal(record.host, 'host2');
  assert.equal(record.generation, generation + 1);
  await proveGuest(c, 'host2', vm, offset2);
  sampler.stop();

  const old = await onHost(c, 'host1', () => readState(vm))!;
  assert.match(old!.selfFenced ?? '', /no proof of host host1's lease/, 'the supervisor fenced its QEMU itself');
  const s = sampler.seen.get(vm)!;
  assert.ok(s.one > 20, `the sampler saw the VM live (${s.one} of ${sampler.samples} samples)`);
  assert.equal(s.twoOrMore, 0, `two live QEMUs of ${vm} seen: ${JSON.stringify(s.pidsAtDouble)}`);
  assert.ok(timing?.restoreStartedAt && timing.detectedAt, 'timings recorded');
  const expiryToRestore = timing!.restoreStartedAt! - timing!.detectedAt;
  assert.ok(expiryToRestore >= 500, `restore started ${expiryToRestore} ms after the lease expiry was seen: the fencing margin is 500 ms`);
  console.log(`# agent SIGKILL -> old QEMU dead: ${Math.round(deathMs)} ms; lease expiry seen -> restore start: ${expiryToRestore} ms; ${sampler.samples} samples at 50 ms, 0 with two QEMUs`);

  await forgetVm(c.cluster, vm);
  await onHost(c, 'host2', () => stopVm(vm));
});

test('etcd unreachable: shorter than the TTL changes nothing; longer, every supervisor self-fences and the VMs come back', { timeout: 420_000 }, async () => {
  // TTL 3 s: keepalives every second, the watchdog deadline 2.75 s after a proof.
  const c = await startEmbeddedCluster({ dir: path.join(lab.home, 'c2'), hosts: 2, leaseTtlSec: 3, env: { HYDRAVM_SECRET: lab.env.HYDRAVM_SECRET } });
  clusters.push(c);
  const store = await startStore(lab, path.join(lab.home, 'store2'));
  stores.push(store);
  const vms = [{ vm: 'out1', host: 'host1' }, { vm: 'out2', host: 'host2' }];
  const started = [];
  for (const v of vms) started.push({ ...v, ...(await protectedVm(c, store, v.vm, v.host)) });
  const sampler = new IncarnationSampler(vms.map((v) => v.vm), c.dir).start();

  // Shorter than the TTL (minus a keepalive period and the margin): nothing happens.
  await new Promise((r) => setTimeout(r, 1500));
  process.kill(c.etcd.pid, 'SIGSTOP');
  await new Promise((r) => setTimeout(r, 1200));
  process.kill(c.etcd.pid, 'SIGCONT');
  await new Promise((r) => setTimeout(r, 4000));
  for (const v of started) {
    assert.ok(pidAlive(v.qemuPid), `${v.vm}'s QEMU survives a 1.2 s etcd outage`);
    const st = await onHost(c, v.host, () => readState(v.vm));
    assert.equal(st?.selfFenced, undefined);
    const rec = await c.cluster.vm(v.vm);
    assert.equal(rec?.value.generation, v.generation, 'no fail-over');
    assert.equal(rec?.value.host, v.host);
  }

  // Longer than the TTL: every supervisor kills its QEMU while etcd is still away.
  const offsets = new Map(started.map((v) => [v.vm, new Map(c.hosts.map((h) => [h.host, serialSize(c, h.host, v.vm)]))]));
  process.kill(c.etcd.pid, 'SIGSTOP');
  const stoppedMono = monoNow();
  try {
    for (const v of started) await until(`${v.vm}'s QEMU to self-fence`, () => !pidAlive(v.qemuPid), 8000);
    const fencedMs = monoNow() - stoppedMono;
    for (const v of started) {
      const st = await onHost(c, v.host, () => readState(v.vm));
      assert.match(st?.selfFenced ?? '', /no proof of host/, `${v.vm}: its supervisor fenced it (${st?.reason})`);
    }
    console.log(`# etcd stopped -> both QEMUs self-fenced after ${Math.round(fencedMs)} ms (TTL 3 s)`);
  } finally {
    process.kill(c.etcd.pid, 'SIGCONT');
  }

  // etcd is back: the manager restores both (on either host) from their images.
  for (const v of started) {
    const { record } = await waitForFailover(c.cluster, v.vm, v.generation, { timeoutMs: 180_000 });
    await proveGuest(c, record.host, v.vm, offsets.get(v.vm)!.get(record.host)!);
  }
  sampler.stop();
  assert.equal(sampler.doubles(), 0, `two live QEMUs of one VM seen: ${JSON.stringify([...sampler.seen])}`);
  for (const v of started) {
    const rec = (await c.cluster.vm(v.vm))!.value;
    await forgetVm(c.cluster, v.vm);
    await onHost(c, rec.host, () => stopVm(v.vm));
  }
});
