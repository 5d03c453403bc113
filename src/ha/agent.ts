// The host agent: one per host (= per HYDRAVM_HOME); composes its lease, etcd view, death watch and assignments.
import fs from 'node:fs';
import path from 'node:path';
import { EventEmitter } from 'node:events';
import type { Etcd3 } from 'etcd3';
import type { Logger } from 'pino';
import { hydraHome } from '../config/paths.js';
import { loadSecret } from '../config/secret.js';
import { log as rootLog } from '../util/log.js';
import type { AgentCore, AgentEvents } from './agent-core.js';
import { AgentLease } from './agent-lease.js';
import { AssignmentRunner } from './assignments.js';
import { Cluster, type ClusterOptions } from './cluster.js';
import { DeathWatch } from './death-watch.js';
import { HaError } from '../errors.js';
import { EtcdView } from './etcd-view.js';
import { fenceLocalVm, staleReason } from './fence.js';
import { listLocalVms, type LocalVm } from './local-vm.js';
import { HwWatchdog } from './hw-watchdog.js';
import { WatchdogFeeder, type WatchdogVerdict } from './watchdog-feed.js';
import { ShellPool, type ShellPoolOptions } from './shell-pool.js';
import { defaultProtect, defaultRestore, defaultStoreGeneration, type ProtectFn, type RestoreFn, type StoreGenerationFn } from './restore-adapter.js';

export type { AgentEvents } from './agent-core.js';

/**
 * The host agent:
 *
 * - Holds a lease with the host's key on it, and self-fences when etcd stops
 *   acknowledging it (agent-lease.ts).
 * - Watches its VMs and reports a QEMU death to etcd at once (death-watch.ts).
 * - Runs the assignments etcd holds for it: protect a VM, restore a VM (assignments.ts).
 * - Fences: kills any local copy of a VM whose generation is older than the
 *   one in etcd (at start, after every (re)connection, on every change), as
 *   seen by its view of etcd (etcd-view.ts).
 * - Feeds its VMs' watchdogs with each proof of its lease (watchdog-feed.ts):
 *   their supervisors kill QEMU by themselves once the agent stops proving it
 *   (agent dead, etcd unreachable), and at once when it revokes a stale copy.
 *   Optionally it also feeds the host's hardware watchdog (hw-watchdog.ts).
 */
export interface AgentOptions {
  host: string;
  etcd: string | string[] | Etcd3;
  /** Client options for `etcd` given as URLs (TLS, user and password). */
  etcdOptions?: ClusterOptions;
  /** This host's HYDRAVM_HOME (default: the process's). */
  home?: string;
  address?: string;
  /** Lease TTL in seconds (etcd's minimum with the embedded settings is 1). */
  leaseTtlSec?: number;
  /** How often local VMs are checked. */
  pollMs?: number;
  /** Memory this host offers to VMs (default: MemTotal). */
  memoryBytes?: number;
  /** Kill this long before the lease could expire at etcd (the agent's own self-fence). */
  fenceMarginMs?: number;
  /** The VMs' supervisors kill QEMU this long before the lease could expire (default fenceMarginMs + 100). */
  watchdogMarginMs?: number;
  /** Opt-in: feed this Linux watchdog device (e.g. /dev/watchdog) on lease proof; the kernel resets the host when it starves. */
  hwWatchdog?: { device: string; timeoutSec: number };
  /** How long a fenced VM's supervisor may take to exit before SIGKILL. */
  supervisorGraceMs?: number;
  secretFile?: string;
  /** Resolve the cluster secret for restores (default: loadSecret). */
  secret?: () => string | Promise<string>;
  restore?: RestoreFn;
  protect?: ProtectFn;
  /** Pre-started restore shells (default: one per configuration of the VMs this host may receive, two at most); false: none. */
  shells?: ShellPoolOptions | false;
  storeGeneration?: StoreGenerationFn;
  logger?: Logger;
}

export class HostAgent extends EventEmitter<AgentEvents> {
  readonly host: string;
  readonly home: string;
  readonly cluster: Cluster;
  private readonly opts: AgentOptions;
  private readonly pollMs: number;
  private readonly log: Logger;
  private readonly lease: AgentLease;
  private readonly view: EtcdView;
  private readonly deaths: DeathWatch;
  private readonly assignments: AssignmentRunner;
  private readonly feeder: WatchdogFeeder;
  private readonly hw: HwWatchdog | undefined;
  private readonly shells: ShellPool | undefined;

  private running = false;
  private fencing = new Set<string>();
  private timers: NodeJS.Timeout[] = [];
  private ticking = false;

  constructor(opts: AgentOptions) {
    super();
    this.opts = opts;
    this.host = opts.host;
    if (!/^[a-z0-9][a-z0-9_.-]{0,62}$/i.test(this.host)) throw new HaError('HYDRA_HA_BAD_HOST', `"${this.host}" is not a valid host name`);
    this.home = path.resolve(opts.home ?? hydraHome());
    this.pollMs = opts.pollMs ?? 50;
    this.cluster = new Cluster(opts.etcd, opts.etcdOptions);
    this.log = (opts.logger ?? rootLog).child({ component: 'agent', host: this.host });
    const usesDefaults = !opts.restore || !opts.protect;
    if (usesDefaults && this.home !== path.resolve(hydraHome())) {
      throw new HaError('HYDRA_HA_HOME', `agent home ${this.home} differs from HYDRAVM_HOME ${hydraHome()}: restore and protection act on HYDRAVM_HOME (run the agent with HYDRAVM_HOME=${this.home})`);
    }
    const core: AgentCore = {
      host: this.host,
      home: this.home,
      cluster: this.cluster,
      log: this.log,
      running: () => this.running,
      emit: (event, ...args) => void (this.emit as (e: string, ...a: unknown[]) => boolean)(event, ...args),
      tick: () => this.tick(),
      resync: (throwErrors) => this.view.resync(throwErrors),
      fence: (vm, reason, self) => this.fence(vm, reason, self),
    };
    const ttlSec = opts.leaseTtlSec ?? 1;
    this.hw = opts.hwWatchdog ? new HwWatchdog({ ...opts.hwWatchdog, leaseTtlSec: ttlSec }) : undefined;
    this.feeder = new WatchdogFeeder(core, {
      marginMs: opts.watchdogMarginMs ?? (opts.fenceMarginMs ?? 150) + 100,
      classify: (v) => this.watchdogVerdict(v),
      ...(this.hw ? { hw: this.hw } : {}),
    });
    // Shells live in HYDRAVM_HOME, where restores look for them: an agent acting on another home keeps none.
    this.shells = opts.shells === false || this.home !== path.resolve(hydraHome()) ? undefined : new ShellPool(this.log, this.host, opts.shells ?? {});
    this.lease = new AgentLease(core, {
      ...(this.shells ? { shells: () => this.shells!.status() } : {}),
      ttlSec,
      marginMs: opts.fenceMarginMs ?? 150,
      onProof: (sentMono, ttlMs) => this.feeder.proven(sentMono, ttlMs),
      onLost: (reason) => this.feeder.leaseLost(reason),
      onDeclaredDead: (reason) => {
        this.feeder.leaseLost(reason);
        for (const v of this.oldIncarnation()) void this.fence(v.name, reason, true);
      },
      readyToRevive: () => this.readyToRevive(),
      ...(opts.address !== undefined ? { address: opts.address } : {}),
      ...(opts.memoryBytes !== undefined ? { memoryBytes: opts.memoryBytes } : {}),
    });
    this.deaths = new DeathWatch(core);
    this.assignments = new AssignmentRunner(core, {
      restore: opts.restore ?? defaultRestore,
      protect: opts.protect ?? defaultProtect,
      storeGeneration: opts.storeGeneration ?? defaultStoreGeneration,
      secret: opts.secret ?? (() => loadSecret({ secretFile: opts.secretFile })),
      ...(opts.secretFile !== undefined ? { secretFile: opts.secretFile } : {}),
      ...(opts.supervisorGraceMs !== undefined ? { supervisorGraceMs: opts.supervisorGraceMs } : {}),
      connected: () => this.lease.connected,
      reportProtected: (vm, generation) => this.deaths.reportProtected(vm, generation),
      ...(typeof opts.etcd === 'string' || Array.isArray(opts.etcd) ? { etcdUrls: [opts.etcd].flat().join(',') } : {}),
    });
    this.view = new EtcdView(core, {
      fenceStale: () => this.fenceStale(),
      assignment: (a, modRevision) => void this.assignments.run(a, modRevision),
    });
  }

  /** etcd has acknowledged a keepalive within the TTL. */
  get connected(): boolean {
    return this.lease.connected;
  }

  /** Whether the agent's view of etcd holds a record of `vm`. */
  knowsVm(vm: string): boolean {
    return this.view.records.has(vm);
  }

  async start(): Promise<void> {
    if (this.running) return;
    this.running = true;
    fs.mkdirSync(path.join(this.home, 'vms'), { recursive: true });
    this.hw?.open();
    this.lease.restartClock();
    this.log.info({ home: this.home, ttlSec: this.opts.leaseTtlSec ?? 1 }, 'agent starting');
    // Local checks run from the first moment, connected or not.
    this.timers.push(setInterval(() => void this.tick(), this.pollMs));
    this.timers.push(setInterval(() => void this.view.resync(), 1000));
    this.timers.push(setInterval(() => void this.lease.reportHost(false), 1000));
    if (this.shells) {
      const shells = this.shells;
      const reconcile = () => shells.reconcile(this.view.records.values(), this.host);
      this.timers.push(setInterval(reconcile, 1000));
      // A used shell is replaced at once, not at the next round.
      this.on('restored', reconcile);
    }
    await this.view.startWatches();
    // Fence stale copies before announcing the host (resync swallows its own errors unless asked).
    await this.view.resync();
    await this.lease.register();
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
    this.deaths.close();
    await this.shells?.close();
    // No new assignment starts now (running is false); one in flight finishes before the fence below.
    await this.assignments.settle(60_000);
    if (opts.fence !== false) {
      for (const v of listLocalVms(this.home)) {
        if (v.live && this.guarded(v)) await this.fence(v.name, 'agent stopping', true);
      }
    }
    else {
      // Left running on purpose: disarm their watchdogs (nothing guards them once the lease is revoked).
      for (const v of listLocalVms(this.home)) fs.rmSync(path.join(v.dir, 'watchdog.json'), { force: true });
    }
    await this.view.close();
    await this.lease.revoke();
    this.hw?.close();
    this.cluster.close();
    this.log.info('agent stopped');
  }

  /** The local loop: self-fence, stale generations, deaths. */
  private async tick(): Promise<void> {
    if (this.ticking || !this.running) return;
    this.ticking = true;
    try {
      await this.lease.selfFenceIfSilent(() => listLocalVms(this.home).filter((v) => v.live && this.guarded(v) && !this.fencing.has(v.name)));
      await this.fenceStale();
      this.feeder.feed();
      this.deaths.scan(this.view.records, (vm) => this.assignments.busy(vm));
    } finally {
      this.ticking = false;
    }
  }

  /**
   * Is this local VM one the cluster may restore elsewhere (so it must die
   * with our lease)? Ours by ha.json, and still ours in etcd as last seen
   * (before etcd was ever reached: ha.json alone decides).
   */
  private guarded(v: LocalVm): boolean {
    if (v.ha?.host !== this.host) return false;
    if (!this.view.loaded) return true;
    const r = this.view.records.get(v.name);
    return !!r && r.host === this.host;
  }

  /** The watchdog's view of a local VM: keep it alive with our lease, kill it now, or leave it out of HA. */
  private watchdogVerdict(v: LocalVm): WatchdogVerdict {
    if (!v.ha || v.ha.fenced) return v.ha?.fenced ? { kind: 'revoke', reason: v.ha.fenced } : { kind: 'none' };
    const stale = staleReason(v, this.view.records.get(v.name), this.host);
    if (stale) return { kind: 'revoke', reason: stale };
    if (this.guarded(v)) return { kind: 'guard' };
    return { kind: 'none' };
  }

  /** Local VMs under HA here (guarded, or due to die) that still live: what a verdict may see restored elsewhere. */
  private oldIncarnation(): LocalVm[] {
    return listLocalVms(this.home).filter((v) => v.live && v.ha?.host === this.host && this.watchdogVerdict(v).kind !== 'none');
  }

  /**
   * After a host-dead verdict: may it be cleared? Only with no assignment
   * running and every VM of this host dead (killed here if need be), so no
   * proof after the clear can keep a copy alive that the manager is
   * restoring elsewhere.
   */
  private async readyToRevive(): Promise<boolean> {
    if (!this.assignments.idle) return false;
    const left = this.oldIncarnation();
    for (const v of left) await this.fence(v.name, 'the manager declared this host dead', true);
    return this.oldIncarnation().length === 0;
  }

  private async fenceStale(): Promise<void> {
    for (const v of listLocalVms(this.home)) {
      if (!v.live || this.assignments.busy(v.name) || this.fencing.has(v.name)) continue;
      const reason = staleReason(v, this.view.records.get(v.name), this.host);
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
}

export async function startAgent(opts: AgentOptions): Promise<HostAgent> {
  const a = new HostAgent(opts);
  await a.start();
  return a;
}
