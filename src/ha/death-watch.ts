// The agent's death loop: notices at once when one of its VMs' QEMU dies (or its protection is up) and tells etcd.
import fs from 'node:fs';
import { localShellConfig } from '../vm/index.js';
import type { AgentCore } from './agent-core.js';
import type { VmRecord } from './cluster.js';
import { localGeneration, readLocalVm, vmDeath, type LocalVm } from './local-vm.js';

/**
 * Watches its VMs' state.json every poll (and by inotify) and reports a QEMU
 * death to etcd at once (state `crashed`), without waiting for any lease.
 */
export class DeathWatch {
  private reporting = new Set<string>();
  private reported = new Set<string>();
  private fsWatchers = new Map<string, fs.FSWatcher>();

  constructor(private readonly core: AgentCore) {}

  /** Deaths and protection progress of this host's VMs; `busy` VMs (an assignment runs) are skipped. */
  scan(records: ReadonlyMap<string, VmRecord>, busy: (vm: string) => boolean): void {
    const { core } = this;
    for (const [name, rec] of records) {
      if (rec.host !== core.host || busy(name)) continue;
      if (rec.state !== 'protected' && rec.state !== 'running' && rec.state !== 'protecting') continue;
      const v = readLocalVm(core.home, name);
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
  }

  /** inotify on the VM's directory: state.json is renamed into place on every change. */
  private watchDir(v: LocalVm): void {
    if (this.fsWatchers.has(v.name)) return;
    try {
      const w = fs.watch(v.dir, () => void this.core.tick());
      w.on('error', () => {
        w.close();
        this.fsWatchers.delete(v.name);
      });
      this.fsWatchers.set(v.name, w);
    } catch {
      /* polling covers it */
    }
  }

  private async reportDeath(vm: string, generation: number, kind: 'crashed' | 'stopped', failedAt: number, reason: string): Promise<void> {
    const { core } = this;
    const id = `${vm}@${generation}:${kind}`;
    if (this.reporting.has(id) || this.reported.has(id)) return;
    this.reporting.add(id);
    const detectedAt = Date.now();
    try {
      const written = await core.cluster.updateVm(vm, (cur) =>
        cur.host === core.host && cur.generation === generation && (cur.state === 'protected' || cur.state === 'running' || cur.state === 'protecting')
          ? { ...cur, state: kind, reason, failedAt, detectedAt }
          : undefined);
      this.reported.add(id);
      if (written) {
        core.log.warn({ vm, generation, kind, reason, detectionMs: detectedAt - failedAt }, 'VM death reported');
        core.emit('reported', { vm, state: kind, generation, detectedAt, failedAt });
      }
    } catch (err) {
      core.log.warn({ vm, err: (err as Error).message }, 'cannot report VM death yet');
    } finally {
      this.reporting.delete(id);
    }
  }

  /** Record in etcd that the VM's current generation is protected (once). */
  async reportProtected(vm: string, generation: number): Promise<void> {
    const { core } = this;
    const id = `${vm}@${generation}:protected`;
    if (this.reporting.has(id) || this.reported.has(id)) return;
    this.reporting.add(id);
    try {
      await core.cluster.updateVm(vm, (cur) =>
        cur.host === core.host && cur.generation === generation && cur.state === 'running'
          ? { ...cur, state: 'protected', imageGeneration: generation, attempts: 0, failedHosts: [], reason: undefined, shellConfig: localShellConfig(vm) }
          : undefined);
      await core.cluster.mergeTiming(vm, generation, { protectedAt: Date.now() });
      this.reported.add(id);
      core.emit('protected', { vm, generation });
    } catch {
      /* next tick */
    } finally {
      this.reporting.delete(id);
    }
  }

  close(): void {
    for (const w of this.fsWatchers.values()) w.close();
    this.fsWatchers.clear();
  }
}
