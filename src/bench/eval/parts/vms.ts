// Scaling with the number of VMs protected to one store: commit latency, achieved interval, store RSS and CPU.
import { protectVm, unprotectVm, readCheckpointHistory } from '../../../checkpoint/index.js';
import { benchEnv } from '../../harness.js';
import { sleep } from '../../../util/sleep.js';
import { bootMemcheck, stopQuietly } from '../memcheck-guest.js';
import { ProcSampler } from '../proc-stats.js';
import type { Part } from '../part.js';

export const VMS_MEMORY_MB = 512;
export const VMS_WORKING_SET_MB = 64;
export const VMS_RATE_MB = 16;
export const VMS_INTERVAL_MS = 1000;

export interface VmsSample {
  vms: number;
  windowS: number;
  /** Raw per-checkpoint values over the window, all VMs together. */
  commitMs: number[];
  intervalMs: number[];
  pauseMs: number[];
  checkpointMb: number[];
  checkpointsPerVm: number[];
  storeRssMb: number | null;
  storeRssAnonMb: number | null;
  /** Store CPU over the window, % of one core. */
  storeCpuPct: number | null;
}

export const vmsPart: Part<VmsSample> = {
  id: 'vms',
  title: 'Scaling with VMs per store',
  plan: (o) => ({ samples: o.vmCounts.length, estimateS: 20 + o.windowS / 2, weights: o.vmCounts.map((n) => 1 + n) }),
  async run({ opts, progress }) {
    const samples: VmsSample[] = [];
    const errors: { what: string; error: string }[] = [];
    for (const n of opts.vmCounts) {
      progress.startSample(`${n} VM${n > 1 ? 's' : ''} on one store`);
      // A fresh store per count, so its RSS is that of n VMs only.
      const env = await benchEnv('eval-vms');
      const names = Array.from({ length: n }, (_, i) => `eval-vms${n}-${i + 1}`);
      try {
        for (const name of names) await bootMemcheck({ name, memoryMb: VMS_MEMORY_MB, workingSetMb: VMS_WORKING_SET_MB, rateMb: VMS_RATE_MB });
        for (const name of names) await protectVm({ vm: name, store: env.store.address, intervalMs: VMS_INTERVAL_MS, generation: 1 });
        // Let every VM's first incremental checkpoints pass before the window opens.
        await sleep(3000);
        const from = Date.now();
        const store = new ProcSampler(env.store.proc.pid);
        await sleep(opts.windowS * 1000);
        const use = store.stop();
        const hists = names.map((name) => readCheckpointHistory(name).filter((h) => h.kind === 'incremental' && h.startedAt >= from));
        const all = hists.flat();
        const s: VmsSample = {
          vms: n, windowS: opts.windowS,
          commitMs: all.map((h) => h.commitMs),
          intervalMs: all.map((h) => h.intervalMs).filter((v): v is number => v !== null),
          pauseMs: all.map((h) => h.pauseMs),
          checkpointMb: all.map((h) => h.bytes / 2 ** 20),
          checkpointsPerVm: hists.map((h) => h.length),
          storeRssMb: use.rssMbMax, storeRssAnonMb: use.rssAnonMbMax, storeCpuPct: use.cpuPct,
        };
        samples.push(s);
        progress.endSample(`${all.length} checkpoints, commit median ${med(s.commitMs)?.toFixed(0)} ms, interval median ${med(s.intervalMs)?.toFixed(0)} ms, store RSS ${s.storeRssMb?.toFixed(0)} MB, CPU ${s.storeCpuPct?.toFixed(0)} %`);
      } catch (err) {
        // One count failing (8 TCG guests may starve on 2 cores) leaves the others standing; the report names it.
        errors.push({ what: `${n} VMs per store`, error: (err as Error).message });
        progress.endSample(`failed: ${(err as Error).message}`);
      } finally {
        // Cleanup: protections and VMs may already be gone.
        for (const name of names) await unprotectVm(name).catch(() => undefined);
        for (const name of names) await stopQuietly(name);
        await env.close();
      }
    }
    return { config: { vmCounts: opts.vmCounts, memoryMb: VMS_MEMORY_MB, workingSetMb: VMS_WORKING_SET_MB, rateMb: VMS_RATE_MB, intervalMs: VMS_INTERVAL_MS, windowS: opts.windowS }, samples, errors };
  },
};

export function med(xs: number[]): number | null {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 2)]!;
}
