import { Cluster, keys, ON_HOST, FAILOVER_PENDING, type Assignment, type ClusterEvent, type FailoverTiming, type HostRecord, type KnownHost, type RestoreMode, type VmRecord } from './cluster.js';
import { HaError } from '../errors.js';
import { sleep } from '../util/sleep.js';
import { CLUSTER_STORE, isClusterStore, listStores, type StoreList } from './store-discovery.js';

/**
 * What users, the demo and the bench do with a cluster: put a VM under HA,
 * take it out, look at the state, wait for a fail-over, read its timings.
 */
export interface ProtectInClusterRequest {
  vm: string;
  /** The host (agent) the VM runs on now. */
  host: string;
  /** host:port, or `cluster`: the active store etcd names, looked up again whenever it changes. */
  store: string;
  storeDir?: string;
  mode?: RestoreMode;
  intervalMs?: number;
  /** Copy-on-write checkpoints, kept across fail-overs. */
  cow?: { grain?: number };
}

/**
 * Ask `host`'s agent to protect its running VM `vm`: it allocates the
 * generation (above what etcd and the store have seen), starts protection and
 * marks the VM `protected`. Resolves with the record once protected (unless
 * `wait` is false); rejects if the agent reports it could not.
 */
export async function protectInCluster(cluster: Cluster, req: ProtectInClusterRequest, opts: { wait?: boolean; timeoutMs?: number } = {}): Promise<VmRecord> {
  const e = cluster.etcd;
  const cur = await cluster.vm(req.vm);
  if (cur && !['stopped', 'unprotected', 'lost'].includes(cur.value.state)) {
    throw new HaError('HYDRA_HA_VM_MANAGED', `VM "${req.vm}" is already managed by the cluster (host ${cur.value.host}, state ${cur.value.state}); \`hydravm cluster forget ${req.vm}\` first`);
  }
  if (req.mode === 'file' && !req.storeDir) throw new HaError('HYDRA_HA_BAD_REQUEST', `VM "${req.vm}": file-mode restores need the store directory as the hosts see it (storeDir)`);
  const store = await followedStore(cluster, req.store);
  const hosts = await cluster.hosts();
  if (!hosts.has(req.host)) throw new HaError('HYDRA_HA_NO_HOST', `host "${req.host}" has no live agent (known: ${[...hosts.keys()].join(', ') || 'none'})`);
  const counter = await cluster.generationCounter(req.vm);
  const now = Date.now();
  const record: VmRecord = {
    name: req.vm,
    host: req.host,
    generation: counter.value,
    store,
    storeDir: req.storeDir,
    mode: req.mode ?? 'network',
    intervalMs: req.intervalMs ?? 2000,
    ...(req.cow ? { cow: req.cow } : {}),
    state: 'protecting',
    updatedAt: now,
  };
  const assignment: Assignment = { kind: 'protect', vm: req.vm, host: req.host, generation: 0, store, storeDir: req.storeDir, mode: record.mode, intervalMs: record.intervalMs, ...(req.cow ? { cow: req.cow } : {}), createdAt: now, by: 'cli' };
  const r = await e
    .if(keys.vm(req.vm), 'Mod', '==', cur?.modRevision ?? '0')
    .then(e.put(keys.vm(req.vm)).value(JSON.stringify(record)), e.put(keys.assignment(req.host, req.vm)).value(JSON.stringify(assignment)))
    .commit();
  if (!r.succeeded) throw new HaError('HYDRA_HA_CONTENDED', `VM "${req.vm}" changed while being registered; try again`);
  if (opts.wait === false) return record;
  const done = await waitForVm(cluster, req.vm, (v) => v.state !== 'protecting', opts.timeoutMs ?? 300_000);
  if (done.state !== 'protected') throw new HaError('HYDRA_HA_PROTECT_FAILED', `VM "${req.vm}" could not be protected on ${req.host}: ${done.reason ?? done.state}`);
  return done;
}

/**
 * The store a VM is protected with. The address of one of the cluster's own
 * stores (registered in etcd as active or standby) becomes `cluster`: that
 * address belongs to one store process, which serves only while it holds the
 * directory's lock. Once a standby takes the directory over (the store lost
 * its etcd lease, e.g. for an etcd leader election longer than its margin, or
 * died), the address serves nothing, and every restore and checkpoint of a VM
 * pinned to it would fail for good. Any other address is kept as given.
 */
export async function followedStore(cluster: Cluster, store: string): Promise<string> {
  if (isClusterStore(store)) return store;
  const list = await listStores(cluster);
  const ours = [list.active, ...list.standbys].some((s) => s?.address === store);
  return ours ? CLUSTER_STORE : store;
}

/** Take a VM out of the cluster (it keeps running, unguarded). The generation counter stays. */
export async function forgetVm(cluster: Cluster, vm: string): Promise<boolean> {
  const cur = await cluster.vm(vm);
  if (!cur) return false;
  await cluster.etcd.delete().key(keys.vm(vm));
  const all = await cluster.etcd.getAll().prefix(keys.assignmentsPrefix).keys();
  for (const k of all) if (k.endsWith(`/${vm}`)) await cluster.etcd.delete().key(k);
  return true;
}

/** Poll (every 20 ms) until the VM's record satisfies `pred`. */
export async function waitForVm(cluster: Cluster, vm: string, pred: (v: VmRecord) => boolean, timeoutMs = 60_000): Promise<VmRecord> {
  const deadline = Date.now() + timeoutMs;
  let last: VmRecord | undefined;
  for (;;) {
    try {
      last = (await cluster.vm(vm))?.value;
      if (last && pred(last)) return last;
    } catch {
      /* etcd hiccup: keep polling */
    }
    if (Date.now() > deadline) throw new HaError('HYDRA_HA_TIMEOUT', `VM "${vm}": condition not reached within ${timeoutMs} ms (last: ${last ? `${last.state} on ${last.host} gen ${last.generation}${last.reason ? `: ${last.reason}` : ''}` : 'no record'})`);
    await sleep(20);
  }
}

/** Wait until the VM runs again at a generation above `fromGeneration`; returns its record and timing. */
export async function waitForFailover(cluster: Cluster, vm: string, fromGeneration: number, opts: { timeoutMs?: number; until?: 'running' | 'protected' } = {}): Promise<{ record: VmRecord; timing?: FailoverTiming }> {
  const want = opts.until ?? 'running';
  const record = await waitForVm(cluster, vm, (v) => v.generation > fromGeneration && (want === 'running' ? v.state === 'running' || v.state === 'protected' : v.state === 'protected'), opts.timeoutMs ?? 120_000);
  return { record, timing: await cluster.timing(vm, record.generation) };
}

export type HostStatus = (HostRecord & { alive: true }) | (KnownHost & { alive: false });

export interface ClusterStatus {
  leader?: string;
  /** The checkpoint store registered as active, and the standbys waiting for its directory. */
  stores: StoreList;
  hosts: HostStatus[];
  vms: (VmRecord & { hostAlive: boolean; needsFailover: boolean })[];
  events: ClusterEvent[];
}

export async function clusterStatus(cluster: Cluster, opts: { events?: number } = {}): Promise<ClusterStatus> {
  const [leader, registered, known, vms, events, stores, verdicts] = await Promise.all([cluster.leader(), cluster.hosts(), cluster.knownHosts(), cluster.vms(), cluster.events(opts.events ?? 10), listStores(cluster), cluster.etcd.getAll().prefix(keys.hostDeadPrefix).keys()]);
  // A host the manager declared dead counts as dead until its agent clears the verdict, whatever its lease says.
  const dead = new Set(verdicts.map((k) => k.slice(keys.hostDeadPrefix.length)));
  const hosts = new Map([...registered].filter(([h]) => !dead.has(h)));
  for (const h of dead) if (registered.has(h) && !known.has(h)) known.set(h, { name: h, address: registered.get(h)!.address, home: registered.get(h)!.home, registeredAt: 0 });
  const all: HostStatus[] = [...hosts.values()].map((h) => ({ ...h, alive: true as const }));
  for (const k of known.values()) if (!hosts.has(k.name)) all.push({ ...k, alive: false as const });
  return {
    leader,
    stores,
    hosts: all.sort((a, b) => a.name.localeCompare(b.name)),
    vms: [...vms.values()].map(({ value: v }) => ({
      ...v,
      hostAlive: hosts.has(v.host),
      needsFailover: FAILOVER_PENDING.has(v.state) || (ON_HOST.has(v.state) && !hosts.has(v.host)),
    })).sort((a, b) => a.name.localeCompare(b.name)),
    events,
  };
}
