import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { cliEntry, guestArtifactsDir, shimPath } from '../src/config/paths.js';
import { findEtcd } from '../src/ha/etcd-process.js';
import { daemonCommand } from '../src/ha/embedded.js';
import { FailoverManager } from '../src/ha/manager.js';
import { protectInCluster, waitForFailover } from '../src/ha/client.js';
import { freePort } from '../src/ha/etcd-process.js';
import { etcdLab, inProcessAgent, killFakeVms, quiet, registerVm, until } from './support/ha.js';
import { assertFullVerify } from './support/lab.js';
import { writeHaLocal } from '../src/ha/local-vm.js';
import { sleep } from '../src/util/sleep.js';

/**
 * The HA layer with real QEMU guests (TCG). Needs the guest artifacts
 * (~/.cache/hydravm/guest/{vmlinuz,initrd.img}), the shim and the compiled
 * CLI (the VM supervisor runs from dist/); skipped with the reason otherwise.
 */
function missing(): string | false {
  try {
    findEtcd();
  } catch {
    return 'etcd not installed (run `hydravm setup`)';
  }
  for (const [what, file] of [['guest kernel', path.join(guestArtifactsDir(), 'vmlinuz')], ['guest initrd', path.join(guestArtifactsDir(), 'initrd.img')], ['userfaultfd shim', shimPath], ['compiled CLI (npm run build)', cliEntry]] as const) {
    if (!fs.existsSync(file)) return `${what} missing: ${file} (run \`hydravm setup\`)`;
  }
  return false;
}
const skip = missing();
if (skip) console.log(`# skipping real-VM HA tests: ${skip}`);

const SECRET = 'ha-test-secret-0123456789abcdef';

function specFor(name: string, dir: string): string {
  const file = path.join(dir, `${name}.json`);
  fs.writeFileSync(file, JSON.stringify({ name, memory: '256M', vcpus: 1, accel: 'auto', kernel: 'guest:vmlinuz', initrd: 'guest:initrd.img', cmdline: 'console=ttyS0 quiet hydra.run=memcheck memcheck.mb=32' }));
  return file;
}

test('real QEMU killed: its agent reports the death to etcd at once', { skip, timeout: 60_000 }, async () => {
  const lab = await etcdLab('realcrash');
  const home = path.join(lab.dir, 'hosts', 'h1');
  fs.mkdirSync(home, { recursive: true });
  const savedHome = process.env.HYDRAVM_HOME;
  process.env.HYDRAVM_HOME = home;
  try {
    const { loadSpecFile } = await import('../src/vm/spec.js');
    const { startVm } = await import('../src/vm/manager.js');
    const state = await startVm(loadSpecFile(specFor('real1', lab.dir)));
    assert.ok(state.qemuPid);
    writeHaLocal(home, { vm: 'real1', host: 'h1', generation: 1, updatedAt: Date.now() });
    await registerVm(lab.cluster, { name: 'real1', host: 'h1', generation: 1, memoryBytes: 256 << 20 });
    const agent = await inProcessAgent(lab, 'h1', { home });
    await until('agent knows the VM', () => agent.knowsVm('real1'));
    await sleep(300);
    const killedAt = Date.now();
    process.kill(state.qemuPid!, 'SIGKILL');
    const rec = await until('crash in etcd', async () => {
      const r = (await lab.cluster.vm('real1'))?.value;
      return r?.state === 'crashed' ? r : undefined;
    }, 5000, 2);
    const seenAt = Date.now();
    console.log(`# real QEMU SIGKILL -> supervisor recorded ${rec.failedAt! - killedAt} ms, agent detected ${rec.detectedAt! - killedAt} ms, 'crashed' visible in etcd ${seenAt - killedAt} ms`);
    assert.ok(rec.detectedAt! - killedAt < 500);
    assert.match(rec.reason ?? '', /QEMU|crash/i);
  } finally {
    process.env.HYDRAVM_HOME = savedHome;
    await lab.cleanup();
  }
});

test('real fail-over (network mode): protected VM on h1, QEMU killed, restored on h2 at generation+1 and protected again', { skip, timeout: 120_000 }, async () => {
  const lab = await etcdLab('realfo');
  const children: ChildProcess[] = [];
  lab.defer(() => children.forEach((c) => c.kill('SIGKILL')));
  try {
    const storeDir = path.join(lab.dir, 'store');
    fs.mkdirSync(storeDir, { recursive: true });
    const storePort = await freePort();
    const store = `127.0.0.1:${storePort}`;
    const env = { ...process.env, HYDRAVM_SECRET: SECRET, HYDRAVM_LOG_LEVEL: process.env.HA_TEST_LOG ?? 'warn' };
    const storeProc = spawn(process.execPath, [cliEntry, 'store', '--dir', storeDir, '--listen', store], { stdio: ['ignore', 'ignore', 'inherit'], env: { ...env, HYDRAVM_HOME: lab.dir } });
    children.push(storeProc);
    const homes: Record<string, string> = {};
    const { command, args } = daemonCommand();
    for (const h of ['h1', 'h2']) {
      homes[h] = path.join(lab.dir, 'hosts', h);
      fs.mkdirSync(homes[h]!, { recursive: true });
      const log = fs.openSync(path.join(lab.dir, `agent-${h}.log`), 'a');
      // TTL 2 s: a restore's paging load on this shared 2-core machine can delay an agent's keepalives past 750 ms,
      // and its VM's watchdog then (rightly) kills the restored QEMU.
      children.push(spawn(command, [...args, 'agent', '--host', h, '--etcd', lab.etcd.url, '--home', homes[h]!, '--lease-ttl', '2'], { stdio: ['ignore', log, log], env: { ...env, HYDRAVM_HOME: homes[h] } }));
    }
    const m = new FailoverManager({ etcd: lab.etcd.url, id: 'mgr', logger: quiet });
    lab.defer(() => m.stop());
    await m.start();
    await m.waitLeader();
    await until('agents up', async () => (await lab.cluster.hosts()).size === 2, 20_000);

    const savedHome = process.env.HYDRAVM_HOME;
    process.env.HYDRAVM_HOME = homes.h1;
    let qemuPid: number;
    try {
      const { loadSpecFile } = await import('../src/vm/spec.js');
      const { startVm } = await import('../src/vm/manager.js');
      qemuPid = (await startVm(loadSpecFile(specFor('realfo', lab.dir)))).qemuPid!;
    } finally {
      process.env.HYDRAVM_HOME = savedHome;
    }
    const rec = await protectInCluster(lab.cluster, { vm: 'realfo', host: 'h1', store, mode: 'network', intervalMs: 500 }, { timeoutMs: 60_000 });
    assert.equal(rec.state, 'protected');
    await sleep(1500); // a few incremental checkpoints
    // h2's agent keeps a restore shell of the VM's configuration (recorded when it was protected): wait until it is idle.
    const { shellKey } = await import('../src/vm/shell.js');
    const cfg = (await lab.cluster.vm('realfo'))!.value.shellConfig;
    assert.ok(cfg, 'the protected VM\'s record carries its restore-shell configuration');
    await until('h2 reports an idle restore shell for the VM', async () => (await lab.cluster.hosts()).get('h2')?.shells?.some((x) => x.key === shellKey(cfg) && x.idle > 0), 60_000);
    const h2Serial = path.join(homes.h2!, 'vms', 'realfo', 'serial.log');
    const serialOffset = fs.existsSync(h2Serial) ? fs.statSync(h2Serial).size : 0;
    const killedAt = Date.now();
    process.kill(qemuPid, 'SIGKILL');
    const { record, timing } = await waitForFailover(lab.cluster, 'realfo', rec.generation, { timeoutMs: 60_000 });
    const runningSeen = Date.now();
    assert.equal(record.host, 'h2');
    assert.equal(record.generation, rec.generation + 1);
    assert.ok(timing);
    assert.equal(timing!.restoreTimings?.warm, 1, `restored into h2's restore shell (cold because: ${timing!.coldReason})`);
    console.log(`# real fail-over (warm, hand-off ${timing!.restoreTimings?.shellHandoffMs?.toFixed(0)} ms): detected ${timing!.detectedAt - killedAt} ms, assigned ${timing!.assignedAt - killedAt} ms, guest running ${timing!.runningAt! - killedAt} ms after the kill (spawn->running ${timing!.spawnToRunningMs?.toFixed(0)} ms); 'running' visible in etcd after ${runningSeen - killedAt} ms`);
    const prot = await waitForFailover(lab.cluster, 'realfo', rec.generation, { timeoutMs: 60_000, until: 'protected' });
    assert.equal(prot.record.imageGeneration, rec.generation + 1, 'the restored VM is protected under its new generation');
    // The whole restored guest, every page: memcheck verifies on request.
    await assertFullVerify(path.join(homes.h2!, 'vms', 'realfo', 'serial.log'), serialOffset);
  } finally {
    killFakeVms(lab.dir);
    await lab.cleanup();
  }
});
