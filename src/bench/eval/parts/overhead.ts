// Protection overhead: memcheck's throughput on the same VM, unprotected and protected, alternating.
import { protectVm, unprotectVm, readCheckpointHistory } from '../../../checkpoint/index.js';
import { benchEnv } from '../../harness.js';
import { sleep } from '../../../util/sleep.js';
import { bootMemcheck, stepsPerSecond, stopQuietly } from '../memcheck-guest.js';
import type { Part } from '../part.js';
import { NEED_TEXT } from '../workloads.js';

export const OVERHEAD_MEMORY_MB = 512;
export const OVERHEAD_WORKING_SET_MB = 64;
/** The paper's overhead figure used a 2 s interval. */
export const OVERHEAD_INTERVAL_MS = 2000;

export interface OverheadSample {
  round: number;
  mode: 'basic' | 'cow';
  unprotectedStepsPerS: number | null;
  protectedStepsPerS: number | null;
  checkpoints: number;
  pauseMs: number[];
  checkpointMb: number[];
}

export const overheadPart: Part<OverheadSample> = {
  id: 'overhead',
  title: 'Protection overhead (memcheck, same VM unprotected vs protected)',
  plan: (o, caps) => ({ samples: o.overheadRounds * caps.modes.length, estimateS: 2 * o.windowS + 15 }),
  async run({ opts, progress, caps }) {
    const samples: OverheadSample[] = [];
    const env = await benchEnv('eval-overhead');
    const name = 'eval-overhead';
    try {
      progress.log('booting the 512 MB memcheck guest (unthrottled writer over 64 MB)');
      await bootMemcheck({ name, memoryMb: OVERHEAD_MEMORY_MB, workingSetMb: OVERHEAD_WORKING_SET_MB, rateMb: 0 });
      await sleep(2000);
      let generation = 0;
      for (let round = 1; round <= opts.overheadRounds; round++) {
        for (const mode of caps.modes) {
          progress.startSample(`round ${round}, ${mode}: ${opts.windowS} s unprotected, then ${opts.windowS} s protected every ${OVERHEAD_INTERVAL_MS / 1000} s`);
          const unprotectedStepsPerS = await stepsPerSecond(name, opts.windowS);
          generation++;
          // Each mode explicitly, whatever the VM's spec says.
          await protectVm({ vm: name, store: env.store.address, intervalMs: OVERHEAD_INTERVAL_MS, generation, cow: mode === 'cow' ? {} : false });
          const from = Date.now();
          const protectedStepsPerS = await stepsPerSecond(name, opts.windowS);
          await unprotectVm(name);
          const hist = readCheckpointHistory(name).filter((h) => h.generation === generation && h.kind === 'incremental' && h.startedAt >= from);
          const s: OverheadSample = { round, mode, unprotectedStepsPerS, protectedStepsPerS, checkpoints: hist.length, pauseMs: hist.map((h) => h.pauseMs), checkpointMb: hist.map((h) => h.bytes / 2 ** 20) };
          samples.push(s);
          const pct = unprotectedStepsPerS && protectedStepsPerS !== null ? (1 - protectedStepsPerS / unprotectedStepsPerS) * 100 : null;
          progress.endSample(`${unprotectedStepsPerS?.toFixed(1)} → ${protectedStepsPerS?.toFixed(1)} steps/s (overhead ${pct?.toFixed(1)} %), ${hist.length} checkpoints`);
        }
      }
    } finally {
      // Cleanup: the protection and VM may already be gone.
      await unprotectVm(name).catch(() => undefined);
      await stopQuietly(name);
      await env.close();
    }
    const waiting = caps.cow ? [] : [{ what: 'overhead with copy-on-write checkpoints', needs: [NEED_TEXT.cow] }];
    return { config: { memoryMb: OVERHEAD_MEMORY_MB, workingSetMb: OVERHEAD_WORKING_SET_MB, rateMb: 0, intervalMs: OVERHEAD_INTERVAL_MS, windowS: opts.windowS, rounds: opts.overheadRounds, modes: caps.modes }, samples, waiting };
  },
};
