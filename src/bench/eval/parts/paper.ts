// The paper's Figures 2-4 and Table II on its own two workloads (a compile, a transcode) inside the Debian workload image.
import { protectVm, unprotectVm, readCheckpointHistory, readProtection, type CheckpointStats } from '../../../checkpoint/index.js';
import { restoreVm, type RestoreMode, type RestoreResult, type RestoreTimings } from '../../../restore/index.js';
import { startVm, readState, isLive, typeOnConsole, vmPaths } from '../../../vm/index.js';
import { buildDebianImage, findDebianImage, type BuiltImage } from '../../../image/index.js';
import { BenchError } from '../../../errors.js';
import { pidAlive } from '../../../util/pid.js';
import { benchEnv, waitFor, type BenchEnv } from '../../harness.js';
import { debianSpec, WorkloadWatch, type WorkloadLine } from '../debian-guest.js';
import { DEBIAN_WORKLOADS, TRANSCODE, missing, NEED_TEXT, type DebianWorkload, type Need } from '../workloads.js';
import { stopQuietly } from '../memcheck-guest.js';
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
  /** The run's place in its boot; the first run of a boot meets a cold page cache (Table II's reference), later ones are Figure 3's baseline. */
  run: number;
  /** Boot to the runner's first line (first run of a boot only). */
  bootS: number | null;
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
  run: number;
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
  /** Kill → the restore called (after the dead VM's checkpointer has exited too). */
  restoreCalledMs: number;
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

async function boot(env: BenchEnv, img: BuiltImage, w: DebianWorkload, scale: number, name: string, runs = 1): Promise<Run> {
  const watch = new WorkloadWatch(name);
  const startedAt = performance.now();
  await startVm(debianSpec(name, img, w, scale, env.home, runs));
  return { name, watch, startedAt };
}

async function end(run: Run): Promise<void> {
  run.watch.close();
  // Cleanup: the protection, the pager and the VM may already be gone.
  await unprotectVm(run.name).catch(() => undefined);
  await stopQuietly(run.name, run.restore);
}

export interface SequenceEntry {
  kind: 'unprotected' | 'protected';
  mode?: 'basic' | 'cow';
  intervalS?: number;
}

/**
 * One boot, the job run once per entry (hydra.runs): before each run the
 * harness sets it up (protects the VM, whose full copy then ends before the
 * job starts) and types "go K" on the console; after it, unprotects. One boot
 * instead of one per run saves most of the time under TCG, and every run but
 * the first meets the same warm page cache.
 */
async function sequenceRuns(env: BenchEnv, img: BuiltImage, w: DebianWorkload, scale: number, seq: SequenceEntry[], each: (e: SequenceEntry, k: number) => void, done: (s: PaperSample | Error, e: SequenceEntry) => void): Promise<void> {
  const run = await boot(env, img, w, scale, `ev-${w.id}-seq`, seq.length);
  try {
    for (const [i, e] of seq.entries()) {
      const k = i + 1;
      each(e, k);
      try {
        const ready = await run.watch.ready(k, k === 1 ? BOOT_TIMEOUT_MS : runTimeoutMs(w, scale));
        let prot: Awaited<ReturnType<typeof protectVm>> | undefined;
        let protectError: Error | undefined;
        if (e.kind === 'protected') {
          try {
            prot = await protectVm({ vm: run.name, store: env.store.address, intervalMs: e.intervalS! * 1000, generation: k, cow: e.mode === 'cow' ? {} : false }, undefined, BOOT_TIMEOUT_MS);
          } catch (err) {
            // The VM is fine, only this run is not measured: the job still runs (the gate must open) and the boot goes on.
            protectError = err as Error;
            await unprotectVm(run.name).catch(() => undefined); // a half-started protection, if any: its own error is the one kept
          }
        }
        const protectedAt = performance.now();
        // Typed again while the run has not started (a line the runner cannot have read yet is harmless: it waits for "go K").
        let start: WorkloadLine | undefined;
        for (let tries = 1; !start; tries++) {
          typeOnConsole(vmPaths(run.name).serialIn, `go ${k}`);
          try {
            start = await run.watch.started(15_000, k);
          } catch (err) {
            if (tries >= 8) throw err;
          }
        }
        const fin = await run.watch.finished(runTimeoutMs(w, scale), k);
        const runS = (fin.t - start.t) / 1000;
        if (protectError) {
          done(new BenchError('HYDRA_BENCH_PROTECT_FAILED', `protecting ${run.name} failed: ${protectError.message}`), e);
          continue;
        }
        if (e.kind === 'unprotected') {
          const half = run.watch.timeOf(0.5, k) ?? fin.t;
          done({ figure: 'unprotected', workload: w.id, scale, run: k, bootS: k === 1 ? (ready.t - run.startedAt) / 1000 : null, runS, lastHalfS: (fin.t - half) / 1000, timeline: run.watch.timeline(k, start.t) }, e);
        } else {
          await unprotectVm(run.name);
          const hist = checkpointsBetween(run.name, start.t, fin.t);
          done({
            figure: 'protected', workload: w.id, scale, mode: e.mode!, intervalS: e.intervalS!, run: k, runS, protectedBeforeStart: protectedAt <= start.t,
            fullCheckpointMs: prot?.initialCopy?.ms ?? null, checkpoints: hist.length, checkpointsPerS: hist.length / runS, pauses: hist.map(phases),
          }, e);
        }
      } catch (err) {
        done(err as Error, e);
        // The VM is in an unknown state: the rest of this boot's runs are not measured.
        if (readProtection(run.name)?.state !== undefined) await unprotectVm(run.name).catch(() => undefined);
        throw err;
      }
    }
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

/** Protected every 2 s, QEMU killed just after a checkpoint past 50 % commits, slim-restored; times the rest of the job (Table II) and the fail-over (Figure 4). */
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
    // Killed while protected, as a failure strikes: an orderly unprotect would merge the frozen disk
    // layers away, and the image's disk state with them.
    const checkpointer = readProtection(run.name)?.pid;
    const qemuPid = readState(run.name)?.qemuPid;
    if (!qemuPid) throw new BenchError('HYDRA_BENCH_NO_PROGRESS', `VM ${run.name} has no QEMU to kill`);
    const tKill = performance.now();
    process.kill(qemuPid, 'SIGKILL');
    run.watch.poll();
    const ended = run.watch.lines.find((l) => l.kind === 'done');
    const newest = Math.max(...readCheckpointHistory(run.name).map((h) => h.startedAt));
    if (ended && wallOf(ended.t) < newest) throw new BenchError('HYDRA_BENCH_NO_PROGRESS', `VM ${run.name}: the job ended before the checkpoint the restore would resume from (its second half is shorter than the ${FAILOVER_INTERVAL_S} s interval): no fail-over to time; use a larger hydra.scale`);
    const tDetect = await waitFor(`${run.name}'s supervisor to record the crash`, () => readState(run.name)?.lifecycle === 'crashed', 30_000, 5);
    const tGone = await waitFor(`${run.name}'s supervisor to exit`, () => !isLive(readState(run.name)), 30_000, 5);
    // No checkpointer of the dead VM may race the restored QEMU.
    await waitFor(`${run.name}'s checkpointer to give up on the dead VM`, () => !pidAlive(checkpointer), 30_000, 5);
    const pauses = checkpointsBetween(run.name, start.t, tKill).map(phases);
    const tCall = performance.now();
    run.restore = await restoreVm({ vm: run.name, store: env.store.address, secret: process.env.HYDRAVM_SECRET!, mode: f.mode, storeDir: env.storeDir, prefetch: f.prefetch });
    const tRun = tCall + run.restore.timings.totalMs;
    const restored = readCheckpointHistory(run.name).find((h) => h.epoch === run.restore!.epoch && h.generation === run.restore!.generation);
    const resumedAt = restored ? run.watch.fractionAt(restored.startedAt - performance.timeOrigin) : run.watch.fractionAt(tKill);
    let memoryCompleteMs: number | null = null;
    const pager = run.restore.pager;
    // Resolves when the pager holds every page; it may not before the job ends (no prefetch).
    void pager?.done.then(() => { memoryCompleteMs = performance.now() - tRun; }, () => undefined);
    const done = await run.watch.finished(runTimeoutMs(w, scale), 1, tRun);
    return {
      figure: 'failover', workload: w.id, scale, config: f.config, intervalS: FAILOVER_INTERVAL_S, resumedAt,
      remainingS: (done.t - tRun) / 1000, referenceS: referenceFrom(ref, resumedAt),
      detectMs: tDetect - tKill, supervisorGoneMs: tGone - tKill, restoreCalledMs: tCall - tKill, timings: run.restore.timings, killToRunningMs: tRun - tKill,
      memoryCompleteMs, ...(pager ? { faultPages: pager.stats.faultPagesFetched, prefetchedPages: pager.stats.pagesPrefetched } : {}), pauses,
    };
  } finally {
    await end(run);
  }
}

export interface WorkloadPlan {
  w: DebianWorkload;
  scale: number;
  /** The runs of one boot. */
  sequence: SequenceEntry[];
  failovers: (typeof FAILOVERS)[number][];
}

/** What the part runs, per workload (also the ETA's plan). */
export function paperPlan(quick: boolean, modes: ('basic' | 'cow')[]): WorkloadPlan[] {
  // --quick: one short transcode, unprotected then protected (each mode) in one boot, and failed over once (network): a smoke of every path.
  if (quick) return [{ w: TRANSCODE, scale: TRANSCODE.quickScale, sequence: [{ kind: 'unprotected' }, { kind: 'unprotected' }, ...modes.map((mode) => ({ kind: 'protected' as const, mode, intervalS: FAILOVER_INTERVAL_S }))], failovers: [FAILOVERS[1]!] }];
  // The first run of the boot meets a cold page cache (Table II's never-failed reference, like the fail-over runs' cold boots);
  // the second, warm like the protected runs after it, is Figure 3's baseline.
  return DEBIAN_WORKLOADS.map((w) => ({
    w, scale: w.scale, failovers: FAILOVERS,
    sequence: [{ kind: 'unprotected' as const }, { kind: 'unprotected' as const }, ...modes.flatMap((mode) => PAPER_INTERVALS_S.map((intervalS) => ({ kind: 'protected' as const, mode, intervalS })))],
  }));
}

const BOOT_ESTIMATE_S = 30;

export const paperPart: Part<PaperSample> = {
  id: 'paper',
  title: "The paper's Figures 2-4 and Table II (compile, ffmpeg transcode, Debian guest)",
  plan: (o, caps) => {
    if (!caps.debianWorkloads) return { samples: 0, estimateS: 0 };
    const weights = paperPlan(o.quick, caps.modes).flatMap((p) => {
      const job = p.w.expectedS * (p.scale / p.w.scale);
      return [...p.sequence.map((e, i) => (i === 0 ? BOOT_ESTIMATE_S : 5) + job * (e.kind === 'protected' ? 1.2 : 1)), ...p.failovers.map(() => BOOT_ESTIMATE_S + 10 + job * 1.2)];
    });
    return { samples: weights.length, estimateS: 1, weights };
  },
  async run(ctx: PartContext) {
    const { caps, opts, progress } = ctx;
    const waiting = ROWS.map((r) => ({ what: r.figure, needs: missing(r.needs, caps).map((n) => NEED_TEXT[n]) })).filter((r) => r.needs.length);
    const plan = paperPlan(opts.quick, caps.modes);
    const config = {
      workloads: plan.map((p) => ({ id: p.w.id, title: p.w.title, paper: p.w.paper, memoryMb: p.w.memoryMb, scale: p.scale, step: p.w.step })),
      sequences: Object.fromEntries(plan.map((p) => [p.w.id, p.sequence.map((e) => (e.kind === 'unprotected' ? 'unprotected' : `${e.mode} ${e.intervalS} s`))])),
      intervalsS: opts.quick ? [FAILOVER_INTERVAL_S] : PAPER_INTERVALS_S, failoverIntervalS: FAILOVER_INTERVAL_S, modes: caps.modes, image: '' as string,
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
    const env = await benchEnv('eval-paper');
    try {
      for (const p of plan) {
        const what = (e: SequenceEntry, k: number) => `${p.w.id} run ${k}/${p.sequence.length} of one boot: ${e.kind === 'unprotected' ? 'unprotected' : `${e.mode} every ${e.intervalS} s`}`;
        let label = '';
        try {
          await sequenceRuns(env, img, p.w, p.scale, p.sequence, (e, k) => { label = what(e, k); progress.startSample(label); }, (s, e) => {
            if (s instanceof Error) {
              errors.push({ what: label, error: s.message });
              progress.endSample(`failed: ${s.message}`);
              return;
            }
            samples.push(s);
            if (s.figure === 'unprotected') progress.endSample(`${s.bootS !== null ? `boot ${s.bootS.toFixed(0)} s, ` : ''}run ${s.runS.toFixed(1)} s, last 50 % ${s.lastHalfS.toFixed(1)} s`);
            else if (s.figure === 'protected') {
              const pauses = s.pauses.map((x) => x.pauseMs).sort((a, b) => a - b);
              progress.endSample(`${e.mode} every ${e.intervalS} s: run ${s.runS.toFixed(1)} s, ${s.checkpoints} checkpoints, pause median ${pauses[Math.floor((pauses.length - 1) / 2)]?.toFixed(1) ?? '-'} ms`);
            }
          });
        } catch (err) {
          // The boot's remaining runs are lost; the fail-over runs (their own boots) still go on.
          progress.log(`${p.w.id}: the sequence stopped: ${(err as Error).message}`);
        }
        const ups = samples.filter((x): x is UnprotectedSample => x.figure === 'unprotected' && x.workload === p.w.id);
        const ref = ups.find((x) => x.run === 1) ?? ups[0];
        for (const f of p.failovers) {
          const label = `${p.w.id}: fail-over at 50 %, ${f.config}`;
          progress.startSample(label);
          try {
            const s = await failoverRun(env, img, p.w, p.scale, f, ref);
            samples.push(s);
            progress.endSample(`resumed at ${(s.resumedAt * 100).toFixed(0)} %, rest ${s.remainingS.toFixed(1)} s (never failed ${s.referenceS?.toFixed(1) ?? '-'} s), kill → running ${s.killToRunningMs.toFixed(0)} ms`);
          } catch (err) {
            // One run failing (a time-out on a loaded host) leaves the others standing; the report names it.
            errors.push({ what: label, error: (err as Error).message });
            progress.endSample(`failed: ${(err as Error).message}`);
          }
        }
      }
    } finally {
      await env.close();
    }
    return { config, samples, waiting, errors };
  },
};
