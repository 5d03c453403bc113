// Scaling with VM size: full checkpoint, pause at a fixed dirty rate, restore spawn → running, memory complete; and the memory held elsewhere.
import { protectVm, unprotectVm, readProtection, readCheckpointHistory } from '../../../checkpoint/index.js';
import { benchEnv, waitFor } from '../../harness.js';
import { BenchError } from '../../../errors.js';
import { sleep } from '../../../util/sleep.js';
import { bootMemcheck, fullWorkingSetMb, killAndRestore, stopQuietly } from '../memcheck-guest.js';
import { ProcSampler } from '../proc-stats.js';
import type { Part } from '../part.js';
import type { RestoreResult } from '../../../restore/index.js';

/** Dirty rate held constant across sizes, so the pause shows what grows with RAM alone. */
export const SIZE_DIRTY_RATE_MB = 32;
export const SIZE_INTERVAL_MS = 1000;

export interface SizeSample {
  sizeGb: number;
  memoryMb: number;
  workingSetMb: number;
  round: number;
  bootMs: number;
  fullCheckpointMs: number | null;
  fullCheckpointMb: number | null;
  /** Raw per-checkpoint values of the incremental checkpoints of this round. */
  pauseMs: number[];
  commitMs: number[];
  checkpointMb: number[];
  /** Memory held by the store process and by the VM's checkpointer while the VM is protected (max over the round). */
  storeRssMb: number | null;
  storeRssAnonMb: number | null;
  checkpointerRssMb: number | null;
  checkpointerRssAnonMb: number | null;
  restore: { spawnToRunningMs: number; deviceLoadMs: number; killToRunningMs: number; completeAfterRunningMs: number | null } | null;
}

export const sizePart: Part<SizeSample> = {
  id: 'size',
  title: 'Scaling with VM size',
  // Filling, copying and paging memory dominate: a round costs about its size plus a constant.
  // Measured here: about 15 s per round plus 9 s per GB (boot and fill, full checkpoint, restore, memory complete).
  plan: (o) => ({ samples: o.sizesGb.length * o.restoreRounds, estimateS: 10, weights: o.sizesGb.flatMap((g) => Array<number>(o.restoreRounds).fill(1.5 + g)) }),
  async run({ opts, progress }) {
    const samples: SizeSample[] = [];
    const errors: { what: string; error: string }[] = [];
    const env = await benchEnv('eval-size');
    try {
      for (const sizeGb of opts.sizesGb) {
        const memoryMb = Math.round(sizeGb * 1024);
        const workingSetMb = fullWorkingSetMb(memoryMb);
        const name = `eval-size-${memoryMb}`;
        let restored: RestoreResult | undefined;
        try {
          progress.log(`${sizeGb} GB guest: booting, memcheck fills ${workingSetMb} MB`);
          const { bootMs } = await bootMemcheck({ name, memoryMb, workingSetMb, rateMb: SIZE_DIRTY_RATE_MB });
          for (let round = 1; round <= opts.restoreRounds; round++) {
            progress.startSample(`${sizeGb} GB round ${round}`);
            const store = new ProcSampler(env.store.proc.pid);
            const prot = await protectVm({ vm: name, store: env.store.address, intervalMs: SIZE_INTERVAL_MS, generation: round }, undefined, 600_000);
            const ckpt = new ProcSampler(prot.pid);
            const target = opts.checkpoints + 1;
            await waitFor(`${opts.checkpoints} incremental checkpoints of ${name}`, () => {
              const p = readProtection(name);
              if (p?.state === 'failed') throw new BenchError('HYDRA_BENCH_PROTECT_FAILED', `protection of ${name} failed: ${p.reason}`);
              return (p?.committedEpoch ?? 0) >= target;
            }, 60_000 + opts.checkpoints * 10_000, 200);
            const storeUse = store.stop();
            const ckptUse = ckpt.stop();
            const hist = readCheckpointHistory(name).filter((h) => h.generation === round && h.kind === 'incremental');
            const last = round === opts.restoreRounds;
            let r: SizeSample['restore'] = null;
            // Checkpointing stops first (the image stays in the store), so no checkpointer races the restored QEMU.
            await unprotectVm(name);
            const fo = await killAndRestore(name, env.store.address, env.storeDir, 60_000 + memoryMb * 60);
            restored = fo.restore;
            r = { spawnToRunningMs: fo.restore.timings.spawnToRunningMs, deviceLoadMs: fo.restore.timings.deviceLoadMs, killToRunningMs: fo.killToRunningMs, completeAfterRunningMs: fo.completeAfterRunningMs };
            const s: SizeSample = {
              sizeGb, memoryMb, workingSetMb, round, bootMs,
              fullCheckpointMs: prot.initialCopy?.ms ?? null,
              fullCheckpointMb: prot.initialCopy ? prot.initialCopy.bytesTotal / 2 ** 20 : null,
              pauseMs: hist.map((h) => h.pauseMs),
              commitMs: hist.map((h) => h.commitMs),
              checkpointMb: hist.map((h) => h.bytes / 2 ** 20),
              storeRssMb: storeUse.rssMbMax, storeRssAnonMb: storeUse.rssAnonMbMax,
              checkpointerRssMb: ckptUse.rssMbMax, checkpointerRssAnonMb: ckptUse.rssAnonMbMax,
              restore: r,
            };
            samples.push(s);
            progress.endSample(`full ckpt ${s.fullCheckpointMs?.toFixed(0)} ms, pause median ${median(s.pauseMs)?.toFixed(1)} ms, spawn→running ${r.spawnToRunningMs.toFixed(0)} ms, memory complete ${r.completeAfterRunningMs?.toFixed(0) ?? 'not'} ms after running`);
            if (!last) {
              if (r.completeAfterRunningMs === null) {
                progress.log(`${name}: memory not complete in time; the next round boots afresh`);
                await stopQuietly(name, restored);
                restored = undefined;
                await bootMemcheck({ name, memoryMb, workingSetMb, rateMb: SIZE_DIRTY_RATE_MB });
              } else {
                // Let the restored guest's post-restore verification settle before the next protection.
                await sleep(2000);
              }
            }
          }
        } catch (err) {
          // One size failing (the largest may not fit a loaded host) leaves the others standing; the report names it.
          errors.push({ what: `${sizeGb} GB VM`, error: (err as Error).message });
          progress.log(`${sizeGb} GB failed: ${(err as Error).message}`);
        } finally {
          // Cleanup: the protection and VM may already be gone.
          await unprotectVm(name).catch(() => undefined);
          await stopQuietly(name, restored);
        }
      }
    } finally {
      await env.close();
    }
    return { config: { sizesGb: opts.sizesGb, dirtyRateMb: SIZE_DIRTY_RATE_MB, intervalMs: SIZE_INTERVAL_MS, checkpointsPerRound: opts.checkpoints, rounds: opts.restoreRounds, restoreMode: 'network, prefetch on', guest: 'memcheck over all RAM but 8 % + 112 MB' }, samples, errors };
  },
};

function median(xs: number[]): number | null {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 2)]!;
}
