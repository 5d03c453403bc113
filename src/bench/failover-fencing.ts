// The fencing part of `hydravm bench failover`: agent death -> old QEMU gone, -> host declared dead, -> restore start, in an embedded cluster.
import fs from 'node:fs';
import path from 'node:path';
import { startEmbeddedCluster, restartDaemon, readClusterInfo, protectInCluster, waitForFailover, forgetVm, DEFAULT_FENCE_MARGIN_MS } from '../ha/index.js';
import { startVm, stopVm, readState, waitForMemcheckStep, monoNow, validateSpec } from '../vm/index.js';
import { pidAlive } from '../util/pid.js';
import { readProtection } from '../checkpoint/index.js';
import { BenchError } from '../errors.js';
import { fmt, sleep, summary, type BenchEnv, type Summary } from './harness.js';
import type { FailoverBenchOptions } from './failover-results.js';

export interface FencingRun {
  round: number;
  fromHost: string;
  toHost: string;
  /** SIGKILL of the host agent until its VM's old QEMU is gone (the supervisor's watchdog). */
  agentDeathToQemuGoneMs: number;
  /** SIGKILL of the agent until the manager held the host dead (its host-dead verdict, or the lease's expiry seen, whichever came first). */
  agentDeathToDeclaredMs: number;
  /** The manager holding the host dead until the restore starts on the other host (the fencing margin and the assignment). */
  leaseExpiryToRestoreStartMs: number;
  /** SIGKILL of the agent until the restored VM runs. */
  agentDeathToRunningMs: number;
  /** Moments (sampled every 10 ms) with two live QEMUs of the VM. */
  doubles: number;
}

export interface FencingResult {
  leaseTtlSec: number;
  watchdogMarginMs: number;
  fenceMarginMs: number;
  runs: FencingRun[];
  agentDeathToQemuGone: Summary;
  agentDeathToDeclared: Summary;
  leaseExpiryToRestoreStart: Summary;
  agentDeathToRunning: Summary;
}

const withHome = async <T>(home: string, fn: () => Promise<T> | T): Promise<T> => {
  const saved = process.env.HYDRAVM_HOME;
  process.env.HYDRAVM_HOME = home;
  try {
    return await fn();
  } finally {
    process.env.HYDRAVM_HOME = saved;
  }
};

/**
 * `rounds` agent-only failures of a protected VM in a two-host embedded
 * cluster (lease TTL 1 s): the agent of the VM's host is SIGKILLed while its
 * QEMU and checkpointer keep running. The supervisor's watchdog must kill
 * QEMU before the lease expires; the manager waits the fencing margin after
 * the expiry before it restores the VM on the other host. After each round
 * the dead agent is started again, so the next round fails back.
 */
export async function runFencingBench(env: BenchEnv, opts: FailoverBenchOptions, rounds: number): Promise<FencingResult> {
  const dir = path.join(env.home, 'fencing-cluster');
  const cluster = await startEmbeddedCluster({ dir, hosts: 2 });
  const homeOf = (host: string) => cluster.hosts.find((h) => h.host === host)!.home;
  const vm = 'fence';
  const runs: FencingRun[] = [];
  let host = 'host1';
  try {
    const spec = validateSpec({
      name: vm, memory: opts.memory, vcpus: 1, accel: 'auto', kernel: 'guest:vmlinux', initrd: 'guest:initrd.img',
      cmdline: `console=ttyS0 quiet hydra.run=memcheck memcheck.mb=${opts.workingSetMb} memcheck.rate=${opts.rateMb}`,
    }, process.cwd(), 'fencing bench spec');
    await withHome(homeOf(host), () => startVm(spec));
    await waitForMemcheckStep(path.join(homeOf(host), 'vms', vm, 'serial.log'), 1, 90_000);
    let record = await protectInCluster(cluster.cluster, { vm, host, store: env.store.address, mode: 'network', intervalMs: opts.intervalMs }, { timeoutMs: 180_000 });
    for (let round = 1; round <= rounds; round++) {
      await waitCommits(homeOf(host), vm, 2);
      const qemuPid = (await withHome(homeOf(host), () => readState(vm)))?.qemuPid;
      if (!qemuPid) throw new BenchError('HYDRA_BENCH_NO_PROGRESS', `fencing round ${round}: VM ${vm} has no QEMU on ${host}`);
      let doubles = 0;
      const other = host === 'host1' ? 'host2' : 'host1';
      const sampler = setInterval(() => {
        const otherPid = readState0(homeOf(other), vm)?.qemuPid;
        if (pidAlive(qemuPid) && otherPid && pidAlive(otherPid) && otherPid !== qemuPid) doubles++;
      }, 10);
      // cluster.json, not the start-time snapshot: agents restarted in earlier rounds have new PIDs.
      const agent = readClusterInfo(dir)!.hosts.find((h) => h.host === host)!;
      const killedMono = monoNow();
      const killedAt = Date.now();
      process.kill(agent.pid, 'SIGKILL');
      while (pidAlive(qemuPid)) {
        if (monoNow() - killedMono > 30_000) throw new BenchError('HYDRA_BENCH_TIMEOUT', `fencing round ${round}: the old QEMU (pid ${qemuPid}) still runs 30 s after its agent died`);
        await sleep(2);
      }
      const goneMs = monoNow() - killedMono;
      const f = await waitForFailover(cluster.cluster, vm, record.generation, { timeoutMs: 180_000, until: 'running' });
      clearInterval(sampler);
      const t = f.timing;
      if (!t?.restoreStartedAt || !t.runningAt) throw new BenchError('HYDRA_BENCH_TIMEOUT', `fencing round ${round}: no restore timing recorded`);
      const run: FencingRun = {
        round,
        fromHost: host,
        toHost: f.record.host,
        agentDeathToQemuGoneMs: goneMs,
        agentDeathToDeclaredMs: t.detectedAt - killedAt,
        leaseExpiryToRestoreStartMs: t.restoreStartedAt - t.detectedAt,
        agentDeathToRunningMs: t.runningAt - killedAt,
        doubles,
      };
      runs.push(run);
      opts.log(`[fencing ${round}] agent SIGKILL -> old QEMU gone ${fmt(run.agentDeathToQemuGoneMs)} ms; -> host declared dead ${fmt(run.agentDeathToDeclaredMs, 0)} ms; declared dead -> restore start ${fmt(run.leaseExpiryToRestoreStartMs, 0)} ms; agent death -> running ${fmt(run.agentDeathToRunningMs, 0)} ms; ${doubles} samples with two QEMUs`);
      // The dead host comes back (its agent again), and the VM fails back to it next round.
      restartDaemon(dir, `agent-${host}`);
      record = (await waitForFailover(cluster.cluster, vm, record.generation, { timeoutMs: 180_000, until: 'protected' })).record;
      host = record.host;
      await waitForHost(cluster.cluster, host === 'host1' ? 'host2' : 'host1');
    }
    await forgetVm(cluster.cluster, vm);
    await withHome(homeOf(host), () => stopVm(vm));
  } finally {
    await cluster.stop();
  }
  return {
    leaseTtlSec: cluster.leaseTtlSec,
    watchdogMarginMs: 250,
    fenceMarginMs: DEFAULT_FENCE_MARGIN_MS,
    runs,
    agentDeathToQemuGone: summary(runs.map((r) => r.agentDeathToQemuGoneMs)),
    agentDeathToDeclared: summary(runs.map((r) => r.agentDeathToDeclaredMs)),
    leaseExpiryToRestoreStart: summary(runs.map((r) => r.leaseExpiryToRestoreStartMs)),
    agentDeathToRunning: summary(runs.map((r) => r.agentDeathToRunningMs)),
  };
}

function readState0(home: string, vm: string): { qemuPid?: number } | undefined {
  try {
    return JSON.parse(fs.readFileSync(path.join(home, 'vms', vm, 'state.json'), 'utf8')) as { qemuPid?: number };
  } catch {
    return undefined;
  }
}

async function waitCommits(home: string, vm: string, n: number): Promise<void> {
  const start = (await withHome(home, () => readProtection(vm)))?.committedEpoch ?? 0;
  const deadline = Date.now() + 120_000;
  while (((await withHome(home, () => readProtection(vm)))?.committedEpoch ?? 0) < start + n) {
    if (Date.now() > deadline) throw new BenchError('HYDRA_BENCH_TIMEOUT', `VM ${vm}: no ${n} new checkpoints within 120 s`);
    await sleep(100);
  }
}

async function waitForHost(cluster: { hosts(): Promise<Map<string, unknown>> }, host: string): Promise<void> {
  const deadline = Date.now() + 30_000;
  // etcd may be busy with the fail-over: an error is a "not yet", retried until the deadline.
  while (!(await cluster.hosts().catch(() => new Map())).has(host)) {
    if (Date.now() > deadline) throw new BenchError('HYDRA_BENCH_TIMEOUT', `host ${host}'s agent did not come back within 30 s`);
    await sleep(100);
  }
}

/** The markdown section of the report. */
export function renderFencing(r: FencingResult): string[] {
  const md = [
    '## Self-fencing: agent death and the fencing margin',
    '',
    `Two-host embedded cluster, lease TTL ${r.leaseTtlSec} s; supervisors kill QEMU ${r.watchdogMarginMs} ms before a lease proof runs out; the manager declares a host dead a TTL after its last heartbeat (or sees its lease expire) and waits ${r.fenceMarginMs} ms more before restoring. The agent alone is SIGKILLed (QEMU and the checkpointer keep running).`,
    '',
    '| round | from → to | agent death → old QEMU gone (ms) | agent death → host declared dead (ms) | declared dead → restore start (ms) | agent death → restored VM running (ms) | samples with two QEMUs |',
    '|---|---|---|---|---|---|---|',
    ...r.runs.map((x) => `| ${x.round} | ${x.fromHost} → ${x.toHost} | ${fmt(x.agentDeathToQemuGoneMs, 0)} | ${fmt(x.agentDeathToDeclaredMs, 0)} | ${fmt(x.leaseExpiryToRestoreStartMs, 0)} | ${fmt(x.agentDeathToRunningMs, 0)} | ${x.doubles} |`),
    `| median | | ${fmt(r.agentDeathToQemuGone.median, 0)} | ${fmt(r.agentDeathToDeclared.median, 0)} | ${fmt(r.leaseExpiryToRestoreStart.median, 0)} | ${fmt(r.agentDeathToRunning.median, 0)} | |`,
    '',
  ];
  return md;
}
