// The fail-over manager: elected among many, it declares silent hosts dead and restores their VMs elsewhere.
import os from 'node:os';
import { EventEmitter } from 'node:events';
import type { Etcd3, Campaign, Watcher } from 'etcd3';
import type { Logger } from 'pino';
import { log as rootLog } from '../util/log.js';
import { Cluster, type ClusterOptions, FAILOVER_PENDING, ON_HOST, PREFIX, keys, type Assignment, type FailoverTiming, type Heartbeat, type HostDead, type HostRecord, type Versioned, type VmRecord } from './cluster.js';
import { placeVm, reservations, DEFAULT_HEADROOM } from './placement.js';
import { shellKey } from '../vm/index.js';
import { HaError } from '../errors.js';
import { monoNow } from '../vm/index.js';
import { sleep } from '../util/sleep.js';

/**
 * The fail-over manager. Any number may run; an etcd election makes exactly
 * one active, and every decision it writes is a transaction that also
 * compares its election key, so a deposed manager cannot write.
 *
 * The active manager fails a VM over when
 *  - its agent reported its QEMU dead (state `crashed`), or
 *  - its host was declared dead: the manager saw no new heartbeat from it
 *    for the TTL and wrote host-dead/HOST (the agent's side is in
 *    agent-lease.ts; the arithmetic in docs/ha.md), or
 *  - its host's lease expired (/hydravm/hosts/HOST deleted: the backstop), or
 *  - a restore failed (state `restore-failed`) or hangs past `restoreTimeoutMs`.
 * A VM is given up (`lost`) only when there is no image to restore. Restores
 * that keep failing are retried for as long as a live host has room: after
 * `maxAttempts` in a row, with a growing pause between attempts (a fault of
 * the store or the network outlives a quick burst of retries; giving up would
 * leave a restorable VM down for good), and the record says why.
 * It then picks a live host with enough free memory (placement.ts), and in ONE
 * transaction that compares the VM record's and the generation counter's mod
 * revisions: raises the generation, points the VM record at the new host
 * (state `restoring`), writes the assignment for that host's agent and a
 * timing record. A second fail-over of the same VM from the same observation
 * cannot succeed: the record's revision has moved.
 */
export interface ManagerOptions {
  etcd: string | string[] | Etcd3;
  /** Client options for `etcd` given as URLs (TLS, user and password). */
  etcdOptions?: ClusterOptions;
  /** Announced in the election (default HOSTNAME:PID). */
  id?: string;
  /** TTL of the election lease (s): how long a dead manager keeps the role. */
  leaderTtlSec?: number;
  /** Full reconciliation period (watches trigger one at once anyway). */
  reconcileMs?: number;
  restoreTimeoutMs?: number;
  /** Failed restores of one VM in a row after which the next attempts back off (see retryDelayMs). */
  maxAttempts?: number;
  /** Pause before the first backed-off attempt; it doubles with each further failure, up to `maxRetryDelayMs`. */
  retryDelayMs?: number;
  maxRetryDelayMs?: number;
  headroomBytes?: number;
  /**
   * After a host's lease expiry is observed, wait this long before restoring
   * its VMs elsewhere: the time their supervisors' watchdogs get, beyond the
   * TTL, to have killed QEMU (docs/ha.md states the arithmetic). Default 500.
   */
  fenceMarginMs?: number;
  logger?: Logger;
}

export const DEFAULT_FENCE_MARGIN_MS = 500;
export const DEFAULT_MAX_ATTEMPTS = 5;
export const DEFAULT_RETRY_DELAY_MS = 2000;
export const DEFAULT_MAX_RETRY_DELAY_MS = 60_000;
/** States whose next restore waits out the back-off once restores keep failing. */
const BACKED_OFF = new Set<VmRecord['state']>(['restore-failed', 'crashed']);

/**
 * How long to wait before restoring again a VM whose last `attempts` restores
 * in a row failed: nothing before `maxAttempts`, then `retryDelayMs`,
 * doubling up to `maxRetryDelayMs`.
 */
export function retryDelay(attempts: number, opts: Pick<ManagerOptions, 'maxAttempts' | 'retryDelayMs' | 'maxRetryDelayMs'> = {}): number {
  const over = attempts - (opts.maxAttempts ?? DEFAULT_MAX_ATTEMPTS);
  if (over < 0) return 0;
  return Math.min(opts.maxRetryDelayMs ?? DEFAULT_MAX_RETRY_DELAY_MS, (opts.retryDelayMs ?? DEFAULT_RETRY_DELAY_MS) * 2 ** Math.min(over, 30));
}

export interface ManagerEvents {
  elected: [{ id: string }];
  deposed: [{ id: string; reason: string }];
  assigned: [{ vm: string; host: string; generation: number; cause: FailoverTiming['cause'] }];
  'no-capacity': [{ vm: string; reason: string }];
  'retry-later': [{ vm: string; attempts: number; delayMs: number; reason: string }];
  lost: [{ vm: string; reason: string }];
}

export class FailoverManager extends EventEmitter<ManagerEvents> {
  readonly id: string;
  readonly cluster: Cluster;
  private readonly opts: ManagerOptions;
  private readonly log: Logger;
  private running = false;
  private campaign: Campaign | undefined;
  private leaderKey: { key: string; createRevision: string } | undefined;
  private watchers: Watcher[] = [];
  private timer: NodeJS.Timeout | undefined;
  private reconciling = false;
  private again = false;
  private hostLostAt = new Map<string, number>();
  /** Monotonic time each dead host's expiry was first observed (the fencing margin counts from here). */
  private hostLostMono = new Map<string, number>();
  private marginTimer: NodeJS.Timeout | undefined;
  /** Backed-off VMs: when (monotonic) the failed restore was first seen, keyed by VM and generation. */
  private failedSeen = new Map<string, number>();
  /** When marginTimer fires (monotonic): an earlier margin replaces it. */
  private marginDue = Infinity;
  /**
   * Each host's newest heartbeat revision this manager saw, and when it saw
   * it on its own clocks: the host is declared dead ttlMs after `seenMono`.
   */
  private beats = new Map<string, { revision: string; seenMono: number; seenAt: number; ttlMs: number }>();
  /** host-dead verdicts as last read: host → mod revision. */
  private dead = new Map<string, string>();
  private beatTimer: NodeJS.Timeout | undefined;
  private declaring = false;
  /** After a failed verdict transaction (etcd away), not before this monotonic time: no busy loop on a refused connection. */
  private beatRetryMono = 0;
  private lastNoCapacity = new Map<string, { reason: string; at: number }>();
  private lastPrune = 0;

  constructor(opts: ManagerOptions) {
    super();
    this.opts = opts;
    this.id = opts.id ?? `${os.hostname()}:${process.pid}`;
    this.cluster = new Cluster(opts.etcd, opts.etcdOptions);
    this.log = (opts.logger ?? rootLog).child({ component: 'manager', id: this.id });
  }

  get isLeader(): boolean {
    return !!this.leaderKey;
  }

  async start(): Promise<void> {
    if (this.running) return;
    this.running = true;
    this.campaignOnce();
  }

  /** Resolves once this manager is the active one. */
  waitLeader(timeoutMs = 10_000): Promise<void> {
    if (this.isLeader) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new HaError('HYDRA_HA_TIMEOUT', `manager ${this.id} not elected within ${timeoutMs} ms`)), timeoutMs);
      this.once('elected', () => {
        clearTimeout(t);
        resolve();
      });
    });
  }

  async stop(): Promise<void> {
    if (!this.running) return;
    this.running = false;
    await this.stepDown('stopping');
    const c = this.campaign;
    this.campaign = undefined;
    // Stopping: an unreachable etcd ends the election by the lease's TTL anyway.
    await Promise.race([c?.resign().catch(() => undefined), sleep(1000)]);
    this.cluster.close();
  }

  private campaignOnce(): void {
    if (!this.running) return;
    const election = this.cluster.etcd.namespace(PREFIX).election(keys.election, this.opts.leaderTtlSec ?? 2);
    const c = election.campaign(this.id);
    this.campaign = c;
    c.on('elected', () => {
      void (async () => {
        try {
          const key = await c.getCampaignKey();
          const kv = (await this.cluster.etcd.get(key).exec()).kvs[0];
          if (!kv || c !== this.campaign) throw new HaError('HYDRA_HA_ELECTION_LOST', 'election key vanished');
          this.leaderKey = { key, createRevision: kv.create_revision };
          this.log.info({ key }, 'elected: this manager is active');
          // Events are an advisory log for `cluster status`; the election does not depend on them.
          await this.cluster.addEvent({ kind: 'manager-elected', message: `manager ${this.id} is active`, manager: this.id }).catch(() => undefined);
          await this.lead(c);
          if (this.leaderKey) this.emit('elected', { id: this.id });
        } catch (err) {
          c.emit('error', err as Error);
        }
      })();
    });
    c.on('error', (err) => {
      if (c !== this.campaign) return;
      this.log.warn({ err: err.message }, 'campaign failed; campaigning again');
      this.campaign = undefined;
      void this.stepDown(`campaign failed: ${err.message}`).then(() => {
        // The campaign already failed; resigning only speeds up the next one.
        c.resign().catch(() => undefined);
        if (this.running) setTimeout(() => this.campaignOnce(), 300);
      });
    });
  }

  private async lead(c: Campaign): Promise<void> {
    const current = () => this.running && this.campaign === c && !!this.leaderKey;
    const trigger = () => void this.reconcile();
    // The periodic pass starts first: creating a watch has no deadline, and after
    // a broken watch stream (a re-election during an etcd leader change) it was
    // seen to hang, which left an elected manager that never failed anything over.
    if (this.timer) clearInterval(this.timer);
    this.timer = setInterval(trigger, this.opts.reconcileMs ?? 250);
    trigger();
    const w1 = await this.cluster.etcd.watch().prefix(keys.hostsPrefix).create();
    w1.on('delete', (kv) => {
      const host = kv.key.toString().slice(keys.hostsPrefix.length);
      // The first sign counts (a verdict may have come before the expiry).
      if (!this.hostLostAt.has(host)) this.hostLostAt.set(host, Date.now());
      if (!this.hostLostMono.has(host)) this.hostLostMono.set(host, monoNow());
      this.log.warn({ host }, 'host lease expired');
      // The verdict follows the expiry too, so a returning agent always meets (and clears) one.
      void this.declareDead(host, { revision: '0', seenMono: monoNow(), seenAt: Date.now(), ttlMs: 0 });
      trigger();
    });
    w1.on('put', (kv) => {
      // Registered again and not held dead: a later death counts afresh.
      const host = kv.key.toString().slice(keys.hostsPrefix.length);
      if (!this.dead.has(host)) this.forgetLoss(host);
      trigger();
    });
    w1.on('connected', trigger);
    w1.on('error', () => undefined);
    const w2 = await this.cluster.etcd.watch().prefix(keys.vmsPrefix).create();
    w2.on('put', (kv) => {
      try {
        const r = JSON.parse(kv.value.toString()) as VmRecord;
        if (FAILOVER_PENDING.has(r.state)) trigger();
      } catch {
        /* ignore */
      }
    });
    w2.on('connected', trigger);
    w2.on('error', () => undefined);
    const w3 = await this.cluster.etcd.watch().prefix(keys.heartbeatsPrefix).create();
    w3.on('put', (kv) => this.sawHeartbeat(kv.key.toString().slice(keys.heartbeatsPrefix.length), kv.mod_revision, kv.value.toString()));
    w3.on('delete', (kv) => {
      this.beats.delete(kv.key.toString().slice(keys.heartbeatsPrefix.length));
      this.armBeatTimer();
    });
    // After a reconnection, a heartbeat missed meanwhile makes the verdict's transaction fail and is read then.
    w3.on('error', () => undefined);
    const w4 = await this.cluster.etcd.watch().prefix(keys.hostDeadPrefix).create();
    w4.on('put', (kv) => {
      this.sawVerdict(kv.key.toString().slice(keys.hostDeadPrefix.length), kv.mod_revision);
      trigger();
    });
    w4.on('delete', (kv) => {
      this.verdictCleared(kv.key.toString().slice(keys.hostDeadPrefix.length));
      trigger();
    });
    w4.on('connected', trigger);
    w4.on('error', () => undefined);
    this.watchers.push(w1, w2, w3, w4);
    // Every heartbeat already there counts from now: this manager never saw an older one.
    try {
      const [hb, dead] = await Promise.all([this.cluster.etcd.getAll().prefix(keys.heartbeatsPrefix).exec(), this.cluster.etcd.getAll().prefix(keys.hostDeadPrefix).exec()]);
      for (const kv of dead.kvs) this.sawVerdict(kv.key.toString().slice(keys.hostDeadPrefix.length), kv.mod_revision);
      for (const kv of hb.kvs) this.sawHeartbeat(kv.key.toString().slice(keys.heartbeatsPrefix.length), kv.mod_revision, kv.value.toString());
    } catch (err) {
      // Unreadable now: the watches deliver the next heartbeats, and the lease stays the backstop.
      this.log.warn({ err: (err as Error).message }, 'cannot read heartbeats yet');
    }
    if (!current()) {
      // Stopped or deposed while we were setting up.
      await Promise.race([Promise.all([w1.cancel(), w2.cancel(), w3.cancel(), w4.cancel()]).catch(() => undefined), sleep(1000)]);
      this.leaderKey = undefined;
      if (this.campaign === c || !this.running) {
        if (this.timer) clearInterval(this.timer);
        this.timer = undefined;
      }
      return;
    }
    trigger();
  }

  private async stepDown(reason: string): Promise<void> {
    const was = this.leaderKey;
    this.leaderKey = undefined;
    if (this.timer) clearInterval(this.timer);
    if (this.marginTimer) clearTimeout(this.marginTimer);
    this.marginTimer = undefined;
    this.marginDue = Infinity;
    if (this.beatTimer) clearTimeout(this.beatTimer);
    this.beatTimer = undefined;
    // A later term starts its heartbeat clocks from its own first observations.
    this.beats.clear();
    this.dead.clear();
    this.timer = undefined;
    const ws = this.watchers;
    this.watchers = [];
    // A cancel that fails leaves a watcher of a client that is closed next.
    await Promise.race([Promise.all(ws.map((w) => w.cancel().catch(() => undefined))), sleep(1000)]);
    if (was) {
      this.log.warn({ reason }, 'no longer the active manager');
      this.emit('deposed', { id: this.id, reason });
    }
  }

  /** A heartbeat of `host` at `revision`: its TTL counts again from now (only a newer revision moves it). */
  private sawHeartbeat(host: string, revision: string, value: string): void {
    if (!this.leaderKey) return;
    const prev = this.beats.get(host);
    if (prev && Number(prev.revision) >= Number(revision)) return;
    let ttlMs = prev?.ttlMs ?? 0;
    try {
      ttlMs = Number((JSON.parse(value) as Heartbeat).ttlMs) || ttlMs;
    } catch {
      // Not a heartbeat this version writes: keep the TTL known, if any.
    }
    if (!(ttlMs > 0)) return;
    this.beats.set(host, { revision, seenMono: monoNow(), seenAt: Date.now(), ttlMs });
    this.armBeatTimer();
  }

  /** A host-dead verdict exists (ours or found): the fencing margin counts from its first observation here. */
  private sawVerdict(host: string, revision: string): void {
    if (!this.leaderKey) return;
    this.dead.set(host, revision);
    if (!this.hostLostMono.has(host)) this.hostLostMono.set(host, monoNow());
    if (!this.hostLostAt.has(host)) this.hostLostAt.set(host, Date.now());
  }

  /** The host's agent cleared its verdict (its old VMs are dead): its heartbeat clock restarts now. */
  private verdictCleared(host: string): void {
    this.dead.delete(host);
    this.forgetLoss(host);
    const b = this.beats.get(host);
    if (b) this.beats.set(host, { ...b, seenMono: monoNow(), seenAt: Date.now() });
    this.armBeatTimer();
  }

  /** The host is back: its next death is timed from its own first sign. */
  private forgetLoss(host: string): void {
    this.hostLostMono.delete(host);
    this.hostLostAt.delete(host);
  }

  /** Wake up when the next live host's heartbeat is a TTL old. */
  private armBeatTimer(): void {
    if (!this.leaderKey) return;
    if (this.beatTimer) clearTimeout(this.beatTimer);
    this.beatTimer = undefined;
    let next = Infinity;
    for (const [host, b] of this.beats) if (!this.dead.has(host)) next = Math.min(next, b.seenMono + b.ttlMs);
    if (next === Infinity) return;
    next = Math.max(next, this.beatRetryMono);
    this.beatTimer = setTimeout(() => void this.declareSilentHosts(), Math.max(0, Math.ceil(next - monoNow())));
  }

  /** Declare dead every host whose newest heartbeat this manager saw is a TTL old. */
  private async declareSilentHosts(): Promise<void> {
    this.beatTimer = undefined;
    if (this.declaring || !this.leaderKey) return;
    this.declaring = true;
    try {
      const now = monoNow();
      const silent = [...this.beats].filter(([host, b]) => !this.dead.has(host) && now >= b.seenMono + b.ttlMs);
      await Promise.all(silent.map(([host, b]) => this.declareDead(host, b)));
    } finally {
      this.declaring = false;
      this.armBeatTimer();
    }
  }

  /**
   * The verdict: create host-dead/HOST only if the heartbeat is still at the
   * revision seen a TTL ago (and this manager still leads); after a lease
   * expiry (revision '0'), only if no heartbeat exists (none can commit on
   * an expired lease, and a new lease's heartbeat makes it fail). A heartbeat that
   * landed meanwhile makes it fail; one sent after it cannot land (the
   * agent's transaction requires the verdict absent), so the agent's last
   * proof is older than what was seen, and its watchdogs expire before now.
   */
  private async declareDead(host: string, b: { revision: string; seenMono: number; seenAt: number; ttlMs: number }): Promise<void> {
    const lk = this.leaderKey;
    if (!lk) return;
    const e = this.cluster.etcd;
    const verdict: HostDead = { host, by: this.id, heartbeatRevision: b.revision, heartbeatSeenAt: b.seenAt, heartbeatSeenMono: b.seenMono, at: Date.now(), atMono: monoNow(), ttlMs: b.ttlMs };
    try {
      const res = await e
        .if(keys.heartbeat(host), b.revision === '0' ? 'Create' : 'Mod', '==', b.revision === '0' ? 0 : b.revision)
        .and(keys.hostDead(host), 'Create', '==', 0)
        .and(lk.key, 'Create', '==', lk.createRevision)
        .then(e.put(keys.hostDead(host)).value(JSON.stringify(verdict)))
        .else(e.get(keys.heartbeat(host)), e.get(keys.hostDead(host)))
        .commit();
      if (res.succeeded) {
        // Unless the lease's expiry was seen first (its own margin already runs), the margin counts from the answer, not the request: later is the safe side.
        this.sawVerdict(host, res.header.revision);
        const why = b.revision === '0' ? 'its lease expired' : `no heartbeat for ${b.ttlMs} ms`;
        this.log.warn({ host, silentMs: Math.round(monoNow() - b.seenMono), ttlMs: b.ttlMs }, `host declared dead: ${why}`);
        // Events are an advisory log for `cluster status`; the verdict is the key itself.
        await this.cluster.addEvent({ kind: 'host-dead', host, message: `host ${host} declared dead: ${why}` }).catch(() => undefined);
        void this.reconcile();
        return;
      }
      const hb = res.responses[0]?.response_range?.kvs[0];
      const dead = res.responses[1]?.response_range?.kvs[0];
      if (dead) this.sawVerdict(host, dead.mod_revision);
      if (b.revision === '0') return;
      if (!hb) this.beats.delete(host);
      // A heartbeat the watch has not delivered yet: it counts from now.
      else this.sawHeartbeat(host, hb.mod_revision, hb.value.toString());
    } catch (err) {
      // etcd unreachable or slow: the next timer tries again (the lease expiry stays the backstop).
      this.log.warn({ host, err: (err as Error).message }, 'cannot declare the host dead yet');
      this.beatRetryMono = monoNow() + 200;
    }
  }

  /** One pass over every VM: fail over what needs it. Re-entrant calls coalesce. */
  async reconcile(): Promise<void> {
    if (!this.leaderKey) return;
    if (this.reconciling) {
      this.again = true;
      return;
    }
    this.reconciling = true;
    // Every etcd call has a deadline, so a pass should never hang; if one does, say so (fail-overs wait on it).
    const stuck = setTimeout(() => this.log.error('a reconcile pass has not finished for 20 s: fail-overs are waiting on it'), 20_000);
    stuck.unref();
    try {
      do {
        this.again = false;
        await this.reconcileOnce();
      } while (this.again && this.leaderKey);
    } catch (err) {
      this.log.warn({ err: (err as Error).message }, 'reconcile failed');
    } finally {
      clearTimeout(stuck);
      this.reconciling = false;
    }
  }

  private async reconcileOnce(): Promise<void> {
    const lk = this.leaderKey;
    if (!lk) return;
    const own = (await this.cluster.etcd.get(lk.key).exec()).kvs[0];
    if (!own || own.create_revision !== lk.createRevision) {
      await this.stepDown('election key is gone');
      this.campaign?.emit('error', new HaError('HYDRA_HA_ELECTION_LOST', 'election key is gone'));
      return;
    }
    const [registered, vms, verdicts] = await Promise.all([this.cluster.hosts(), this.cluster.vms(), this.cluster.etcd.getAll().prefix(keys.hostDeadPrefix).exec()]);
    const before = this.dead;
    this.dead = new Map(verdicts.kvs.map((kv) => [kv.key.toString().slice(keys.hostDeadPrefix.length), kv.mod_revision]));
    // A verdict written after this read (seen by its watch or written here) stands.
    for (const [h, rev] of before) if (Number(rev) > Number(verdicts.header.revision)) this.dead.set(h, rev);
    for (const [h, rev] of this.dead) this.sawVerdict(h, rev);
    // Cleared before its watch event came: the heartbeat clock restarts here too.
    for (const h of before.keys()) if (!this.dead.has(h)) this.verdictCleared(h);
    // A host declared dead is no place for a restore, whatever its lease says.
    const hosts = new Map([...registered].filter(([h]) => !this.dead.has(h)));
    const reserved = reservations([...vms.values()].map((v) => v.value));
    const now = Date.now();
    for (const h of [...this.hostLostMono.keys()]) {
      if (hosts.has(h)) {
        this.hostLostMono.delete(h);
        this.hostLostAt.delete(h);
      }
    }
    for (const k of [...this.failedSeen.keys()]) {
      const at = k.lastIndexOf('@');
      const cur = vms.get(k.slice(0, at))?.value;
      if (!cur || !BACKED_OFF.has(cur.state) || String(cur.generation) !== k.slice(at + 1)) this.failedSeen.delete(k);
    }
    for (const v of vms.values()) {
      const r = v.value;
      const alive = hosts.has(r.host);
      if (ON_HOST.has(r.state) && !alive) {
        if (!this.fenceMarginPassed(r.host)) continue;
        await this.failover(v, 'host-lost', hosts, reserved);
      } else if (r.state === 'crashed') {
        // A restored copy that dies before it is protected counts as a failed restore.
        if (!(await this.retryDue(v))) continue;
        await this.failover(v, 'qemu-died', hosts, reserved);
      } else if (r.state === 'host-lost') {
        if (!alive && !this.fenceMarginPassed(r.host)) continue;
        await this.failover(v, 'host-lost', hosts, reserved);
      } else if (r.state === 'restore-failed') {
        if (!(await this.retryDue(v))) continue;
        await this.failover(v, 'restore-failed', hosts, reserved);
      } else if (r.state === 'restoring' && now - r.updatedAt > (this.opts.restoreTimeoutMs ?? 120_000)) {
        await this.failover({ ...v, value: { ...r, failedHosts: [...new Set([...(r.failedHosts ?? []), r.host])] } }, 'restore-failed', hosts, reserved);
      }
    }
    if (now - this.lastPrune > 10_000) {
      this.lastPrune = now;
      // Pruning old events is housekeeping; the next round tries again.
      await this.cluster.pruneEvents().catch(() => undefined);
    }
  }

  /**
   * Has the fencing margin passed since `host`'s lease expiry was observed?
   * A host found dead without an observed expiry (a manager that just took
   * over) counts from now: waiting is the conservative side. Schedules a
   * reconcile for when it passes.
   */
  private fenceMarginPassed(host: string): boolean {
    const now = monoNow();
    let lost = this.hostLostMono.get(host);
    if (lost === undefined) {
      lost = now;
      this.hostLostMono.set(host, lost);
    }
    const left = lost + (this.opts.fenceMarginMs ?? DEFAULT_FENCE_MARGIN_MS) - now;
    if (left <= 0) return true;
    if (!this.marginTimer || now + left < this.marginDue) {
      if (this.marginTimer) clearTimeout(this.marginTimer);
      this.marginDue = now + left;
      this.marginTimer = setTimeout(() => {
        this.marginTimer = undefined;
        this.marginDue = Infinity;
        void this.reconcile();
      }, Math.ceil(left) + 5);
    }
    return false;
  }

  /**
   * May the manager restore this failed VM again now? Yes before `maxAttempts`
   * failures in a row; after that once the back-off since the failure was
   * first seen (by this manager: a new one waits the whole pause, the
   * conservative side) has passed; the periodic reconcile comes back for it.
   * The first time, the record's reason says how often and why it failed, and
   * when the next attempt comes.
   */
  private async retryDue(v: Versioned<VmRecord>): Promise<boolean> {
    const r = v.value;
    const delayMs = retryDelay(r.attempts ?? 0, this.opts);
    if (delayMs === 0) return true;
    const key = `${r.name}@${r.generation}`;
    const now = monoNow();
    const seen = this.failedSeen.get(key);
    if (seen === undefined) {
      this.failedSeen.set(key, now);
      const prefix = `${r.attempts} restores in a row failed`;
      // A record this manager (or one before it) already annotated keeps its reason.
      if (r.reason?.startsWith(prefix)) return false;
      const reason = `${prefix} (last: ${r.reason ?? 'no reason recorded'}); next attempt in ${Math.round(delayMs / 1000)} s`;
      this.log.error({ vm: r.name, attempts: r.attempts, delayMs, last: r.reason }, 'restores keep failing: backing off');
      const lk = this.leaderKey!;
      await this.cluster.etcd
        .if(keys.vm(r.name), 'Mod', '==', v.modRevision)
        .and(lk.key, 'Create', '==', lk.createRevision)
        .then(this.cluster.etcd.put(keys.vm(r.name)).value(JSON.stringify({ ...r, reason, updatedAt: Date.now() } satisfies VmRecord)))
        .commit()
        // Only the reason shown to users: a failed write (record changed, etcd away) changes no decision.
        .catch(() => undefined);
      // Events are an advisory log for `cluster status`; the record's reason says the same.
      await this.cluster.addEvent({ kind: 'retry-later', vm: r.name, message: reason }).catch(() => undefined);
      this.emit('retry-later', { vm: r.name, attempts: r.attempts ?? 0, delayMs, reason });
      this.again = true;
      return false;
    }
    return now - seen >= delayMs;
  }

  private async markLost(v: Versioned<VmRecord>, reason: string): Promise<void> {
    const lk = this.leaderKey!;
    const r = await this.cluster.etcd
      .if(keys.vm(v.value.name), 'Mod', '==', v.modRevision)
      .and(lk.key, 'Create', '==', lk.createRevision)
      .then(this.cluster.etcd.put(keys.vm(v.value.name)).value(JSON.stringify({ ...v.value, state: 'lost', reason, updatedAt: Date.now() } satisfies VmRecord)))
      .commit();
    if (r.succeeded) {
      this.log.error({ vm: v.value.name, reason }, 'VM lost');
      // Events are an advisory log for `cluster status`; the VM's record carries the state.
      await this.cluster.addEvent({ kind: 'lost', vm: v.value.name, message: reason }).catch(() => undefined);
      this.emit('lost', { vm: v.value.name, reason });
    }
  }

  private async failover(v: Versioned<VmRecord>, cause: FailoverTiming['cause'], hosts: Map<string, HostRecord>, reserved: Map<string, number>): Promise<void> {
    const r = v.value;
    const lk = this.leaderKey;
    if (!lk) return;
    if (r.imageGeneration === undefined) return this.markLost(v, `VM "${r.name}" failed (${cause}) before its first checkpoint was committed: no image to restore`);

    const sawAt = Date.now();
    const placement = placeVm(
      {
        vm: r.name,
        memoryBytes: r.memoryBytes ?? 0,
        exclude: cause === 'host-lost' ? [r.host] : [],
        avoid: [r.host, ...(r.failedHosts ?? [])],
        headroomBytes: this.opts.headroomBytes ?? DEFAULT_HEADROOM,
        ...(r.shellConfig ? { shellKey: shellKey(r.shellConfig) } : {}),
      },
      [...hosts.values()],
      reserved,
    );
    if (!placement.ok) {
      const last = this.lastNoCapacity.get(r.name);
      if (!last || last.reason !== placement.reason || sawAt - last.at > 10_000) {
        this.lastNoCapacity.set(r.name, { reason: placement.reason, at: sawAt });
        this.log.error({ vm: r.name, reason: placement.reason }, 'cannot fail over VM now; retrying');
        // Events are an advisory log for `cluster status`; the retry does not depend on them.
        await this.cluster.addEvent({ kind: 'no-capacity', vm: r.name, message: `${placement.reason}; retrying` }).catch(() => undefined);
        this.emit('no-capacity', { vm: r.name, reason: placement.reason });
        // Make the failure visible in the VM's record (its host is gone).
        if (cause === 'host-lost' && r.state !== 'host-lost') {
          await this.cluster.etcd
            .if(keys.vm(r.name), 'Mod', '==', v.modRevision)
            .and(lk.key, 'Create', '==', lk.createRevision)
            .then(this.cluster.etcd.put(keys.vm(r.name)).value(JSON.stringify({ ...r, state: 'host-lost', reason: placement.reason, detectedAt: r.detectedAt ?? this.hostLostAt.get(r.host) ?? sawAt, updatedAt: Date.now() } satisfies VmRecord)))
            .commit()
            // Guarded by the lease's revision: a failure means the host came back or etcd is away; the next round decides again.
            .catch(() => undefined);
        }
      }
      return;
    }
    this.lastNoCapacity.delete(r.name);
    const target = placement.host;
    const counter = await this.cluster.generationCounter(r.name);
    const generation = Math.max(counter.value, r.generation) + 1;
    const hostLost = cause === 'host-lost';
    const detectedAt = hostLost ? (r.state === 'host-lost' && r.detectedAt ? r.detectedAt : this.hostLostAt.get(r.host) ?? sawAt) : r.detectedAt ?? sawAt;
    const failedAt = hostLost ? undefined : r.failedAt;
    const assignedAt = Date.now();
    const record: VmRecord = {
      ...r,
      host: target,
      generation,
      state: 'restoring',
      reason: `${cause} on ${r.host}`,
      previousHost: r.host,
      attempts: (r.attempts ?? 0) + 1,
      failedAt,
      detectedAt,
      updatedAt: assignedAt,
    };
    const assignment: Assignment = {
      kind: 'restore',
      vm: r.name,
      host: target,
      generation,
      imageGeneration: r.imageGeneration,
      store: r.store,
      storeDir: r.storeDir,
      mode: r.mode,
      intervalMs: r.intervalMs,
      ...(r.cow ? { cow: r.cow } : {}),
      createdAt: assignedAt,
      by: this.id,
    };
    const timing: FailoverTiming = {
      vm: r.name,
      generation,
      fromGeneration: r.generation,
      imageGeneration: r.imageGeneration,
      fromHost: r.host,
      toHost: target,
      cause,
      failedAt,
      detectedAt,
      managerSawAt: sawAt,
      assignedAt,
      detectionMs: failedAt !== undefined ? detectedAt - failedAt : undefined,
    };
    const e = this.cluster.etcd;
    const txn = e
      .if(keys.vm(r.name), 'Mod', '==', v.modRevision)
      .and(keys.generation(r.name), 'Mod', '==', counter.modRevision)
      .and(lk.key, 'Create', '==', lk.createRevision);
    // Restoring on a verdict: only while it stands (a revived host cleared it only once its VMs were dead, but do not lean on that alone).
    const verdict = hostLost ? this.dead.get(r.host) : undefined;
    if (verdict !== undefined) txn.and(keys.hostDead(r.host), 'Mod', '==', verdict);
    const res = await txn
      .then(
        e.put(keys.generation(r.name)).value(String(generation)),
        e.put(keys.vm(r.name)).value(JSON.stringify(record)),
        e.put(keys.assignment(target, r.name)).value(JSON.stringify(assignment)),
        e.put(keys.timing(r.name, generation)).value(JSON.stringify(timing)),
      )
      .commit();
    if (!res.succeeded) {
      this.log.info({ vm: r.name }, 'fail-over lost a race (record changed); re-reading');
      this.again = true;
      return;
    }
    reserved.set(target, (reserved.get(target) ?? 0) + (r.memoryBytes ?? 0));
    this.log.warn({ vm: r.name, cause, from: r.host, to: target, generation, detectionMs: timing.detectionMs }, 'failing VM over');
    // Events are an advisory log for `cluster status`; the fail-over does not depend on them.
    await this.cluster.addEvent({ kind: 'failover', vm: r.name, host: target, message: `${cause} on ${r.host}: restoring VM "${r.name}" generation ${generation} (image ${r.imageGeneration}) on ${target}`, generation }).catch(() => undefined);
    this.emit('assigned', { vm: r.name, host: target, generation, cause });
  }
}

export async function startManager(opts: ManagerOptions): Promise<FailoverManager> {
  const m = new FailoverManager(opts);
  await m.start();
  return m;
}

/**
 * The fail-over assignment as a standalone transaction, for tests and tools:
 * assign VM `vm`, as read at `modRevision`, to `host` at the next generation.
 * Succeeds for exactly one of any number of concurrent callers holding the
 * same observation.
 */
export async function assignRestore(cluster: Cluster, observed: Versioned<VmRecord>, host: string, by = 'tool'): Promise<{ ok: boolean; generation: number }> {
  const r = observed.value;
  const counter = await cluster.generationCounter(r.name);
  const generation = Math.max(counter.value, r.generation) + 1;
  const e = cluster.etcd;
  const now = Date.now();
  const assignment: Assignment = { kind: 'restore', vm: r.name, host, generation, imageGeneration: r.imageGeneration, store: r.store, storeDir: r.storeDir, mode: r.mode, intervalMs: r.intervalMs, ...(r.cow ? { cow: r.cow } : {}), createdAt: now, by };
  const res = await e
    .if(keys.vm(r.name), 'Mod', '==', observed.modRevision)
    .and(keys.generation(r.name), 'Mod', '==', counter.modRevision)
    .then(
      e.put(keys.generation(r.name)).value(String(generation)),
      e.put(keys.vm(r.name)).value(JSON.stringify({ ...r, host, generation, state: 'restoring', previousHost: r.host, updatedAt: now } satisfies VmRecord)),
      e.put(keys.assignment(host, r.name)).value(JSON.stringify(assignment)),
    )
    .commit();
  return { ok: res.succeeded, generation };
}
