import fs from 'node:fs';
import { defaultSecretFile } from '../config/secret.js';
import path from 'node:path';
import crypto from 'node:crypto';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { hydraHome } from '../config/paths.js';
import { Cluster } from './cluster.js';
import { HaError } from '../errors.js';
import { startEtcd, stopPid } from './etcd-process.js';
import { pidAlive } from '../util/pid.js';
import { inNetns, removeNetns, type NetnsLayout } from './netns.js';
import { sleep } from '../util/sleep.js';
import { fenceLocalVm } from './fence.js';
import { listLocalVms } from './local-vm.js';
import { spawnClusterStore, stopClusterStores, waitStoresRegistered, type ClusterStoreInfo } from './cluster-stores.js';

/**
 * The embedded cluster for one machine (demo, bench): an etcd member, one
 * manager and N agents, each agent a "host" with its own HYDRAVM_HOME. All
 * are detached processes that outlive the command that started them.
 *
 * Directory layout (default $HYDRAVM_HOME/cluster, or --dir):
 *
 *   cluster.json          EmbeddedClusterInfo: etcd URL, hosts, pids (what `cluster down/status` read)
 *   (the cluster secret is $HYDRAVM_HOME/cluster.secret, shared with `hydravm store`, unless one is given)
 *   etcd/data/            etcd's data directory
 *   hosts/HOST/           HOST's HYDRAVM_HOME (its VMs under vms/)
 *   shared/store/         with `stores`: the checkpoint stores' shared directory
 *   run/NAME.pid          pid files: etcd, manager, agent-HOST
 *   logs/NAME.log         logs (JSON lines): etcd, manager, agent-HOST
 */
export interface EmbeddedClusterOptions {
  dir?: string;
  /** Number of hosts (named host1..hostN) or their names. Default 2. */
  hosts?: number | string[];
  /** Memory each host offers to VMs (default: the machine's). */
  hostMemoryBytes?: number;
  etcdPort?: number;
  leaseTtlSec?: number;
  /** Secret file the agents use for restores (default $HYDRAVM_HOME/cluster.secret, as for `hydravm store`; created). */
  secretFile?: string;
  /** Extra environment for the daemons. */
  env?: NodeJS.ProcessEnv;
  /** Start the manager (default true). */
  manager?: boolean;
  /**
   * A checkpoint store per host on DIR/shared/store (default false): the
   * first host's takes the directory's lock and is active, the others wait as
   * standbys; VMs protected with store `cluster` follow whichever is active.
   */
  stores?: boolean;
  timeoutMs?: number;
}

export interface DaemonInfo {
  name: string;
  pid: number;
  log: string;
  pidFile: string;
  /** The daemon's arguments (for a restart; no secrets in them). */
  args?: string[];
}

export interface EmbeddedHost extends DaemonInfo {
  host: string;
  home: string;
  /** Namespaced clusters: the host's network namespace and address. */
  netns?: string;
  address?: string;
}

export interface EmbeddedClusterInfo {
  dir: string;
  etcdUrl: string;
  secretFile: string;
  leaseTtlSec: number;
  etcd: DaemonInfo;
  manager?: DaemonInfo;
  hosts: EmbeddedHost[];
  startedAt: string;
  // Namespaced clusters (`cluster up --netns`, see netns-cluster.ts); `etcd` is then the first member.
  /** Every etcd member, one per host. */
  etcdMembers?: (DaemonInfo & { url: string; netns: string })[];
  /** The checkpoint store the cluster started in the first host's namespace (the active one at start; see `stores`). */
  store?: DaemonInfo & { address: string; dir: string };
  /** Every checkpoint store the cluster started, one per host: one active, the others standbys. */
  stores?: ClusterStoreInfo[];
  /** Namespaces, bridge and veths created: what `cluster down` removes. */
  netns?: NetnsLayout;
}

export interface EmbeddedCluster extends EmbeddedClusterInfo {
  /** A client on the cluster's etcd (closed by stop()). */
  cluster: Cluster;
  /** Stop everything: manager, agents (which kill their HA VMs), etcd. */
  stop(): Promise<void>;
}

export function defaultClusterDir(): string {
  return path.join(hydraHome(), 'cluster');
}

export function readClusterInfo(dir = defaultClusterDir()): EmbeddedClusterInfo | undefined {
  try {
    return JSON.parse(fs.readFileSync(path.join(dir, 'cluster.json'), 'utf8')) as EmbeddedClusterInfo;
  } catch {
    return undefined;
  }
}

/** How to run this package's HA daemon entry (src/cli/ha-daemon.ts under tsx, or the compiled .js). */
export function daemonCommand(): { command: string; args: string[] } {
  const here = fileURLToPath(import.meta.url);
  const ext = path.extname(here);
  // A path, not an import: the daemon is a command-line entry, above this layer.
  const entry = path.join(path.dirname(here), '..', 'cli', `ha-daemon${ext}`);
  const args = ext === '.ts' ? ['--import', 'tsx', entry] : [entry];
  return { command: process.execPath, args };
}

/** Start a detached HA daemon (`agent ...` or `manager ...`) with a pid file and a log. */
export function spawnDaemon(dir: string, name: string, daemonArgs: string[], env: NodeJS.ProcessEnv, netns?: string): DaemonInfo {
  const logs = path.join(dir, 'logs');
  const run = path.join(dir, 'run');
  fs.mkdirSync(logs, { recursive: true });
  fs.mkdirSync(run, { recursive: true });
  const log = path.join(logs, `${name}.log`);
  const pidFile = path.join(run, `${name}.pid`);
  const daemon = daemonCommand();
  // nsenter execs the daemon: the pid is the daemon's, and its children (supervisors, QEMU) inherit the namespace.
  const [command, ...args] = netns ? [...inNetns(netns), daemon.command, ...daemon.args] : [daemon.command, ...daemon.args];
  const fd = fs.openSync(log, 'a');
  const child = spawn(command!, [...args, ...daemonArgs], { detached: true, stdio: ['ignore', fd, fd], env, cwd: process.cwd() });
  fs.closeSync(fd);
  child.unref();
  if (!child.pid) throw new HaError('HYDRA_HA_SPAWN', `cannot start ${name} (see ${log})`);
  fs.writeFileSync(pidFile, `${child.pid}\n`);
  return { name, pid: child.pid, log, pidFile, args: daemonArgs };
}

export async function startEmbeddedCluster(opts: EmbeddedClusterOptions = {}): Promise<EmbeddedCluster> {
  const dir = path.resolve(opts.dir ?? defaultClusterDir());
  const existing = readClusterInfo(dir);
  if (existing && pidAlive(existing.etcd.pid)) {
    throw new HaError('HYDRA_HA_CLUSTER_RUNNING', `an embedded cluster already runs in ${dir} (etcd pid ${existing.etcd.pid}); \`hydravm cluster down --dir ${dir}\` first`);
  }
  fs.mkdirSync(dir, { recursive: true });
  const hostNames = typeof opts.hosts === 'object' ? opts.hosts : Array.from({ length: opts.hosts ?? 2 }, (_, i) => `host${i + 1}`);
  const ttl = opts.leaseTtlSec ?? 1;
  // The same secret file a `hydravm store` on this machine uses by default, so the
  // agents' restores authenticate to it without further configuration.
  const secretFile = opts.secretFile ?? defaultSecretFile();
  if (!fs.existsSync(secretFile)) {
    fs.mkdirSync(path.dirname(secretFile), { recursive: true });
    fs.writeFileSync(secretFile, crypto.randomBytes(32).toString('hex') + '\n', { mode: 0o600 });
  }
  fs.mkdirSync(path.join(dir, 'logs'), { recursive: true });
  fs.mkdirSync(path.join(dir, 'run'), { recursive: true });
  const etcdProc = await startEtcd({ dataDir: path.join(dir, 'etcd', 'data'), clientPort: opts.etcdPort, logFile: path.join(dir, 'logs', 'etcd.log'), detached: true });
  fs.writeFileSync(path.join(dir, 'run', 'etcd.pid'), `${etcdProc.pid}\n`);
  const info: EmbeddedClusterInfo = {
    dir,
    etcdUrl: etcdProc.url,
    secretFile,
    leaseTtlSec: ttl,
    etcd: { name: 'etcd', pid: etcdProc.pid, log: etcdProc.logFile, pidFile: path.join(dir, 'run', 'etcd.pid') },
    hosts: [],
    startedAt: new Date().toISOString(),
  };
  const baseEnv = { ...process.env, ...opts.env };
  try {
    if (opts.stores) await startStores(info, hostNames.map((host) => ({ host, listen: '127.0.0.1:0' })), baseEnv, opts.timeoutMs ?? 30_000);
    if (opts.manager !== false) {
      info.manager = spawnDaemon(dir, 'manager', ['manager', '--etcd', etcdProc.url, '--id', 'manager-1'], baseEnv);
    }
    for (const host of hostNames) {
      const home = path.join(dir, 'hosts', host);
      fs.mkdirSync(home, { recursive: true });
      const args = ['agent', '--host', host, '--etcd', etcdProc.url, '--home', home, '--lease-ttl', String(ttl), '--secret-file', secretFile];
      if (opts.hostMemoryBytes) args.push('--memory', String(opts.hostMemoryBytes));
      const d = spawnDaemon(dir, `agent-${host}`, args, { ...baseEnv, HYDRAVM_HOME: home });
      info.hosts.push({ ...d, host, home });
    }
    fs.writeFileSync(path.join(dir, 'cluster.json'), JSON.stringify(info, null, 2) + '\n');
    const cluster = new Cluster(etcdProc.url);
    const deadline = Date.now() + (opts.timeoutMs ?? 30_000);
    for (;;) {
      // etcd may not answer yet while it starts: polled until the deadline.
      const [hosts, leader] = await Promise.all([cluster.hosts().catch(() => new Map()), cluster.leader().catch(() => undefined)]);
      if (hostNames.every((h) => hosts.has(h)) && (opts.manager === false || leader)) break;
      for (const d of [info.manager, ...info.hosts]) {
        if (d && !pidAlive(d.pid)) throw new HaError('HYDRA_HA_SPAWN', `${d.name} exited during start (see ${d.log})`);
      }
      if (Date.now() > deadline) throw new HaError('HYDRA_HA_TIMEOUT', `embedded cluster not up within ${(opts.timeoutMs ?? 30_000) / 1000} s (logs in ${path.join(dir, 'logs')})`);
      await sleep(50);
    }
    return { ...info, cluster, stop: async () => { cluster.close(); await stopEmbeddedCluster(dir); } };
  } catch (err) {
    fs.writeFileSync(path.join(dir, 'cluster.json'), JSON.stringify(info, null, 2) + '\n');
    await stopEmbeddedCluster(dir);
    throw err;
  }
}

/**
 * One store per host on DIR/shared/store: the first is started alone and
 * becomes active, then the others, which wait as standbys. Records them in
 * cluster.json before waiting, so a failed start is still cleaned up.
 */
export async function startStores(info: EmbeddedClusterInfo, hosts: { host: string; listen: string; netns?: string; etcdUrl?: string; leaseTtlSec?: number }[], env: NodeJS.ProcessEnv, timeoutMs: number): Promise<void> {
  const storeDir = path.join(info.dir, 'shared', 'store');
  const cluster = new Cluster(info.etcdUrl);
  try {
    info.stores = [];
    for (const [i, h] of hosts.entries()) {
      info.stores.push(spawnClusterStore(info.dir, { host: h.host, storeDir, listen: h.listen, etcdUrl: h.etcdUrl ?? info.etcdUrl, secretFile: info.secretFile, env, ...(h.netns ? { netns: h.netns } : {}), ...(h.leaseTtlSec ? { leaseTtlSec: h.leaseTtlSec } : {}) }));
      fs.writeFileSync(path.join(info.dir, 'cluster.json'), JSON.stringify(info, null, 2) + '\n');
      if (i === 0) {
        const list = await waitStoresRegistered(cluster, info.stores, timeoutMs);
        info.store = { ...info.stores[0]!, address: list.active!.address, dir: storeDir };
      }
    }
    await waitStoresRegistered(cluster, info.stores, timeoutMs);
    fs.writeFileSync(path.join(info.dir, 'cluster.json'), JSON.stringify(info, null, 2) + '\n');
  } finally {
    cluster.close();
  }
}

/**
 * Start a stopped (or killed) daemon of the embedded cluster in `dir` again,
 * with its recorded arguments: `manager`, `agent-HOST` or `store-HOST`. `env` adds to this
 * process's environment (an agent gets its host's HYDRAVM_HOME). Updates
 * cluster.json, so `cluster down` stops the new process.
 */
export function restartDaemon(dir: string, name: string, env: NodeJS.ProcessEnv = {}): DaemonInfo {
  const info = readClusterInfo(dir);
  if (!info) throw new HaError('HYDRA_HA_SPAWN', `no embedded cluster in ${dir}`);
  const store = info.stores?.find((st) => st.name === name);
  if (store) {
    // A store comes back as a standby (it always runs with --standby) and serves once it takes the directory's lock.
    if (pidAlive(store.pid)) throw new HaError('HYDRA_HA_SPAWN', `daemon "${name}" still runs (pid ${store.pid})`);
    const arg = (flag: string) => (store.args?.includes(flag) ? store.args[store.args.indexOf(flag) + 1] : undefined);
    const ttl = Number(arg('--lease-ttl'));
    const d = spawnClusterStore(dir, { host: store.host, storeDir: store.dir, listen: store.listen, etcdUrl: arg('--etcd') ?? info.etcdUrl, secretFile: info.secretFile, env: { ...process.env, ...env }, ...(store.netns ? { netns: store.netns } : {}), ...(ttl > 0 ? { leaseTtlSec: ttl } : {}) });
    Object.assign(store, d);
    fs.writeFileSync(path.join(dir, 'cluster.json'), JSON.stringify(info, null, 2) + '\n');
    return d;
  }
  const host = info.hosts.find((h) => h.name === name);
  const old = host ?? (info.manager?.name === name ? info.manager : undefined);
  if (!old?.args) throw new HaError('HYDRA_HA_SPAWN', `no daemon "${name}" with recorded arguments in ${dir}`);
  if (pidAlive(old.pid)) throw new HaError('HYDRA_HA_SPAWN', `daemon "${name}" still runs (pid ${old.pid})`);
  const d = spawnDaemon(dir, name, old.args, { ...process.env, ...env, ...(host ? { HYDRAVM_HOME: host.home } : {}) }, host?.netns);
  if (host) Object.assign(host, d);
  else info.manager = d;
  fs.writeFileSync(path.join(dir, 'cluster.json'), JSON.stringify(info, null, 2) + '\n');
  return d;
}

/** Stop what `startEmbeddedCluster` started in `dir`: manager, agents, etcd (data stays). */
export async function stopEmbeddedCluster(dir = defaultClusterDir()): Promise<boolean> {
  const info = readClusterInfo(dir);
  if (!info) return false;
  // By recorded PID, so only while each is still the daemon recorded (its arguments on its command line).
  const who = (d: DaemonInfo, fallback: string[]) => ({ cmdline: d.args?.length ? d.args : fallback });
  if (info.manager) await stopPid(info.manager.pid, 3000, who(info.manager, ['manager']));
  await Promise.all(info.hosts.map((h) => stopPid(h.pid, 5000, who(h, ['agent', '--host', h.host]))));
  // An agent fences its guarded VMs when it stops, but not a VM it never guarded (started on the host,
  // not yet protected), nor any when it was killed after its grace (mid-restore, a checkpointer just
  // spawned): whatever still runs of a host's VMs, QEMU, supervisor or checkpointer, dies with the cluster.
  for (const h of info.hosts) {
    for (const v of listLocalVms(h.home)) {
      if (v.live || (v.protection?.pid !== undefined && pidAlive(v.protection.pid))) await fenceLocalVm(h.home, v.name, 'cluster stopped');
    }
  }
  if (info.stores) await stopClusterStores(info.stores);
  else if (info.store) await stopPid(info.store.pid, 3000, { cmdline: ['store', '--dir', info.store.dir] });
  if (info.etcdMembers) await Promise.all(info.etcdMembers.map((m) => stopPid(m.pid, 3000, { cmdline: ['--data-dir', path.join(path.resolve(dir), 'etcd', m.name.replace(/^etcd-/, ''))] })));
  else await stopPid(info.etcd.pid, 3000, { cmdline: ['--data-dir', path.join(path.resolve(dir), 'etcd', 'data')] });
  for (const d of [info.etcd, info.manager, info.store, ...info.hosts, ...(info.etcdMembers ?? [])]) if (d?.pidFile) fs.rmSync(d.pidFile, { force: true });
  // What still runs in the namespaces (VMs of a killed agent) dies with them.
  if (info.netns) removeNetns(info.netns);
  return true;
}
