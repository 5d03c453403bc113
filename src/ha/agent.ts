import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { EventEmitter } from 'node:events';
import type { Etcd3, Lease, Watcher, IKeyValue } from 'etcd3';
import type { Logger } from 'pino';
import { hydraHome } from '../config/paths.js';
import { log as rootLog } from '../util/log.js';
import { Cluster, keys, type Assignment, type HostRecord, type Versioned, type VmRecord } from './cluster.js';
import { HaError } from './errors.js';
import { fenceLocalVm, pidAlive, listLocalVms, localGeneration, readLocalVm, staleReason, vmDeath, writeHaLocal, type LocalVm } from './fencing.js';
import { defaultProtect, defaultRestore, defaultStoreGeneration, type ProtectFn, type RestoreFn, type RestoreOutcome, type StoreGenerationFn } from './restore-adapter.js';

/**
 * The host agent: one per host (= per HYDRAVM_HOME).
 *
 * - Holds a lease (TTL ~1 s) with /hydravm/hosts/HOST on it: the key exists
 *   while the host is alive. Reports its free memory there.
 * - Watches its VMs' state.json every `pollMs` (and by inotify) and reports a
 *   QEMU death to etcd at once (state `crashed`), without waiting for any lease.
 * - Runs the assignments etcd holds for it: protect a VM, restore a VM.
 * - Fences: kills any local copy of a VM whose generation is older than the
 *   one in etcd (at start, after every (re)connection, on every change).
 * - Self-fences: if it has not had a keepalive acknowledged for the lease's
 *   TTL (minus a margin), the manager may already be restoring its VMs
 *   elsewhere, so it kills them itself, before the lease can expire at etcd.
 */
export interface AgentOptions {
  host: string;
  etcd: string | string[] | Etcd3;
  /** This host's HYDRAVM_HOME (default: the process's). */
  home?: string;
  address?: string;
  /** Lease TTL in seconds (etcd's minimum with the embedded settings is 1). */
  leaseTtlSec?: number;
  /** How often local VMs are checked. */
  pollMs?: number;
  /** Memory this host offers to VMs (default: MemTotal). */
  memoryBytes?: number;
  /** Kill this long before the lease could expire at etcd. */
  fenceMarginMs?: number;
  /** How long a fenced VM's supervisor may take to exit before SIGKILL. */
  supervisorGraceMs?: number;
  secretFile?: string;
  /** Resolve the cluster secret for restores (default: loadSecret). */
  secret?: () => string | Promise<string>;
  restore?: RestoreFn;
  protect?: ProtectFn;
  storeGeneration?: StoreGenerationFn;
  logger?: Logger;
}

export interface AgentEvents {
  registered: [{ leaseId: string }];
  reported: [{ vm: string; state: string; generation: number; detectedAt: number; failedAt: number }];
  fenced: [{ vm: string; reason: string; self: boolean }];
  'self-fence': [{ silentMs: number }];
  restored: [{ vm: string; generation: number }];
  'restore-failed': [{ vm: string; generation: number; error: string }];
  protected: [{ vm: string; generation: number }];
}

function memInfo(): { totalBytes: number; availableBytes: number } {
  try {
    const text = fs.readFileSync('/proc/meminfo', 'utf8');
    const get = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? 0) * 1024;
    return { totalBytes: get('MemTotal'), availableBytes: get('MemAvailable') || os.freemem() };
  } catch {
    return { totalBytes: os.totalmem(), availableBytes: os.freemem() };
  }
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export class HostAgent extends EventEmitter<AgentEvents> {
  readonly host: string;
  readonly home: string;
  readonly cluster: Cluster;
  private readonly opts: AgentOptions;
  private readonly ttlSec: number;
  private readonly pollMs: number;
  private readonly marginMs: number;
  private readonly log: Logger;
  private readonly restoreFn: RestoreFn;
  private readonly protectFn: ProtectFn;
  private readonly storeGenFn: StoreGenerationFn;

  private running = false;
  private lease: Lease | undefined;
  private leaseId: string | undefined;
  private leaseOk = false;
  private fired: number[] = [];
  /** Send time of the newest keepalive etcd acknowledged: etcd's expiry is at least this + TTL. */
  private ackedSendAt = Date.now();
  private grantedTtlSec: number;
  private registering = false;
  private selfFenced = false;

  /** Last known VM records (from etcd). */
  private records = new Map<string, VmRecord>();
  private recordsLoaded = false;
  private watchers: Watcher[] = [];
  private inflight = new Set<string>();
  private reporting = new Set<string>();
  private reported = new Set<string>();
  private fencing = new Set<string>();
  private fsWatchers = new Map<string, fs.FSWatcher>();
  private timers: NodeJS.Timeout[] = [];
  private ticking = false;
  private resyncing = false;
  private lastHostReport = '';
  private lastHostReportAt = 0;

  constructor(opts: AgentOptions) {
    super();
    this.opts = opts;
    this.host = opts.host;
    if (!/^[a-z0-9][a-z0-9_.-]{0,62}$/i.test(this.host)) throw new HaError('HYDRA_HA_BAD_HOST', `"${this.host}" is not a valid host name`);
    this.home = path.resolve(opts.home ?? hydraHome());
    this.ttlSec = opts.leaseTtlSec ?? 1;
    this.grantedTtlSec = this.ttlSec;
    this.pollMs = opts.pollMs ?? 50;
    this.marginMs = opts.fenceMarginMs ?? 150;
    this.cluster = new Cluster(opts.etcd);
    this.log = (opts.logger ?? rootLog).child({ component: 'agent', host: this.host });
    const usesDefaults = !opts.restore || !opts.protect;
    if (usesDefaults && this.home !== path.resolve(hydraHome())) {
      throw new HaError('HYDRA_HA_HOME', `agent home ${this.home} differs from HYDRAVM_HOME ${hydraHome()}: restore and protection act on HYDRAVM_HOME (run the agent with HYDRAVM_HOME=${this.home})`);
    }
    this.restoreFn = opts.restore ?? defaultRestore;
    this.protectFn = opts.protect ?? defaultProtect;
    this.storeGenFn = opts.storeGeneration ?? defaultStoreGeneration;
  }

  /** etcd has acknowledged a keepalive within the TTL. */
  get connected(): boolean {
    return this.leaseOk && Date.now() < this.fenceDeadline();
  }

  private fenceDeadline(): number {
    return this.ackedSendAt + Math.min(this.ttlSec, this.grantedTtlSec) * 1000 - this.marginMs;
  }

  async start(): Promise<void> {
    if (this.running) return;
    this.running = true;
    fs.mkdirSync(path.join(this.home, 'vms'), { recursive: true });
    this.ackedSendAt = Date.now();
    this.log.info({ home: this.home, ttlSec: this.ttlSec }, 'agent starting');
    // Local checks run from the first moment, connected or not.
    this.timers.push(setInterval(() => void this.tick(), this.pollMs));
    this.timers.push(setInterval(() => void this.resync(), 1000));
    this.timers.push(setInterval(() => void this.reportHost(false), 1000));
    await this.startWatches();
    // Fence stale copies before announcing the host.
    await this.resync().catch(() => undefined);
    await this.register();
  }

  /**
   * Stop the agent. Its HA VMs would go unguarded (and the manager will
   * restore them elsewhere once the lease is gone), so by default they are
   * killed first.
   */
  async stop(opts: { fence?: boolean } = {}): Promise<void> {
    if (!this.running) return;
    this.running = false;
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
    for (const w of this.fsWatchers.values()) w.close();
    this.fsWatchers.clear();
    if (opts.fence !== false) {
      for (const v of listLocalVms(this.home)) {
        if (v.live && this.guarded(v)) await this.fence(v.name, 'agent stopping', true);
      }
    }
    await Promise.race([Promise.all(this.watchers.map((w) => w.cancel().catch(() => undefined))), sleep(1000)]);
    this.watchers = [];
    if (this.lease) {
      const lease = this.lease;
      this.lease = undefined;
      this.leaseOk = false;
      await Promise.race([lease.revoke().catch(() => undefined), sleep(1000)]);
    }
    this.cluster.close();
    this.log.info('agent stopped');
  }

  // ---------------------------------------------------------------- lease

  private async register(): Promise<void> {
    if (this.registering || !this.running) return;
    this.registering = true;
    try {
      while (this.running) {
        try {
          await this.registerOnce();
          return;
        } catch (err) {
          this.log.warn({ err: (err as Error).message }, 'cannot register with etcd; retrying');
          await sleep(200);
        }
      }
    } finally {
      this.registering = false;
    }
  }

  private async registerOnce(): Promise<void> {
    const old = this.lease;
    this.lease = undefined;
    this.leaseOk = false;
    old?.release();
    const sentAt = Date.now();
    const lease = this.cluster.etcd.lease(this.ttlSec);
    lease.on('keepaliveEstablished', () => (this.fired = []));
    lease.on('keepaliveFired', () => this.fired.push(Date.now()));
    lease.on('keepaliveSucceeded', (res) => {
      const sent = this.fired.shift();
      if (sent !== undefined && lease === this.lease) {
        this.ackedSendAt = Math.max(this.ackedSendAt, sent);
        this.grantedTtlSec = Number(res.TTL) || this.grantedTtlSec;
        if (this.selfFenced) this.log.info('etcd reachable again');
        this.selfFenced = false;
      }
    });
    lease.on('lost', (err) => {
      if (lease !== this.lease) return;
      this.log.warn({ err: err.message }, 'lease lost; registering again');
      this.leaseOk = false;
      this.lease = undefined;
      if (this.running) setTimeout(() => void this.register(), 100);
    });
    let id: string;
    try {
      id = await Promise.race([lease.grant(), sleep(2000).then(() => Promise.reject(new Error('lease grant timed out')))]);
    } catch (err) {
      lease.release();
      throw err;
    }
    try {
      // Before announcing ourselves: know the cluster, fence what is stale.
      await this.resync(true);
      if (!this.running) throw new Error('agent stopped');
    } catch (err) {
      lease.release();
      throw err;
    }
    this.lease = lease;
    this.leaseId = id;
    this.leaseOk = true;
    this.ackedSendAt = Math.max(this.ackedSendAt, sentAt);
    this.lastHostReport = '';
    await this.reportHost(true);
    await this.cluster.etcd.put(keys.knownHost(this.host)).value(JSON.stringify({ name: this.host, address: this.opts.address ?? os.hostname(), home: this.home, registeredAt: Date.now() }));
    this.log.info({ leaseId: id }, 'registered');
    this.emit('registered', { leaseId: id });
    void this.resync();
  }

  private hostRecord(): HostRecord {
    const mem = memInfo();
    const capacity = this.opts.memoryBytes ?? mem.totalBytes;
    const local = listLocalVms(this.home).filter((v) => v.live);
    const used = local.reduce((s, v) => s + (v.state?.memoryBytes ?? 0), 0);
    return {
      name: this.host,
      address: this.opts.address ?? os.hostname(),
      agentPid: process.pid,
      home: this.home,
      totalMemoryBytes: capacity,
      freeMemoryBytes: Math.max(0, Math.min(mem.availableBytes, capacity - used)),
      vms: local.filter((v) => v.ha?.host === this.host).map((v) => v.name),
      leaseId: this.leaseId ?? '',
      startedAt: 0,
      updatedAt: Date.now(),
    };
  }

  private async reportHost(force: boolean): Promise<void> {
    const lease = this.lease;
    if (!lease || !this.leaseOk) return;
    const rec = this.hostRecord();
    const sig = JSON.stringify({ ...rec, updatedAt: 0, freeMemoryBytes: Math.round(rec.freeMemoryBytes / (16 << 20)) });
    if (!force && sig === this.lastHostReport && Date.now() - this.lastHostReportAt < 10_000) return;
    try {
      await lease.put(keys.host(this.host)).value(JSON.stringify(rec));
      this.lastHostReport = sig;
      this.lastHostReportAt = Date.now();
    } catch (err) {
      this.log.warn({ err: (err as Error).message }, 'cannot report host');
      if (force) throw err;
    }
  }

  // ---------------------------------------------------------------- etcd view

  private async startWatches(): Promise<void> {
    const onVm = (kv: IKeyValue, deleted: boolean) => {
      const name = kv.key.toString().slice(keys.vmsPrefix.length);
      if (deleted) this.records.delete(name);
      else {
        try {
          this.records.set(name, JSON.parse(kv.value.toString()) as VmRecord);
        } catch {
          return;
        }
      }
      void this.tick();
    };
    const onAssignment = (kv: IKeyValue) => {
      try {
        const a = JSON.parse(kv.value.toString()) as Assignment;
        void this.runAssignment(a, kv.mod_revision);
      } catch {
        /* ignore */
      }
    };
    try {
      const w1 = await this.cluster.etcd.watch().prefix(keys.vmsPrefix).create();
      w1.on('put', (kv) => onVm(kv, false));
      w1.on('delete', (kv) => onVm(kv, true));
      w1.on('connected', () => void this.resync());
      w1.on('error', () => undefined);
      const w2 = await this.cluster.etcd.watch().prefix(keys.hostAssignmentsPrefix(this.host)).only('put').create();
      w2.on('put', onAssignment);
      w2.on('connected', () => void this.resync());
      w2.on('error', () => undefined);
      this.watchers.push(w1, w2);
      if (!this.running) void Promise.all([w1.cancel(), w2.cancel()]).catch(() => undefined);
    } catch (err) {
      // etcd unreachable at start: the periodic resync covers us; retry the watches later.
      this.log.warn({ err: (err as Error).message }, 'cannot watch etcd yet');
      if (this.running) setTimeout(() => void this.startWatches(), 500);
    }
  }

  /** Re-read every VM record and this host's assignments; fence and run what they say. */
  private async resync(throwErrors = false): Promise<void> {
    if (this.resyncing && !throwErrors) return;
    this.resyncing = true;
    try {
      const vms = await this.cluster.vms();
      this.records = new Map([...vms].map(([k, v]) => [k, v.value]));
      this.recordsLoaded = true;
      await this.fenceStale();
      const asg = await this.cluster.assignments(this.host);
      for (const a of asg.values()) void this.runAssignment(a.value, a.modRevision);
    } catch (err) {
      if (throwErrors) throw err;
    } finally {
      this.resyncing = false;
    }
  }

  // ---------------------------------------------------------------- local loop

  private async tick(): Promise<void> {
    if (this.ticking || !this.running) return;
    this.ticking = true;
    try {
      // 1. Self-fence: etcd has not heard from us for (almost) a TTL.
      const now = Date.now();
      if (now >= this.fenceDeadline()) {
        const victims = listLocalVms(this.home).filter((v) => v.live && this.guarded(v) && !this.fencing.has(v.name));
        if (!this.selfFenced || victims.length > 0) {
          if (!this.selfFenced) {
            this.log.error({ silentMs: now - this.ackedSendAt, vms: victims.map((v) => v.name) }, 'no contact with etcd for the lease TTL: self-fencing');
            this.emit('self-fence', { silentMs: now - this.ackedSendAt });
          }
          this.selfFenced = true;
          await Promise.all(victims.map((v) => this.fence(v.name, `self-fence: no contact with etcd for ${now - this.ackedSendAt} ms`, true)));
        }
      }
      // 2. Stale generations.
      await this.fenceStale();
      // 3. Deaths and protection progress of our VMs.
      for (const [name, rec] of this.records) {
        if (rec.host !== this.host || this.inflight.has(name)) continue;
        if (rec.state !== 'protected' && rec.state !== 'running' && rec.state !== 'protecting') continue;
        const v = readLocalVm(this.home, name);
        if (!v) continue;
        this.watchDir(v);
        const gen = localGeneration(v);
        if (gen !== rec.generation) continue;
        const death = vmDeath(v);
        if (death.kind === 'crashed' || death.kind === 'stopped') {
          void this.reportDeath(name, gen, death.kind, death.at, death.reason);
        } else if (rec.state === 'running' && v.protection?.state === 'protected' && v.protection.generation === rec.generation) {
          void this.reportProtected(name, rec.generation);
        }
      }
    } finally {
      this.ticking = false;
    }
  }

  /** inotify on the VM's directory: state.json is renamed into place on every change. */
  private watchDir(v: LocalVm): void {
    if (this.fsWatchers.has(v.name)) return;
    try {
      const w = fs.watch(v.dir, () => void this.tick());
      w.on('error', () => {
        w.close();
        this.fsWatchers.delete(v.name);
      });
      this.fsWatchers.set(v.name, w);
    } catch {
      /* polling covers it */
    }
  }

  /**
   * Is this local VM one the cluster may restore elsewhere (so it must die
   * with our lease)? Ours by ha.json, and still ours in etcd as last seen
   * (before etcd was ever reached: ha.json alone decides).
   */
  private guarded(v: LocalVm): boolean {
    if (v.ha?.host !== this.host) return false;
    if (!this.recordsLoaded) return true;
    const r = this.records.get(v.name);
    return !!r && r.host === this.host;
  }

  private async fenceStale(): Promise<void> {
    for (const v of listLocalVms(this.home)) {
      if (!v.live || this.inflight.has(v.name) || this.fencing.has(v.name)) continue;
      const reason = staleReason(v, this.records.get(v.name), this.host);
      if (reason) await this.fence(v.name, reason, false);
    }
  }

  private async fence(vm: string, reason: string, self: boolean): Promise<void> {
    if (this.fencing.has(vm)) return;
    this.fencing.add(vm);
    try {
      this.log.warn({ vm, reason }, 'fencing VM');
      const res = await fenceLocalVm(this.home, vm, reason, this.opts.supervisorGraceMs);
      this.log.warn({ ...res, vm }, 'VM fenced');
      this.emit('fenced', { vm, reason, self });
    } finally {
      this.fencing.delete(vm);
    }
  }

  private async reportDeath(vm: string, generation: number, kind: 'crashed' | 'stopped', failedAt: number, reason: string): Promise<void> {
    const id = `${vm}@${generation}:${kind}`;
    if (this.reporting.has(id) || this.reported.has(id)) return;
    this.reporting.add(id);
    const detectedAt = Date.now();
    try {
      const written = await this.cluster.updateVm(vm, (cur) =>
        cur.host === this.host && cur.generation === generation && (cur.state === 'protected' || cur.state === 'running' || cur.state === 'protecting')
          ? { ...cur, state: kind, reason, failedAt, detectedAt }
          : undefined);
      this.reported.add(id);
      if (written) {
        this.log.warn({ vm, generation, kind, reason, detectionMs: detectedAt - failedAt }, 'VM death reported');
        this.emit('reported', { vm, state: kind, generation, detectedAt, failedAt });
      }
    } catch (err) {
      this.log.warn({ vm, err: (err as Error).message }, 'cannot report VM death yet');
    } finally {
      this.reporting.delete(id);
    }
  }

  private async reportProtected(vm: string, generation: number): Promise<void> {
    const id = `${vm}@${generation}:protected`;
    if (this.reporting.has(id) || this.reported.has(id)) return;
    this.reporting.add(id);
    try {
      await this.cluster.updateVm(vm, (cur) =>
        cur.host === this.host && cur.generation === generation && cur.state === 'running'
          ? { ...cur, state: 'protected', imageGeneration: generation, attempts: 0, failedHosts: [], reason: undefined }
          : undefined);
      await this.cluster.mergeTiming(vm, generation, { protectedAt: Date.now() });
      this.reported.add(id);
      this.emit('protected', { vm, generation });
    } catch {
      /* next tick */
    } finally {
      this.reporting.delete(id);
    }
  }

  // ---------------------------------------------------------------- assignments

  private async deleteAssignment(a: Assignment, modRevision: string): Promise<void> {
    const k = keys.assignment(this.host, a.vm);
    await this.cluster.etcd.if(k, 'Mod', '==', modRevision).then(this.cluster.etcd.delete().key(k)).commit().catch(() => undefined);
  }

  private async runAssignment(a: Assignment, modRevision: string): Promise<void> {
    // Only while registered and in contact: a partitioned agent must not start VMs.
    if (!this.running || this.inflight.has(a.vm) || !this.connected) return;
    this.inflight.add(a.vm);
    try {
      const cur = await this.cluster.vm(a.vm);
      if (a.kind === 'restore') {
        if (!cur || cur.value.host !== this.host || cur.value.generation !== a.generation || cur.value.state !== 'restoring') {
          this.log.info({ vm: a.vm, generation: a.generation }, 'dropping a stale restore assignment');
          await this.deleteAssignment(a, modRevision);
          return;
        }
        await this.doRestore(a, modRevision);
      } else {
        if (!cur || cur.value.host !== this.host || cur.value.state !== 'protecting') {
          await this.deleteAssignment(a, modRevision);
          return;
        }
        await this.doProtect(a, modRevision, cur);
      }
    } catch (err) {
      this.log.warn({ vm: a.vm, err: (err as Error).message }, 'assignment could not run; will retry');
    } finally {
      this.inflight.delete(a.vm);
    }
  }

  private async doRestore(a: Assignment, modRevision: string): Promise<void> {
    const k = keys.assignment(this.host, a.vm);
    // An older copy on this very host (its QEMU crashed, or it was fenced) must be gone.
    const old = readLocalVm(this.home, a.vm);
    if (old?.live) await this.fence(a.vm, `restoring generation ${a.generation} here`, false);
    writeHaLocal(this.home, { vm: a.vm, host: this.host, generation: a.generation, updatedAt: Date.now() });
    const startedAt = Date.now();
    await this.cluster.mergeTiming(a.vm, a.generation, { restoreStartedAt: startedAt }).catch(() => undefined);
    this.log.info({ vm: a.vm, generation: a.generation, image: a.imageGeneration, mode: a.mode }, 'restoring VM');
    let res: RestoreOutcome;
    try {
      const secret = this.opts.secret ? await this.opts.secret() : await this.loadSecret();
      // Protection is started below, after etcd knows the VM runs: the initial
      // checkpoint takes seconds and must not delay the fail-over's record.
      res = await this.restoreFn({
        vm: a.vm,
        store: a.store,
        secret,
        mode: a.mode,
        storeDir: a.storeDir,
        generation: a.imageGeneration,
        newGeneration: a.generation,
      });
    } catch (err) {
      return this.restoreFailed(a, (err as Error).message);
    }
    const runningAt = res.timings?.totalMs !== undefined ? Math.round(startedAt + res.timings.totalMs) : Date.now();
    // The timing first, so whoever sees `running` finds it complete.
    await this.cluster.mergeTiming(a.vm, a.generation, {
      runningAt,
      spawnToRunningMs: res.timings?.spawnToRunningMs,
      restoreTimings: res.timings as Record<string, number> | undefined,
    }).catch(() => undefined);
    const local = readLocalVm(this.home, a.vm);
    const written = await this.cluster.updateVm(a.vm, (cur) =>
      cur.host === this.host && cur.generation === a.generation && cur.state === 'restoring'
        ? { ...cur, state: 'running', memoryBytes: local?.state?.memoryBytes ?? cur.memoryBytes, reason: undefined }
        : undefined,
    () => [this.cluster.etcd.delete().key(k)]);
    if (!written) {
      // Superseded while we restored (a newer generation exists): fenceStale kills it.
      await this.deleteAssignment(a, modRevision);
      return;
    }
    this.log.info({ vm: a.vm, generation: a.generation, restoreMs: runningAt - startedAt, spawnToRunningMs: res.timings?.spawnToRunningMs }, 'VM restored');
    this.emit('restored', { vm: a.vm, generation: a.generation });

    // Protect the new incarnation under its generation (unless the restore did).
    const now = readLocalVm(this.home, a.vm);
    if (!(now?.protection?.state === 'protected' && now.protection.generation === a.generation && now.protection.pid && pidAlive(now.protection.pid))) {
      try {
        if (res.pager) await res.pager.done;
        await this.protectFn({ vm: a.vm, store: a.store, intervalMs: a.intervalMs, generation: a.generation, secretFile: this.opts.secretFile, ...(a.cow ? { cow: a.cow } : {}) });
      } catch (err) {
        const msg = (err as Error).message;
        this.log.error({ vm: a.vm, generation: a.generation, err: msg }, 'restored VM runs unprotected: protection failed');
        await this.cluster.updateVm(a.vm, (cur) => (cur.host === this.host && cur.generation === a.generation && cur.state === 'running' ? { ...cur, reason: `protection failed: ${msg}` } : undefined)).catch(() => undefined);
        return;
      }
    }
    await this.reportProtected(a.vm, a.generation);
  }

  private async restoreFailed(a: Assignment, msg: string): Promise<void> {
    const k = keys.assignment(this.host, a.vm);
    this.log.error({ vm: a.vm, generation: a.generation, err: msg }, 'restore failed');
    // Whatever it left running must not stay.
    if (readLocalVm(this.home, a.vm)?.live) await fenceLocalVm(this.home, a.vm, `restore failed: ${msg}`, this.opts.supervisorGraceMs);
    await this.cluster.updateVm(a.vm, (cur) =>
      cur.host === this.host && cur.generation === a.generation && cur.state === 'restoring'
        ? { ...cur, state: 'restore-failed', reason: `restore on ${this.host} failed: ${msg}`, failedHosts: [...new Set([...(cur.failedHosts ?? []), this.host])], detectedAt: Date.now(), failedAt: Date.now() }
        : undefined,
    () => [this.cluster.etcd.delete().key(k)]);
    await this.cluster.mergeTiming(a.vm, a.generation, { error: msg }).catch(() => undefined);
    this.emit('restore-failed', { vm: a.vm, generation: a.generation, error: msg });
  }

  private async doProtect(a: Assignment, modRevision: string, cur: Versioned<VmRecord>): Promise<void> {
    const k = keys.assignment(this.host, a.vm);
    const local = readLocalVm(this.home, a.vm);
    const fail = async (reason: string) => {
      this.log.error({ vm: a.vm, reason }, 'cannot protect VM');
      await this.cluster.updateVm(a.vm, (c) => (c.host === this.host && c.state === 'protecting' ? { ...c, state: 'unprotected', reason } : undefined), () => [this.cluster.etcd.delete().key(k)]);
    };
    if (!local?.live || local.state?.lifecycle !== 'running') return fail(`VM "${a.vm}" is not running on host ${this.host}`);
    let generation = cur.value.generation;
    try {
      // Higher than anything etcd or the store has seen: the store fences older generations.
      const storeNext = await this.storeGenFn(a.vm, a.store, this.opts.secretFile);
      generation = await this.cluster.allocateGeneration(a.vm, storeNext ?? 0);
      await this.cluster.updateVm(a.vm, (c) => (c.host === this.host && c.state === 'protecting' ? { ...c, generation, memoryBytes: local.state?.memoryBytes } : undefined));
      writeHaLocal(this.home, { vm: a.vm, host: this.host, generation, updatedAt: Date.now() });
      const st = await this.protectFn({ vm: a.vm, store: a.store, intervalMs: a.intervalMs, generation, secretFile: this.opts.secretFile, ...(a.cow ? { cow: a.cow } : {}) });
      await this.cluster.updateVm(a.vm, (c) =>
        c.host === this.host && c.generation === generation && c.state === 'protecting'
          ? { ...c, state: 'protected', imageGeneration: st.generation ?? generation, attempts: 0, reason: undefined }
          : undefined,
      () => [this.cluster.etcd.delete().key(k)]);
      this.log.info({ vm: a.vm, generation }, 'VM protected');
      this.emit('protected', { vm: a.vm, generation });
    } catch (err) {
      await fail(`protecting failed: ${(err as Error).message}`);
    }
    void modRevision;
  }

  private async loadSecret(): Promise<string> {
    const { loadSecret } = await import('../config/secret.js');
    return loadSecret({ secretFile: this.opts.secretFile });
  }
}

export async function startAgent(opts: AgentOptions): Promise<HostAgent> {
  const a = new HostAgent(opts);
  await a.start();
  return a;
}
