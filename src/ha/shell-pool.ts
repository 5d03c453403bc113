// The host agent's pool of pre-started restore shells: which configurations to keep warm, replacing used and dead shells.
import type { Logger } from 'pino';
import { listShells, removeShell, shellKey, startShell, stopShellNow, type ShellConfig, type ShellInfo } from '../vm/index.js';
import type { VmRecord } from './cluster.js';

export interface ShellPoolOptions {
  /** Idle shells kept per configuration (default 1; 0 turns the pool off). */
  perConfig?: number;
  /** At most this many idle shells in all (default 2): each holds a QEMU process, though no guest memory. */
  max?: number;
  /**
   * Configurations to keep warm. Default: those of the VMs this host may
   * receive (every VM record with a shell configuration whose VM runs
   * elsewhere, or is being restored here).
   */
  configs?: ShellConfig[];
}

export interface ShellPoolStatus {
  key: string;
  idle: number;
}

/**
 * Keeps `perConfig` idle shells of each wanted configuration, at most `max`
 * in all, most wanted first. Checked every second and after each restore: a
 * shell a restore adopted has left the pool's directory, a shell whose QEMU
 * died while idle is noticed (its supervisor records it, or both processes
 * are gone) and removed, and both are replaced in the background, one start
 * at a time so a fail-over never competes with several QEMU starts.
 * Shells of configurations no longer wanted are stopped.
 */
export class ShellPool {
  private starting = false;
  private closed = false;
  private readonly perConfig: number;
  private readonly max: number;
  /** Consecutive start failures per key: a broken configuration backs off instead of spinning. */
  private failures = new Map<string, { count: number; until: number }>();

  /** `owner` tags the shells this pool starts: it counts, stops and reaps only those (a restore may adopt any). */
  constructor(private readonly log: Logger, private readonly owner: string, private readonly opts: ShellPoolOptions = {}) {
    this.perConfig = opts.perConfig ?? 1;
    this.max = opts.max ?? 2;
  }

  /** The configurations wanted now, most wanted first (by how many VMs need each). */
  wanted(records: Iterable<VmRecord>, host: string): ShellConfig[] {
    if (this.opts.configs) return this.opts.configs;
    const count = new Map<string, { config: ShellConfig; n: number }>();
    for (const r of records) {
      // A VM being restored here still wants its shell: the restore is about to adopt it
      // (stopping it now would turn the restore cold, or kill the QEMU in the middle of its adoption).
      if (!r.shellConfig || (r.host === host && r.state !== 'restoring') || r.state === 'lost') continue;
      const k = shellKey(r.shellConfig);
      const e = count.get(k) ?? { config: r.shellConfig, n: 0 };
      e.n++;
      count.set(k, e);
    }
    return [...count.values()].sort((a, b) => b.n - a.n).map((e) => e.config);
  }

  /** Idle shells by key, for the host record and `cluster status`. */
  status(): ShellPoolStatus[] {
    const by = new Map<string, number>();
    for (const s of listShells()) if (s.idle && s.owner === this.owner) by.set(s.key, (by.get(s.key) ?? 0) + 1);
    return [...by.entries()].map(([key, idle]) => ({ key, idle })).sort((a, b) => a.key.localeCompare(b.key));
  }

  /** One round: reap dead shells, stop unwanted ones, start one missing shell in the background. */
  reconcile(records: Iterable<VmRecord>, host: string): void {
    if (this.closed || this.perConfig <= 0) return;
    const shells = listShells().filter((s) => s.owner === this.owner);
    for (const s of shells) {
      if (s.live) continue;
      // No state yet: its supervisor is still starting (given a minute before it counts as debris).
      if (!s.state && Date.now() - s.createdAt < 60_000) continue;
      if (s.state) this.log.warn({ shell: s.id, key: s.key, reason: s.state.reason ?? s.state.lifecycle }, 'idle restore shell died: replacing it');
      removeShell(s.id);
    }
    const wanted = this.wanted(records, host);
    const plan = new Map<string, number>();
    let total = 0;
    for (const c of wanted) {
      const n = Math.min(this.perConfig, this.max - total);
      if (n <= 0) break;
      plan.set(shellKey(c), n);
      total += n;
    }
    const live = shells.filter((s) => s.live || (!s.state && Date.now() - s.createdAt < 60_000));
    const have = new Map<string, ShellInfo[]>();
    for (const s of live) have.set(s.key, [...(have.get(s.key) ?? []), s]);
    for (const [key, list] of have) {
      const surplus = list.filter((s) => s.idle).slice(plan.get(key) ?? 0);
      for (const s of surplus) {
        this.log.info({ shell: s.id, key }, 'restore shell no longer wanted: stopping it');
        stopShellNow(s.id);
      }
    }
    if (this.starting) return;
    const missing = wanted.find((c) => {
      const k = shellKey(c);
      const f = this.failures.get(k);
      return (have.get(k)?.length ?? 0) < (plan.get(k) ?? 0) && !(f && Date.now() < f.until);
    });
    if (!missing) return;
    this.starting = true;
    const key = shellKey(missing);
    const t0 = performance.now();
    void startShell(missing, { owner: this.owner })
      .then((s) => {
        this.failures.delete(key);
        this.log.info({ shell: s.id, key, startMs: Math.round(performance.now() - t0) }, 'restore shell ready');
        // Closed while it started: it must not outlive the agent.
        if (this.closed) stopShellNow(s.id);
      })
      .catch((err: unknown) => {
        const f = this.failures.get(key) ?? { count: 0, until: 0 };
        f.count++;
        f.until = Date.now() + Math.min(60_000, 1000 * 2 ** f.count);
        this.failures.set(key, f);
        this.log.error({ key, err: (err as Error).message, retryInMs: f.until - Date.now() }, 'restore shell did not start');
      })
      .finally(() => { this.starting = false; });
  }

  /** Stop every shell (agent stopping): an idle shell also ends itself when the agent's process dies. */
  async close(): Promise<void> {
    this.closed = true;
    for (let i = 0; i < 200 && this.starting; i++) await new Promise((r) => setTimeout(r, 50));
    for (const s of listShells()) if (s.owner === this.owner) stopShellNow(s.id);
  }
}
