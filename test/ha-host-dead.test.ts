// Host death at the lease's speed: the manager's host-dead verdict against real agents (separate processes) and a real etcd.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import type { IKeyValue } from 'etcd3';
import { keys, type Heartbeat, type HostDead } from '../src/ha/cluster.js';
import { FailoverManager } from '../src/ha/manager.js';
import { daemonCommand } from '../src/ha/embedded.js';
import { waitForFailover } from '../src/ha/client.js';
import { procStartTime } from '../src/util/pid.js';
import { monoNow, readWatchdogFeed, type WatchdogFeed } from '../src/vm/watchdog.js';
import { writeHaLocal } from '../src/ha/local-vm.js';
import { alive, etcdLab, fakeRestore, inProcessAgent, quiet, registerVm, until, writeJson, type EtcdLab, skipWithoutEtcd } from './support/ha.js';
import { sleep } from '../src/util/sleep.js';

/**
 * The agent proves its host alive with a heartbeat transaction that only
 * commits while no host-dead/HOST verdict exists; the manager writes the
 * verdict a TTL after the newest heartbeat revision it saw, by a transaction
 * on that revision. The agents here are real `hydravm agent` processes (so
 * they can be SIGKILLed and SIGSTOPped); the VMs are fake (sleep processes),
 * each guarded by a small supervisor process running the real watchdog guard
 * (src/vm/watchdog.ts). The real-QEMU path is in ha-fencing.test.ts.
 */
const skip = skipWithoutEtcd();

const TTL_MS = 1000;
const MARGIN_MS = 500;
/** Room for a loaded 2-core machine on top of the bounds the design gives (timers and etcd round trips run late). */
const SLACK_MS = 1000;

/** The supervisor stand-in: the real watchdog guard; on starvation it kills "QEMU" and records the self-fence. */
const SUPERVISOR = `
import fs from 'node:fs';
const [watchdogUrl, file, qemuPid, stateFile] = process.argv.slice(2);
const { guardWithWatchdog, monoNow } = await import(watchdogUrl);
guardWithWatchdog(file, (reason) => {
  try { process.kill(Number(qemuPid), 'SIGKILL'); } catch { /* already gone */ }
  const st = JSON.parse(fs.readFileSync(stateFile, 'utf8'));
  fs.writeFileSync(stateFile + '.tmp', JSON.stringify({ ...st, lifecycle: 'crashed', reason, selfFenced: reason, selfFencedMono: monoNow(), endedAt: new Date().toISOString() }));
  fs.renameSync(stateFile + '.tmp', stateFile);
  process.exit(0);
});
setInterval(() => undefined, 1 << 30);
`;

interface GuardedVm {
  name: string;
  dir: string;
  qemuPid: number;
  supervisorPid: number;
}

function sleeper(): number {
  const p = spawn('sleep', ['600'], { stdio: 'ignore', detached: true });
  p.unref();
  return p.pid!;
}

/** A fake VM on `host` at `generation` whose supervisor enforces watchdog.json. */
function guardedVm(lab: EtcdLab, home: string, name: string, generation: number, host: string): GuardedVm {
  const dir = path.join(home, 'vms', name);
  fs.mkdirSync(dir, { recursive: true });
  const script = path.join(lab.dir, 'supervisor.mjs');
  fs.writeFileSync(script, SUPERVISOR);
  const qemuPid = sleeper();
  const stateFile = path.join(dir, 'state.json');
  writeJson(stateFile, { name, lifecycle: 'running', qemuPid, qemuStartTime: procStartTime(qemuPid), memoryBytes: 128 << 20, startedAt: new Date().toISOString() });
  const sup = spawn(process.execPath, [script, new URL('../src/vm/watchdog.js', import.meta.url).href, path.join(dir, 'watchdog.json'), String(qemuPid), stateFile], { stdio: 'ignore', detached: true });
  sup.unref();
  const supervisorPid = sup.pid!;
  const st = JSON.parse(fs.readFileSync(stateFile, 'utf8'));
  writeJson(stateFile, { ...st, supervisorPid, supervisorStartTime: procStartTime(supervisorPid) });
  writeHaLocal(home, { vm: name, host, generation, updatedAt: Date.now() });
  lab.defer(() => {
    for (const pid of [qemuPid, supervisorPid]) if (alive(pid)) process.kill(pid, 'SIGKILL');
  });
  return { name, dir, qemuPid, supervisorPid };
}

/** `hydravm agent` as its own process, as on a real host. */
async function agentProcess(lab: EtcdLab, host: string): Promise<{ child: ChildProcess; home: string; log: () => string }> {
  const home = path.join(lab.dir, 'hosts', host);
  fs.mkdirSync(home, { recursive: true });
  const logFile = path.join(lab.dir, `agent-${host}-${Date.now()}.log`);
  const out = fs.openSync(logFile, 'a');
  const { command, args } = daemonCommand();
  const child = spawn(command, [...args, 'agent', '--host', host, '--etcd', lab.etcd.url, '--home', home, '--lease-ttl', String(TTL_MS / 1000), '--memory', '2G'], {
    stdio: ['ignore', out, out], env: { ...process.env, HYDRAVM_HOME: home, HYDRAVM_LOG_LEVEL: 'info', HYDRAVM_SECRET: 'test-secret' },
  });
  fs.closeSync(out);
  lab.defer(() => {
    if (child.exitCode === null) {
      child.kill('SIGCONT');
      child.kill('SIGKILL');
    }
  });
  const log = () => fs.readFileSync(logFile, 'utf8');
  // This process's own heartbeat (an earlier agent's may still sit on its unexpired lease).
  const mine = async () => {
    const kv = (await lab.cluster.etcd.get(keys.heartbeat(host)).exec()).kvs[0];
    return kv && (JSON.parse(kv.value.toString()) as Heartbeat).agentPid === child.pid;
  };
  await until(`agent ${host} registered`, mine, 30_000).catch((err) => {
    throw new Error(`${(err as Error).message}; agent log: ${log().slice(-2000)}`);
  });
  return { child, home, log };
}

/** Everything written to a key prefix, with the test's clocks at delivery. */
async function recordPuts(lab: EtcdLab, prefix: string): Promise<{ puts: { kv: IKeyValue; at: number; mono: number }[]; deletes: { key: string; at: number; revision: string }[] }> {
  const rec = { puts: [] as { kv: IKeyValue; at: number; mono: number }[], deletes: [] as { key: string; at: number; revision: string }[] };
  const w = await lab.cluster.etcd.watch().prefix(prefix).create();
  w.on('put', (kv) => rec.puts.push({ kv, at: Date.now(), mono: monoNow() }));
  w.on('delete', (kv) => rec.deletes.push({ key: kv.key.toString(), at: Date.now(), revision: kv.mod_revision }));
  lab.defer(() => w.cancel());
  return rec;
}

/** Two hosts: h1 a real agent process with one guarded VM, h2 an in-process agent whose restore notes whether h1's copy still lived. */
async function rig(prefix: string) {
  const lab = await etcdLab(prefix);
  const m = new FailoverManager({ etcd: lab.etcd.url, id: 'm1', leaderTtlSec: 1, fenceMarginMs: MARGIN_MS, logger: quiet });
  lab.defer(() => m.stop());
  await m.start();
  await m.waitLeader();
  const verdicts = await recordPuts(lab, keys.hostDeadPrefix);
  const beats = await recordPuts(lab, keys.heartbeatsPrefix);
  const h1 = await agentProcess(lab, 'h1');
  await registerVm(lab.cluster, { name: 'd1', host: 'h1', generation: 1 });
  const vm = guardedVm(lab, h1.home, 'd1', 1, 'h1');
  const restores: { at: number; mono: number; oldQemuAlive: boolean; oldSupervisorAlive: boolean }[] = [];
  const h2home = path.join(lab.dir, 'hosts', 'h2');
  fs.mkdirSync(h2home, { recursive: true });
  const inner = fakeRestore(h2home, 'h2');
  await inProcessAgent(lab, 'h2', {
    home: h2home,
    restore: async (req) => {
      restores.push({ at: Date.now(), mono: monoNow(), oldQemuAlive: alive(vm.qemuPid), oldSupervisorAlive: alive(vm.supervisorPid) });
      return inner(req);
    },
  });
  const feedFile = path.join(vm.dir, 'watchdog.json');
  await until('d1\'s watchdog armed by h1', () => readWatchdogFeed(feedFile)?.deadlineMono, 15_000);
  return { lab, m, verdicts, beats, h1, vm, restores, feedFile };
}

const verdictOf = (p: { kv: IKeyValue }) => JSON.parse(p.kv.value.toString()) as HostDead;

test('agent SIGKILLed: the manager declares the host dead a TTL after the last heartbeat it saw, before the lease expires; the VM is restored after the margin, its old copy dead', { skip, timeout: 120_000 }, async () => {
  const { lab, verdicts, beats, h1, vm, restores } = await rig('hdkill');
  try {
    await sleep(700);
    const hostGone = await recordPuts(lab, keys.hostsPrefix);
    h1.child.kill('SIGKILL');
    const killedAt = Date.now();
    await until('host-dead/h1', () => verdicts.puts.find((p) => p.kv.key.toString() === keys.hostDead('h1')), 10_000);
    const v = verdictOf(verdicts.puts[0]!);
    const lastBeat = beats.puts.filter((p) => p.kv.key.toString() === keys.heartbeat('h1')).at(-1)!;
    const hb = JSON.parse(lastBeat.kv.value.toString()) as Heartbeat;
    assert.equal(v.heartbeatRevision, lastBeat.kv.mod_revision, 'the verdict compared the last heartbeat h1 wrote');
    assert.equal(v.ttlMs, TTL_MS);
    const silence = v.at - v.heartbeatSeenAt;
    assert.ok(silence >= TTL_MS, `never before the TTL: declared ${silence} ms after the manager saw the heartbeat`);
    assert.ok(silence <= TTL_MS + 100 + SLACK_MS, `declared ${silence} ms after the manager saw the last heartbeat (TTL ${TTL_MS} ms)`);
    const sinceSent = v.at - hb.at;
    assert.ok(sinceSent <= TTL_MS + MARGIN_MS + 100 + SLACK_MS, `declared ${sinceSent} ms after the agent sent its last heartbeat`);

    const { record, timing } = await waitForFailover(lab.cluster, 'd1', 1, { timeoutMs: 30_000 });
    assert.equal(record.host, 'h2');
    assert.equal(restores.length, 1);
    const r = restores[0]!;
    assert.equal(r.oldQemuAlive, false, 'h1\'s copy was dead when the restore started');
    assert.ok(r.mono - v.atMono >= MARGIN_MS, `restore started ${Math.round(r.mono - v.atMono)} ms after the verdict: the fencing margin is ${MARGIN_MS} ms`);
    const st = JSON.parse(fs.readFileSync(path.join(vm.dir, 'state.json'), 'utf8')) as { selfFenced?: string; selfFencedMono?: number };
    assert.match(st.selfFenced ?? '', /no proof of host h1's lease/, 'the watchdog fired');
    assert.ok(st.selfFencedMono! < r.mono, `the watchdog fired ${Math.round(r.mono - st.selfFencedMono!)} ms before the restore started`);
    assert.equal(timing?.cause, 'host-lost');
    // The lease's own expiry comes later (etcd's 0.5 s tick); it is only the backstop now.
    await until('h1\'s lease expiry', () => hostGone.deletes.find((d) => d.key === keys.host('h1')), 5000);
    const leaseGoneAt = hostGone.deletes.find((d) => d.key === keys.host('h1'))!.at;
    console.log(`# agent SIGKILL: last heartbeat sent -> verdict ${sinceSent} ms, heartbeat seen -> verdict ${silence} ms (TTL ${TTL_MS}); kill -> verdict ${v.at - killedAt} ms, kill -> lease expiry seen ${leaseGoneAt - killedAt} ms; verdict -> restore start ${Math.round(r.mono - v.atMono)} ms (margin ${MARGIN_MS}); watchdog fired ${Math.round(v.atMono - st.selfFencedMono!)} ms before the verdict`);
  } finally {
    await lab.cleanup();
  }
});

test('agent SIGSTOPped and resumed right at the verdict: it never proves its lease after it, its VM stays dead, one incarnation runs', { skip, timeout: 120_000 }, async () => {
  const { lab, verdicts, beats, h1, vm, restores, feedFile } = await rig('hdstop');
  try {
    // Every feed h1 writes, sampled every 5 ms.
    const feeds: WatchdogFeed[] = [];
    let lastSig = '';
    const sampler = setInterval(() => {
      const f = readWatchdogFeed(feedFile);
      const sig = f ? `${f.deadlineMono}|${f.revoked ?? ''}` : '';
      if (f && sig !== lastSig) feeds.push(f);
      lastSig = sig;
    }, 5);
    lab.defer(() => clearInterval(sampler));
    await sleep(700);
    h1.child.kill('SIGSTOP');
    const stoppedMono = monoNow();
    await until('host-dead/h1', () => verdicts.puts.find((p) => p.kv.key.toString() === keys.hostDead('h1')), 10_000, 2);
    h1.child.kill('SIGCONT');
    const v = verdictOf(verdicts.puts[0]!);
    console.log(`# SIGSTOP -> verdict ${Math.round(v.atMono - stoppedMono)} ms; SIGCONT ${Math.round(monoNow() - v.atMono)} ms after the verdict`);

    // The resumed agent's in-flight keepalives are acknowledged, but no heartbeat after the verdict commits.
    await until('h1 cleared the verdict', () => verdicts.deletes.find((d) => d.key === keys.hostDead('h1')), 20_000);
    await until('h1 heartbeats again', () => beats.puts.some((p) => p.kv.key.toString() === keys.heartbeat('h1') && Number(p.kv.mod_revision) > Number(v.heartbeatRevision)), 10_000);
    const { record } = await waitForFailover(lab.cluster, 'd1', 1, { timeoutMs: 30_000 });
    assert.equal(record.host, 'h2');
    assert.equal(record.generation, 2);
    await sleep(1500);
    clearInterval(sampler);

    for (const f of feeds) {
      if (f.revoked) continue;
      assert.ok(f.deadlineMono < v.atMono, `a proof of h1 kept d1 alive until ${Math.round(f.deadlineMono - v.atMono)} ms after the verdict: ${JSON.stringify(f)}`);
    }
    assert.ok(feeds.length >= 2, `feeds sampled (${feeds.length})`);
    assert.equal(alive(vm.qemuPid), false, 'h1\'s copy is dead');
    assert.ok(restores.length >= 1);
    for (const r of restores) assert.equal(r.oldQemuAlive, false, 'h1\'s copy was dead whenever a restore started');
    // At etcd: no heartbeat of h1 between the verdict and its clearing.
    const verdictRev = Number(verdicts.puts[0]!.kv.mod_revision);
    const clearRev = Number(verdicts.deletes.find((d) => d.key === keys.hostDead('h1'))!.revision);
    const inside = beats.puts.filter((p) => p.kv.key.toString() === keys.heartbeat('h1') && Number(p.kv.mod_revision) > verdictRev && Number(p.kv.mod_revision) < clearRev);
    assert.equal(inside.length, 0, `heartbeats committed while h1 was declared dead: ${inside.map((p) => p.kv.mod_revision).join(', ')}`);
    const st = JSON.parse(fs.readFileSync(path.join(vm.dir, 'state.json'), 'utf8')) as { selfFenced?: string; selfFencedMono?: number };
    assert.ok(st.selfFenced, 'd1 on h1 was fenced by its own supervisor');
    assert.ok(st.selfFencedMono! < restores[0]!.mono, `d1's watchdog fired ${Math.round(restores[0]!.mono - st.selfFencedMono!)} ms before the first restore started`);
    console.log(`# d1's watchdog fired ${Math.round(v.atMono - st.selfFencedMono!)} ms before the verdict; ${feeds.length} feeds sampled, none past the verdict`);
    assert.match(h1.log(), /host declared dead/);
    assert.match(h1.log(), /host-dead verdict cleared/);
    // h1 is a live host again: it holds its lease and no new verdict follows.
    assert.ok((await lab.cluster.hosts()).has('h1'));
    assert.equal(verdicts.puts.length, 1, 'one verdict');
  } finally {
    await lab.cleanup();
  }
});

test('an agent restarted on a host declared dead clears the verdict once its VMs are dead and comes back as a live host', { skip, timeout: 120_000 }, async () => {
  const { lab, verdicts, beats, h1, vm } = await rig('hdrestart');
  try {
    await sleep(500);
    h1.child.kill('SIGKILL');
    await until('host-dead/h1', () => verdicts.puts.find((p) => p.kv.key.toString() === keys.hostDead('h1')), 10_000);
    const { record } = await waitForFailover(lab.cluster, 'd1', 1, { timeoutMs: 30_000 });
    assert.equal(record.host, 'h2');
    const v = verdictOf(verdicts.puts[0]!);

    const again = await agentProcess(lab, 'h1').catch(() => undefined);
    // agentProcess waits for a heartbeat key: the first one after the restart commits only once the verdict is gone.
    assert.ok(again, 'the restarted agent heartbeats');
    assert.equal((await lab.cluster.etcd.get(keys.hostDead('h1')).exec()).kvs.length, 0, 'verdict cleared');
    assert.match(again.log(), /host-dead verdict cleared/);
    await sleep(3 * TTL_MS);
    const later = beats.puts.filter((p) => p.kv.key.toString() === keys.heartbeat('h1') && Number(p.kv.mod_revision) > Number(v.heartbeatRevision));
    assert.ok(later.length >= 5, `h1 heartbeats again (${later.length} in ${3 * TTL_MS} ms)`);
    assert.equal(verdicts.puts.length, 1, 'no new verdict on the revived host');
    assert.ok((await lab.cluster.hosts()).has('h1'), 'h1 is a registered host');
    assert.equal(alive(vm.qemuPid), false);
    const rec = (await lab.cluster.vm('d1'))!.value;
    assert.equal(rec.generation, 2, 'the old incarnation on h1 did not report or run again');
  } finally {
    await lab.cleanup();
  }
});
