// Helpers of the HA tests: an etcd lab, fake VMs, in-process agents, a partitionable proxy.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { pino } from 'pino';
import { findEtcd, startEtcd, type EtcdProcess } from '../../src/ha/etcd-process.js';
import { Cluster, keys, type VmRecord } from '../../src/ha/cluster.js';
import { HostAgent, type AgentOptions } from '../../src/ha/agent.js';
import { writeHaLocal } from '../../src/ha/local-vm.js';
import { procStartTime } from '../../src/util/pid.js';
import type { RestoreFn } from '../../src/ha/restore-adapter.js';
import { tmpDir } from './tmp.js';

/** The `skip` option of tests that need a real etcd: false when it is installed, else why they are skipped. */
export function skipWithoutEtcd(): false | string {
  try {
    findEtcd();
    return false;
  } catch {
    return 'etcd not installed (apt-get install etcd-server etcd-client, or `hydravm setup`)';
  }
}

export { tmpDir } from './tmp.js';
export { until } from './until.js';

/** Test scaffolding for the HA layer: a real etcd per test, fake VMs made of `sleep` processes. */
export const GiB = 1024 ** 3;
export const quiet = pino({ level: process.env.HA_TEST_LOG ?? 'silent' }, pino.destination({ fd: 2, sync: true }));

export interface EtcdLab {
  dir: string;
  etcd: EtcdProcess;
  cluster: Cluster;
  cleanup(): Promise<void>;
  /** Everything registered here is stopped by cleanup(), in reverse order. */
  defer(fn: () => unknown): void;
}

export async function etcdLab(prefix: string): Promise<EtcdLab> {
  const dir = tmpDir(prefix);
  const etcd = await startEtcd({ dataDir: path.join(dir, 'etcd'), logFile: path.join(dir, 'etcd.log') });
  const cluster = new Cluster(etcd.url);
  const deferred: (() => unknown)[] = [];
  return {
    dir,
    etcd,
    cluster,
    defer: (fn) => deferred.push(fn),
    async cleanup() {
      for (const fn of deferred.reverse()) {
        try {
          await fn();
        } catch {
          /* best effort */
        }
      }
      cluster.close();
      await etcd.stop();
      killFakeVms(dir);
      if (!process.env.HA_TEST_KEEP) fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

function sleeper(): number {
  const p = spawn('sleep', ['600'], { stdio: 'ignore', detached: true });
  p.unref();
  return p.pid!;
}

export interface FakeVm {
  name: string;
  home: string;
  qemuPid: number;
  supervisorPid: number;
  checkpointerPid: number;
}

/**
 * A VM as the agent sees it: state.json (lifecycle running, live pids),
 * protection.json and ha.json at `generation`. The "QEMU", "supervisor" and
 * "checkpointer" are `sleep` processes.
 */
export function fakeVm(home: string, name: string, generation: number, host: string, memoryBytes = 128 << 20, withHa = true): FakeVm {
  const dir = path.join(home, 'vms', name);
  fs.mkdirSync(dir, { recursive: true });
  const vm: FakeVm = { name, home, qemuPid: sleeper(), supervisorPid: sleeper(), checkpointerPid: sleeper() };
  // Start times as the supervisor records them: fencing signals a PID only while it matches.
  writeJson(path.join(dir, 'state.json'), { name, lifecycle: 'running', supervisorPid: vm.supervisorPid, supervisorStartTime: procStartTime(vm.supervisorPid), qemuPid: vm.qemuPid, qemuStartTime: procStartTime(vm.qemuPid), memoryBytes, startedAt: new Date().toISOString() });
  writeJson(path.join(dir, 'protection.json'), { vm: name, pid: vm.checkpointerPid, startTime: procStartTime(vm.checkpointerPid), generation, state: 'protected', committedEpoch: 1, updatedAt: Date.now() });
  if (withHa) writeHaLocal(home, { vm: name, host, generation, updatedAt: Date.now() });
  return vm;
}

/** What the supervisor does when QEMU dies: record `crashed`. Returns the kill time. */
export function crashFakeVm(vm: FakeVm): number {
  const at = Date.now();
  process.kill(vm.qemuPid, 'SIGKILL');
  const file = path.join(vm.home, 'vms', vm.name, 'state.json');
  const st = JSON.parse(fs.readFileSync(file, 'utf8'));
  writeJson(file, { ...st, lifecycle: 'crashed', reason: 'QEMU died (code null, signal SIGKILL)', endedAt: new Date(at).toISOString(), exitSignal: 'SIGKILL' });
  return at;
}

export function writeJson(file: string, value: unknown): void {
  fs.writeFileSync(`${file}.tmp`, JSON.stringify(value));
  fs.renameSync(`${file}.tmp`, file);
}

export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Kill every fake VM process under dir (any state.json/protection.json pid). */
export function killFakeVms(dir: string): void {
  const walk = (d: string) => {
    let entries: fs.Dirent[] = [];
    try {
      entries = fs.readdirSync(d, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name === 'state.json' || e.name === 'protection.json') {
        try {
          const j = JSON.parse(fs.readFileSync(p, 'utf8'));
          for (const pid of [j.qemuPid, j.supervisorPid, j.pid]) if (pid && pid !== process.pid) try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
        } catch {
          /* ignore */
        }
      }
    }
  };
  walk(dir);
}

/** A restore that "starts" a fake VM in the agent's home, protected at the new generation. */
export function fakeRestore(home: string, host: string, delayMs = 30): RestoreFn {
  return async (req) => {
    await new Promise((r) => setTimeout(r, delayMs));
    const dir = path.join(home, 'vms', req.vm);
    const prevHa = fs.existsSync(path.join(dir, 'ha.json')) ? fs.readFileSync(path.join(dir, 'ha.json'), 'utf8') : undefined;
    const vm = fakeVm(home, req.vm, req.newGeneration, host, 128 << 20, false);
    if (prevHa) fs.writeFileSync(path.join(dir, 'ha.json'), prevHa);
    return { vm: vm.name, generation: req.newGeneration, epoch: 1, timings: { spawnToRunningMs: delayMs } };
  };
}

/** Register a VM as protected on `host` at `generation` straight into etcd. */
export async function registerVm(cluster: Cluster, rec: Partial<VmRecord> & { name: string; host: string; generation: number }): Promise<void> {
  const full: VmRecord = { store: '127.0.0.1:1', mode: 'network', intervalMs: 1000, state: 'protected', imageGeneration: rec.generation, memoryBytes: 128 << 20, updatedAt: Date.now(), ...rec };
  await cluster.etcd.put(keys.generation(rec.name)).value(String(rec.generation));
  await cluster.etcd.put(keys.vm(rec.name)).value(JSON.stringify(full));
}

export async function inProcessAgent(lab: EtcdLab, host: string, extra: Partial<AgentOptions> = {}): Promise<HostAgent> {
  const home = extra.home ?? path.join(lab.dir, 'hosts', host);
  fs.mkdirSync(home, { recursive: true });
  const agent = new HostAgent({
    host,
    etcd: lab.etcd.url,
    home,
    memoryBytes: 2 * GiB,
    supervisorGraceMs: 100,
    restore: fakeRestore(home, host),
    protect: async (r) => ({ generation: r.generation }),
    storeGeneration: async () => undefined,
    secret: () => 'test-secret',
    logger: quiet,
    ...extra,
  });
  lab.defer(() => agent.stop());
  await agent.start();
  return agent;
}

/** A TCP proxy in front of etcd whose link can be cut (a network partition of whoever uses it). */
export interface Partitionable {
  url: string;
  cut(): void;
  heal(): void;
  close(): Promise<void>;
}

export async function partitionableProxy(target: string): Promise<Partitionable> {
  const u = new URL(target);
  const sockets = new Set<net.Socket>();
  let blocked = false;
  const server = net.createServer((client) => {
    if (blocked) return void client.destroy();
    const upstream = net.connect(Number(u.port), u.hostname);
    sockets.add(client);
    sockets.add(upstream);
    const drop = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on('error', drop).on('close', drop);
    upstream.on('error', drop).on('close', drop);
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}`,
    cut() {
      blocked = true;
      for (const s of sockets) s.destroy();
      sockets.clear();
    },
    heal() {
      blocked = false;
    },
    close: () => new Promise<void>((r) => {
      for (const s of sockets) s.destroy();
      server.close(() => r());
    }),
  };
}

/** The live QEMU processes of VM `vm` whose command line mentions a path under `root` (any host's home), from /proc. */
export function liveQemusOf(vm: string, root: string): number[] {
  const out: number[] = [];
  // A VM restored into a restore shell runs in a QEMU started as `-name shell-ID`: its state.json names it.
  const adopted = new Set<number>();
  const homes = [root, ...(fs.existsSync(path.join(root, 'hosts')) ? fs.readdirSync(path.join(root, 'hosts')).map((h) => path.join(root, 'hosts', h)) : [])];
  for (const home of homes) {
    try {
      const st = JSON.parse(fs.readFileSync(path.join(home, 'vms', vm, 'state.json'), 'utf8')) as { shell?: string; qemuPid?: number };
      if (st.shell && st.qemuPid) adopted.add(st.qemuPid);
    } catch {
      // no state there
    }
  }
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    let args: string[];
    try {
      args = fs.readFileSync(`/proc/${d}/cmdline`, 'utf8').split('\0');
    } catch {
      continue;
    }
    const i = args.indexOf('-name');
    const named = args[i + 1] === `${vm},debug-threads=on` || (adopted.has(Number(d)) && /^shell-/.test(args[i + 1] ?? ''));
    if (i < 0 || !named || !args.some((a) => a.includes(root))) continue;
    if (pidAliveNotZombie(Number(d))) out.push(Number(d));
  }
  return out;
}

function pidAliveNotZombie(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

/**
 * Samples every `periodMs` (50) how many QEMUs of each VM are alive across
 * every host under `root`: the proof that no VM ever runs twice.
 */
export class IncarnationSampler {
  samples = 0;
  /** Per VM: samples that saw at least one / two or more live QEMUs. */
  seen = new Map<string, { one: number; twoOrMore: number; pidsAtDouble: number[][] }>();
  private timer: NodeJS.Timeout | undefined;

  constructor(private readonly vms: string[], private readonly root: string, private readonly periodMs = 50) {}

  start(): this {
    this.timer = setInterval(() => this.sample(), this.periodMs);
    return this;
  }

  sample(): void {
    this.samples++;
    for (const vm of this.vms) {
      const pids = liveQemusOf(vm, this.root);
      const s = this.seen.get(vm) ?? { one: 0, twoOrMore: 0, pidsAtDouble: [] };
      if (pids.length >= 1) s.one++;
      if (pids.length >= 2) {
        s.twoOrMore++;
        if (s.pidsAtDouble.length < 5) s.pidsAtDouble.push(pids);
      }
      this.seen.set(vm, s);
    }
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  doubles(): number {
    return [...this.seen.values()].reduce((n, s) => n + s.twoOrMore, 0);
  }
}
