// The agent's etcd lease: registering the host on it, reporting the host record, and self-fencing when keepalives stop.
import fs from 'node:fs';
import os from 'node:os';
import type { Lease } from 'etcd3';
import { HaError } from '../errors.js';
import { sleep } from '../util/sleep.js';
import { monoNow } from '../vm/index.js';
import type { AgentCore } from './agent-core.js';
import { keys, type HostRecord } from './cluster.js';
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
   * granted the lease): its expiry at etcd is at least sentMono + ttlMs.
   * Feeds the VMs' watchdogs.
   */
  onProof?: (sentMono: number, ttlMs: number) => void;
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

  constructor(private readonly core: AgentCore, private readonly opts: LeaseOptions) {
    this.grantedTtlSec = opts.ttlSec;
  }

  /** etcd has acknowledged a keepalive within the TTL. */
  get connected(): boolean {
    return this.leaseOk && Date.now() < this.fenceDeadline();
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
        this.ackedSendAt = Math.max(this.ackedSendAt, sent.wall);
        this.grantedTtlSec = Number(res.TTL) || this.grantedTtlSec;
        this.opts.onProof?.(sent.mono, Math.min(this.opts.ttlSec, this.grantedTtlSec) * 1000);
        if (this.selfFenced) core.log.info('etcd reachable again');
        this.selfFenced = false;
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
    this.leaseOk = true;
    this.ackedSendAt = Math.max(this.ackedSendAt, sentAt);
    this.opts.onProof?.(sentMono, this.opts.ttlSec * 1000);
    this.lastHostReport = '';
    await this.reportHost(true);
    await core.cluster.etcd.put(keys.knownHost(core.host)).value(JSON.stringify({ name: core.host, address: this.opts.address ?? os.hostname(), home: core.home, registeredAt: Date.now() }));
    core.log.info({ leaseId: id }, 'registered');
    core.emit('registered', { leaseId: id });
    void core.resync();
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
