import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { makeLab, startStore, until, pidAlive, assertFullVerify } from './support/lab.js';
import type { StoreProcess } from '../src/store/spawn.js';
import { startEmbeddedCluster, protectInCluster, waitForFailover, forgetVm, type EmbeddedCluster } from '../src/ha/index.js';
import { loadSpecFile } from '../src/vm/spec.js';
import { startVm, stopVm } from '../src/vm/manager.js';
import { readState } from '../src/vm/runtime.js';
import { readProtection, readCheckpointHistory } from '../src/checkpoint/protection.js';
import { lastMemcheckProgress, waitForMemcheckStep, countViolations, readSerial } from '../src/vm/serial.js';

/**
 * Automatic fail-over end to end, as the cluster does it: a protected VM
 * running memcheck, its QEMU killed or its whole host killed, the manager
 * restores it on another host, and the guest continues from a step at or
 * after its newest committed checkpoint with its memory intact. Both memory
 * modes, both failure kinds.
 */
const lab = makeLab('hafo');
let cluster: EmbeddedCluster;
let store: StoreProcess;
const storeDir = path.join(lab.home, 'store');

before(async () => {
  cluster = await startEmbeddedCluster({ dir: path.join(lab.home, 'cluster'), hosts: 3, env: { HYDRAVM_SECRET: lab.env.HYDRAVM_SECRET } });
  store = await startStore(lab, storeDir);
});
after(async () => {
  await cluster?.stop();
  await store?.stop();
  lab.cleanup();
});

const homeOf = (host: string) => cluster.hosts.find((h) => h.host === host)!.home;
const serialOn = (host: string, vm: string) => path.join(homeOf(host), 'vms', vm, 'serial.log');
/** Library calls act on one host's HYDRAVM_HOME; async ones keep it until they settle. */
function withHome<T>(host: string, fn: () => T): T {
  const saved = process.env.HYDRAVM_HOME;
  process.env.HYDRAVM_HOME = homeOf(host);
  let result: T;
  try {
    result = fn();
  } catch (err) {
    process.env.HYDRAVM_HOME = saved;
    throw err;
  }
  if (result instanceof Promise) {
    return result.finally(() => { process.env.HYDRAVM_HOME = saved; }) as T;
  }
  process.env.HYDRAVM_HOME = saved;
  return result;
}
function serialSizes(vm: string): Map<string, number> {
  return new Map(cluster.hosts.map((h) => [h.host, fs.existsSync(serialOn(h.host, vm)) ? fs.statSync(serialOn(h.host, vm)).size : 0]));
}

const scenarios = [
  { vm: 'hanq', mode: 'network', failure: 'qemu', host: 'host1' },
  { vm: 'hafq', mode: 'file', failure: 'qemu', host: 'host1' },
  { vm: 'hanh', mode: 'network', failure: 'host', host: 'host3' },
  { vm: 'hafh', mode: 'file', failure: 'host', host: 'host2' },
] as const;

for (const s of scenarios) {
  test(`automatic fail-over (${s.mode} mode) after ${s.failure === 'qemu' ? 'QEMU is killed' : 'its whole host dies'}: memcheck continues with zero violations`, { timeout: 180_000 }, async () => {
    const spec = loadSpecFile(lab.writeSpec(s.vm, {}));
    const qemuPid = (await withHome(s.host, () => startVm(spec))).qemuPid!;
    await waitForMemcheckStep(serialOn(s.host, s.vm), 1, 120_000); // a boot on a loaded machine
    const rec = await protectInCluster(cluster.cluster, { vm: s.vm, host: s.host, store: store.address, storeDir: s.mode === 'file' ? storeDir : undefined, mode: s.mode, intervalMs: 1000 }, { timeoutMs: 120_000 });
    await until('three commits', () => (withHome(s.host, () => readProtection(s.vm))?.committedEpoch ?? 0) >= 3, 60_000);

    // What the guest had printed over time, to bound where a checkpoint caught it.
    const samples: { at: number; step: number }[] = [];
    const sampler = setInterval(() => {
      const p = lastMemcheckProgress(serialOn(s.host, s.vm));
      if (p) samples.push({ at: Date.now(), step: p.step });
    }, 20);
    await new Promise((r) => setTimeout(r, 1000 + Math.floor(Math.random() * 1000)));
    clearInterval(sampler);
    const offsets = serialSizes(s.vm);
    const history = withHome(s.host, () => readCheckpointHistory(s.vm)).filter((h) => h.generation === rec.generation);
    if (s.failure === 'qemu') {
      process.kill(qemuPid, 'SIGKILL');
    } else {
      // A host's death: its agent, and every process of its VMs, at once.
      const st = withHome(s.host, () => readState(s.vm))!;
      const cp = withHome(s.host, () => readProtection(s.vm));
      for (const pid of [cluster.hosts.find((h) => h.host === s.host)!.pid, st.supervisorPid, st.qemuPid, cp?.pid]) {
        if (pid && pidAlive(pid)) process.kill(pid, 'SIGKILL');
      }
    }
    const { record, timing } = await waitForFailover(cluster.cluster, s.vm, rec.generation, { timeoutMs: 60_000 });
    assert.notEqual(record.host, s.host, 'restored on another host');
    assert.equal(record.generation, rec.generation + 1);
    assert.ok(timing && timing.runningAt, 'timings recorded');
    if (s.failure === 'qemu') assert.ok(timing!.detectedAt - timing!.failedAt! < 1000, `QEMU death detected in ${timing!.detectedAt - timing!.failedAt!} ms`);

    // The checkpoint restored is at least the last one committed before the failure started.
    const serial = serialOn(record.host, s.vm);
    const offset = offsets.get(record.host) ?? 0;
    const lastCkpt = history.at(-1)!;
    const floor = samples.filter((x) => x.at < lastCkpt.startedAt - 50).at(-1)?.step ?? 0;
    const resumed = await waitForMemcheckStep(serial, 1, 30_000, offset);
    assert.ok(resumed.step >= floor, `resumed at step ${resumed.step}, the guest had reached ${floor} before checkpoint ${lastCkpt.epoch}`);
    await waitForMemcheckStep(serial, resumed.step + 5, 60_000, offset);
    assert.doesNotMatch(readSerial(serial).slice(offset), /memcheck: start/, 'no reboot');
    assert.equal(countViolations(serial, offset), 0, readSerial(serial).slice(offset).split('\n').filter((l) => /VIOLATION/.test(l)).slice(0, 3).join('\n'));
    await assertFullVerify(serial, offset);

    await forgetVm(cluster.cluster, s.vm);
    await withHome(record.host, () => stopVm(s.vm));
  });
}
