// A checkpoint store in a cluster: waits for the shared directory's lock, serves, registers in etcd on a lease, fences itself when the lease is lost.
import fs from 'node:fs/promises';
import os from 'node:os';
import type { Lease } from 'etcd3';
import type { Logger } from 'pino';
import { HaError, StoreError } from '../errors.js';
import { DirLock, lockHolder, startStoreServer, type StoreServer, type StoreServerOptions } from '../store/index.js';
import { log as rootLog } from '../util/log.js';
import { sleep } from '../util/sleep.js';
import { Cluster, keys, type ClusterOptions } from './cluster.js';
import type { StoreRecord } from './store-discovery.js';

/**
 * Who may write the shared store directory, and how clients find it.
 *
 * The directory's exclusive flock (store.lock) is the authority: only its
 * holder opens the directory read-write, so two stores never write it at
 * once, whatever etcd says. etcd is the discovery: the holder registers
 * /hydravm/stores/active on its lease, and only after it took the lock and
 * recovered the directory (journal replay, as every store start does).
 *
 * A store that cannot renew its lease for the TTL minus a margin fences
 * itself: it refuses every BEGIN and COMMIT (HYDRA_STORE_NOT_ACTIVE), ends its
 * connections, waits for a commit in flight to finish, and only then
 * releases the lock. It does so before etcd could expire the lease (the
 * expiry is at least a TTL after the last acknowledged keepalive was sent),
 * so the record never outlives the store's right to write. A store cut off
 * from etcd is usually cut off from the hosts too: it gives the directory to
 * a standby the cluster can reach rather than holding it out of reach. And on
 * a shared file system whose locks are leases of the file server (NFSv4), it
 * has stopped writing before the server could give the lock to another.
 *
 * A standby takes the lock only while its own lease is renewed, so a standby
 * cut off from etcd never serves. When the holder dies the kernel (or the
 * file server) frees the lock at once and a standby takes over within its
 * poll interval plus the directory's recovery; the dead holder's record is
 * overwritten then (the lock says who is active now). A client that meets a
 * dead or fenced store looks the active one up again and reconnects.
 */
export interface ClusterStoreOptions {
  /** The store server: dir, listen, secret, TLS, limits. */
  server: Omit<StoreServerOptions, 'lock'>;
  etcd: string | string[];
  etcdOptions?: ClusterOptions;
  /** This store's name in the cluster (the standby key, status). */
  name: string;
  /** Wait for the lock while another store holds it (default: refuse with HYDRA_STORE_DIR_BUSY). */
  standby?: boolean;
  /** host:port clients connect to (default: the bound address; needed when listening on 0.0.0.0). */
  advertise?: string;
  /** Lease TTL in seconds (default 3). */
  leaseTtlSec?: number;
  /** Fence this long before the lease could expire at etcd (default 500 ms). */
  marginMs?: number;
  /** How often a standby tries the lock (default 100 ms). */
  pollMs?: number;
  logger?: Logger;
  /** This store started serving at `address`. */
  onActive?: (address: string) => void;
  /** This store stopped serving (it fenced itself) and waits as a standby again. */
  onFenced?: (reason: string) => void;
}

export const DEFAULT_STORE_LEASE_TTL_SEC = 3;
const DEFAULT_MARGIN_MS = 500;

export class ClusterStore {
  state: 'starting' | 'standby' | 'active' | 'stopped' = 'starting';
  server: StoreServer | undefined;
  readonly cluster: Cluster;
  private readonly log: Logger;
  private readonly ttlSec: number;
  private readonly marginMs: number;
  private lease: Lease | undefined;
  private leaseId = '';
  private fired: number[] = [];
  /** Send time of the newest keepalive etcd acknowledged: the lease lives at etcd at least until this + TTL. */
  private ackedSendAt = 0;
  private standbyPut = false;
  private stopped = false;
  private loop: Promise<void> | undefined;
  private since = Date.now();
  private lastError: Error | undefined;

  constructor(private readonly opts: ClusterStoreOptions) {
    this.cluster = new Cluster(opts.etcd, opts.etcdOptions);
    this.ttlSec = opts.leaseTtlSec ?? DEFAULT_STORE_LEASE_TTL_SEC;
    this.marginMs = Math.min(opts.marginMs ?? DEFAULT_MARGIN_MS, this.ttlSec * 500);
    this.log = (opts.logger ?? rootLog).child({ component: 'cluster-store', name: opts.name, dir: opts.server.dir });
  }

  get address(): string | undefined {
    return this.server ? (this.opts.advertise ?? this.server.address) : undefined;
  }

  /** etcd renewed our lease recently enough that it cannot have expired yet. */
  private connected(): boolean {
    return this.lease !== undefined && Date.now() < this.ackedSendAt + this.ttlSec * 1000 - this.marginMs;
  }

  /**
   * Take a lease, then either serve (the lock is free) or wait as a standby.
   * Without `standby`, a lock held elsewhere is an error. Resolves once this
   * store serves or is registered as a standby.
   */
  async start(timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!(await this.grantLease())) {
      if (Date.now() > deadline) throw new HaError('HYDRA_HA_LEASE', `store ${this.opts.name}: no etcd lease within ${timeoutMs / 1000} s (is etcd at ${String(this.opts.etcd)} reachable?)`);
      await sleep(200);
    }
    // Owner-only, as the store makes it: it holds guest RAM.
    await fs.mkdir(this.opts.server.dir, { recursive: true, mode: 0o700 });
    const lock = await DirLock.tryExclusive(this.opts.server.dir);
    if (!lock && !this.opts.standby) {
      await this.revoke();
      this.cluster.close();
      throw new StoreError('HYDRA_STORE_DIR_BUSY', `store directory ${this.opts.server.dir} is served by ${await lockHolder(this.opts.server.dir)}; start this store with --standby to wait for it`);
    }
    if (lock) await this.promote(lock);
    if (this.state !== 'active' && !this.opts.standby) {
      await this.stop();
      throw this.lastError ?? new StoreError('HYDRA_STORE_START_FAILED', `store ${this.opts.name}: could not start serving ${this.opts.server.dir} (etcd lease not renewed)`);
    }
    if (this.state !== 'active') await this.becomeStandby();
    this.loop = this.run();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await this.loop;
    if (this.server) await this.demote('stopping', false);
    await this.revoke();
    this.cluster.close();
    this.state = 'stopped';
  }

  private async run(): Promise<void> {
    while (!this.stopped) {
      try {
        if (this.state === 'active') {
          if (!this.connected()) await this.demote(this.lease ? `no keepalive acknowledged by etcd for ${Date.now() - this.ackedSendAt} ms (lease TTL ${this.ttlSec} s)` : 'the etcd lease was lost', true);
          else await sleep(50);
          continue;
        }
        if (!this.lease && !(await this.grantLease())) {
          await sleep(200);
          continue;
        }
        if (!this.standbyPut) await this.becomeStandby();
        if (this.connected()) {
          const lock = await DirLock.tryExclusive(this.opts.server.dir);
          if (lock) {
            await this.promote(lock);
            continue;
          }
        }
      } catch (err) {
        this.log.warn({ err: (err as Error).message }, 'cluster store step failed; retrying');
      }
      await sleep(this.opts.pollMs ?? 100);
    }
  }

  private async grantLease(): Promise<boolean> {
    const lease = this.cluster.etcd.lease(this.ttlSec);
    const sentAt = Date.now();
    lease.on('keepaliveEstablished', () => (this.fired = []));
    lease.on('keepaliveFired', () => this.fired.push(Date.now()));
    lease.on('keepaliveSucceeded', () => {
      const sent = this.fired.shift();
      if (sent !== undefined && lease === this.lease) this.ackedSendAt = Math.max(this.ackedSendAt, sent);
    });
    lease.on('lost', (err) => {
      if (lease !== this.lease) return;
      this.log.warn({ err: err.message }, 'store lease lost');
      this.lease = undefined;
      this.standbyPut = false;
    });
    try {
      this.leaseId = await Promise.race([lease.grant(), sleep(2000).then(() => Promise.reject(new HaError('HYDRA_HA_LEASE', 'lease grant timed out')))]);
    } catch (err) {
      lease.release();
      this.log.warn({ err: (err as Error).message }, 'cannot get an etcd lease');
      return false;
    }
    this.lease = lease;
    this.fired = [];
    this.ackedSendAt = sentAt;
    this.standbyPut = false;
    return true;
  }

  private record(role: StoreRecord['role'], address: string): StoreRecord {
    return { name: this.opts.name, address, dir: this.opts.server.dir, pid: process.pid, host: os.hostname(), role, since: this.since, leaseId: this.leaseId };
  }

  private async becomeStandby(): Promise<void> {
    if (!this.lease) return;
    if (this.state !== 'standby') {
      this.state = 'standby';
      this.since = Date.now();
      this.log.info({ holder: await lockHolder(this.opts.server.dir) }, 'standby: waiting for the store directory\'s lock');
    }
    // What it will listen on once active, when known before it binds (not for port 0).
    const planned = this.opts.advertise ?? (/:0$/.test(this.opts.server.listen) ? '' : this.opts.server.listen);
    await this.lease.put(keys.storeStandby(this.opts.name)).value(JSON.stringify(this.record('standby', planned)));
    this.standbyPut = true;
  }

  /** The lock is ours: recover and serve, then announce. Any failure gives the lock back. */
  private async promote(lock: DirLock): Promise<void> {
    const t0 = Date.now();
    let server: StoreServer;
    try {
      // Every BEGIN and COMMIT asks too: a commit never waits for the next tick of run() to be refused.
      server = await startStoreServer({ ...this.opts.server, lock, mayWrite: () => (this.connected() ? null : `no keepalive acknowledged by etcd for ${Date.now() - this.ackedSendAt} ms (lease TTL ${this.ttlSec} s)`) });
    } catch (err) {
      // The store never served: giving the lock back is all there is to undo.
      await lock.release();
      this.lastError = err as Error;
      this.log.error({ err: (err as Error).message }, 'cannot serve the store directory; staying a standby');
      await sleep(1000);
      return;
    }
    this.server = server;
    const address = this.opts.advertise ?? server.address;
    if (!this.connected() || this.stopped) {
      await this.demote(this.stopped ? 'stopping' : 'lease not renewed while the directory was recovered', !this.stopped);
      return;
    }
    this.since = Date.now();
    try {
      // The lock is the authority: a dead holder's record is replaced, not waited for.
      await this.lease!.put(keys.storeActive).value(JSON.stringify(this.record('active', address)));
    } catch (err) {
      await this.demote(`cannot register in etcd: ${(err as Error).message}`, true);
      return;
    }
    this.state = 'active';
    this.standbyPut = false;
    // The standby record is only for status; a failure leaves it until the lease ends.
    await this.cluster.etcd.delete().key(keys.storeStandby(this.opts.name)).catch(() => undefined);
    this.log.info({ address, recoverMs: this.since - t0 }, 'active: serving the store directory and registered in etcd');
    this.opts.onActive?.(address);
  }

  /**
   * Stop serving: refuse commits first, then close (a commit in flight
   * finishes) and release the lock. The lease goes too, so the record is
   * removed at once when etcd is reachable and by expiry when not.
   */
  private async demote(reason: string, fenced: boolean): Promise<void> {
    const server = this.server;
    if (!server) return;
    if (fenced) this.log.error({ reason }, 'fencing: this store stops accepting checkpoints and releases the directory');
    server.fence(reason);
    await server.close();
    this.server = undefined;
    this.state = 'standby';
    await this.revoke();
    if (fenced) this.opts.onFenced?.(reason);
  }

  private async revoke(): Promise<void> {
    const lease = this.lease;
    this.lease = undefined;
    this.standbyPut = false;
    if (!lease) return;
    // Bounded: when etcd is out of reach the lease simply expires.
    await Promise.race([lease.revoke().catch(() => undefined), sleep(1000)]);
    lease.release();
  }
}
