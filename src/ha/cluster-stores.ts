// The checkpoint stores `cluster up` starts: one per host on the shared directory; whichever takes its lock first is active, the others wait as standbys.
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { cliEntry } from '../config/paths.js';
import { HaError } from '../errors.js';
import { pidAlive } from '../util/pid.js';
import { sleep } from '../util/sleep.js';
import type { Cluster } from './cluster.js';
import type { DaemonInfo } from './embedded.js';
import { stopPid } from './etcd-process.js';
import { inNetns } from './netns.js';
import { listStores, type StoreList } from './store-discovery.js';
import { lastLines } from '../util/log-tail.js';

export interface ClusterStoreInfo extends DaemonInfo {
  /** The host it runs on (its name in etcd is store-HOST). */
  host: string;
  /** The shared store directory. */
  dir: string;
  listen: string;
  netns?: string;
}

export interface SpawnClusterStore {
  host: string;
  storeDir: string;
  listen: string;
  etcdUrl: string;
  secretFile: string;
  env: NodeJS.ProcessEnv;
  netns?: string;
}

/** Start `hydravm store --etcd ... --standby` for `host`, detached, with a pid file and a log in the cluster directory. */
export function spawnClusterStore(dir: string, s: SpawnClusterStore): ClusterStoreInfo {
  const name = `store-${s.host}`;
  const log = path.join(dir, 'logs', `${name}.log`);
  const pidFile = path.join(dir, 'run', `${name}.pid`);
  fs.mkdirSync(s.storeDir, { recursive: true });
  const args = ['store', '--dir', s.storeDir, '--listen', s.listen, '--secret-file', s.secretFile, '--etcd', s.etcdUrl, '--standby', '--name', name];
  const argv = [...(s.netns ? inNetns(s.netns) : []), process.execPath, cliEntry, ...args];
  const fd = fs.openSync(log, 'a');
  const child = spawn(argv[0]!, argv.slice(1), { detached: true, stdio: ['ignore', fd, fd], env: s.env });
  fs.closeSync(fd);
  child.unref();
  if (!child.pid) throw new HaError('HYDRA_HA_SPAWN', `cannot start checkpoint store ${name} (see ${log})`);
  fs.writeFileSync(pidFile, `${child.pid}\n`);
  return { name, pid: child.pid, log, pidFile, args, host: s.host, dir: s.storeDir, listen: s.listen, ...(s.netns ? { netns: s.netns } : {}) };
}

/** Wait until one of `stores` is registered as active and every other one as a standby. */
export async function waitStoresRegistered(cluster: Cluster, stores: ClusterStoreInfo[], timeoutMs: number): Promise<StoreList> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    // etcd may not answer every call while it settles: polled until the deadline.
    const list = await listStores(cluster).catch(() => undefined);
    const names = new Set([list?.active?.name, ...(list?.standbys ?? []).map((s) => s.name)]);
    if (list?.active && stores.every((s) => names.has(s.name))) return list;
    for (const s of stores) {
      if (!pidAlive(s.pid)) throw new HaError('HYDRA_HA_SPAWN', `checkpoint store ${s.name} exited during start (see ${s.log}): ${lastLines(s.log)}`);
    }
    if (Date.now() > deadline) throw new HaError('HYDRA_HA_TIMEOUT', `checkpoint stores not registered in etcd within ${timeoutMs / 1000} s (active: ${list?.active?.name ?? 'none'}; logs ${stores.map((s) => s.log).join(', ')})`);
    await sleep(100);
  }
}

/** Stop the cluster's stores, each only while its pid still runs `hydravm store --dir DIR`. */
export async function stopClusterStores(stores: ClusterStoreInfo[]): Promise<void> {
  await Promise.all(stores.map((s) => stopPid(s.pid, 3000, { cmdline: ['store', '--dir', s.dir] })));
  for (const s of stores) fs.rmSync(s.pidFile, { force: true });
}
