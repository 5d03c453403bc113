// The fail-over benchmark's report: results.json, the markdown tables and the SVG charts.
import os from 'node:os';
import { summary, fmt } from './harness.js';
import { barChart } from './svg-chart.js';
import { med, pick, type FailoverAnalysis } from './failover-analysis.js';
import type { FailoverBenchOptions, QemuBaseline, RunResult } from './failover-results.js';

const range = (xs: (number | null | undefined)[], digits = 0): string => {
  const s = summary(xs.filter((v): v is number => typeof v === 'number'));
  if (s.n === 0) return '-';
  return s.n === 1 ? fmt(s.median, digits) : `${fmt(s.median, digits)} (${fmt(s.min, digits)}-${fmt(s.max, digits)})`;
};

export interface RunContext {
  startedAt: string;
  durationS: number;
  loadBefore: { uptime: string; loadavg: number[] };
  loadAfter: { uptime: string; loadavg: number[] };
}

export function renderFailover(opts: FailoverBenchOptions, ctx: RunContext, runs: RunResult[], qemu: QemuBaseline | undefined, a: FailoverAnalysis) {
  const { startedAt, durationS, loadBefore, loadAfter } = ctx;
  const { file, net, nopf, groups, splits, bootMs, speedup, loadSpeedup, coldSpeedup, supervisorMs, pfFaults, npFaults, faultRatio, unfailed, slowdown, targets } = a;
  const json = {
    benchmark: 'failover',
    date: startedAt,
    durationS: Math.round(durationS),
    host: { cpus: os.cpus().length, memGiB: Math.round(os.totalmem() / 2 ** 30), kernel: os.release(), loadBefore, loadAfter },
    guest: { memory: opts.memory, accel: 'auto', workload: `memcheck mb=${opts.workingSetMb} rate=${opts.rateMb} MB/s`, protectionIntervalMs: opts.intervalMs },
    method: {
      kill: 'SIGKILL of QEMU; detection = supervisor records crashed in state.json (polled every 10 ms)',
      restore: 'restoreVm() in-process (network-mode pager runs in the bench process)',
      progress: 'first memcheck progress line after the kill offset (serial log polled every 10 ms; memcheck prints at most every 0.25 s)',
      stepsPerS: `steps since the first line in a ${opts.windowS} s window / time from the window start to the last line in it`,
      noPrefetch: `stopped after ${opts.noPrefetchS} s`,
    },
    splits,
    baselines: {
      qemuFullSaveRestore: qemu,
      rebootMs: bootMs,
      slimSpeedup: { file: speedup(file), network: speedup(net) },
      slimSpeedupVsColdCache: { file: coldSpeedup(file), network: coldSpeedup(net) },
      loadPhaseSpeedup: { file: loadSpeedup(file), network: loadSpeedup(net) },
    },
    paging: {
      prefetch: { faults: summary(pick(net, (r) => r.pager?.faults).filter((v): v is number => v !== undefined)), runs: net.map((r) => r.pager) },
      noPrefetch: { runs: nopf.map((r) => r.pager) },
      faultReduction: faultRatio,
    },
    slowdown,
    targets,
    runs,
  };

  const md: string[] = [];
  md.push(`Host: ${os.cpus().length} CPUs, QEMU accel ${runs[0]?.accel ?? '?'}; load before: \`${loadBefore.uptime}\`; after: \`${loadAfter.uptime}\`. Run took ${Math.round(durationS)} s, ${startedAt}.`);
  md.push(`Guest: ${opts.memory}, memcheck ${opts.workingSetMb} MB at ${opts.rateMb} MB/s, protected every ${opts.intervalMs / 1000} s. Medians of ${opts.repeats} fail-overs per mode (min-max in parentheses); each on a freshly booted VM.`);
  md.push('');
  md.push('### Fail-over time split (ms)');
  md.push('');
  md.push('| mode | runs | kill → detected | kill → supervisor gone | restore prepare | supervisor start (launch → QEMU spawn) | QEMU spawn → running | of which device load | kill → running | kill → guest progress |');
  md.push('|---|---|---|---|---|---|---|---|---|---|');
  for (const [label, rs] of [...groups, ['network, no prefetch', nopf] as [string, RunResult[]]]) {
    if (!rs.length) continue;
    md.push(`| ${label} | ${rs.length} | ${range(pick(rs, (r) => r.detectMs))} | ${range(pick(rs, (r) => r.goneMs))} | ${range(pick(rs, (r) => r.restore.prepareMs))} | ${range(pick(rs, supervisorMs))} | ${range(pick(rs, (r) => r.restore.spawnToRunningMs))} | ${range(pick(rs, (r) => r.restore.deviceLoadMs), 1)} | ${range(pick(rs, (r) => r.killToRunningMs))} | ${range(pick(rs, (r) => r.killToProgressMs))} |`);
  }
  md.push('');
  md.push('### Baselines (same guest, same run)');
  md.push('');
  md.push('| what | time | notes |');
  md.push('|---|---|---|');
  if (qemu) {
    md.push(`| QEMU full save (migrate to file: of the stopped VM) | ${fmt(qemu.saveMs, 0)} ms | ${fmt(qemu.fileBytes / 2 ** 20, 0)} MB file |`);
    md.push(`| QEMU full restore: spawn → running | ${fmt(qemu.spawnToRunningMs, 0)} ms | spawn → QMP ${fmt(qemu.spawnMs, 0)} ms, load ${fmt(qemu.loadMs, 0)} ms; spawn → guest progress ${fmt(qemu.spawnToProgressMs, 0)} ms |`);
  }
  md.push(`| reboot: spawn → first memcheck progress | ${range(runs.map((r) => r.bootMs).concat(qemu ? [qemu.bootMs] : []))} ms | ${bootMs.n} boots |`);
  md.push(`| slim restore QEMU spawn → running, file / network | ${fmt(splits.file!.spawnToRunningMs.median, 0)} / ${fmt(splits.network!.spawnToRunningMs.median, 0)} ms | speedup vs QEMU full restore (page cache warm): ${fmt(speedup(file))}x / ${fmt(speedup(net))}x |`);
  if (qemu?.cold) md.push(`| QEMU full restore, saved file evicted from the page cache first: spawn → running | ${fmt(qemu.cold.spawnToRunningMs, 0)} ms | load ${fmt(qemu.cold.loadMs, 0)} ms; slim speedup vs this: ${fmt(coldSpeedup(file))}x / ${fmt(coldSpeedup(net))}x |`);
  md.push(`| load phase only: full RAM + devices vs device state | ${qemu ? fmt(qemu.loadMs, 0) : '-'} ms vs ${fmt(splits.file!.deviceLoadMs.median, 1)} / ${fmt(splits.network!.deviceLoadMs.median, 1)} ms | ${fmt(loadSpeedup(file), 0)}x / ${fmt(loadSpeedup(net), 0)}x |`);
  md.push('');
  md.push('### Network mode paging');
  md.push('');
  md.push('| prefetch | runs | demand faults | faults/s | pages prefetched | pages fetched on faults | memory complete after running | slowest fault |');
  md.push('|---|---|---|---|---|---|---|---|');
  if (net.length) md.push(`| on | ${net.length} | ${range(pick(net, (r) => r.pager?.faults))} | ${range(pick(net, (r) => r.pager?.faultsPerS), 1)} | ${range(pick(net, (r) => r.pager?.pagesPrefetched))} | ${range(pick(net, (r) => r.pager?.faultPagesFetched))} | ${range(pick(net, (r) => r.pager?.completeAfterRunningMs))} ms | ${range(pick(net, (r) => r.pager?.maxFaultMs), 1)} ms |`);
  if (nopf.length) md.push(`| off (stopped after ${opts.noPrefetchS} s) | ${nopf.length} | ${range(pick(nopf, (r) => r.pager?.faults))} | ${range(pick(nopf, (r) => r.pager?.faultsPerS), 1)} | 0 | ${range(pick(nopf, (r) => r.pager?.faultPagesFetched))} (${fmt((med(pick(nopf, (r) => r.pager?.bytesFetched)) ?? 0) / 2 ** 20, 0)} MB) | not complete (${fmt((100 * (med(pick(nopf, (r) => r.pager?.pagesPresent)) ?? 0)) / (nopf[0]?.pager?.pagesTotal ?? 1), 0)}% present) | ${range(pick(nopf, (r) => r.pager?.maxFaultMs), 1)} ms |`);
  md.push('');
  md.push(`Prefetch cuts demand faults ${fmt(faultRatio)}x (faults without prefetch in ${opts.noPrefetchS} s / faults with prefetch until memory complete).`);
  md.push('');
  md.push(`### Slowdown of the remaining memcheck work (${opts.windowS} s after the restore vs the unfailed protected VM)`);
  md.push('');
  md.push('| configuration | runs | steps/s before kill (same runs) | steps/s after restore | slowdown vs unfailed (all runs) |');
  md.push('|---|---|---|---|---|');
  md.push(`| unfailed, protected every ${opts.intervalMs / 1000} s | ${runs.length} | ${range(pick(runs, (r) => r.stepsPerSBefore), 1)} | - | - |`);
  for (const s of slowdown) {
    if (!s.runs) continue;
    md.push(`| ${s.config} | ${s.runs} | ${fmt(s.stepsPerSBefore)} | ${range(pick(s.config === 'file' ? file : s.config === 'network + prefetch' ? net : nopf, (r) => r.stepsPerSAfter), 1)} | ${fmt(s.slowdownPct)} % |`);
  }
  md.push('');
  md.push('### Targets');
  md.push('');
  md.push('| target | measured | met |');
  md.push('|---|---|---|');
  for (const t of targets) md.push(`| ${t.target} | ${t.unit === 'x' ? fmt(t.value) : fmt(t.value, 0)} ${t.unit} | ${t.met ? 'yes' : '**no**'} |`);
  const violations = runs.reduce((a, r) => a + r.violations, 0) + (qemu?.violations ?? 0);
  md.push('');
  md.push(`memcheck violations after restores: ${violations}.`);
  const markdown = md.join('\n') + '\n';

  const cats = ['kill→detected', 'restore prepare', 'spawn→running', 'device load', 'kill→running', 'kill→progress'];
  const splitSeries = groups.map(([label, rs]) => ({
    name: label,
    values: [med(pick(rs, (r) => r.detectMs)), med(pick(rs, (r) => r.restore.prepareMs)), med(pick(rs, (r) => r.restore.spawnToRunningMs)), med(pick(rs, (r) => r.restore.deviceLoadMs)), med(pick(rs, (r) => r.killToRunningMs)), med(pick(rs, (r) => r.killToProgressMs))],
  }));
  const charts: Record<string, string> = {
    'failover-split.svg': barChart({ title: 'Fail-over time split (median)', unit: 'ms', categories: cats, series: splitSeries, target: { value: 1000, label: 'target: death → running 1 s' } }),
    'failover-vs-baselines.svg': barChart({
      title: 'Restore spawn → running vs baselines (median)', unit: 'ms',
      categories: ['slim, file', 'slim, network', 'QEMU full (warm)', 'QEMU full (cold)', 'reboot (to progress)'],
      series: [{ name: 'spawn → running', values: [splits.file!.spawnToRunningMs.median, splits.network!.spawnToRunningMs.median, qemu?.spawnToRunningMs ?? null, qemu?.cold?.spawnToRunningMs ?? null, bootMs.median] }],
    }),
    'failover-paging.svg': barChart({
      title: 'Network mode: demand faults', unit: 'faults',
      categories: ['prefetch (until complete)', `no prefetch (${opts.noPrefetchS} s)`],
      series: [{ name: 'demand faults (median)', values: [pfFaults, npFaults] }],
    }),
    'failover-slowdown.svg': barChart({
      title: `memcheck steps/s: unfailed vs ${opts.windowS} s after restore`, unit: 'steps/s',
      categories: ['unfailed', ...slowdown.filter((s) => s.runs).map((s) => s.config)],
      series: [{ name: 'steps/s (median)', values: [unfailed, ...slowdown.filter((s) => s.runs).map((s) => s.stepsPerSAfter)] }],
    }),
  };
  return { json, markdown, charts };
}
