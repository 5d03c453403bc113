// A Debian VM serving redis on a 3-host namespaced cluster, watched by a client on another host: kill it, see what the client saw.
import fs from 'node:fs';
import path from 'node:path';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { cliEntry } from '../config/paths.js';
import { pidAlive } from '../util/pid.js';
import { sleep } from '../util/sleep.js';
import { BenchError } from '../errors.js';
import type { BuiltImage } from '../image/index.js';
import type { CheckpointStats } from '../checkpoint/index.js';
import {
  startNetnsCluster, protectInCluster, waitForVm, waitForFailover, forgetVm, inNetns, killNetnsHost, reviveNetnsHost, keys,
  type EmbeddedCluster, type FailoverTiming, type VmRecord,
} from '../ha/index.js';
import { readWatchLog, summarizeWatch, lossReport, lastAcked, type WatchRecord } from './redis-watcher.js';

/**
 * The layout, chosen so that every fail-over has somewhere to go and the
 * client and the store survive every kill:
 *
 *   host1   the checkpoint store and the redis client (the watcher); it offers
 *           too little memory for the VM, so placement never puts it there
 *   host2   the VM starts here (`vm start` in host2's namespace)
 *   host3   the other VM host
 *
 * The VM's NIC is a tap on br0 in its host's namespace; every br0 is bridged
 * to the cluster's bridge, so the VM keeps one address on any host. Its root
 * disk is an overlay of the built image on the shared directory.
 */
export interface DebianRigOptions {
  /** Cluster directory (its shared/ holds the root disk, layers and store). */
  dir: string;
  prefix: string;
  /** A /24 inside 198.18.0.0/15; the VM gets .100 of it. */
  subnet: string;
  image: BuiltImage;
  /** Guest memory (default 512M). */
  memory?: string;
  intervalMs: number;
  /** Environment for the CLI and daemons (HYDRAVM_SECRET). */
  env: NodeJS.ProcessEnv;
  log: (msg: string) => void;
  bootTimeoutMs?: number;
}

export type FailureKind = 'qemu' | 'host';

export interface FailoverObservation {
  kind: FailureKind;
  fromHost: string;
  toHost: string;
  /** The checkpoint interval running when the VM was killed. */
  intervalMs: number;
  killAt: number;
  /** The client: time from the kill to its first reply, and its longest gap between replies around the fail-over. */
  firstReplyAfterKillMs: number;
  longestGapMs: number;
  /** Counter acknowledged before the kill, found by the first GET after it, acknowledged increments lost. */
  ackedBeforeKill: number;
  found: number;
  lostAcked: number;
  /** Counter acknowledged before the restored checkpoint's pause began (a restore must keep at least these). */
  ackedAtCheckpoint: number;
  /** The epoch whose pause `ackedAtCheckpoint` is taken at: the restored one, or the newest earlier one in the history. */
  checkpointEpoch?: number;
  /** Where the outage went: kill to the restored guest running (cluster record), and to the client's first accepted connection. */
  runningAfterKillMs?: number;
  connectedAfterKillMs: number;
  restoredEpoch?: number;
  generation: number;
  /** The cluster's own split: failure noticed, restore started, guest running. */
  timing?: FailoverTiming;
}

export const DEBIAN_VM = 'debvm';
const MAC = '52:54:00:9d:00:64';
const TAP = 'debvm0';
const MIB = 1024 * 1024;

const readJson = <T>(file: string): T | undefined => {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8')) as T;
  } catch {
    return undefined;
  }
};

export class DebianNetnsRig {
  readonly vmAddress: string;
  readonly watchLog: string;
  private watcher: ChildProcess | undefined;
  private current: VmRecord | undefined;

  private constructor(readonly opts: DebianRigOptions, readonly cluster: EmbeddedCluster) {
    this.vmAddress = opts.subnet.replace(/\.0\/24$/, '.100');
    this.watchLog = path.join(opts.dir, 'watch.jsonl');
  }

  /** Cluster up, the VM booted on host2 and answering the client on host1 (not yet protected). */
  static async start(opts: DebianRigOptions): Promise<DebianNetnsRig> {
    const memoryBytes = parseMemory(opts.memory ?? '512M');
    const cluster = await startNetnsCluster({
      dir: opts.dir, hosts: 3, prefix: opts.prefix, subnet: opts.subnet, env: opts.env,
      hostMemoryBytes: memoryBytes * 4, hostMemory: { host1: Math.floor(memoryBytes / 2) },
    });
    const rig = new DebianNetnsRig(opts, cluster);
    try {
      await rig.boot();
    } catch (err) {
      await rig.stop();
      throw err;
    }
    return rig;
  }

  host(name: string) {
    const h = this.cluster.hosts.find((x) => x.host === name);
    if (!h) throw new BenchError('HYDRA_BENCH_SETUP_FAILED', `no host ${name} in the cluster`);
    return h;
  }

  vmFile(host: string, file: string): string {
    return path.join(this.host(host).home, 'vms', DEBIAN_VM, file);
  }

  /** The VM's state on `host` as its supervisor records it. */
  vmState(host: string) {
    return readJson<{ qemuPid?: number; supervisorPid?: number; lifecycle: string; generation?: number }>(this.vmFile(host, 'state.json'));
  }

  protection(host: string) {
    return readJson<{ committedEpoch: number; generation: number; pid: number; state: string; configuredIntervalMs?: number }>(this.vmFile(host, 'protection.json'));
  }

  history(host: string): (CheckpointStats & { generation: number })[] {
    try {
      return fs.readFileSync(this.vmFile(host, 'checkpoints.jsonl'), 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l));
    } catch {
      return [];
    }
  }

  records(): WatchRecord[] {
    return fs.existsSync(this.watchLog) ? readWatchLog(this.watchLog) : [];
  }

  get rootDisk(): string {
    return path.join(this.opts.dir, 'shared', 'disks', `${DEBIAN_VM}-root.qcow2`);
  }

  private cli(host: string | undefined, args: string[], timeoutMs = 180_000) {
    const argv = [...(host ? inNetns(this.host(host).netns!) : []), process.execPath, cliEntry, ...args];
    const env = { ...process.env, ...this.opts.env, ...(host ? { HYDRAVM_HOME: this.host(host).home } : {}) };
    return spawnSync(argv[0]!, argv.slice(1), { env, encoding: 'utf8', timeout: timeoutMs });
  }

  private async boot(): Promise<void> {
    const { image, dir } = this.opts;
    const gateway = this.cluster.netns!.bridgeAddress;
    fs.mkdirSync(path.dirname(this.rootDisk), { recursive: true });
    const spec = {
      name: DEBIAN_VM,
      memory: this.opts.memory ?? '512M',
      kernel: image.vmlinux ?? image.kernel,
      initrd: image.initrd,
      cmdline: `${image.cmdline} ip=${this.vmAddress}::${gateway}:255.255.255.0::eth0:off`,
      root: { path: this.rootDisk, base: image.root },
      nics: [{ mac: MAC, bridge: this.cluster.netns!.hostBridge ?? 'br0', tap: TAP }],
    };
    const specFile = path.join(dir, `${DEBIAN_VM}.json`);
    fs.writeFileSync(specFile, JSON.stringify(spec, null, 2) + '\n');
    const t0 = Date.now();
    const r = this.cli('host2', ['vm', 'start', specFile]);
    if (r.status !== 0) throw new BenchError('HYDRA_BENCH_SETUP_FAILED', `vm start of ${DEBIAN_VM} in host2 failed: ${r.stderr || r.error?.message}`);
    this.startWatcher();
    const first = await this.waitReply(0, this.opts.bootTimeoutMs ?? 15 * 60_000, 'redis in the Debian VM answering the client on host1');
    this.opts.log(`boot: vm start to the first redis reply ${((first.t - t0) / 1000).toFixed(1)} s`);
  }

  /** The client: `bench redis-watch` in host1's namespace, appending to watch.jsonl. */
  startWatcher(): void {
    if (this.watcher && this.watcher.exitCode === null) return;
    const argv = [...inNetns(this.host('host1').netns!), process.execPath, cliEntry, 'bench', 'redis-watch', '--host', this.vmAddress, '--out', this.watchLog];
    this.watcher = spawn(argv[0]!, argv.slice(1), { env: { ...process.env, ...this.opts.env }, stdio: 'ignore' });
  }

  async stopWatcher(): Promise<void> {
    const w = this.watcher;
    if (!w || w.exitCode !== null || w.signalCode !== null) return;
    const exited = new Promise((r) => w.once('exit', r));
    w.kill('SIGTERM');
    await Promise.race([exited, sleep(5000)]);
    if (w.exitCode === null && w.signalCode === null) w.kill('SIGKILL');
  }

  async waitReply(after: number, timeoutMs: number, what: string): Promise<WatchRecord> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const r = this.records().find((x) => x.ok && x.op === 'incr' && x.t > after);
      if (r) return r;
      if (Date.now() > deadline) throw new BenchError('HYDRA_BENCH_TIMEOUT', `timed out after ${timeoutMs / 1000} s waiting for ${what}`);
      await sleep(100);
    }
  }

  /**
   * The first reply on a connection opened after `killAt`: the restored VM's.
   * A reply the old VM sent just before the kill may still arrive after it;
   * it is not the end of the outage.
   */
  async waitReconnected(killAt: number, timeoutMs: number, what: string): Promise<WatchRecord> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const recs = this.records();
      const c = recs.findIndex((x) => x.ok && x.op === 'connect' && x.t > killAt);
      const r = c >= 0 ? recs.slice(c).find((x) => x.ok && x.op === 'incr') : undefined;
      if (r) return r;
      if (Date.now() > deadline) throw new BenchError('HYDRA_BENCH_TIMEOUT', `timed out after ${timeoutMs / 1000} s waiting for ${what}`);
      await sleep(100);
    }
  }

  /** Put the VM (running on host2) under the cluster's protection. */
  async protect(): Promise<VmRecord> {
    this.current = await protectInCluster(this.cluster.cluster, { vm: DEBIAN_VM, host: 'host2', store: this.cluster.store!.address, mode: 'network', intervalMs: this.opts.intervalMs }, { timeoutMs: 300_000 });
    return this.current;
  }

  /**
   * The checkpoint interval of the next restore's protection: written into
   * the VM's record, which the manager copies into the restore assignment.
   * The checkpointer running now keeps its interval until then.
   */
  async setInterval(ms: number): Promise<void> {
    const c = this.cluster.cluster;
    for (let i = 0; i < 50; i++) {
      const cur = await c.vm(DEBIAN_VM);
      if (!cur) throw new BenchError('HYDRA_BENCH_TIMEOUT', `VM ${DEBIAN_VM} has no record in the cluster`);
      const r = await c.etcd.if(keys.vm(DEBIAN_VM), 'Mod', '==', cur.modRevision)
        .then(c.etcd.put(keys.vm(DEBIAN_VM)).value(JSON.stringify({ ...cur.value, intervalMs: ms, updatedAt: Date.now() }))).commit();
      if (r.succeeded) return;
      await sleep(50);
    }
    throw new BenchError('HYDRA_BENCH_TIMEOUT', `VM ${DEBIAN_VM}: its record kept changing; interval not set`);
  }

  /** Protected on its host with at least `n` commits of this generation, and just after one more. */
  async settled(n = 3): Promise<VmRecord> {
    const rec = await waitForVm(this.cluster.cluster, DEBIAN_VM, (v) => v.state === 'protected', 300_000);
    const deadline = Date.now() + 300_000;
    const epoch = () => {
      const p = this.protection(rec.host);
      return p && p.generation === rec.generation ? p.committedEpoch : 0;
    };
    while (epoch() < n) {
      if (Date.now() > deadline) throw new BenchError('HYDRA_BENCH_TIMEOUT', `VM ${DEBIAN_VM} on ${rec.host}: fewer than ${n} commits within 300 s`);
      await sleep(50);
    }
    const e = epoch();
    while (epoch() <= e) {
      if (Date.now() > deadline) throw new BenchError('HYDRA_BENCH_TIMEOUT', `VM ${DEBIAN_VM} on ${rec.host}: no commit after epoch ${e}`);
      await sleep(10);
    }
    this.current = rec;
    return rec;
  }

  /**
   * Kill the VM's QEMU, or its whole host, at a random moment of a
   * checkpoint interval, wait for the cluster to restore it elsewhere and for
   * the client's first reply, and say what the client saw. A killed host is
   * revived afterwards when `revive` is set (so the next round has 3 hosts).
   */
  async failover(kind: FailureKind, opts: { revive?: boolean } = {}): Promise<FailoverObservation> {
    const rec = await this.settled();
    const from = rec.host;
    const intervalMs = this.protection(from)?.configuredIntervalMs ?? rec.intervalMs;
    await sleep(Math.floor(Math.random() * intervalMs));
    const qemuPid = this.vmState(from)?.qemuPid;
    if (!qemuPid || !pidAlive(qemuPid)) throw new BenchError('HYDRA_BENCH_SETUP_FAILED', `VM ${DEBIAN_VM} on ${from}: no running QEMU to kill`);
    const killAt = Date.now();
    if (kind === 'qemu') process.kill(qemuPid, 'SIGKILL');
    else await killNetnsHost(this.opts.dir, from);
    const fo = await waitForFailover(this.cluster.cluster, DEBIAN_VM, rec.generation, { timeoutMs: 300_000 });
    const reply = await this.waitReconnected(killAt, 300_000, `the client's first reply from the restored VM after the ${kind} kill`);
    await sleep(1000);
    const recs = this.records();
    const s = summarizeWatch(recs.filter((x) => x.t > killAt - 5000 && x.t <= reply.t), killAt);
    const loss = lossReport(recs, killAt);
    const epoch = fo.timing?.restoredEpoch;
    // The checkpointer appends an epoch to its history only after the store's acknowledgement:
    // killed (or quitting on its dead VM) in between, the store has the epoch and the history
    // not. The newest earlier epoch then gives a weaker, still valid bound.
    const mine = this.history(from).filter((h) => h.generation === rec.generation && epoch !== undefined && h.epoch <= epoch);
    const cp = mine.find((h) => h.epoch === epoch) ?? mine.at(-1);
    const obs: FailoverObservation = {
      kind, fromHost: from, toHost: fo.record.host, intervalMs, killAt,
      firstReplyAfterKillMs: reply.t - killAt,
      longestGapMs: s.longestGapMs,
      ackedBeforeKill: loss.ackedBeforeKill,
      found: loss.found ?? -1,
      lostAcked: loss.lostAcked ?? -1,
      ackedAtCheckpoint: cp ? lastAcked(recs, 'incr', cp.startedAt) ?? 0 : -1,
      ...(cp ? { checkpointEpoch: cp.epoch } : {}),
      ...(fo.timing?.runningAt ? { runningAfterKillMs: fo.timing.runningAt - killAt } : {}),
      connectedAfterKillMs: (recs.find((x) => x.ok && x.op === 'connect' && x.t > killAt)?.t ?? reply.t) - killAt,
      ...(epoch !== undefined ? { restoredEpoch: epoch } : {}),
      generation: fo.record.generation,
      ...(fo.timing ? { timing: fo.timing } : {}),
    };
    this.current = fo.record;
    this.opts.log(`${kind} death on ${from} -> ${obs.toHost} (interval ${intervalMs} ms): kill to first reply ${obs.firstReplyAfterKillMs.toFixed(0)} ms, longest gap ${obs.longestGapMs.toFixed(0)} ms, `
      + `guest running ${obs.runningAfterKillMs ?? '?'} ms after the kill (cluster: ${fo.timing?.totalMs ?? '?'} ms after the failure it recorded), client connected at ${obs.connectedAfterKillMs.toFixed(0)} ms; `
      + `counter acknowledged ${obs.ackedBeforeKill}, found ${obs.found}, lost ${obs.lostAcked} (acknowledged at the pause of epoch ${obs.checkpointEpoch ?? '?'}, restored ${epoch ?? '?'}: ${obs.ackedAtCheckpoint})`);
    if (kind === 'host' && opts.revive) await this.revive(from);
    return obs;
  }

  /** A killed host comes back (etcd member and agent) and registers again. */
  async revive(host: string): Promise<void> {
    await reviveNetnsHost(this.opts.dir, host, this.opts.env);
    const deadline = Date.now() + 120_000;
    // etcd may fail a call while the member rejoins: polled until the deadline.
    while (!(await this.cluster.cluster.hosts().catch(() => new Map())).has(host)) {
      if (Date.now() > deadline) throw new BenchError('HYDRA_BENCH_TIMEOUT', `host ${host} did not register again within 120 s of its revival`);
      await sleep(200);
    }
  }

  /** Cluster down: the watcher, the VM record, every namespaced process and link. */
  async stop(): Promise<void> {
    await this.stopWatcher();
    // Best effort: the cluster is going down either way, and its namespaces take everything with them.
    await forgetVm(this.cluster.cluster, DEBIAN_VM).catch(() => undefined);
    await this.cluster.stop();
  }
}

function parseMemory(s: string): number {
  const m = /^(\d+)([MG])$/i.exec(s);
  if (!m) throw new BenchError('HYDRA_BENCH_BAD_OPTION', `guest memory "${s}": give e.g. 512M or 1G`);
  return Number(m[1]) * (m[2]!.toUpperCase() === 'G' ? 1024 : 1) * MIB;
}
