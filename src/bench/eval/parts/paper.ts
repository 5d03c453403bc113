// The paper's Figures 2-4 and Table II on its own two workloads inside the Debian guest (waits until that image and CoW land).
import { protectVm, unprotectVm, readCheckpointHistory } from '../../../checkpoint/index.js';
import { restoreVm, type RestoreMode } from '../../../restore/index.js';
import { startVm, readState, isLive } from '../../../vm/index.js';
import { benchEnv, type BenchEnv } from '../../harness.js';
import { debianSpec, WorkloadWatch } from '../debian-guest.js';
import { DEBIAN_WORKLOADS, missing, NEED_TEXT, type DebianWorkload, type Need } from '../workloads.js';
import { stopQuietly, waitFor } from '../memcheck-guest.js';
import type { Part, PartContext } from '../part.js';
import type { CheckpointStats } from '../../../checkpoint/index.js';

export const PAPER_INTERVALS_S = [1, 2, 5, 10];

export type PaperSample =
  | { figure: 'baseline'; workload: string; runS: number }
  | { figure: 'fig2-3'; workload: string; mode: 'basic' | 'cow'; intervalS: number; runS: number; checkpointsPerS: number; pauses: Pick<CheckpointStats, 'pauseMs' | 'stopMs' | 'collectMs' | 'copyMs' | 'devstateMs' | 'contMs' | 'bytes'>[] }
  | { figure: 'fig4'; workload: string; mode: RestoreMode; detectMs: number; prepareMs: number; spawnToRunningMs: number; deviceLoadMs: number; killToRunningMs: number }
  | { figure: 'table2'; workload: string; config: 'never failed' | 'file' | 'network' | 'network, no prefetch'; lastHalfS: number };

const ROWS: { figure: string; needs: Need[] }[] = [
  { figure: 'Figure 2 (pause per phase) and Figure 3 (overhead, checkpoints per second), basic', needs: ['debian-image', 'debian-workloads'] },
  { figure: 'Figure 2 and Figure 3, copy-on-write', needs: ['debian-image', 'debian-workloads', 'cow'] },
  { figure: 'Figure 4 (fail-over time split)', needs: ['debian-image', 'debian-workloads'] },
  { figure: 'Table II (last 50 % after a slim restore vs never failed)', needs: ['debian-image', 'debian-workloads'] },
];

async function boot(w: DebianWorkload, name: string): Promise<WorkloadWatch> {
  const watch = new WorkloadWatch(name);
  await startVm(debianSpec(name, w));
  await watch.started(300_000);
  return watch;
}

async function runOnce(ctx: PartContext, env: BenchEnv, w: DebianWorkload, mode: 'basic' | 'cow' | null, intervalS: number, gen: number): Promise<PaperSample> {
  const name = `eval-${w.id}`;
  const watch = await boot(w, name);
  try {
    if (mode) await protectVm({ vm: name, store: env.store.address, intervalMs: intervalS * 1000, generation: gen, cow: mode === 'cow' ? {} : false });
    const start = watch.lines.find((l) => l.kind === 'start')!;
    const done = await watch.finished(w.expectedS * 4000);
    const runS = (done.t - start.t) / 1000;
    if (!mode) return { figure: 'baseline', workload: w.id, runS };
    const hist = readCheckpointHistory(name).filter((h) => h.generation === gen && h.kind === 'incremental');
    return { figure: 'fig2-3', workload: w.id, mode, intervalS, runS, checkpointsPerS: hist.length / runS, pauses: hist.map(({ pauseMs, stopMs, collectMs, copyMs, devstateMs, contMs, bytes }) => ({ pauseMs, stopMs, collectMs, copyMs, devstateMs, contMs, bytes })) };
  } finally {
    watch.close();
    // Cleanup: protection and VM may already be gone.
    await unprotectVm(name).catch(() => undefined);
    await stopQuietly(name);
  }
}

/** Fail at 50 %, restore, and time the remaining half (Table II) and the fail-over split (Figure 4). */
async function failOver(env: BenchEnv, w: DebianWorkload, mode: RestoreMode, prefetch: boolean, gen: number): Promise<PaperSample[]> {
  const name = `eval-${w.id}-fo`;
  const watch = await boot(w, name);
  try {
    await protectVm({ vm: name, store: env.store.address, intervalMs: 2000, generation: gen });
    await watch.reached(0.5, w.expectedS * 4000);
    // A checkpoint after the halfway line, so the restored VM resumes at about 50 %.
    const epoch = readCheckpointHistory(name).length;
    await waitFor(`a checkpoint of ${name} after 50 %`, () => readCheckpointHistory(name).length > epoch, 60_000, 50);
    await unprotectVm(name);
    const tKill = performance.now();
    process.kill(readState(name)!.qemuPid!, 'SIGKILL');
    const tDetect = await waitFor(`${name} recorded crashed`, () => readState(name)?.lifecycle === 'crashed', 20_000, 10);
    await waitFor(`${name} supervisor gone`, () => !isLive(readState(name)), 20_000, 5);
    const tCall = performance.now();
    const r = await restoreVm({ vm: name, store: env.store.address, secret: process.env.HYDRAVM_SECRET!, mode, storeDir: env.storeDir, prefetch });
    const tRun = tCall + r.timings.totalMs;
    const done = await watch.until('the workload to finish after the restore', (x) => x.lines.find((l) => l.kind === 'done' && l.t > tRun), w.expectedS * 4000);
    const config = mode === 'file' ? 'file' : prefetch ? 'network' : 'network, no prefetch';
    const out: PaperSample[] = [{ figure: 'table2', workload: w.id, config, lastHalfS: (done.t - tRun) / 1000 }];
    if (prefetch) out.push({ figure: 'fig4', workload: w.id, mode, detectMs: tDetect - tKill, prepareMs: r.timings.prepareMs, spawnToRunningMs: r.timings.spawnToRunningMs, deviceLoadMs: r.timings.deviceLoadMs, killToRunningMs: tRun - tKill });
    await r.pager?.stop();
    return out;
  } finally {
    watch.close();
    // Cleanup: protection and VM may already be gone.
    await unprotectVm(name).catch(() => undefined);
    await stopQuietly(name);
  }
}

async function neverFailed(w: DebianWorkload): Promise<PaperSample> {
  const name = `eval-${w.id}-ref`;
  const watch = await boot(w, name);
  try {
    const half = await watch.reached(0.5, w.expectedS * 4000);
    const done = await watch.finished(w.expectedS * 4000);
    return { figure: 'table2', workload: w.id, config: 'never failed', lastHalfS: (done.t - half.t) / 1000 };
  } finally {
    watch.close();
    await stopQuietly(name);
  }
}

export const paperPart: Part<PaperSample> = {
  id: 'paper',
  title: "The paper's Figures 2-4 and Table II (kernel-style compile, ffmpeg transcode, Debian guest)",
  plan: (o, caps) => ({ samples: !caps.debianWorkloads ? 0 : DEBIAN_WORKLOADS.length * (1 + (o.quick ? 1 : PAPER_INTERVALS_S.length) * 2 + 4), estimateS: 600 }),
  async run(ctx) {
    const { caps, opts, progress } = ctx;
    const waiting = ROWS.map((r) => ({ what: r.figure, needs: missing(r.needs, caps).map((n) => NEED_TEXT[n]) })).filter((r) => r.needs.length);
    const config = { workloads: DEBIAN_WORKLOADS.map((w) => ({ id: w.id, title: w.title, paper: w.paper, memoryMb: w.memoryMb, packages: w.packages, script: w.script })), intervalsS: opts.quick ? [2] : PAPER_INTERVALS_S, modes: caps.modes };
    if (!caps.debianWorkloads) return { config, samples: [], waitingFor: missing(['debian-image', 'debian-workloads'], caps).map((n) => NEED_TEXT[n]), waiting };
    const samples: PaperSample[] = [];
    const env = await benchEnv('eval-paper');
    let gen = 0;
    try {
      for (const w of DEBIAN_WORKLOADS) {
        progress.startSample(`${w.id}: unprotected`);
        samples.push(await runOnce(ctx, env, w, null, 0, 0));
        progress.endSample('done');
        for (const mode of caps.modes) {
          for (const intervalS of config.intervalsS) {
            progress.startSample(`${w.id}: ${mode} every ${intervalS} s`);
            samples.push(await runOnce(ctx, env, w, mode, intervalS, ++gen));
            progress.endSample('done');
          }
        }
        progress.startSample(`${w.id}: never failed (Table II reference)`);
        samples.push(await neverFailed(w));
        progress.endSample('done');
        for (const [mode, prefetch] of [['file', true], ['network', true], ['network', false]] as const) {
          progress.startSample(`${w.id}: fail-over at 50 %, ${mode}${prefetch ? '' : ', no prefetch'}`);
          samples.push(...(await failOver(env, w, mode, prefetch, ++gen)));
          progress.endSample('done');
        }
      }
    } finally {
      await env.close();
    }
    return { config, samples, waiting };
  },
};
