import os from 'node:os';
import { validateSpec, startVm, stopVm, waitForMemcheckStep, vmPaths } from '../vm/index.js';
import { protectVm, unprotectVm, readCheckpointHistory, readProtection } from '../checkpoint/index.js';
import { benchEnv, summary, fmt, writeResults, sleep, type Summary } from './harness.js';
import { barChart } from './svg-chart.js';
import { BenchError } from '../errors.js';

export interface CheckpointBenchOptions {
  outDir: string;
  workingSetsMb: number[];
  intervalsS: number[];
  /** Incremental checkpoints measured per configuration. */
  checkpoints: number;
  memory: string;
  /** Also measure a VM with a qcow2 disk (memcheck + diskcheck): the disk freeze's share of the pause, and merges. */
  disk: boolean;
  log: (msg: string) => void;
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

interface ConfigResult {
  workingSetMb: number;
  intervalS: number;
  checkpoints: number;
  pauseMs: Summary;
  parts: Record<'stopMs' | 'collectMs' | 'copyMs' | 'devstateMs' | 'contMs', Summary>;
  pages: Summary;
  mb: Summary;
  commitMs: Summary;
  sendMs: Summary;
  achievedIntervalMs: Summary;
  initialCopyMs: number | null;
}

/**
 * Pause time, checkpoint size and commit time of incremental checkpoints for
 * memcheck at several working-set sizes and intervals on one guest. memcheck
 * runs unthrottled, so each checkpoint carries its whole working set.
 */
export async function runCheckpointBench(opts: CheckpointBenchOptions) {
  const env = await benchEnv('ckpt');
  const results: ConfigResult[] = [];
  let diskResult: DiskResult | undefined;
  let generation = 0;
  try {
    for (const ws of opts.workingSetsMb) {
      const name = `bench-ws${ws}`;
      const spec = validateSpec({
        name, memory: opts.memory, vcpus: 1, accel: 'auto', kernel: 'guest:vmlinux', initrd: 'guest:initrd.img',
        cmdline: `console=ttyS0 quiet hydra.run=memcheck memcheck.mb=${ws}`,
      }, process.cwd(), 'bench spec');
      opts.log(`starting ${opts.memory} guest with memcheck over ${ws} MB`);
      await startVm(spec);
      await waitForMemcheckStep(vmPaths(name).serialLog, 1, 60_000);
      for (const intervalS of opts.intervalsS) {
        generation++;
        opts.log(`  protect every ${intervalS} s (generation ${generation})`);
        const first = await protectVm({ vm: name, store: env.store.address, intervalMs: intervalS * 1000, generation });
        const target = opts.checkpoints + 1;
        while ((readProtection(name)?.committedEpoch ?? 0) < target) {
          const p = readProtection(name);
          if (p?.state === 'failed') throw new BenchError('HYDRA_BENCH_PROTECT_FAILED', `protection of ${name} failed: ${p.reason}`);
          await sleep(200);
        }
        await unprotectVm(name);
        const hist = readCheckpointHistory(name).filter((h) => h.generation === generation && h.kind === 'incremental');
        const pick = (k: keyof (typeof hist)[number]) => summary(hist.map((h) => h[k] as number));
        const r: ConfigResult = {
          workingSetMb: ws,
          intervalS,
          checkpoints: hist.length,
          pauseMs: pick('pauseMs'),
          parts: { stopMs: pick('stopMs'), collectMs: pick('collectMs'), copyMs: pick('copyMs'), devstateMs: pick('devstateMs'), contMs: pick('contMs') },
          pages: pick('pages'),
          mb: summary(hist.map((h) => h.bytes / 2 ** 20)),
          commitMs: pick('commitMs'),
          sendMs: pick('sendMs'),
          achievedIntervalMs: summary(hist.map((h) => h.intervalMs).filter((v): v is number => v !== null)),
          initialCopyMs: first.initialCopy?.ms ?? null,
        };
        results.push(r);
        opts.log(`    pause median ${fmt(r.pauseMs.median)} ms p99 ${fmt(r.pauseMs.p99)} ms, ${fmt(r.mb.median)} MB/ckpt, commit ${fmt(r.commitMs.median)} ms, interval ${fmt((r.achievedIntervalMs.median ?? 0) / 1000, 2)} s`);
      }
      await stopVm(name);
    }
    if (opts.disk) diskResult = await diskRun(env, opts, ++generation);
  } finally {
    await env.close();
  }
  const json = {
    benchmark: 'checkpoint',
    date: new Date().toISOString(),
    host: { cpus: os.cpus().length, memGiB: Math.round(os.totalmem() / 2 ** 30), kernel: os.release() },
    guest: { memory: opts.memory, accel: 'auto', workload: 'memcheck (unthrottled)' },
    results,
    disk: diskResult ?? null,
  };
  const md = [
    `| working set | interval | ckpts | pause median | pause p99 | stop / collect / copy / devstate / cont (median) | MB/ckpt | commit median | commit p99 | achieved interval |`,
    `|---|---|---|---|---|---|---|---|---|---|`,
    ...results.map((r) => `| ${r.workingSetMb} MB | ${r.intervalS} s | ${r.checkpoints} | ${fmt(r.pauseMs.median)} ms | ${fmt(r.pauseMs.p99)} ms | ${fmt(r.parts.stopMs.median)} / ${fmt(r.parts.collectMs.median)} / ${fmt(r.parts.copyMs.median)} / ${fmt(r.parts.devstateMs.median)} / ${fmt(r.parts.contMs.median)} ms | ${fmt(r.mb.median)} | ${fmt(r.commitMs.median)} ms | ${fmt(r.commitMs.p99)} ms | ${fmt((r.achievedIntervalMs.median ?? 0) / 1000, 2)} s |`),
  ].join('\n') + '\n' + (diskResult ? [
    '',
    `With a qcow2 disk (memcheck 16 MB + diskcheck, interval 1 s, ${diskResult.checkpoints} checkpoints): pause median ${fmt(diskResult.pauseMs.median)} ms, p99 ${fmt(diskResult.pauseMs.p99)} ms, of which the disk freeze median ${fmt(diskResult.diskFreezeMs.median, 2)} ms, p99 ${fmt(diskResult.diskFreezeMs.p99, 2)} ms; chain length max ${diskResult.chainLength.max}; ${diskResult.merges} background merges of ${diskResult.layersMerged} layers, mean ${fmt(diskResult.meanMergeMs)} ms each.`,
    '',
  ].join('\n') : '');
  const cats = results.map((r) => `${r.workingSetMb}MB/${r.intervalS}s`);
  const charts = {
    'checkpoint-pause.svg': barChart({ title: 'VM pause per checkpoint', unit: 'ms', categories: cats, series: [{ name: 'median', values: results.map((r) => r.pauseMs.median) }, { name: 'p99', values: results.map((r) => r.pauseMs.p99) }], target: { value: 15, label: 'target 15 ms' } }),
    'checkpoint-commit.svg': barChart({ title: 'Commit time per checkpoint', unit: 'ms', categories: cats, series: [{ name: 'median', values: results.map((r) => r.commitMs.median) }, { name: 'p99', values: results.map((r) => r.commitMs.p99) }] }),
  };
  const files = writeResults(opts.outDir, 'checkpoint', json, md, charts);
  return { json, markdown: md, files };
}

async function diskRun(env: Awaited<ReturnType<typeof benchEnv>>, opts: CheckpointBenchOptions, generation: number): Promise<DiskResult> {
  const name = 'bench-disk';
  const spec = validateSpec({
    name, memory: opts.memory, vcpus: 1, accel: 'auto', kernel: 'guest:vmlinux', initrd: 'guest:initrd.img',
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
