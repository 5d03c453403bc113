import fs from 'node:fs';
import path from 'node:path';
import { validateSpec, startVm, readState, waitForMemcheckStep, lastMemcheckProgress, countViolations, requestFullVerify, qemuIdentity, supervisorIdentity, killProcess } from '../vm/index.js';
import { checkSetup, runSetup } from '../setup/index.js';
import { hydraHome } from '../config/paths.js';
import { readProtection } from '../checkpoint/index.js';
import { spawnStore, type StoreProcess } from '../store/index.js';
import { startEmbeddedCluster, stopEmbeddedCluster, protectInCluster, waitForFailover, type EmbeddedCluster, type FailoverTiming } from '../ha/index.js';
import { BenchError } from '../errors.js';
import { sleep } from '../util/sleep.js';

export interface DemoOptions {
  memory: string;
  workingSetMb: number;
  intervalMs: number;
  keep: boolean;
}

const say = (msg: string): void => void process.stdout.write(`${msg}\n`);
const ms = (v: number | undefined) => (v === undefined ? '-' : `${Math.round(v)} ms`);

/** The embedded default VM: the test guest with memcheck, nothing to download or write. */
export function demoSpec(opts: { name?: string; memory: string; workingSetMb: number }) {
  return validateSpec({
    name: opts.name ?? 'demo',
    memory: opts.memory,
    vcpus: 1,
    accel: 'auto',
    kernel: 'guest:vmlinux',
    initrd: 'guest:initrd.img',
    cmdline: `console=ttyS0 quiet hydra.run=memcheck memcheck.mb=${opts.workingSetMb} memcheck.rate=32`,
  }, process.cwd(), 'embedded demo spec');
}

/**
 * The whole story on one machine: an embedded cluster (etcd, a manager, two
 * host agents, a checkpoint store), a VM running memcheck protected by
 * incremental checkpoints, then two failures: its QEMU is killed, and later
 * its whole host dies. Each time the cluster restores it elsewhere and the
 * guest continues with its memory intact.
 */
export async function runDemo(opts: DemoOptions): Promise<void> {
  if (!(await checkSetup()).ok) {
    say('== setting up (first run only): QEMU, native parts, guest images');
    await runSetup({ log: (m: string) => say(`   ${m}`) });
  }
  const base = path.join(hydraHome(), 'demo');
  const clusterDir = path.join(base, 'cluster');
  // Leftovers of an earlier demo run: none is the normal case.
  await stopEmbeddedCluster(clusterDir).catch(() => false);
  fs.rmSync(base, { recursive: true, force: true });
  fs.mkdirSync(base, { recursive: true });

  // Everything below outlives this process unless stopped (daemons and VMs are detached): a
  // start still under way is awaited, then stopped; the cluster's stop takes the VMs with it.
  let clusterP: Promise<EmbeddedCluster> | undefined;
  let storeP: Promise<StoreProcess> | undefined;
  const stopAll = async () => {
    // A start that failed cleaned up after itself, and its error reaches the demo's own await.
    const [c, st] = await Promise.all([clusterP?.catch(() => undefined), storeP?.catch(() => undefined)]);
    await c?.stop();
    await st?.stop();
  };
  const release = stopOnInterrupt(stopAll, `hydravm cluster down --dir ${clusterDir}`);

  say('== embedded cluster: etcd, a fail-over manager, host agents host1 and host2, a checkpoint store');
  // Lease TTL 2 s: the network-mode pager runs in the restoring agent's process, and on a
  // loaded machine paging in a 512 MB guest can hold its keepalives past a 1 s lease's
  // deadline, which makes the VM's watchdog (rightly) kill the restored QEMU.
  clusterP = startEmbeddedCluster({ dir: clusterDir, hosts: 2, leaseTtlSec: 2 });
  const storeLog = path.join(base, 'store.log');
  let ok = false;
  try {
    const cluster = await clusterP;
    storeP = spawnStore({ dir: path.join(base, 'store'), secretFile: cluster.secretFile, logFile: storeLog });
    const store = await storeP;
    say(`   etcd ${cluster.etcdUrl}, store ${store.address} (log ${storeLog}), runtime in ${base}`);
    const hostHome = (host: string) => cluster.hosts.find((h) => h.host === host)!.home;
    const serialOn = (host: string) => path.join(hostHome(host), 'vms', 'demo', 'serial.log');
    const spec = demoSpec(opts);
    say(`== starting VM "${spec.name}" on host1 (${opts.memory}, memcheck writing ${opts.workingSetMb} MB)`);
    process.env.HYDRAVM_HOME = hostHome('host1');
    const t0 = Date.now();
    const state = await startVm(spec);
    say(`   QEMU pid ${state.qemuPid}, accel ${state.accel}`);
    const first = await waitForMemcheckStep(serialOn('host1'), 1, 60_000);
    say(`   memcheck running after ${((Date.now() - t0) / 1000).toFixed(1)} s (step ${first.step}); console: ${serialOn('host1')}`);

    say(`== protecting it: a full checkpoint, then one every ${opts.intervalMs / 1000} s`);
    let record = await protectInCluster(cluster.cluster, { vm: 'demo', host: 'host1', store: store.address, mode: 'network', intervalMs: opts.intervalMs });
    await sleep(4000);
    showProtection('host1', record.generation, hostHome('host1'));

    say('== failure 1: the VM\'s QEMU is killed (SIGKILL)');
    const before1 = lastMemcheckProgress(serialOn('host1'))!;
    let offsets = serialOffsets(cluster);
    let killedAt = Date.now();
    const st1 = readState('demo')!;
    killProcess(st1.qemuPid, qemuIdentity(st1));
    const f1 = await waitForFailover(cluster.cluster, 'demo', record.generation, { until: 'running' });
    showFailover(f1.timing, killedAt);
    await showGuest(serialOn(f1.record.host), before1.step, offsets.get(f1.record.host) ?? 0);
    const p1 = await waitForFailover(cluster.cluster, 'demo', record.generation, { until: 'protected' });
    record = p1.record;
    say(`   protected again on ${record.host} as generation ${record.generation}`);
    await sleep(3000);
    showProtection(record.host, record.generation, hostHome(record.host));

    say(`== failure 2: host ${record.host} dies (its agent, QEMU and checkpointer are killed at once)`);
    const deadHost = record.host;
    const before2 = lastMemcheckProgress(serialOn(deadHost))!;
    offsets = serialOffsets(cluster);
    killedAt = Date.now();
    killHost(cluster, deadHost);
    const f2 = await waitForFailover(cluster.cluster, 'demo', record.generation, { until: 'running' });
    showFailover(f2.timing, killedAt);
    await showGuest(serialOn(f2.record.host), before2.step, offsets.get(f2.record.host) ?? 0);
    ok = true;
    say(`== done: the VM survived two failures with its memory intact${opts.keep ? ' (left running; `hydravm cluster down --dir ' + cluster.dir + '` stops it)' : ''}`);
  } finally {
    release();
    if (!opts.keep || !ok) await stopAll();
  }
}

/**
 * Ctrl-C (or SIGTERM) runs `stop` before the process ends, instead of ending
 * it at once and leaving the detached daemons and VMs running. A second
 * signal meanwhile is only acknowledged. Returns the function that removes
 * the handlers.
 */
function stopOnInterrupt(stop: () => Promise<void>, fallback: string): () => void {
  let stopping = false;
  const handler = (signal: NodeJS.Signals) => {
    if (stopping) return say(`   (${signal}: still stopping)`);
    stopping = true;
    say(`== ${signal}: stopping the demo's cluster, store and VM`);
    void stop()
      .catch((err: unknown) => say(`   stopping failed: ${(err as Error).message} (\`${fallback}\` stops what is left)`))
      .finally(() => process.exit(130));
  };
  process.on('SIGINT', handler);
  process.on('SIGTERM', handler);
  return () => {
    process.off('SIGINT', handler);
    process.off('SIGTERM', handler);
  };
}

function showProtection(host: string, generation: number, home: string): void {
  process.env.HYDRAVM_HOME = home;
  const p = readProtection('demo');
  if (!p) return;
  say(`   ${host}: generation ${generation}, epoch ${p.committedEpoch}, interval ${ms(p.recent.medianIntervalMs ?? undefined)}, pause median ${ms(p.recent.medianPauseMs ?? undefined)} (last ${ms(p.last?.pauseMs)}), ${((p.last?.bytes ?? 0) / 2 ** 20).toFixed(1)} MB per checkpoint`);
}

function showFailover(t: FailoverTiming | undefined, killedAt: number): void {
  if (!t) return say('   (no timing recorded)');
  const what = t.cause === 'host-lost' ? 'host loss (no heartbeat for the TTL)' : 'QEMU death';
  say(`   ${what} detected after ${ms(t.detectedAt - killedAt)}; restored on ${t.toHost}: QEMU spawn to running ${ms(t.spawnToRunningMs)}; failure to running VM ${ms((t.runningAt ?? NaN) - killedAt)}`);
}

/** Where each host's copy of the VM console ends now: a restored VM's lines come after. */
function serialOffsets(cluster: EmbeddedCluster): Map<string, number> {
  const out = new Map<string, number>();
  for (const h of cluster.hosts) {
    try {
      out.set(h.host, fs.statSync(path.join(h.home, 'vms', 'demo', 'serial.log')).size);
    } catch {
      out.set(h.host, 0);
    }
  }
  return out;
}

async function showGuest(serial: string, stepBefore: number, offset: number): Promise<void> {
  const resumed = await waitForMemcheckStep(serial, 1, 60_000, offset);
  await sleep(2000);
  const later = lastMemcheckProgress(serial, offset)!;
  say(`   guest continues: step ${stepBefore} before the failure, ${resumed.step} right after the restore, ${later.step} 2 s later`);
  // Every page, not a sample: memcheck verifies its whole working set when asked on the console.
  const full = await requestFullVerify(serial, undefined, 180_000);
  const violations = Math.max(full.violations, countViolations(serial, offset));
  say(`   full verification of all ${full.pages} pages of the guest's working set: ${violations} violations (${full.ms} ms in the guest)`);
  if (violations > 0) throw new BenchError('HYDRA_DEMO_VIOLATIONS', `memcheck reported ${violations} violations after the restore (see ${serial})`);
}

/** A whole host's death: its agent and every process of its VMs, at once. */
function killHost(cluster: EmbeddedCluster, host: string): void {
  const h = cluster.hosts.find((x) => x.host === host)!;
  process.env.HYDRAVM_HOME = h.home;
  const st = readState('demo');
  const p = readProtection('demo');
  // Every PID through a pidfd, and only while it is still the process recorded.
  killProcess(h.pid, { cmdline: ['agent', '--host', host] });
  if (st) {
    killProcess(st.supervisorPid, supervisorIdentity(st));
    killProcess(st.qemuPid, qemuIdentity(st));
  }
  if (p) killProcess(p.pid, { cmdline: ['internal-checkpoint', 'demo'] });
}
