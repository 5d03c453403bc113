// The paper's Figures 2-4 and Table II on its own two workloads (a compile, a transcode) inside the Debian workload image.
import { protectVm, unprotectVm, readCheckpointHistory, readProtection, type CheckpointStats } from '../../../checkpoint/index.js';
import { restoreVm, type RestoreMode, type RestoreResult, type RestoreTimings } from '../../../restore/index.js';
import { startVm, readState, isLive } from '../../../vm/index.js';
import { buildDebianImage, findDebianImage, type BuiltImage } from '../../../image/index.js';
import { BenchError } from '../../../errors.js';
import { benchEnv, type BenchEnv } from '../../harness.js';
import { debianSpec, WorkloadWatch } from '../debian-guest.js';
import { DEBIAN_WORKLOADS, TRANSCODE, missing, NEED_TEXT, type DebianWorkload, type Need } from '../workloads.js';
import { stopQuietly, waitFor } from '../memcheck-guest.js';
import type { Part, PartContext } from '../part.js';

export const PAPER_INTERVALS_S = [1, 2, 5, 10];
/** The interval of the fail-over runs (the paper's Table II does not name one; its overhead figure centres on 2 s). */
export const FAILOVER_INTERVAL_S = 2;
/** Boot of the Debian guest to the workload's start line, under TCG on a loaded host. */
const BOOT_TIMEOUT_MS = 400_000;

export type FailoverConfig = 'file' | 'network' | 'network, no prefetch';
const FAILOVERS: { config: FailoverConfig; mode: RestoreMode; prefetch: boolean }[] = [
  { config: 'file', mode: 'file', prefetch: true },
  { config: 'network', mode: 'network', prefetch: true },
  { config: 'network, no prefetch', mode: 'network', prefetch: false },
];

/** One checkpoint's pause and its phases (Figure 2), from the checkpointer's history. */
export type PausePhases = Pick<CheckpointStats, 'pauseMs' | 'stopMs' | 'collectMs' | 'copyMs' | 'devstateMs' | 'diskMs' | 'contMs' | 'bytes' | 'commitMs'> & { cowCopies?: number; faults?: number };

export interface UnprotectedSample {
  figure: 'unprotected';
  workload: string;
  scale: number;
  bootS: number;
  runS: number;
  /** The last 50 %: from the first step line at or past half the job to its end (Table II's never-failed row). */
  lastHalfS: number;
  /** [seconds since start, fraction done] at each step line: the reference for a restored run resuming at any fraction. */
  timeline: [number, number][];
}

export interface ProtectedSample {
  figure: 'protected';
  workload: string;
  scale: number;
  mode: 'basic' | 'cow';
  intervalS: number;
  runS: number;
  /** Whether the initial full copy had finished before the job started (else it overlapped the job's first seconds). */
  protectedBeforeStart: boolean;
  fullCheckpointMs: number | null;
  checkpoints: number;
  checkpointsPerS: number;
  pauses: PausePhases[];
}

export interface FailoverSample {
  figure: 'failover';
  workload: string;
  scale: number;
  config: FailoverConfig;
  intervalS: number;
  /** Fraction of the job done at the restored checkpoint's pause. */
  resumedAt: number;
  /** From the restored guest running to the job's end. */
  remainingS: number;
  /** The unprotected run's time from the same fraction to its end (null without one). */
  referenceS: number | null;
  /** Figure 4: QEMU killed → crash recorded by the VM's supervisor → supervisor gone (restore may start) → restore phases. */
  detectMs: number;
  supervisorGoneMs: number;
  timings: RestoreTimings;
  killToRunningMs: number;
  /** Network mode: from running to the pager holding every page (null: not within the run, or file mode). */
  memoryCompleteMs: number | null;
  /** Network mode: pages fetched on a fault, and by prefetch, until the job ended. */
  faultPages?: number;
  prefetchedPages?: number;
  pauses: PausePhases[];
}

export type PaperSample = UnprotectedSample | ProtectedSample | FailoverSample;

const ROWS: { figure: string; needs: Need[] }[] = [
  { figure: 'Figure 2 (pause per phase) and Figure 3 (overhead, checkpoints per second), basic', needs: ['debian-image', 'debian-workloads'] },
  { figure: 'Figure 2 and Figure 3, copy-on-write', needs: ['debian-image', 'debian-workloads', 'cow'] },
  { figure: 'Figure 4 (fail-over time split)', needs: ['debian-image', 'debian-workloads'] },
  { figure: 'Table II (last 50 % after a slim restore vs never failed)', needs: ['debian-image', 'debian-workloads'] },
];

const wallOf = (t: number) => performance.timeOrigin + t;
const runTimeoutMs = (w: DebianWorkload, scale: number) => 120_000 + w.expectedS * (scale / w.scale) * 8000;

function phases(h: CheckpointStats): PausePhases {
  const { pauseMs, stopMs, collectMs, copyMs, devstateMs, diskMs, contMs, bytes, commitMs } = h;
  return { pauseMs, stopMs, collectMs, copyMs, devstateMs, diskMs, contMs, bytes, commitMs, ...(h.cow ? { cowCopies: h.cow.cowCopies, faults: h.cow.faults } : {}) };
}

function checkpointsBetween(name: string, fromT: number, toT: number): CheckpointStats[] {
  return readCheckpointHistory(name).filter((h) => h.kind === 'incremental' && h.startedAt >= wallOf(fromT) && h.startedAt <= wallOf(toT));
}

interface Run {
  name: string;
  watch: WorkloadWatch;
  startedAt: number;
  restore?: RestoreResult;
}

async function boot(env: BenchEnv, img: BuiltImage, w: DebianWorkload, scale: number, name: string): Promise<Run> {
  const watch = new WorkloadWatch(name);
  const startedAt = performance.now();
  await startVm(debianSpec(name, img, w, scale, env.home));
  return { name, watch, startedAt };
}

async function end(run: Run): Promise<void> {
  run.watch.close();
  // Cleanup: the protection, the pager and the VM may already be gone.
  await unprotectVm(run.name).catch(() => undefined);
  await stopQuietly(run.name, run.restore);
}

async function unprotectedRun(env: BenchEnv, img: BuiltImage, w: DebianWorkload, scale: number, k: number): Promise<UnprotectedSample> {
  const run = await boot(env, img, w, scale, `ev-${w.id}-u${k}`);
  try {
    const start = await run.watch.started(BOOT_TIMEOUT_MS);
    const done = await run.watch.finished(runTimeoutMs(w, scale));
    const half = run.watch.timeOf(0.5) ?? done.t;
    const timeline = run.watch.lines.filter((l) => l.kind === 'step').map((l) => [(l.t - start.t) / 1000, l.step! / l.of!] as [number, number]);
    return { figure: 'unprotected', workload: w.id, scale, bootS: (start.t - run.startedAt) / 1000, runS: (done.t - start.t) / 1000, lastHalfS: (done.t - half) / 1000, timeline };
  } finally {
    await end(run);
  }
}

async function protectedRun(env: BenchEnv, img: BuiltImage, w: DebianWorkload, scale: number, mode: 'basic' | 'cow', intervalS: number): Promise<ProtectedSample> {
  const run = await boot(env, img, w, scale, `ev-${w.id}-${mode}-${intervalS}`);
  try {
    // Protected while it boots: the full copy is normally done before the job starts.
    const prot = await protectVm({ vm: run.name, store: env.store.address, intervalMs: intervalS * 1000, generation: 1, cow: mode === 'cow' ? {} : false }, undefined, BOOT_TIMEOUT_MS);
    const protectedAt = performance.now();
    const start = await run.watch.started(BOOT_TIMEOUT_MS);
    const done = await run.watch.finished(runTimeoutMs(w, scale));
    await unprotectVm(run.name);
    const hist = checkpointsBetween(run.name, start.t, done.t);
    const runS = (done.t - start.t) / 1000;
    return {
      figure: 'protected', workload: w.id, scale, mode, intervalS, runS, protectedBeforeStart: protectedAt <= start.t,
      fullCheckpointMs: prot.initialCopy?.ms ?? null, checkpoints: hist.length, checkpointsPerS: hist.length / runS, pauses: hist.map(phases),
    };
  } finally {
    await end(run);
  }
}

/** The unprotected run's seconds from `fraction` of the job to its end. */
function referenceFrom(ref: UnprotectedSample | undefined, fraction: number): number | null {
  if (!ref) return null;
  const at = ref.timeline.find(([, f]) => f >= fraction);
  return at ? ref.runS - at[0] : null;
}

/** Protected every 2 s, killed just after a checkpoint past 50 %, slim-restored; times the rest of the job (Table II) and the fail-over (Figure 4). */
async function failoverRun(env: BenchEnv, img: BuiltImage, w: DebianWorkload, scale: number, f: (typeof FAILOVERS)[number], ref: UnprotectedSample | undefined): Promise<FailoverSample> {
  const run = await boot(env, img, w, scale, `ev-${w.id}-fo-${f.mode}${f.prefetch ? '' : '-np'}`);
  try {
    await protectVm({ vm: run.name, store: env.store.address, intervalMs: FAILOVER_INTERVAL_S * 1000, generation: 1, cow: false }, undefined, BOOT_TIMEOUT_MS);
    const start = await run.watch.started(BOOT_TIMEOUT_MS);
    const half = await run.watch.reached(0.5, runTimeoutMs(w, scale));
    // A checkpoint that began past the halfway line, so the restored VM resumes at about 50 %.
    await waitFor(`a checkpoint of ${run.name} past 50 %`, () => {
      if (readProtection(run.name)?.state === 'failed') throw new BenchError('HYDRA_BENCH_PROTECT_FAILED', `protection of ${run.name} failed: ${readProtection(run.name)?.reason}`);
      return checkpointsBetween(run.name, half.t, performance.now() + 1e6).length > 0;
    }, 60_000 + FAILOVER_INTERVAL_S * 5000, 20);
    // Checkpointing stops first (the image stays in the store), so no checkpointer races the restored QEMU.
    await unprotectVm(run.name);
    const pauses = checkpointsBetween(run.name, start.t, performance.now() + 1e6).map(phases);
    const qemuPid = readState(run.name)?.qemuPid;
    if (!qemuPid) throw new BenchError('HYDRA_BENCH_NO_PROGRESS', `VM ${run.name} has no QEMU to kill`);
    const tKill = performance.now();
    process.kill(qemuPid, 'SIGKILL');
    const tDetect = await waitFor(`${run.name}'s supervisor to record the crash`, () => readState(run.name)?.lifecycle === 'crashed', 30_000, 5);
    const tGone = await waitFor(`${run.name}'s supervisor to exit`, () => !isLive(readState(run.name)), 30_000, 5);
    const tCall = performance.now();
    run.restore = await restoreVm({ vm: run.name, store: env.store.address, secret: process.env.HYDRAVM_SECRET!, mode: f.mode, storeDir: env.storeDir, prefetch: f.prefetch });
    const tRun = tCall + run.restore.timings.totalMs;
    const restored = readCheckpointHistory(run.name).find((h) => h.epoch === run.restore!.epoch && h.generation === run.restore!.generation);
    const resumedAt = restored ? run.watch.fractionAt(restored.startedAt - performance.timeOrigin) : run.watch.fractionAt(tKill);
    let memoryCompleteMs: number | null = null;
    const pager = run.restore.pager;
    // Resolves when the pager holds every page; it may not before the job ends (no prefetch).
    void pager?.done.then(() => { memoryCompleteMs = performance.now() - tRun; }, () => undefined);
    const done = await run.watch.finished(runTimeoutMs(w, scale), tRun);
    return {
      figure: 'failover', workload: w.id, scale, config: f.config, intervalS: FAILOVER_INTERVAL_S, resumedAt,
      remainingS: (done.t - tRun) / 1000, referenceS: referenceFrom(ref, resumedAt),
      detectMs: tDetect - tKill, supervisorGoneMs: tGone - tKill, timings: run.restore.timings, killToRunningMs: tRun - tKill,
      memoryCompleteMs, ...(pager ? { faultPages: pager.stats.faultPagesFetched, prefetchedPages: pager.stats.pagesPrefetched } : {}), pauses,
    };
  } finally {
    await end(run);
  }
}

/** What one run of the part does, in order (also the ETA's plan). */
export function paperPlan(quick: boolean, modes: ('basic' | 'cow')[]): { w: DebianWorkload; scale: number; kind: 'unprotected' | 'protected' | 'failover'; mode?: 'basic' | 'cow'; intervalS?: number; failover?: (typeof FAILOVERS)[number] }[] {
  // --quick: one short transcode, unprotected and failed over once (network), as a smoke of the whole path.
  if (quick) return [{ w: TRANSCODE, scale: TRANSCODE.quickScale, kind: 'unprotected' }, { w: TRANSCODE, scale: TRANSCODE.quickScale, kind: 'failover', failover: FAILOVERS[1] }];
  return DEBIAN_WORKLOADS.flatMap((w) => [
    { w, scale: w.scale, kind: 'unprotected' as const },
    ...modes.flatMap((mode) => PAPER_INTERVALS_S.map((intervalS) => ({ w, scale: w.scale, kind: 'protected' as const, mode, intervalS }))),
    ...FAILOVERS.map((failover) => ({ w, scale: w.scale, kind: 'failover' as const, failover })),
  ]);
}

export const paperPart: Part<PaperSample> = {
  id: 'paper',
  title: "The paper's Figures 2-4 and Table II (compile, ffmpeg transcode, Debian guest)",
  plan: (o, caps) => {
    if (!caps.debianWorkloads) return { samples: 0, estimateS: 0 };
    const runs = paperPlan(o.quick, caps.modes);
    return { samples: runs.length, estimateS: 1, weights: runs.map((r) => 45 + r.w.expectedS * (r.kind === 'failover' ? 1.3 : r.kind === 'protected' ? 1.2 : 1)) };
  },
  async run(ctx: PartContext) {
    const { caps, opts, progress } = ctx;
    const waiting = ROWS.map((r) => ({ what: r.figure, needs: missing(r.needs, caps).map((n) => NEED_TEXT[n]) })).filter((r) => r.needs.length);
    const runs = paperPlan(opts.quick, caps.modes);
    const config = {
      workloads: [...new Set(runs.map((r) => r.w))].map((w) => ({ id: w.id, title: w.title, paper: w.paper, memoryMb: w.memoryMb, scale: opts.quick ? w.quickScale : w.scale, step: w.step })),
      intervalsS: opts.quick ? [] : PAPER_INTERVALS_S, failoverIntervalS: FAILOVER_INTERVAL_S, modes: caps.modes, image: '' as string,
    };
    if (!caps.debianWorkloads) return { config, samples: [], waitingFor: missing(['debian-image', 'debian-workloads'], caps).map((n) => NEED_TEXT[n]), waiting };
    // --quick never builds the image (minutes of downloads): it runs on a cached one or says it waits.
    let img: BuiltImage | undefined;
    if (opts.quick) {
      img = await findDebianImage({ workloads: true });
      if (!img) return { config, samples: [], waitingFor: ['the workload image to be built once (`hydravm image build debian --workloads`; a full `bench eval` builds it)'], waiting };
    } else {
      progress.log('the Debian workload image: building it unless cached (`hydravm image build debian --workloads`)');
      img = await buildDebianImage({ workloads: true, log: (m) => progress.log(m) });
    }
    config.image = `${img.dir} (${img.built ? `built in ${img.info.buildSeconds.toFixed(0)} s by this run` : 'cached'})`;
    const samples: PaperSample[] = [];
    const errors: { what: string; error: string }[] = [];
    const refs = new Map<string, UnprotectedSample>();
    const env = await benchEnv('eval-paper');
    try {
      let k = 0;
      for (const r of runs) {
        const label = r.kind === 'unprotected' ? `${r.w.id}: unprotected` : r.kind === 'protected' ? `${r.w.id}: ${r.mode} every ${r.intervalS} s` : `${r.w.id}: fail-over at 50 %, ${r.failover!.config}`;
        progress.startSample(label);
        try {
          if (r.kind === 'unprotected') {
            const s = await unprotectedRun(env, img, r.w, r.scale, ++k);
            refs.set(r.w.id, s);
            samples.push(s);
            progress.endSample(`boot ${s.bootS.toFixed(0)} s, run ${s.runS.toFixed(1)} s, last 50 % ${s.lastHalfS.toFixed(1)} s`);
          } else if (r.kind === 'protected') {
            const s = await protectedRun(env, img, r.w, r.scale, r.mode!, r.intervalS!);
            samples.push(s);
            const pauses = s.pauses.map((p) => p.pauseMs).sort((a, b) => a - b);
            progress.endSample(`run ${s.runS.toFixed(1)} s, ${s.checkpoints} checkpoints, pause median ${pauses[Math.floor((pauses.length - 1) / 2)]?.toFixed(1) ?? '-'} ms`);
          } else {
            const s = await failoverRun(env, img, r.w, r.scale, r.failover!, refs.get(r.w.id));
            samples.push(s);
            progress.endSample(`resumed at ${(s.resumedAt * 100).toFixed(0)} %, rest ${s.remainingS.toFixed(1)} s (never failed ${s.referenceS?.toFixed(1) ?? '-'} s), kill → running ${s.killToRunningMs.toFixed(0)} ms`);
          }
        } catch (err) {
          // One run failing (a time-out on a loaded host) leaves the others standing; the report names it.
          errors.push({ what: label, error: (err as Error).message });
          progress.endSample(`failed: ${(err as Error).message}`);
        }
      }
    } finally {
      await env.close();
    }
    return { config, samples, waiting, errors };
  },
};
