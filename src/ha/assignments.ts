// The agent's assignments: what etcd asks this host to do (restore a VM here, protect a VM running here).
import { pidAlive } from '../util/pid.js';
import { localShellConfig } from '../vm/index.js';
import type { AgentCore } from './agent-core.js';
import { keys, type Assignment, type Versioned, type VmRecord } from './cluster.js';
import { fenceLocalVm } from './fence.js';
import { localMacs, readLocalVm, writeHaLocal } from './local-vm.js';
import { NetError } from '../errors.js';
import type { ProtectFn, RestoreFn, RestoreOutcome, StoreGenerationFn } from './restore-adapter.js';
import { isClusterStore, storeAddress } from './store-discovery.js';

/** How long an assignment waits for an active store in etcd (a standby may be taking over right now). */
const STORE_LOOKUP_MS = 15_000;

export interface AssignmentOptions {
  restore: RestoreFn;
  protect: ProtectFn;
  storeGeneration: StoreGenerationFn;
  /** The cluster secret for restores. */
  secret: () => string | Promise<string>;
  secretFile?: string;
  /** How long a fenced VM's supervisor may take to exit before SIGKILL. */
  supervisorGraceMs?: number;
  /** Whether the agent is in contact with etcd (a partitioned agent must not start VMs). */
  connected: () => boolean;
  /** Record the protection of a VM's generation in etcd. */
  reportProtected: (vm: string, generation: number) => Promise<void>;
  /** etcd endpoints a checkpointer started here may use to look the active store up again (store `cluster`). */
  etcdUrls?: string;
}

export class AssignmentRunner {
  /** VMs with an assignment running. */
  private inflight = new Set<string>();

  constructor(private readonly core: AgentCore, private readonly opts: AssignmentOptions) {}

  busy(vm: string): boolean {
    return this.inflight.has(vm);
  }

  /** No assignment runs. */
  get idle(): boolean {
    return this.inflight.size === 0;
  }

  /**
   * Wait (at most `timeoutMs`) until no assignment runs: a restore in flight
   * when the agent stops would otherwise start a QEMU after the agent's last
   * fence, with nobody left to feed or fence it.
   */
  async settle(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.inflight.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  }

  async run(a: Assignment, modRevision: string): Promise<void> {
    // Only while registered and in contact: a partitioned agent must not start VMs.
    if (!this.core.running() || this.inflight.has(a.vm) || !this.opts.connected()) return;
    this.inflight.add(a.vm);
    try {
      const cur = await this.core.cluster.vm(a.vm);
      if (a.kind === 'restore') {
        if (!cur || cur.value.host !== this.core.host || cur.value.generation !== a.generation || cur.value.state !== 'restoring') {
          this.core.log.info({ vm: a.vm, generation: a.generation }, 'dropping a stale restore assignment');
          await this.deleteAssignment(a, modRevision);
          return;
        }
        await this.doRestore(a, modRevision);
      } else {
        if (!cur || cur.value.host !== this.core.host || cur.value.state !== 'protecting') {
          await this.deleteAssignment(a, modRevision);
          return;
        }
        await this.doProtect(a, modRevision, cur);
      }
    } catch (err) {
      this.core.log.warn({ vm: a.vm, err: (err as Error).message }, 'assignment could not run; will retry');
    } finally {
      this.inflight.delete(a.vm);
    }
  }

  private async deleteAssignment(a: Assignment, modRevision: string): Promise<void> {
    const { etcd } = this.core.cluster;
    const k = keys.assignment(this.core.host, a.vm);
    // Only if unchanged since read; a failure leaves it for the next resync, which drops it again.
    await etcd.if(k, 'Mod', '==', modRevision).then(etcd.delete().key(k)).commit().catch(() => undefined);
  }

  private async doRestore(a: Assignment, modRevision: string): Promise<void> {
    const { core, opts } = this;
    const { cluster, host, home } = core;
    const k = keys.assignment(host, a.vm);
    // An older copy on this very host (its QEMU crashed, or it was fenced) must be gone.
    const old = readLocalVm(home, a.vm);
    if (old?.live) await core.fence(a.vm, `restoring generation ${a.generation} here`, false);
    writeHaLocal(home, { vm: a.vm, host, generation: a.generation, updatedAt: Date.now() });
    const startedAt = Date.now();
    // Timings are for reports only: a failed write must not hold up the restore.
    await cluster.mergeTiming(a.vm, a.generation, { restoreStartedAt: startedAt }).catch(() => undefined);
    core.log.info({ vm: a.vm, generation: a.generation, image: a.imageGeneration, mode: a.mode }, 'restoring VM');
    let res: RestoreOutcome;
    try {
      const secret = await opts.secret();
      // Protection is started below, after etcd knows the VM runs: the initial
      // checkpoint takes seconds and must not delay the fail-over's record.
      res = await opts.restore({
        vm: a.vm,
        store: await storeAddress(cluster, a.store, STORE_LOOKUP_MS),
        ...(isClusterStore(a.store) ? { resolveStore: () => storeAddress(cluster, a.store, STORE_LOOKUP_MS) } : {}),
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
    // The timing first, so whoever sees `running` finds it complete (best effort, as above).
    await cluster.mergeTiming(a.vm, a.generation, {
      runningAt,
      restoredEpoch: res.epoch,
      spawnToRunningMs: res.timings?.spawnToRunningMs,
      restoreTimings: res.timings as Record<string, number> | undefined,
      ...(res.shell && !res.shell.used ? { coldReason: res.shell.reason } : {}),
    }).catch(() => undefined); // best effort: the timing record is advisory
    // The restored copy's files, read once: its memory size for etcd, its protection below.
    const local = readLocalVm(home, a.vm);
    const written = await cluster.updateVm(a.vm, (cur) =>
      cur.host === host && cur.generation === a.generation && cur.state === 'restoring'
        ? { ...cur, state: 'running', memoryBytes: local?.state?.memoryBytes ?? cur.memoryBytes, reason: undefined }
        : undefined,
    () => [cluster.etcd.delete().key(k)]);
    if (!written) {
      // Superseded while we restored (a newer generation exists): fenceStale kills it.
      await this.deleteAssignment(a, modRevision);
      return;
    }
    core.log.info({ vm: a.vm, generation: a.generation, restoreMs: runningAt - startedAt, spawnToRunningMs: res.timings?.spawnToRunningMs }, 'VM restored');
    core.emit('restored', { vm: a.vm, generation: a.generation });

    // Protect the new incarnation under its generation (unless the restore did: read once above, after it returned).
    if (!(local?.protection?.state === 'protected' && local.protection.generation === a.generation && local.protection.pid && pidAlive(local.protection.pid))) {
      try {
        if (res.pager) await res.pager.done;
        await opts.protect({ ...(await this.protectTarget(a.store)), vm: a.vm, intervalMs: a.intervalMs, generation: a.generation, secretFile: opts.secretFile, ...(a.cow ? { cow: a.cow } : {}) });
      } catch (err) {
        const msg = (err as Error).message;
        core.log.error({ vm: a.vm, generation: a.generation, err: msg }, 'restored VM runs unprotected: protection failed');
        // The reason is informative; the error above is logged whether or not etcd takes it.
        await cluster.updateVm(a.vm, (cur) => (cur.host === host && cur.generation === a.generation && cur.state === 'running' ? { ...cur, reason: `protection failed: ${msg}` } : undefined)).catch(() => undefined);
        return;
      }
    }
    await opts.reportProtected(a.vm, a.generation);
  }

  /**
   * The store a checkpointer started here talks to: a fixed address, or for
   * `cluster` the active store now plus the etcd endpoints to look it up again.
   */
  private async protectTarget(store: string): Promise<{ store: string; storeDiscovery?: { etcd: string } }> {
    if (!isClusterStore(store)) return { store };
    const address = await storeAddress(this.core.cluster, store, STORE_LOOKUP_MS);
    return { store: address, ...(this.opts.etcdUrls ? { storeDiscovery: { etcd: this.opts.etcdUrls } } : {}) };
  }

  private async restoreFailed(a: Assignment, msg: string): Promise<void> {
    const { core } = this;
    const { cluster, host, home } = core;
    const k = keys.assignment(host, a.vm);
    core.log.error({ vm: a.vm, generation: a.generation, err: msg }, 'restore failed');
    // Whatever it left running must not stay.
    if (readLocalVm(home, a.vm)?.live) await fenceLocalVm(home, a.vm, `restore failed: ${msg}`, this.opts.supervisorGraceMs);
    await cluster.updateVm(a.vm, (cur) =>
      cur.host === host && cur.generation === a.generation && cur.state === 'restoring'
        ? { ...cur, state: 'restore-failed', reason: `restore on ${host} failed: ${msg}`, failedHosts: [...new Set([...(cur.failedHosts ?? []), host])], detectedAt: Date.now(), failedAt: Date.now() }
        : undefined,
    () => [cluster.etcd.delete().key(k)]);
    // Timings are for reports only; the state above carries the failure.
    await cluster.mergeTiming(a.vm, a.generation, { error: msg }).catch(() => undefined);
    core.emit('restore-failed', { vm: a.vm, generation: a.generation, error: msg });
  }

  private async doProtect(a: Assignment, modRevision: string, cur: Versioned<VmRecord>): Promise<void> {
    const { core, opts } = this;
    const { cluster, host, home } = core;
    const k = keys.assignment(host, a.vm);
    const local = readLocalVm(home, a.vm);
    const fail = async (reason: string) => {
      core.log.error({ vm: a.vm, reason }, 'cannot protect VM');
      await cluster.updateVm(a.vm, (c) => (c.host === host && c.state === 'protecting' ? { ...c, state: 'unprotected', reason } : undefined), () => [cluster.etcd.delete().key(k)]);
    };
    if (!local?.live || local.state?.lifecycle !== 'running') return fail(`VM "${a.vm}" is not running on host ${host}`);
    let generation = cur.value.generation;
    try {
      const macs = localMacs(home, a.vm);
      if (macs.length > 0) assertNoMacClash(a.vm, macs, await cluster.vms());
      // Higher than anything etcd or the store has seen: the store fences older generations.
      const target = await this.protectTarget(a.store);
      const storeNext = await opts.storeGeneration(a.vm, target.store, opts.secretFile);
      generation = await cluster.allocateGeneration(a.vm, storeNext ?? 0);
      await cluster.updateVm(a.vm, (c) => (c.host === host && c.state === 'protecting' ? { ...c, generation, memoryBytes: local.state?.memoryBytes } : undefined));
      writeHaLocal(home, { vm: a.vm, host, generation, updatedAt: Date.now() });
      const st = await opts.protect({ ...target, vm: a.vm, intervalMs: a.intervalMs, generation, secretFile: opts.secretFile, ...(a.cow ? { cow: a.cow } : {}) });
      await cluster.updateVm(a.vm, (c) =>
        c.host === host && c.generation === generation && c.state === 'protecting'
          ? { ...c, state: 'protected', imageGeneration: st.generation ?? generation, attempts: 0, reason: undefined, shellConfig: localShellConfig(a.vm), ...(macs.length > 0 ? { macs } : {}) }
          : undefined,
      () => [cluster.etcd.delete().key(k)]);
      core.log.info({ vm: a.vm, generation }, 'VM protected');
      core.emit('protected', { vm: a.vm, generation });
    } catch (err) {
      await fail(`protecting failed: ${(err as Error).message}`);
    }
    void modRevision;
  }
}

/**
 * The hosts' VM bridges are one layer-2 segment (a VM keeps its address on
 * whichever host it is restored), so two VMs of the cluster with one MAC would
 * take each other's traffic wherever they run, and a fail-over onto the other's
 * host would be refused there. A VM whose MAC another managed VM already has
 * (one that may run: not stopped, not lost) is not protected.
 */
function assertNoMacClash(vm: string, macs: string[], records: Map<string, Versioned<VmRecord>>): void {
  for (const [name, { value: r }] of records) {
    if (name === vm || r.state === 'stopped' || r.state === 'lost') continue;
    const shared = macs.find((m) => r.macs?.includes(m));
    if (shared) {
      throw new NetError('HYDRA_NET_MAC_CLASH', `VM "${vm}": MAC ${shared} is already used by VM "${name}" of this cluster (on host ${r.host}, ${r.state}); the hosts' bridges are one segment, so give each VM its own MAC`);
    }
  }
}
