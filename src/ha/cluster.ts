import os from 'node:os';
import crypto from 'node:crypto';
import { Etcd3, type IOptions, type IKeyValue, type IOperation } from 'etcd3';
import { HaError } from '../errors.js';
import type { ShellConfig } from '../vm/index.js';
import { etcdSecurityOptions, type EtcdCredentials } from './etcd-credentials.js';

/**
 * Cluster state in etcd. Every key lives under /hydravm/:
 *
 *   /hydravm/hosts/HOST               HostRecord, attached to the agent's lease (TTL ~1 s):
 *                                     the key exists exactly while the host is alive
 *   /hydravm/heartbeats/HOST          Heartbeat, on the agent's lease: rewritten after each acknowledged
 *                                     keepalive, by a transaction that succeeds only while
 *                                     host-dead/HOST does not exist (the agent's liveness proof)
 *   /hydravm/host-dead/HOST           HostDead: the manager's verdict that HOST is dead, written when
 *                                     the heartbeat stayed unchanged for the TTL; cleared by the
 *                                     host's agent once every VM of its old incarnation is dead
 *   /hydravm/known-hosts/HOST         KnownHost: every host ever registered (no lease), so
 *                                     status can show dead hosts too
 *   /hydravm/vms/VM                   VmRecord: where the VM runs, its generation, its state
 *   /hydravm/generations/VM           the VM's generation counter (decimal); only ever raised,
 *                                     by a transaction; never deleted
 *   /hydravm/assignments/HOST/VM      Assignment: work for HOST's agent (protect, restore)
 *   /hydravm/timings/VM/GEN           FailoverTiming of the fail-over that created generation GEN
 *   /hydravm/events/TS-RAND           ClusterEvent: what the manager decided or could not do
 *   /hydravm/election/manager/LEASE   etcd3 Election: the oldest key is the active manager
 *   /hydravm/stores/active            StoreRecord of the checkpoint store that holds the shared
 *                                     directory's lock, on that store's lease
 *   /hydravm/stores/standby/NAME      StoreRecord of a standby store waiting for the lock, on its lease
 */
export const PREFIX = '/hydravm/';
const pad = (n: number) => String(n).padStart(10, '0');

export const keys = {
  hostsPrefix: `${PREFIX}hosts/`,
  host: (host: string) => `${PREFIX}hosts/${host}`,
  heartbeatsPrefix: `${PREFIX}heartbeats/`,
  heartbeat: (host: string) => `${PREFIX}heartbeats/${host}`,
  hostDeadPrefix: `${PREFIX}host-dead/`,
  hostDead: (host: string) => `${PREFIX}host-dead/${host}`,
  knownHostsPrefix: `${PREFIX}known-hosts/`,
  knownHost: (host: string) => `${PREFIX}known-hosts/${host}`,
  vmsPrefix: `${PREFIX}vms/`,
  vm: (vm: string) => `${PREFIX}vms/${vm}`,
  generationsPrefix: `${PREFIX}generations/`,
  generation: (vm: string) => `${PREFIX}generations/${vm}`,
  assignmentsPrefix: `${PREFIX}assignments/`,
  hostAssignmentsPrefix: (host: string) => `${PREFIX}assignments/${host}/`,
  assignment: (host: string, vm: string) => `${PREFIX}assignments/${host}/${vm}`,
  timingsPrefix: (vm?: string) => (vm ? `${PREFIX}timings/${vm}/` : `${PREFIX}timings/`),
  timing: (vm: string, generation: number) => `${PREFIX}timings/${vm}/${pad(generation)}`,
  eventsPrefix: `${PREFIX}events/`,
  event: (at: number) => `${PREFIX}events/${pad(Math.floor(at / 1000))}${String(at % 1000).padStart(3, '0')}-${crypto.randomBytes(3).toString('hex')}`,
  /** Election name under the /hydravm/ namespace: keys are /hydravm/election/manager/LEASE. */
  election: 'manager',
  electionPrefix: `${PREFIX}election/manager/`,
  storeActive: `${PREFIX}stores/active`,
  storeStandbyPrefix: `${PREFIX}stores/standby/`,
  storeStandby: (name: string) => `${PREFIX}stores/standby/${name}`,
} as const;

/** An agent's liveness proof (heartbeats/HOST); the manager reads only its revision and `ttlMs`. */
export interface Heartbeat {
  host: string;
  /** The agent's lease TTL, ms: its VMs' watchdogs expire at most this long after the keepalive this heartbeat follows. */
  ttlMs: number;
  agentPid: number;
  /** The agent's wall clock when it sent the heartbeat (informational: the manager times with its own clock). */
  at: number;
  /** Heartbeats this agent process has written (informational). */
  seq: number;
}

/** The manager's verdict on a silent host (host-dead/HOST). */
export interface HostDead {
  host: string;
  /** The manager that wrote it. */
  by: string;
  /** The heartbeat revision it compared (the newest it had seen). */
  heartbeatRevision: string;
  /** The manager's wall clock when it first saw that revision, and when it wrote this. */
  heartbeatSeenAt: number;
  at: number;
  /** The same two moments on the manager's CLOCK_MONOTONIC (comparable only on its machine). */
  heartbeatSeenMono: number;
  atMono: number;
  /** The heartbeat's TTL the manager waited out, ms. */
  ttlMs: number;
}

export interface KnownHost {
  name: string;
  address: string;
  home: string;
  registeredAt: number;
}

export interface HostRecord {
  name: string;
  /** Where the host can be reached (informational; agents talk through etcd). */
  address: string;
  agentPid: number;
  /** The agent's HYDRAVM_HOME (informational: several hosts may share a machine). */
  home: string;
  totalMemoryBytes: number;
  /** What a new VM may still use: capacity minus live VMs, bounded by MemAvailable. */
  freeMemoryBytes: number;
  /** HA-managed VMs live on this host. */
  vms: string[];
  /** Idle restore shells on this host, by configuration key (absent: none). */
  shells?: { key: string; idle: number }[];
  leaseId: string;
  startedAt: number;
  updatedAt: number;
}

/**
 * protecting      asked to protect, no image yet (not restorable)
 * protected       running, checkpoints committed at `generation`
 * running         restored and running; protection at `generation` not committed yet
 *                 (a fail-over now restores `imageGeneration`)
 * restoring       a restore at `generation` is assigned to `host`
 * crashed         its agent saw QEMU die: fail-over pending
 * host-lost       its host's lease expired: fail-over pending
 * restore-failed  the restore on `host` failed: fail-over pending (another host)
 * stopped         shut down on purpose (guest power-off or `vm stop`): left alone
 * unprotected     protecting failed; not restorable
 * lost            given up: no image to restore, or too many failed restores
 */
export type VmHaState = 'protecting' | 'protected' | 'running' | 'restoring' | 'crashed' | 'host-lost' | 'restore-failed' | 'stopped' | 'unprotected' | 'lost';

export const FAILOVER_PENDING: ReadonlySet<VmHaState> = new Set(['crashed', 'host-lost', 'restore-failed']);
/** States in which the VM (or its restore) occupies its host, so the host's death needs a fail-over. */
export const ON_HOST: ReadonlySet<VmHaState> = new Set(['protected', 'running', 'restoring', 'protecting']);

export type RestoreMode = 'file' | 'network';

export interface VmRecord {
  name: string;
  host: string;
  /** The VM's current generation: the only incarnation allowed to run. */
  generation: number;
  /** The newest generation with a committed image (what a fail-over restores). */
  imageGeneration?: number;
  store: string;
  storeDir?: string;
  mode: RestoreMode;
  intervalMs: number;
  /** Copy-on-write checkpoints (grain in bytes). */
  cow?: { grain?: number };
  memoryBytes?: number;
  /** The restore-shell configuration the VM needs (set when protected; absent for VMs no shell can take). */
  shellConfig?: ShellConfig;
  /** The MACs of the VM's NICs (set when protected): the hosts' bridges form one segment, so no other VM of the cluster may use them. */
  macs?: string[];
  state: VmHaState;
  reason?: string;
  /** Consecutive failed restores (reset once protected). */
  attempts?: number;
  /** Hosts a restore failed on recently (placement avoids them). */
  failedHosts?: string[];
  previousHost?: string;
  /** When the failure now being handled happened / was noticed (ms since epoch). */
  failedAt?: number;
  detectedAt?: number;
  updatedAt: number;
}

export interface Assignment {
  kind: 'protect' | 'restore';
  vm: string;
  host: string;
  /** The generation the VM runs at after this assignment (restore), or 0 (protect: agent allocates). */
  generation: number;
  /** Restore: which image generation to load. */
  imageGeneration?: number;
  store: string;
  storeDir?: string;
  mode: RestoreMode;
  intervalMs: number;
  cow?: { grain?: number };
  createdAt: number;
  by: string;
}

export interface FailoverTiming {
  vm: string;
  generation: number;
  fromGeneration: number;
  imageGeneration?: number;
  fromHost: string;
  toHost: string;
  cause: 'qemu-died' | 'host-lost' | 'restore-failed' | 'stale';
  /** QEMU's exit as the supervisor recorded it (crash), or the last sign of life. */
  failedAt?: number;
  /** When the agent (crash) or the manager (host-dead verdict, or lease expiry) noticed the failure. */
  detectedAt: number;
  /** When the manager saw it. */
  managerSawAt?: number;
  assignedAt: number;
  restoreStartedAt?: number;
  runningAt?: number;
  protectedAt?: number;
  /** From restoreVm's own timings. */
  spawnToRunningMs?: number;
  /** The committed epoch of `imageGeneration` the restore started from. */
  restoredEpoch?: number;
  /** detectedAt - failedAt */
  detectionMs?: number;
  /** runningAt - restoreStartedAt */
  restoreMs?: number;
  /** runningAt - (failedAt ?? detectedAt) */
  totalMs?: number;
  error?: string;
  restoreTimings?: Record<string, number>;
  /** Why the restore started QEMU cold instead of using a restore shell (absent when it used one). */
  coldReason?: string;
}

export interface ClusterEvent {
  at: number;
  kind: string;
  vm?: string;
  host?: string;
  message: string;
  [k: string]: unknown;
}

export interface Versioned<T> {
  value: T;
  modRevision: string;
  createRevision: string;
  lease: string;
}

export interface ClusterOptions {
  /** Deadline of each unary etcd call (ms). */
  callTimeoutMs?: number;
  /** TLS and user/password for a secured etcd (etcd-credentials.ts). */
  credentials?: EtcdCredentials;
}

/**
 * A no-op fault-handling policy: etcd3's default circuit breaker refuses all
 * calls for 5 s after three failures, which would delay an agent's return
 * after a partition; our callers retry on their own schedule.
 */
const noopPolicy = {
  execute: <T>(fn: (ctx: { signal: AbortSignal; attempt: number }) => T | Promise<T>) => Promise.resolve().then(() => fn({ signal: new AbortController().signal, attempt: 1 })),
  onSuccess: () => ({ dispose() {} }),
  onFailure: () => ({ dispose() {} }),
};

/** An etcd client set up for HA use: short deadlines, no circuit breaker. */
export function connectEtcd(urls: string | string[], opts: ClusterOptions = {}): Etcd3 {
  const hosts = (Array.isArray(urls) ? urls : urls.split(',')).map((u) => u.trim()).filter(Boolean);
  if (hosts.length === 0) throw new HaError('HYDRA_HA_NO_ETCD', 'no etcd endpoint given (--etcd URL or HYDRAVM_ETCD)');
  const timeout = opts.callTimeoutMs ?? 1500;
  const options: IOptions = {
    hosts,
    dialTimeout: 1000,
    defaultCallOptions: (ctx) => (ctx.isStream ? {} : { deadline: Date.now() + timeout }),
    faultHandling: { host: () => noopPolicy } as unknown as IOptions['faultHandling'],
    // Keepalive pings find a member that died without closing its connections (its host is gone): streams
    // (watches, lease keepalives) on it fail within seconds and are re-made on a live member, instead of
    // waiting on TCP for minutes. 5 s is the least etcd accepts by default (--grpc-keepalive-min-time).
    grpcOptions: { 'grpc.initial_reconnect_backoff_ms': 100, 'grpc.max_reconnect_backoff_ms': 300, 'grpc.keepalive_time_ms': 5000, 'grpc.keepalive_timeout_ms': 3000, 'grpc.keepalive_permit_without_calls': 1 },
    ...etcdSecurityOptions(opts.credentials),
  };
  return new Etcd3(options);
}

function decode<T>(kv: IKeyValue): Versioned<T> {
  return { value: JSON.parse(kv.value.toString()) as T, modRevision: kv.mod_revision, createRevision: kv.create_revision, lease: kv.lease };
}

/** Typed access to the keys above. */
export class Cluster {
  readonly etcd: Etcd3;
  private readonly ownsClient: boolean;

  constructor(etcd: Etcd3 | string | string[], opts: ClusterOptions = {}) {
    this.ownsClient = !(etcd instanceof Etcd3);
    this.etcd = etcd instanceof Etcd3 ? etcd : connectEtcd(etcd, opts);
  }

  close(): void {
    if (this.ownsClient) this.etcd.close();
  }

  async getJson<T>(key: string): Promise<Versioned<T> | undefined> {
    const res = await this.etcd.get(key).exec();
    const kv = res.kvs[0];
    return kv ? decode<T>(kv) : undefined;
  }

  async listJson<T>(prefix: string): Promise<{ items: Map<string, Versioned<T>>; revision: string }> {
    const res = await this.etcd.getAll().prefix(prefix).exec();
    const items = new Map<string, Versioned<T>>();
    for (const kv of res.kvs) {
      try {
        items.set(kv.key.toString().slice(prefix.length), decode<T>(kv));
      } catch {
        /* not ours / corrupt: skip */
      }
    }
    return { items, revision: res.header.revision };
  }

  async hosts(): Promise<Map<string, HostRecord>> {
    const { items } = await this.listJson<HostRecord>(keys.hostsPrefix);
    return new Map([...items].map(([k, v]) => [k, v.value]));
  }

  async vms(): Promise<Map<string, Versioned<VmRecord>>> {
    return (await this.listJson<VmRecord>(keys.vmsPrefix)).items;
  }

  async knownHosts(): Promise<Map<string, KnownHost>> {
    const { items } = await this.listJson<KnownHost>(keys.knownHostsPrefix);
    return new Map([...items].map(([k, v]) => [k, v.value]));
  }

  vm(name: string): Promise<Versioned<VmRecord> | undefined> {
    return this.getJson<VmRecord>(keys.vm(name));
  }

  async generationCounter(vm: string): Promise<{ value: number; modRevision: string }> {
    const res = await this.etcd.get(keys.generation(vm)).exec();
    const kv = res.kvs[0];
    return kv ? { value: Number(kv.value.toString()), modRevision: kv.mod_revision } : { value: 0, modRevision: '0' };
  }

  /**
   * Raise the VM's generation counter to max(counter + 1, atLeast) and return
   * it. A transaction on the counter's mod revision: concurrent callers each
   * get a distinct, increasing number.
   */
  async allocateGeneration(vm: string, atLeast = 0): Promise<number> {
    for (let i = 0; i < 50; i++) {
      const cur = await this.generationCounter(vm);
      const next = Math.max(cur.value + 1, atLeast);
      const r = await this.etcd.if(keys.generation(vm), 'Mod', '==', cur.modRevision).then(this.etcd.put(keys.generation(vm)).value(String(next))).commit();
      if (r.succeeded) return next;
    }
    throw new HaError('HYDRA_HA_CONTENDED', `VM "${vm}": could not allocate a generation (too much contention)`);
  }

  /**
   * Compare-and-swap update of a VM record: `fn` gets the current record and
   * returns the new one, or undefined to leave it. Retries on conflict.
   * Returns the record written, or undefined when `fn` declined / no record.
   */
  async updateVm(name: string, fn: (cur: VmRecord) => VmRecord | undefined, extra: (cur: VmRecord) => IOperation[] = () => []): Promise<VmRecord | undefined> {
    for (let i = 0; i < 50; i++) {
      const cur = await this.vm(name);
      if (!cur) return undefined;
      const next = fn(cur.value);
      if (!next) return undefined;
      const r = await this.etcd
        .if(keys.vm(name), 'Mod', '==', cur.modRevision)
        .then(this.etcd.put(keys.vm(name)).value(JSON.stringify({ ...next, updatedAt: Date.now() })), ...extra(cur.value))
        .commit();
      if (r.succeeded) return next;
    }
    throw new HaError('HYDRA_HA_CONTENDED', `VM "${name}": record changed too often to update`);
  }

  async assignments(host: string): Promise<Map<string, Versioned<Assignment>>> {
    return (await this.listJson<Assignment>(keys.hostAssignmentsPrefix(host))).items;
  }

  async timings(vm?: string): Promise<FailoverTiming[]> {
    const { items } = await this.listJson<FailoverTiming>(keys.timingsPrefix(vm));
    return [...items.values()].map((v) => v.value);
  }

  async timing(vm: string, generation: number): Promise<FailoverTiming | undefined> {
    return (await this.getJson<FailoverTiming>(keys.timing(vm, generation)))?.value;
  }

  /** Merge fields into a timing record (compare-and-swap), deriving the durations. */
  async mergeTiming(vm: string, generation: number, patch: Partial<FailoverTiming>): Promise<void> {
    const key = keys.timing(vm, generation);
    for (let i = 0; i < 20; i++) {
      const cur = await this.getJson<FailoverTiming>(key);
      if (!cur) return;
      const t = deriveTiming({ ...cur.value, ...patch });
      const r = await this.etcd.if(key, 'Mod', '==', cur.modRevision).then(this.etcd.put(key).value(JSON.stringify(t))).commit();
      if (r.succeeded) return;
    }
  }

  async addEvent(ev: Omit<ClusterEvent, 'at'> & { at?: number }): Promise<void> {
    const at = ev.at ?? Date.now();
    await this.etcd.put(keys.event(at)).value(JSON.stringify({ ...ev, at }));
  }

  async events(limit = 50): Promise<ClusterEvent[]> {
    const res = await this.etcd.getAll().prefix(keys.eventsPrefix).sort('Key', 'Descend').limit(limit).exec();
    return res.kvs.map((kv) => JSON.parse(kv.value.toString()) as ClusterEvent).reverse();
  }

  /** Keep only the newest `keep` events. */
  async pruneEvents(keep = 500): Promise<void> {
    const all = await this.etcd.getAll().prefix(keys.eventsPrefix).sort('Key', 'Ascend').keys();
    for (const k of all.slice(0, Math.max(0, all.length - keep))) await this.etcd.delete().key(k);
  }

  /** The active manager's announced value, if any. */
  async leader(): Promise<string | undefined> {
    return this.etcd.namespace(PREFIX).election(keys.election).leader();
  }
}

export function deriveTiming(t: FailoverTiming): FailoverTiming {
  const out = { ...t };
  if (out.failedAt !== undefined) out.detectionMs = out.detectedAt - out.failedAt;
  if (out.runningAt !== undefined && out.restoreStartedAt !== undefined) out.restoreMs = out.runningAt - out.restoreStartedAt;
  if (out.runningAt !== undefined) out.totalMs = out.runningAt - (out.failedAt ?? out.detectedAt);
  return out;
}

export function defaultHostName(): string {
  return os.hostname();
}
