// The agent's etcd lease and heartbeat: registering the host, proving it alive (or learning it was declared dead), self-fencing when proofs stop.
import fs from 'node:fs';
import os from 'node:os';
import type { Lease } from 'etcd3';
import { HaError } from '../errors.js';
import { sleep } from '../util/sleep.js';
import { monoNow } from '../vm/index.js';
import type { AgentCore } from './agent-core.js';
import { keys, type Heartbeat, type HostRecord } from './cluster.js';
import { listLocalVms, type LocalVm } from './local-vm.js';

export interface LeaseOptions {
  /** Lease TTL in seconds. */
  ttlSec: number;
  /** Kill this long before the lease could expire at etcd. */
  marginMs: number;
  address?: string;
  /** Memory this host offers to VMs (default: MemTotal). */
  memoryBytes?: number;
  /**
   * etcd acknowledged a keepalive sent at monotonic time `sentMono` (or
   * granted the lease), and after that a heartbeat committed while no
   * host-dead verdict existed: the lease lives until at least sentMono +
   * ttlMs, and the manager cannot declare the host dead before then either.
   * Feeds the VMs' watchdogs.
   */
  onProof?: (sentMono: number, ttlMs: number) => void;
  /**
   * The manager declared this host dead (host-dead/HOST exists): no proof
   * comes until the agent clears it, and whatever this incarnation guarded
   * may be restored elsewhere. The agent revokes and kills its VMs.
   */
  onDeclaredDead?: (reason: string) => void;
  /**
   * May the verdict be cleared now? Only once no VM this host guarded is
   * alive (their restores elsewhere cannot meet them) and no assignment
   * runs; the agent kills what is left and answers false until then.
   */
  readyToRevive?: () => Promise<boolean>;
  /** etcd says the lease is gone (expired): what it guarded may already be restored elsewhere. */
  onLost?: (reason: string) => void;
  /** Idle restore shells to report in the host record. */
  shells?: () => { key: string; idle: number }[];
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

/**
 * Holds a lease (TTL ~1 s) with /hydravm/hosts/HOST on it: the key exists
 * while the host is alive. If no keepalive has been acknowledged for the TTL
 * (minus a margin), the manager may already be restoring this host's VMs
 * elsewhere, so the agent kills them itself, before the lease can expire at etcd.
 */
export class AgentLease {
  private lease: Lease | undefined;
  private leaseId: string | undefined;
  private leaseOk = false;
  private fired: { wall: number; mono: number }[] = [];
  /** Send time of the newest keepalive etcd acknowledged: etcd's expiry is at least this + TTL. */
  private ackedSendAt = Date.now();
  private grantedTtlSec: number;
  private registering = false;
  private selfFenced = false;
  private lastHostReport = '';
  private lastHostReportAt = 0;
  /** The host-dead verdict's mod revision while the manager holds this host dead. */
  private deadRevision: string | undefined;
  private reviving = false;
  private heartbeatSeq = 0;
  private heartbeatBusy = false;
  /** A keepalive acknowledged while a heartbeat was in flight: its proof waits for the next heartbeat. */
  private heartbeatPending: { mono: number; wall: number; ttlMs: number } | undefined;

  constructor(private readonly core: AgentCore, private readonly opts: LeaseOptions) {
    this.grantedTtlSec = opts.ttlSec;
  }

  /** etcd has acknowledged a keepalive within the TTL. */
  get connected(): boolean {
    return this.leaseOk && this.deadRevision === undefined && Date.now() < this.fenceDeadline();
  }

  /** The manager holds this host dead and the agent has not cleared the verdict yet. */
  get declaredDead(): boolean {
    return this.deadRevision !== undefined;
  }

  private fenceDeadline(): number {
    return this.ackedSendAt + Math.min(this.opts.ttlSec, this.grantedTtlSec) * 1000 - this.opts.marginMs;
  }

  /** Start the silence clock (the agent starts guarding its VMs now). */
  restartClock(): void {
    this.ackedSendAt = Date.now();
  }

  /**
   * Self-fence: etcd has not heard from us for (almost) a TTL, so kill every
   * guarded VM `victims` names (once, and again for any that appear).
   */
  async selfFenceIfSilent(victims: () => LocalVm[]): Promise<void> {
    const now = Date.now();
    if (now < this.fenceDeadline()) return;
    const vms = victims();
    if (this.selfFenced && vms.length === 0) return;
    if (!this.selfFenced) {
      this.core.log.error({ silentMs: now - this.ackedSendAt, vms: vms.map((v) => v.name) }, 'no contact with etcd for the lease TTL: self-fencing');
      this.core.emit('self-fence', { silentMs: now - this.ackedSendAt });
    }
    this.selfFenced = true;
    await Promise.all(vms.map((v) => this.core.fence(v.name, `self-fence: no contact with etcd for ${now - this.ackedSendAt} ms`, true)));
  }

  /** Register the host, retrying until it works or the agent stops. */
  async register(): Promise<void> {
    if (this.registering || !this.core.running()) return;
    this.registering = true;
    try {
      while (this.core.running()) {
        try {
          await this.registerOnce();
          return;
        } catch (err) {
          this.core.log.warn({ err: (err as Error).message }, 'cannot register with etcd; retrying');
          await sleep(200);
        }
      }
    } finally {
      this.registering = false;
    }
  }

  private async registerOnce(): Promise<void> {
    const { core } = this;
    const old = this.lease;
    this.lease = undefined;
    this.leaseOk = false;
    old?.release();
    const sentAt = Date.now();
    const sentMono = monoNow();
    const lease = core.cluster.etcd.lease(this.opts.ttlSec);
    lease.on('keepaliveEstablished', () => (this.fired = []));
    lease.on('keepaliveFired', () => this.fired.push({ wall: Date.now(), mono: monoNow() }));
    lease.on('keepaliveSucceeded', (res) => {
      const sent = this.fired.shift();
      if (sent !== undefined && lease === this.lease) {
        this.grantedTtlSec = Number(res.TTL) || this.grantedTtlSec;
        // The keepalive alone proves nothing to the watchdogs: the heartbeat after it must land too.
        void this.heartbeat({ mono: sent.mono, wall: sent.wall, ttlMs: Math.min(this.opts.ttlSec, this.grantedTtlSec) * 1000 });
      }
    });
    lease.on('lost', (err) => {
      if (lease !== this.lease) return;
      core.log.warn({ err: err.message }, 'lease lost; registering again');
      this.opts.onLost?.(`lease lost: ${err.message}`);
      this.leaseOk = false;
      this.lease = undefined;
      if (core.running()) setTimeout(() => void this.register(), 100);
    });
    let id: string;
    try {
      id = await Promise.race([lease.grant(), sleep(2000).then(() => Promise.reject(new HaError('HYDRA_HA_LEASE', 'lease grant timed out')))]);
    } catch (err) {
      lease.release();
      throw err;
    }
    try {
      // Before announcing ourselves: know the cluster, fence what is stale.
      await core.resync(true);
      if (!core.running()) throw new HaError('HYDRA_HA_STOPPED', 'agent stopped');
    } catch (err) {
      lease.release();
      throw err;
    }
    this.lease = lease;
    this.leaseId = id;
    // The grant is a proof only once a heartbeat lands after it (a verdict left from before is cleared first).
    const ttlMs = Math.min(this.opts.ttlSec, this.grantedTtlSec) * 1000;
    let beat = await this.writeHeartbeat(id, ttlMs);
    if (!beat.ok) {
      await this.revive(beat.deadRevision);
      beat = await this.writeHeartbeat(id, ttlMs);
    }
    if (!beat.ok) {
      this.lease = undefined;
      lease.release();
      throw new HaError('HYDRA_HA_HOST_DEAD', `host ${core.host} is declared dead again (host-dead revision ${beat.deadRevision}) while registering`);
    }
    this.leaseOk = true;
    this.proven({ mono: sentMono, wall: sentAt, ttlMs });
    this.lastHostReport = '';
    await this.reportHost(true);
    await core.cluster.etcd.put(keys.knownHost(core.host)).value(JSON.stringify({ name: core.host, address: this.opts.address ?? os.hostname(), home: core.home, registeredAt: Date.now() }));
    core.log.info({ leaseId: id }, 'registered');
    core.emit('registered', { leaseId: id });
    void core.resync();
  }

  /** A heartbeat proved the lease at `p`: feed the watchdogs and the agent's own self-fence clock. */
  private proven(p: { mono: number; wall: number; ttlMs: number }): void {
    this.ackedSendAt = Math.max(this.ackedSendAt, p.wall);
    this.opts.onProof?.(p.mono, p.ttlMs);
    if (this.selfFenced) this.core.log.info('etcd reachable again');
    this.selfFenced = false;
  }

  /**
   * Write the heartbeat after an acknowledged keepalive; its success is the
   * proof. One at a time: a keepalive acknowledged meanwhile is carried by
   * the next heartbeat (a later heartbeat proves an earlier keepalive too).
   */
  private async heartbeat(p: { mono: number; wall: number; ttlMs: number }): Promise<void> {
    if (this.heartbeatBusy) {
      this.heartbeatPending = p;
      return;
    }
    this.heartbeatBusy = true;
    try {
      let next: typeof p | undefined = p;
      while (next) {
        this.heartbeatPending = undefined;
        const id = this.leaseId;
        if (!this.lease || !id || this.deadRevision !== undefined || !this.core.running()) return;
        try {
          const beat = await this.writeHeartbeat(id, next.ttlMs);
          if (beat.ok) this.proven(next);
          else this.declaredDeadBy(beat.deadRevision);
        } catch (err) {
          // No proof from this keepalive: the watchdogs keep their older deadline, which is the safe side.
          this.core.log.warn({ err: (err as Error).message }, 'heartbeat failed');
        }
        next = this.heartbeatPending;
      }
    } finally {
      this.heartbeatBusy = false;
    }
  }

  /**
   * The heartbeat transaction: put heartbeats/HOST (on the lease) only if
   * host-dead/HOST does not exist. Either it commits before the manager's
   * verdict, whose transaction compares this key's revision and so fails,
   * or after it, and then it does not commit: no proof follows a verdict.
   * `ttlMs` is the TTL of the proof it carries: the manager waits that long.
   */
  private async writeHeartbeat(leaseId: string, ttlMs: number): Promise<{ ok: true } | { ok: false; deadRevision: string }> {
    const e = this.core.cluster.etcd;
    const host = this.core.host;
    const hb: Heartbeat = { host, ttlMs, agentPid: process.pid, at: Date.now(), seq: ++this.heartbeatSeq };
    const res = await e
      .if(keys.hostDead(host), 'Create', '==', 0)
      .then(e.put(keys.heartbeat(host)).value(JSON.stringify(hb)).lease(leaseId))
      .else(e.get(keys.hostDead(host)))
      .commit();
    if (res.succeeded) return { ok: true };
    const kv = res.responses[0]?.response_range?.kvs[0];
    return { ok: false, deadRevision: kv?.mod_revision ?? '0' };
  }

  /** The heartbeat met a host-dead verdict: stop proving, let the agent kill its VMs, then clear it. */
  private declaredDeadBy(revision: string): void {
    if (this.deadRevision !== undefined) return;
    this.deadRevision = revision;
    const reason = `the manager declared host ${this.core.host} dead (no heartbeat seen for the TTL)`;
    // revive() retries etcd by itself; it only ends early when the agent stops.
    void this.revive(revision, reason).catch((err: Error) => this.core.log.warn({ err: err.message }, 'host-dead verdict not cleared'));
  }

  /**
   * Come back from a host-dead verdict: kill every guarded VM (their
   * watchdogs already starve), wait until none lives, then delete the
   * verdict (only the one seen: a newer one starts over). Proofs resume
   * with the next heartbeat.
   */
  private async revive(revision: string, reason = `the manager declared host ${this.core.host} dead`): Promise<void> {
    if (this.reviving) {
      while (this.reviving && this.core.running()) await sleep(50);
      return;
    }
    this.reviving = true;
    this.deadRevision ??= revision;
    this.core.log.error({ revision }, 'host declared dead: revoking every guarded VM');
    try {
      this.opts.onDeclaredDead?.(reason);
      while (this.core.running()) {
        try {
          if (await this.opts.readyToRevive?.() ?? true) break;
        } catch (err) {
          this.core.log.warn({ err: (err as Error).message }, 'cannot fence the old incarnation yet');
        }
        await sleep(100);
      }
      const e = this.core.cluster.etcd;
      const key = keys.hostDead(this.core.host);
      let rev = revision;
      for (;;) {
        if (!this.core.running()) throw new HaError('HYDRA_HA_STOPPED', 'agent stopped');
        try {
          const res = await e.if(key, 'Mod', '==', rev).then(e.delete().key(key)).else(e.get(key)).commit();
          if (res.succeeded) break;
          const kv = res.responses[0]?.response_range?.kvs[0];
          if (!kv) break;
          // A newer verdict (a manager that saw no heartbeat since): the VMs are dead already; clear that one.
          rev = kv.mod_revision;
        } catch (err) {
          this.core.log.warn({ err: (err as Error).message }, 'cannot clear the host-dead verdict yet; retrying');
          await sleep(200);
        }
      }
      this.core.log.warn({ revision }, 'host-dead verdict cleared: every VM of the old incarnation is dead');
      this.core.emit('revived', { revision });
      this.deadRevision = undefined;
    } finally {
      this.reviving = false;
    }
  }

  private hostRecord(): HostRecord {
    const { core } = this;
    const mem = memInfo();
    const capacity = this.opts.memoryBytes ?? mem.totalBytes;
    const local = listLocalVms(core.home).filter((v) => v.live);
    const used = local.reduce((s, v) => s + (v.state?.memoryBytes ?? 0), 0);
    return {
      name: core.host,
      address: this.opts.address ?? os.hostname(),
      agentPid: process.pid,
      home: core.home,
      totalMemoryBytes: capacity,
      freeMemoryBytes: Math.max(0, Math.min(mem.availableBytes, capacity - used)),
      vms: local.filter((v) => v.ha?.host === core.host).map((v) => v.name),
      leaseId: this.leaseId ?? '',
      ...(this.opts.shells ? { shells: this.opts.shells() } : {}),
      startedAt: 0,
      updatedAt: Date.now(),
    };
  }

  /** Put the host record on the lease (only when it changed, or every 10 s). */
  async reportHost(force: boolean): Promise<void> {
    const lease = this.lease;
    if (!lease || !this.leaseOk) return;
    const rec = this.hostRecord();
    const sig = JSON.stringify({ ...rec, updatedAt: 0, freeMemoryBytes: Math.round(rec.freeMemoryBytes / (16 << 20)) });
    if (!force && sig === this.lastHostReport && Date.now() - this.lastHostReportAt < 10_000) return;
    try {
      await lease.put(keys.host(this.core.host)).value(JSON.stringify(rec));
      this.lastHostReport = sig;
      this.lastHostReportAt = Date.now();
    } catch (err) {
      this.core.log.warn({ err: (err as Error).message }, 'cannot report host');
      if (force) throw err;
    }
  }

  /** Give the lease back (the host key goes at once). */
  async revoke(): Promise<void> {
    if (!this.lease) return;
    const lease = this.lease;
    this.lease = undefined;
    this.leaseOk = false;
    await Promise.race([
      // Bounded below; a failed revoke only means the lease expires by its TTL.
      lease.revoke().catch(() => undefined),
      sleep(1000),
    ]);
  }
}
