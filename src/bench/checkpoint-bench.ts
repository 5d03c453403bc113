import os from 'node:os';
import { validateSpec, startVm, stopVm, waitForMemcheckStep, lastMemcheckProgress, vmPaths } from '../vm/index.js';
import { protectVm, unprotectVm, readCheckpointHistory, readProtection } from '../checkpoint/index.js';
import { SpecError } from '../errors.js';
import { benchEnv, summary, fmt, writeResults, sleep, type Summary } from './harness.js';

const uptime = () => { try { return execFileSync('uptime', { encoding: 'utf8' }).trim(); } catch { return 'unknown'; } };
import { barChart } from './svg-chart.js';
import { BenchError } from '../errors.js';
import { execFileSync } from 'node:child_process';
import { checkpointMarkdown, type CheckpointBenchJson, type CheckpointModeResult, type CheckpointSlowdown } from './checkpoint-report.js';

export interface CheckpointBenchOptions {
  outDir: string;
  /** Guest memory sizes, e.g. ['512M', '4G']. */
  memories: string[];
  /** memcheck working sets (MB) rewritten unthrottled: the dirty set of each checkpoint. */
  workingSetsMb: number[];
  /** 'basic' or 'cow:<grain>' (e.g. cow:64K). */
  modes: string[];
  /** Incremental checkpoints measured per configuration. */
  checkpoints: number;
  intervalS: number;
  /** Seconds of memcheck progress per slowdown measurement (0: skip the slowdown runs). */
  slowdownWindowS: number;
  /** Also measure a VM with a qcow2 disk (memcheck + diskcheck): the disk freeze's share of the pause, and merges. */
  disk: boolean;
  log: (msg: string) => void;
  /** The command line, recorded with the results. */
  command?: string;
}

interface DiskResult {
  checkpoints: number;
  pauseMs: Summary;
  diskFreezeMs: Summary;
  chainLength: Summary;
  merges: number;
  layersMerged: number;
  meanMergeMs: number | null;
}

type ModeResult = CheckpointModeResult;
type SlowdownResult = CheckpointSlowdown;

const PAPER = { basicPauseMs: '70-80', cowPauseMs: '5-7' };

function parseMode(mode: string): { label: string; cow: false | { grain: number } } {
  if (mode === 'basic') return { label: 'basic', cow: false };
  const m = /^cow:(\d+)([KM])$/i.exec(mode);
  if (!m) throw new SpecError(`--modes: "${mode}" is not basic or cow:<grain> (e.g. cow:64K)`);
  return { label: `cow ${m[1]}${m[2]!.toUpperCase()}`, cow: { grain: Number(m[1]) * (m[2]!.toUpperCase() === 'K' ? 1024 : 1024 * 1024) } };
}

async function waitEpoch(name: string, epoch: number): Promise<void> {
  while ((readProtection(name)?.committedEpoch ?? 0) < epoch) {
    const p = readProtection(name);
    if (p?.state === 'failed') throw new BenchError('HYDRA_BENCH_PROTECT_FAILED', `protection of ${name} failed: ${p.reason}`);
    await sleep(200);
  }
}

function guestSpec(name: string, memory: string, ws: number, rateMb: number) {
  return validateSpec({
    name, memory, vcpus: 1, accel: 'auto', kernel: 'guest:vmlinux', initrd: 'guest:initrd.img',
    cmdline: `console=ttyS0 quiet hydra.run=memcheck memcheck.mb=${ws} memcheck.rate=${rateMb}`,
  }, process.cwd(), 'bench spec');
}

/** memcheck steps per second over `windowS` seconds. */
async function stepRate(name: string, windowS: number): Promise<number> {
  const log = vmPaths(name).serialLog;
  const a = lastMemcheckProgress(log)!;
  const t0 = Date.now();
  await sleep(windowS * 1000);
  const b = lastMemcheckProgress(log)!;
  return (b.step - a.step) / ((Date.now() - t0) / 1000);
}

/**
 * Basic and copy-on-write checkpoints side by side: for each guest size and
 * memcheck working set (rewritten unthrottled, so each checkpoint carries
 * about the whole set), every mode protects the same running VM in turn.
 * Then the guest's slowdown from protection against the same VM unprotected,
 * at memcheck 32 MB/s and unthrottled.
 */
export async function runCheckpointBench(opts: CheckpointBenchOptions) {
  const loadBefore = uptime();
  const started = Date.now();
  const env = await benchEnv('ckpt');
  const modes = opts.modes.map(parseMode);
  const results: ModeResult[] = [];
  const slowdown: SlowdownResult[] = [];
  let diskResult: DiskResult | undefined;
  let generation = 0;
  try {
    for (const memory of opts.memories) {
      for (const ws of opts.workingSetsMb) {
        const name = `bench-${memory.toLowerCase()}-${ws}`;
        opts.log(`starting ${memory} guest with memcheck over ${ws} MB (unthrottled)`);
        await startVm(guestSpec(name, memory, ws, 0));
        await waitForMemcheckStep(vmPaths(name).serialLog, 1, 120_000);
        try {
          for (const m of modes) {
            generation++;
            opts.log(`  ${m.label}: protect every ${opts.intervalS} s (generation ${generation})`);
            await protectVm({ vm: name, store: env.store.address, intervalMs: opts.intervalS * 1000, generation, cow: m.cow });
            await waitEpoch(name, opts.checkpoints + 1);
            // A checkpoint of a large dirty set under load takes seconds to finish before the checkpointer exits.
            await unprotectVm(name, 120_000);
            const hist = readCheckpointHistory(name).filter((h) => h.generation === generation && h.kind === 'incremental');
            const pick = (k: 'pauseMs' | 'stopMs' | 'collectMs' | 'copyMs' | 'devstateMs' | 'diskMs' | 'contMs' | 'commitMs' | 'sendMs') => summary(hist.map((h) => h[k]));
            const cowPick = (k: 'cowCopies' | 'faults' | 'serviceMeanUs' | 'serviceMaxUs') => (m.cow ? summary(hist.map((h) => h.cow?.[k] ?? 0)) : null);
            const r: ModeResult = {
              memory, workingSetMb: ws, mode: m.label, checkpoints: hist.length,
              pauseMs: pick('pauseMs'),
              vmPausedMs: summary(hist.map((h) => h.vmPausedMs).filter((v): v is number => v !== undefined)),
              parts: { stopMs: pick('stopMs'), collectMs: pick('collectMs'), copyMs: pick('copyMs'), devstateMs: pick('devstateMs'), diskMs: pick('diskMs'), contMs: pick('contMs') },
              mb: summary(hist.map((h) => h.bytes / 2 ** 20)),
              commitMs: pick('commitMs'), sendMs: pick('sendMs'),
              precopyRounds: hist.reduce((a, h) => a + (h.precopyRounds ?? 0), 0),
              cowCopies: cowPick('cowCopies'), faults: cowPick('faults'), serviceMeanUs: cowPick('serviceMeanUs'), serviceMaxUs: cowPick('serviceMaxUs'),
            };
            results.push(r);
            opts.log(`    VM paused median ${fmt(r.vmPausedMs?.median ?? null)} ms p99 ${fmt(r.vmPausedMs?.p99 ?? null)} ms; stop to cont median ${fmt(r.pauseMs.median)} ms p99 ${fmt(r.pauseMs.p99)} ms, collect ${fmt(r.parts.collectMs.median, 2)} ms, copy ${fmt(r.parts.copyMs.median)} ms, devstate ${fmt(r.parts.devstateMs.median)} ms, ${fmt(r.mb.median)} MB/ckpt`);
          }
        } finally {
          await stopVm(name);
        }
      }
    }
    if (opts.slowdownWindowS > 0) {
      const memory = opts.memories[0]!;
      for (const rateMb of [32, 0]) {
        const name = `bench-slow-${rateMb}`;
        opts.log(`slowdown: ${memory} guest, memcheck over 64 MB at ${rateMb ? `${rateMb} MB/s` : 'full speed'}`);
        await startVm(guestSpec(name, memory, 64, rateMb));
        await waitForMemcheckStep(vmPaths(name).serialLog, 1, 120_000);
        try {
          const unprotectedRuns: number[] = [await stepRate(name, opts.slowdownWindowS)];
          const rows: { mode: string; stepsPerS: number }[] = [];
          for (const m of modes) {
            generation++;
            await protectVm({ vm: name, store: env.store.address, intervalMs: opts.intervalS * 1000, generation, cow: m.cow });
            await waitEpoch(name, 2);
            rows.push({ mode: m.label, stepsPerS: await stepRate(name, opts.slowdownWindowS) });
            await unprotectVm(name);
            opts.log(`  ${m.label}: ${fmt(rows.at(-1)!.stepsPerS)} steps/s`);
          }
          unprotectedRuns.push(await stepRate(name, opts.slowdownWindowS));
          const base = unprotectedRuns.reduce((a, b) => a + b, 0) / unprotectedRuns.length;
          opts.log(`  unprotected: ${unprotectedRuns.map((v) => fmt(v)).join(' / ')} steps/s`);
          slowdown.push({ rateMb, mode: 'unprotected', stepsPerS: base, slowdownPct: null });
          for (const r of rows) slowdown.push({ rateMb, mode: r.mode, stepsPerS: r.stepsPerS, slowdownPct: (1 - r.stepsPerS / base) * 100 });
        } finally {
          await stopVm(name);
        }
      }
    }
    if (opts.disk) diskResult = await diskRun(env, opts, ++generation);
  } finally {
    await env.close();
  }
  const json: CheckpointBenchJson = {
    benchmark: 'checkpoint',
    date: new Date().toISOString(),
    host: { cpus: os.cpus().length, memGiB: Math.round(os.totalmem() / 2 ** 30), kernel: os.release() },
    load: { before: loadBefore, after: uptime() },
    command: opts.command,
    durationS: Math.round((Date.now() - started) / 1000),
    guest: { memories: opts.memories, intervalS: opts.intervalS },
    paper: PAPER,
    results,
    slowdown,
    slowdownWindowS: opts.slowdownWindowS,
    disk: diskResult ?? null,
  };
  const md = checkpointMarkdown(json);
  const cats = results.map((r) => `${r.memory}/${r.workingSetMb}MB ${r.mode}`);
  const charts = {
    'checkpoint-pause.svg': barChart({ title: 'VM pause per checkpoint: basic vs copy-on-write', unit: 'ms', categories: cats, series: [{ name: 'median', values: results.map((r) => r.pauseMs.median) }, { name: 'p99', values: results.map((r) => r.pauseMs.p99) }], target: { value: 5, label: 'CoW target 5 ms' } }),
    'checkpoint-bytes.svg': barChart({ title: 'MB per checkpoint', unit: 'MB', categories: cats, series: [{ name: 'median', values: results.map((r) => r.mb.median) }] }),
    ...(slowdown.length ? { 'checkpoint-slowdown.svg': barChart({ title: 'Guest slowdown from protection (memcheck steps/s vs unprotected)', unit: '%', categories: slowdown.filter((s) => s.slowdownPct !== null).map((s) => `${s.rateMb ? `${s.rateMb}MB/s` : 'unthrottled'} ${s.mode}`), series: [{ name: 'slowdown', values: slowdown.filter((s) => s.slowdownPct !== null).map((s) => s.slowdownPct) }] }) } : {}),
  };
  const files = writeResults(opts.outDir, 'checkpoint', json, md, charts);
  return { json, markdown: md, files };
}

async function diskRun(env: Awaited<ReturnType<typeof benchEnv>>, opts: CheckpointBenchOptions, generation: number): Promise<DiskResult> {
  const name = 'bench-disk';
  const spec = validateSpec({
    name, memory: opts.memories[0]!, vcpus: 1, accel: 'auto', kernel: 'guest:vmlinux', initrd: 'guest:initrd.img',
    cmdline: 'console=ttyS0 quiet hydra.run=memcheck+diskcheck memcheck.mb=16 diskcheck.rate=50',
    disks: [{ path: `${env.home}/disks/bench-disk.qcow2`, size: '256M' }],
  }, process.cwd(), 'bench spec');
  opts.log('starting a guest with a qcow2 disk (memcheck 16 MB + diskcheck)');
  await startVm(spec);
  await waitForMemcheckStep(vmPaths(name).serialLog, 1, 60_000);
  await protectVm({ vm: name, store: env.store.address, intervalMs: 1000, generation });
  const target = Math.max(opts.checkpoints, 20) + 1;
  while ((readProtection(name)?.committedEpoch ?? 0) < target) await sleep(200);
  const status = readProtection(name)!;
  await unprotectVm(name);
  await stopVm(name);
  const hist = readCheckpointHistory(name).filter((h) => h.generation === generation && h.kind === 'incremental');
  const m = status.diskMerges;
  const r: DiskResult = {
    checkpoints: hist.length,
    pauseMs: summary(hist.map((h) => h.pauseMs)),
    diskFreezeMs: summary(hist.map((h) => h.diskMs)),
    chainLength: summary(hist.map((h) => h.diskChainLength)),
    merges: m?.merges ?? 0,
    layersMerged: m?.layersMerged ?? 0,
    meanMergeMs: m && m.merges ? m.totalMergeMs / m.merges : null,
  };
  opts.log(`    disk freeze median ${fmt(r.diskFreezeMs.median, 2)} ms p99 ${fmt(r.diskFreezeMs.p99, 2)} ms, chain max ${r.chainLength.max}, ${r.merges} merges`);
  return r;
}
