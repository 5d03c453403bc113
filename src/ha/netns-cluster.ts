// The embedded cluster with hosts that are network namespaces: an etcd member, an agent (and one store) per namespace.
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { defaultSecretFile } from '../config/secret.js';
import { HaError, NetnsError } from '../errors.js';
import { pidAlive } from '../util/pid.js';
import { sleep } from '../util/sleep.js';
import { Cluster } from './cluster.js';
import { startEtcd, waitEtcdHealthy, type EtcdProcess } from './etcd-process.js';
import { defaultClusterDir, readClusterInfo, spawnDaemon, startStores, stopEmbeddedCluster, type DaemonInfo, type EmbeddedCluster, type EmbeddedClusterInfo } from './embedded.js';
import { checkNetnsTools, cleanupCommands, createNetns, existingWithPrefix, inNetns, planNetns, removeNetns } from './netns.js';

/**
 * `hydravm cluster up --netns`: every host is its own network stack.
 *
 *   root namespace   bridge PREFIXbr (A.B.C.1), the manager, the CLI
 *   PREFIXhostI      eth0 A.B.C.(10+I); etcd member hostI (client :2379, peer :2380);
 *                    the agent (its supervisors, QEMU and checkpointers inherit the namespace);
 *                    a checkpoint store (:7000) on DIR/shared/store: host1's active,
 *                    the others standbys waiting for the directory's lock
 *
 * The etcd members form one cluster (initial-cluster of the namespace
 * addresses). Each agent talks to its own host's member: a host that is cut
 * off keeps its member, which has no quorum, so its lease expires and it
 * self-fences; a member dying takes its host's agent out of the cluster like
 * a host death. The manager is given every member. Shared storage is DIR/shared, the same path in
 * every namespace (namespaces share the file system).
 */
export interface NetnsClusterOptions {
  dir?: string;
  hosts?: number | string[];
  /** Name prefix of namespaces, bridge and veths (default "hvm-"). */
  prefix?: string;
  /** A /24 inside 198.18.0.0/15 (default 198.18.100.0/24). */
  subnet?: string;
  hostMemoryBytes?: number;
  /** Memory offered to VMs by particular hosts (overrides hostMemoryBytes for them), e.g. a host kept for the store. */
  hostMemory?: Record<string, number>;
  /** Host lease TTL (default 3 s: see MEMBER_ELECTION_MS). */
  leaseTtlSec?: number;
  secretFile?: string;
  env?: NodeJS.ProcessEnv;
  timeoutMs?: number;
}

export const DEFAULT_NETNS_PREFIX = 'hvm-';
export const ETCD_CLIENT_PORT = 2379;
export const ETCD_PEER_PORT = 2380;
const STORE_PORT = 7000;
/**
 * Several members elect a leader, and on this loaded 2-core machine a
 * 300 ms election timeout made the leader step down now and then: each
 * election left every agent ~1 s without acknowledged keepalives, and with
 * a 1 s lease they self-fenced healthy VMs. Members get 100 / 1000 ms.
 *
 * The leases (agents' and stores') must outlast the loss of the leader
 * member (its host partitioned or dead): measured here, no keepalive was
 * acknowledged for 2.0-2.9 s after it (the randomised election timeout of
 * 1-2 s, then about a second before the new leader renews leases), and the
 * newest acknowledged keepalive may be a keepalive interval (TTL/3) older
 * than that. With 3 s leases the VMs' watchdogs (TTL - 250 ms) killed
 * healthy VMs and the active store fenced itself (TTL - 500 ms) at such an
 * election. 5 s leases leave 3.1 s (agents) and 2.8 s (stores) past the
 * keepalive interval (1.7 s); a host's death is noticed 2 s later in
 * exchange. An election can still outlast a store's margin (once in four
 * leader losses here): the store then hands the directory to a standby, and
 * VMs protected with store `cluster` follow it.
 */
export const MEMBER_HEARTBEAT_MS = 100;
export const MEMBER_ELECTION_MS = 1000;
export const NETNS_LEASE_TTL_SEC = 5;

function writeInfo(info: EmbeddedClusterInfo): void {
  fs.writeFileSync(path.join(info.dir, 'cluster.json'), JSON.stringify(info, null, 2) + '\n');
}

/**
 * A namespace or link left by a crashed run of this directory's cluster is
 * removed (its names are recorded there and nothing of it runs any more).
 * Anything else with the prefix is refused by createNetns() with the commands
 * that would remove it.
 */
function cleanLeftovers(dir: string): string[] {
  const old = readClusterInfo(dir);
  if (!old?.netns) return [];
  const daemons = [old.manager, old.store, ...(old.stores ?? []), ...old.hosts, ...(old.etcdMembers ?? [old.etcd])].filter((d): d is DaemonInfo => !!d);
  const running = daemons.filter((d) => pidAlive(d.pid));
  if (running.length) {
    throw new HaError('HYDRA_HA_CLUSTER_RUNNING', `a namespaced cluster still runs in ${dir} (${running.map((d) => `${d.name} pid ${d.pid}`).join(', ')}); \`hydravm cluster down --dir ${dir}\` first`);
  }
  return removeNetns(old.netns);
}

export async function startNetnsCluster(opts: NetnsClusterOptions = {}): Promise<EmbeddedCluster> {
  checkNetnsTools();
  const dir = path.resolve(opts.dir ?? defaultClusterDir());
  const hostNames = typeof opts.hosts === 'object' ? opts.hosts : Array.from({ length: opts.hosts ?? 3 }, (_, i) => `host${i + 1}`);
  const layout = planNetns(opts.prefix ?? DEFAULT_NETNS_PREFIX, hostNames, opts.subnet);
  const old = readClusterInfo(dir);
  if (old && !old.netns && pidAlive(old.etcd.pid)) {
    throw new HaError('HYDRA_HA_CLUSTER_RUNNING', `an embedded cluster already runs in ${dir} (etcd pid ${old.etcd.pid}); \`hydravm cluster down --dir ${dir}\` first`);
  }
  cleanLeftovers(dir);
  const found = existingWithPrefix(layout.prefix);
  if (found.netns.length || found.links.length) {
    throw new NetnsError('HYDRA_NETNS_LEFTOVER', `namespaces or links with prefix "${layout.prefix}" exist that ${dir} did not record (${[...found.netns, ...found.links].join(', ')}): another cluster may use them; if not, remove them with: ${cleanupCommands(found)}`);
  }
  const timeoutMs = opts.timeoutMs ?? 60_000;
  const ttl = opts.leaseTtlSec ?? NETNS_LEASE_TTL_SEC;
  const secretFile = opts.secretFile ?? defaultSecretFile();
  if (!fs.existsSync(secretFile)) {
    fs.mkdirSync(path.dirname(secretFile), { recursive: true });
    fs.writeFileSync(secretFile, crypto.randomBytes(32).toString('hex') + '\n', { mode: 0o600 });
  }
  for (const sub of ['logs', 'run', 'shared']) fs.mkdirSync(path.join(dir, sub), { recursive: true });
  for (const sub of ['etcd', 'hosts']) fs.rmSync(path.join(dir, sub), { recursive: true, force: true }); // a new etcd cluster needs empty data dirs

  const memberUrl = (address: string) => `http://${address}:${ETCD_CLIENT_PORT}`;
  const info: EmbeddedClusterInfo = {
    dir,
    etcdUrl: layout.hosts.map((h) => memberUrl(h.address)).join(','),
    secretFile,
    leaseTtlSec: ttl,
    etcd: { name: 'etcd-none', pid: 0, log: '', pidFile: '' },
    hosts: [],
    startedAt: new Date().toISOString(),
    etcdMembers: [],
    netns: layout,
  };
  // Recorded before anything exists: a crash half-way leaves a record `down` (or the next `up`) cleans from.
  writeInfo(info);
  const baseEnv = { ...process.env, ...opts.env };
  try {
    createNetns(layout);
    const initialCluster = layout.hosts.map((h) => `${h.host}=http://${h.address}:${ETCD_PEER_PORT}`).join(',');
    const members: EtcdProcess[] = [];
    for (const h of layout.hosts) {
      const m = await startEtcd({
        name: h.host, dataDir: path.join(dir, 'etcd', h.host), logFile: path.join(dir, 'logs', `etcd-${h.host}.log`),
        listenHost: h.address, clientPort: ETCD_CLIENT_PORT, peerPort: ETCD_PEER_PORT, initialCluster, netns: h.netns, detached: true, waitHealthy: false,
        heartbeatMs: MEMBER_HEARTBEAT_MS, electionMs: MEMBER_ELECTION_MS,
      });
      members.push(m);
      const pidFile = path.join(dir, 'run', `etcd-${h.host}.pid`);
      fs.writeFileSync(pidFile, `${m.pid}\n`);
      info.etcdMembers!.push({ name: `etcd-${h.host}`, pid: m.pid, log: m.logFile, pidFile, url: m.url, netns: h.netns });
      info.etcd = info.etcdMembers![0]!;
      writeInfo(info);
    }
    await waitEtcdHealthy(members, timeoutMs);

    // A store per host on the shared directory, each on its own host's etcd member (as the agents): host1's is active.
    await startStores(info, layout.hosts.map((h) => ({ host: h.host, listen: `${h.address}:${STORE_PORT}`, netns: h.netns, etcdUrl: memberUrl(h.address), leaseTtlSec: ttl })), baseEnv, timeoutMs);

    info.manager = spawnDaemon(dir, 'manager', ['manager', '--etcd', info.etcdUrl, '--id', 'manager-1'], baseEnv);
    writeInfo(info);
    for (const h of layout.hosts) {
      const home = path.join(dir, 'hosts', h.host);
      fs.mkdirSync(home, { recursive: true });
      // The agent talks to its own host's member only: a member cut off elsewhere (whose
      // connections hang rather than fail) cannot stall this host's lease keepalives.
      const args = ['agent', '--host', h.host, '--etcd', memberUrl(h.address), '--home', home, '--address', h.address, '--lease-ttl', String(ttl), '--secret-file', secretFile];
      const memory = opts.hostMemory?.[h.host] ?? opts.hostMemoryBytes;
      if (memory) args.push('--memory', String(memory));
      const d = spawnDaemon(dir, `agent-${h.host}`, args, { ...baseEnv, HYDRAVM_HOME: home }, h.netns);
      info.hosts.push({ ...d, host: h.host, home, netns: h.netns, address: h.address });
      writeInfo(info);
    }

    const cluster = new Cluster(info.etcdUrl);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      // etcd may not answer every call while members settle: polled until the deadline.
      const [hosts, leader] = await Promise.all([cluster.hosts().catch(() => new Map()), cluster.leader().catch(() => undefined)]);
      if (hostNames.every((h) => hosts.has(h)) && leader) break;
      for (const d of [info.manager, ...info.hosts]) {
        if (d && !pidAlive(d.pid)) {
          cluster.close();
          throw new HaError('HYDRA_HA_SPAWN', `${d.name} exited during start (see ${d.log})`);
        }
      }
      if (Date.now() > deadline) {
        cluster.close();
        throw new HaError('HYDRA_HA_TIMEOUT', `namespaced cluster not up within ${timeoutMs / 1000} s (logs in ${path.join(dir, 'logs')})`);
      }
      await sleep(100);
    }
    return { ...info, cluster, stop: async () => { cluster.close(); await stopEmbeddedCluster(dir); } };
  } catch (err) {
    writeInfo(info);
    await stopEmbeddedCluster(dir);
    throw err;
  }
}
