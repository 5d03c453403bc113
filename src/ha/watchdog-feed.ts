// The agent's side of the VM watchdogs: after each proof of its lease, it feeds every guarded VM's watchdog.json.
import fs from 'node:fs';
import path from 'node:path';
import { monoNow, writeWatchdogFeed, type WatchdogFeed } from '../vm/index.js';
import type { AgentCore } from './agent-core.js';
import type { HwWatchdog } from './hw-watchdog.js';
import { listLocalVms, type LocalVm } from './local-vm.js';

/** What the agent wants for one local VM: kept alive with the lease, killed now, or left out of HA. */
export type WatchdogVerdict = { kind: 'guard' } | { kind: 'revoke'; reason: string } | { kind: 'none' };

export interface FeederOptions {
  /**
   * The supervisor kills QEMU this long before the lease could expire at
   * etcd: it must exceed the supervisor's poll period (50 ms) plus the time
   * a SIGKILL takes, with room for a loaded machine.
   */
  marginMs: number;
  classify(v: LocalVm): WatchdogVerdict;
  hw?: HwWatchdog;
}

/**
 * Proxmox's watchdog-mux, per VM and without a daemon of its own: the agent
 * writes HOME/vms/NAME/watchdog.json (see src/vm/watchdog.ts) with a deadline
 * of `proof + TTL - margin` in monotonic time each time etcd acknowledges its
 * lease, and the VM's supervisor kills QEMU once that deadline passes. An
 * agent that dies, hangs or loses etcd stops feeding, so its VMs die before
 * the lease can expire and the manager restores them elsewhere.
 */
export class WatchdogFeeder {
  private proof: { sentMono: number; ttlMs: number } | undefined;
  /** What was last written per VM (deadline, or the revocation), to write only on change between proofs. */
  private written = new Map<string, string>();
  private broken: string | undefined;

  constructor(private readonly core: AgentCore, private readonly opts: FeederOptions) {}

  /** etcd acknowledged the lease for a keepalive sent at `sentMono`: feed every guarded VM. */
  proven(sentMono: number, ttlMs: number): void {
    if (this.proof && sentMono < this.proof.sentMono) return;
    this.proof = { sentMono, ttlMs };
    this.broken = undefined;
    this.opts.hw?.feed(sentMono, ttlMs);
    this.feed(true);
  }

  /**
   * The lease this agent proved is gone at etcd (expired): whatever it
   * guarded may be restored elsewhere now, so every guarded VM is revoked;
   * a new lease does not revive them.
   */
  leaseLost(reason: string): void {
    this.broken = reason;
    this.proof = undefined;
    this.feed(true);
  }

  /**
   * Bring every local VM's watchdog.json in line with its verdict. `all`
   * rewrites every guarded feed (a new proof); otherwise only missing or
   * changed ones are written (a VM appeared, was revoked or left HA).
   */
  feed(all = false): void {
    const { core } = this;
    for (const v of listLocalVms(core.home)) {
      const file = path.join(v.dir, 'watchdog.json');
      let verdict = this.opts.classify(v);
      if (verdict.kind === 'guard' && this.broken) verdict = { kind: 'revoke', reason: this.broken };
      if (verdict.kind === 'none') {
        if (this.written.delete(v.name) || fs.existsSync(file)) fs.rmSync(file, { force: true });
        continue;
      }
      if (!v.live) continue;
      let feed: WatchdogFeed;
      if (verdict.kind === 'guard') {
        // No proof yet (agent just started): a feed left by an earlier agent keeps its own deadline.
        if (!this.proof) continue;
        const { sentMono, ttlMs } = this.proof;
        feed = this.feedOf(v, { proofMono: sentMono, ttlMs, deadlineMono: sentMono + ttlMs - this.opts.marginMs });
      } else {
        feed = this.feedOf(v, { proofMono: this.proof?.sentMono ?? 0, ttlMs: this.proof?.ttlMs ?? 0, deadlineMono: 0, revoked: verdict.reason });
      }
      const sig = `${feed.deadlineMono}|${feed.revoked ?? ''}`;
      if (!all && this.written.get(v.name) === sig && fs.existsSync(file)) continue;
      if (verdict.kind === 'revoke' && this.written.get(v.name) === sig && fs.existsSync(file)) continue;
      try {
        writeWatchdogFeed(file, feed);
        this.written.set(v.name, sig);
        if (verdict.kind === 'revoke') core.log.warn({ vm: v.name, reason: verdict.reason }, 'watchdog revoked');
      } catch (err) {
        // The VM's directory went away (removed or being replaced): the next feed writes it again.
        core.log.warn({ vm: v.name, err: (err as Error).message }, 'cannot write watchdog feed');
      }
    }
  }

  private feedOf(v: LocalVm, t: Pick<WatchdogFeed, 'proofMono' | 'ttlMs' | 'deadlineMono' | 'revoked'>): WatchdogFeed {
    return {
      vm: v.name,
      host: this.core.host,
      generation: v.ha?.generation ?? 0,
      ...t,
      agentPid: process.pid,
      writtenAt: new Date().toISOString(),
    };
  }

  /** Remaining life of the current proof, ms (negative: starved). */
  remainingMs(): number {
    return this.proof ? this.proof.sentMono + this.proof.ttlMs - this.opts.marginMs - monoNow() : -1;
  }
}
