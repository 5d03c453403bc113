// Where the cluster's checkpoint store is: the active store's record in etcd, and lookups that follow it.
import { HaError } from '../errors.js';
import { sleep } from '../util/sleep.js';
import { Cluster, keys, type ClusterOptions } from './cluster.js';
import { credentialsFrom } from './etcd-credentials.js';

/**
 * The store "address" meaning "the cluster's active store, as etcd names it
 * now" (`cluster protect --store cluster`, the default). Agents resolve it on
 * every use; checkpointers they start resolve it again on every reconnection.
 */
export const CLUSTER_STORE = 'cluster';

export function isClusterStore(store: string): boolean {
  return store === CLUSTER_STORE;
}

export interface StoreRecord {
  /** The store process's name in the cluster (`cluster up`: store-HOST). */
  name: string;
  /** host:port checkpointers and restores connect to. */
  address: string;
  /** The shared directory, as the store sees it. */
  dir: string;
  pid: number;
  /** The machine (os.hostname()). */
  host: string;
  role: 'active' | 'standby';
  /** When it took the directory's lock (active) or began to wait for it (standby), ms since epoch. */
  since: number;
  leaseId: string;
}

export interface StoreList {
  active?: StoreRecord;
  standbys: StoreRecord[];
}

export async function listStores(cluster: Cluster): Promise<StoreList> {
  const [active, standbys] = await Promise.all([cluster.getJson<StoreRecord>(keys.storeActive), cluster.listJson<StoreRecord>(keys.storeStandbyPrefix)]);
  return { ...(active ? { active: active.value } : {}), standbys: [...standbys.items.values()].map((v) => v.value).sort((a, b) => a.name.localeCompare(b.name)) };
}

/**
 * The active store's address. With `waitMs`, a missing record (a standby
 * taking over) is waited for; then HYDRA_HA_NO_STORE.
 */
export async function resolveStore(cluster: Cluster, waitMs = 0): Promise<string> {
  const deadline = Date.now() + waitMs;
  for (;;) {
    const rec = (await cluster.getJson<StoreRecord>(keys.storeActive))?.value;
    if (rec?.address) return rec.address;
    if (Date.now() >= deadline) {
      throw new HaError('HYDRA_HA_NO_STORE', `no checkpoint store is registered as active in etcd (${keys.storeActive})${waitMs ? ` after ${waitMs} ms` : ''}: start \`hydravm store --etcd ...\`, or wait for a standby to take over`);
    }
    await sleep(100);
  }
}

/** `store` itself, or the active store's address when it is CLUSTER_STORE. */
export async function storeAddress(cluster: Cluster, store: string, waitMs = 0): Promise<string> {
  return isClusterStore(store) ? resolveStore(cluster, waitMs) : store;
}

/**
 * A lookup of the active store on its own etcd client, for a process that is
 * not an agent (the checkpointer). Credentials come from HYDRAVM_ETCD_*.
 */
export function storeResolver(d: { etcd: string }, opts: ClusterOptions = {}): { resolve(): Promise<string>; close(): void } {
  const credentials = opts.credentials ?? credentialsFrom({});
  const cluster = new Cluster(d.etcd, { ...opts, ...(credentials ? { credentials } : {}) });
  return {
    // A short wait covers a standby that is taking over right now; the caller retries beyond it.
    resolve: () => resolveStore(cluster, 2000),
    close: () => cluster.close(),
  };
}
