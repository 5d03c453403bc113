// Markdown tables and SVG plots rendered from an evaluation's JSON (never from anything else, so numbers come only from runs).
import { summary } from '../harness.js';
import { barChart } from '../svg-chart.js';
import { scatterChart } from './line-chart.js';
import { linearFit, type LinearFit } from './fit.js';
import { PAPER, PAPER_SETUP } from './paper.js';
import type { EvalDocument, PartResult } from './types.js';
import type { SizeSample } from './parts/size.js';
import type { VmsSample } from './parts/vms.js';
import type { BaselineSample } from './parts/baseline.js';
import type { OverheadSample } from './parts/overhead.js';
import type { PaperSample, UnprotectedSample, ProtectedSample, FailoverSample, PausePhases } from './parts/paper.js';

const f = (v: number | null | undefined, d = 1) => (v === null || v === undefined || !Number.isFinite(v) ? '-' : v.toFixed(d));
const med = (xs: (number | null | undefined)[]) => summary(xs.filter((v): v is number => typeof v === 'number' && Number.isFinite(v))).median;
const range = (xs: (number | null | undefined)[], d = 0) => {
  const s = summary(xs.filter((v): v is number => typeof v === 'number' && Number.isFinite(v)));
  if (!s.n) return '-';
  return s.n === 1 ? f(s.median, d) : `${f(s.median, d)} (${f(s.min, d)}-${f(s.max, d)})`;
};
const part = <S>(doc: EvalDocument, id: string) => doc.parts.find((p) => p.id === id) as PartResult<S> | undefined;
const loadLine = (p: PartResult) => `load average at start ${p.load.start.loadavg.join(' / ')}, at end ${p.load.end.loadavg.join(' / ')} (1 / 5 / 15 min, ${p.durationS.toFixed(0)} s)`;

function statusBlock(p: PartResult): string[] {
  const out: string[] = [];
  if (p.status === 'failed') out.push(`**Failed:** ${p.error}`, '');
  if (p.status === 'waiting') out.push(`**Waiting for** ${p.waitingFor?.join(' and ')}.`, '');
  for (const w of p.waiting ?? []) out.push(`- waiting: ${w.what} — needs ${w.needs.join(' and ')}`);
  if (p.waiting?.length) out.push('');
  for (const e of p.errors ?? []) out.push(`- **not measured:** ${e.what} — ${e.error}`);
  if (p.errors?.length) out.push('');
  return out;
}

/** A warning when the host's load changed a lot while a part stepped through its configurations one after another. */
function loadDrift(p: PartResult, what: string, first: string): string[] {
  const a = p.load.start.loadavg[0] ?? 0, b = p.load.end.loadavg[0] ?? 0;
  if (Math.max(a, b) < 4 || Math.max(a, b) < 1.5 * Math.min(a, b)) return [];
  return [`**Caution:** the 1-minute load went from ${a} to ${b} during this part, which measured its ${what} one after another, so ${first} ran on a ${a > b ? 'busier' : 'quieter'} host than the later ones: a trend in the numbers below may be the load's rather than the ${what}'.`, ''];
}

export interface Rendered {
  markdown: string;
  charts: Record<string, string>;
  /** The growth verdicts, for the summary. */
  fits: { what: string; fit: LinearFit }[];
}

function fitOf(points: { x: number; y: number | null | undefined }[], unit: string, per: string): LinearFit {
  return linearFit(points.filter((p): p is { x: number; y: number } => typeof p.y === 'number' && Number.isFinite(p.y)), unit, per);
}

function sizeSection(p: PartResult<SizeSample>, r: Rendered): string[] {
  const s = p.samples;
  const sizes = [...new Set(s.map((x) => x.sizeGb))];
  const by = (g: number) => s.filter((x) => x.sizeGb === g);
  const out = [`## Scaling with VM size`, '', ...statusBlock(p), `${loadLine(p)}. Guest: memcheck over all RAM but 8 % + 112 MB (fully populated), writing ${p.config.dirtyRateMb} MB/s, protected every ${Number(p.config.intervalMs) / 1000} s; ${p.config.rounds} protect → kill → network restore round(s) per size, ${p.config.checkpointsPerRound} incremental checkpoints each. Cells: median (min-max) over samples.`, ''];
  out.push('| VM size | rounds | full checkpoint | full ckpt size | pause median | pause p99 | MB per ckpt | commit median | restore spawn → running | kill → running | memory complete after running | paper (512 MB) |');
  out.push('|---|---|---|---|---|---|---|---|---|---|---|---|');
  for (const g of sizes) {
    const rs = by(g);
    const pauses = rs.flatMap((x) => x.pauseMs);
    out.push(`| ${g} GB | ${rs.length} | ${range(rs.map((x) => x.fullCheckpointMs))} ms | ${range(rs.map((x) => x.fullCheckpointMb))} MB | ${f(summary(pauses).median)} ms | ${f(summary(pauses).p99)} ms | ${f(med(rs.flatMap((x) => x.checkpointMb)))} | ${f(med(rs.flatMap((x) => x.commitMs)), 0)} ms | ${range(rs.map((x) => x.restore?.spawnToRunningMs))} ms | ${range(rs.map((x) => x.restore?.killToRunningMs))} ms | ${range(rs.map((x) => x.restore?.completeAfterRunningMs))} ms | ${g === 0.5 ? `pause ${PAPER.pause!.paper}; fail-over ${PAPER.failover!.paper}` : 'not measured'} |`);
  }
  const series = [
    { key: 'full-checkpoint', what: 'full checkpoint time', unit: 'ms', pts: s.map((x) => ({ x: x.sizeGb, y: x.fullCheckpointMs })) },
    { key: 'pause', what: `pause at ${p.config.dirtyRateMb} MB/s dirtied`, unit: 'ms', pts: s.flatMap((x) => x.pauseMs.map((y) => ({ x: x.sizeGb, y }))) },
    { key: 'restore', what: 'restore spawn → running', unit: 'ms', pts: s.map((x) => ({ x: x.sizeGb, y: x.restore?.spawnToRunningMs })) },
    { key: 'memory-complete', what: 'memory complete after running (network)', unit: 'ms', pts: s.map((x) => ({ x: x.sizeGb, y: x.restore?.completeAfterRunningMs })) },
  ];
  out.push('', `Growth with VM size (least-squares line over every raw sample; "flat" when the slope is within two standard errors of zero)${Number(p.config.rounds) === 1 ? '. This run took one round per size, so full checkpoint, restore and memory-complete fits rest on one point per size: read them as indicative' : ''}:`, '');
  out.push(...loadDrift(p, 'sizes', 'the smaller sizes'));
  for (const se of series) {
    const fit = fitOf(se.pts, se.unit, 'GB');
    r.fits.push({ what: `${se.what} vs VM size`, fit });
    out.push(`- ${se.what}: ${fit.text}`);
    const pts = se.pts.filter((q): q is { x: number; y: number } => typeof q.y === 'number');
    r.charts[`size-${se.key}.svg`] = scatterChart({ title: `${se.what} vs VM size`, xLabel: 'VM size (GB)', yLabel: se.unit, series: [{ name: 'samples', points: pts, fit: { slope: fit.slope, intercept: fit.intercept, label: fit.text } }] });
  }
  out.push('', `Plots: ${series.map((se) => `\`size-${se.key}.svg\``).join(', ')}.`, '');

  out.push('### Memory cost against a standby VM', '');
  out.push('Memory held while a VM is protected, against a standby-VM design that keeps one full copy of the VM\'s RAM on another host. Elsewhere: the store process (anonymous RSS, max over the protected window; its file pages are reclaimable cache, and one store serves many VMs, see the next section). One store process serves the sizes one after another, so its RSS is a high-water mark that a smaller size may have set. On the VM\'s own host: its checkpointer, mostly the pre-faulted staging buffer the dirty pages are copied into during the pause.', '');
  out.push('| VM size | store RSS (anon), elsewhere | elsewhere / standby | checkpointer RSS (anon), VM\'s host | (store + checkpointer) / standby | standby VM | paper |');
  out.push('|---|---|---|---|---|---|---|');
  const ratios: { g: number; store: number; ck: number | null }[] = [];
  for (const g of sizes) {
    const rs = by(g);
    const store = med(rs.map((x) => x.storeRssAnonMb));
    const ck = med(rs.map((x) => x.checkpointerRssAnonMb));
    const standby = g * 1024;
    if (store !== null) ratios.push({ g, store, ck });
    const pct = (v: number | null) => (v === null ? '-' : `${(v / standby * 100).toFixed(1)} %`);
    out.push(`| ${g} GB | ${f(med(rs.map((x) => x.storeRssMb)), 0)} (${f(store, 0)}) MB | ${pct(store)} | ${f(med(rs.map((x) => x.checkpointerRssMb)), 0)} (${f(ck, 0)}) MB | ${pct(store !== null && ck !== null ? store + ck : null)} | ${f(standby, 0)} MB | ${PAPER.memory!.paper} |`);
  }
  const big = ratios[ratios.length - 1];
  if (big) {
    const standby = big.g * 1024;
    const both = big.store + (big.ck ?? 0);
    out.push('', `**In one line:** protecting a ${big.g} GB VM reserves ${f(big.store, 0)} MB on other hosts (the store) against ${standby} MB for a standby VM, ${(big.store / standby * 100).toFixed(1)} % (${(standby / big.store).toFixed(1)}× less); counting the checkpointer's ${f(big.ck, 0)} MB on the VM's own host too, ${(both / standby * 100).toFixed(1)} % (${(standby / both).toFixed(1)}× less).`);
  }
  out.push('', `Why it differs from the paper: ${PAPER.memory!.why}`, '');
  return out;
}

function vmsSection(p: PartResult<VmsSample>, r: Rendered, cores: number): string[] {
  const s = p.samples;
  const out = [`## Scaling with VMs per store`, '', ...statusBlock(p), `${loadLine(p)}. Each VM: ${p.config.memoryMb} MB, memcheck over ${p.config.workingSetMb} MB at ${p.config.rateMb} MB/s, protected every ${Number(p.config.intervalMs) / 1000} s to one store process; measured over a ${p.config.windowS} s window after the initial checkpoints.`, ''];
  out.push('| VMs | checkpoints | commit median | commit p99 | achieved interval median | pause median | store RSS (anon) | store CPU (% of a core) | paper |');
  out.push('|---|---|---|---|---|---|---|---|---|');
  for (const x of s) {
    const c = summary(x.commitMs);
    out.push(`| ${x.vms} | ${x.commitMs.length} | ${f(c.median, 0)} ms | ${f(c.p99, 0)} ms | ${f(med(x.intervalMs), 0)} ms | ${f(med(x.pauseMs))} ms | ${f(x.storeRssMb, 0)} (${f(x.storeRssAnonMb, 0)}) MB | ${f(x.storeCpuPct, 0)} | ${x.vms === 1 ? `commit ${PAPER.commit!.paper}; ${PAPER.interval!.paper}` : 'one VM only'} |`);
  }
  const series = [
    { key: 'commit', what: 'commit latency', unit: 'ms', pts: s.flatMap((x) => x.commitMs.map((y) => ({ x: x.vms, y }))) },
    { key: 'interval', what: 'achieved interval', unit: 'ms', pts: s.flatMap((x) => x.intervalMs.map((y) => ({ x: x.vms, y }))) },
    { key: 'store-rss', what: 'store RSS', unit: 'MB', pts: s.map((x) => ({ x: x.vms, y: x.storeRssMb })) },
    { key: 'store-cpu', what: 'store CPU', unit: '% of a core', pts: s.map((x) => ({ x: x.vms, y: x.storeCpuPct })) },
  ];
  out.push('', ...loadDrift(p, 'VM counts', 'the smaller counts'));
  out.push('', 'Growth with the number of VMs (least-squares line; store RSS and CPU have one sample per count):', '');
  for (const se of series) {
    const fit = fitOf(se.pts, se.unit, 'VM');
    r.fits.push({ what: `${se.what} vs VMs per store`, fit });
    out.push(`- ${se.what}: ${fit.text}`);
    const pts = se.pts.filter((q): q is { x: number; y: number } => typeof q.y === 'number');
    r.charts[`vms-${se.key}.svg`] = scatterChart({ title: `${se.what} vs VMs per store`, xLabel: 'VMs protected to one store', yLabel: se.unit, series: [{ name: 'samples', points: pts, fit: { slope: fit.slope, intercept: fit.intercept, label: fit.text } }] });
  }
  const configured = Number(p.config.intervalMs);
  const holds = s.filter((x) => (med(x.intervalMs) ?? Infinity) <= configured * 1.2).map((x) => x.vms);
  const misses = s.filter((x) => !holds.includes(x.vms));
  if (s.length) {
    out.push('', `**What fits:** ${holds.length ? `up to ${Math.max(...holds)} VM(s) per store hold the configured ${configured / 1000} s interval (median within 20 %)` : 'no count held the configured interval'}${misses.length ? `; with ${misses.map((x) => x.vms).join(', ')} VMs the achieved interval is ${misses.map((x) => `${f((med(x.intervalMs) ?? 0) / 1000, 1)} s`).join(', ')}, while the store uses ${misses.map((x) => `${f(x.storeCpuPct, 0)} %`).join(', ')} of a core, so the store is not what limits it: the VMs' TCG threads and their checkpointers share the ${cores} cores` : ''}.`);
  }
  out.push('', `Plots: ${series.map((se) => `\`vms-${se.key}.svg\``).join(', ')}.`, '', `Why the commit differs from the paper: ${PAPER.commit!.why} Why the interval does: ${PAPER.interval!.why}`, '');
  return out;
}

function baselineSection(p: PartResult<BaselineSample>, size: PartResult<SizeSample> | undefined, r: Rendered): string[] {
  const s = p.samples;
  const out = [`## Baseline: QEMU full save/restore`, '', ...statusBlock(p), `${loadLine(p)}. A fully populated guest (memcheck over all RAM but 8 % + 112 MB) is stopped and saved with \`migrate\` to \`file:\`; a new QEMU with the same arguments and \`-incoming defer\` loads it (\`migrate-incoming\`) and runs (\`cont\`). Cold: \`sync; echo 3 > /proc/sys/vm/drop_caches\`, then \`fincore\` must show at most 1 % of the file cached; warm: the file read just before.`, ''];
  out.push('| VM size | cache | n | saved file | save | load | spawn → running | cold verified (cached before load) | HydraVM slim restore spawn → running (same size) | paper |');
  out.push('|---|---|---|---|---|---|---|---|---|---|');
  const cats: string[] = [];
  const full: (number | null)[] = [];
  const slim: (number | null)[] = [];
  for (const g of [...new Set(s.map((x) => x.sizeGb))]) {
    const slimMs = med(size?.samples.filter((x) => x.sizeGb === g).map((x) => x.restore?.spawnToRunningMs) ?? []);
    for (const cache of ['cold', 'warm'] as const) {
      const rs = s.filter((x) => x.sizeGb === g && x.cache === cache);
      if (!rs.length) continue;
      const verified = cache === 'cold' ? `${rs.filter((x) => x.coldVerified).length}/${rs.length} (${range(rs.map((x) => x.residentMbBefore), 1)} MB)` : `- (${range(rs.map((x) => x.residentMbBefore), 0)} MB)`;
      out.push(`| ${g} GB | ${cache} | ${rs.length} | ${f(rs[0]!.fileMb, 0)} MB | ${f(med(rs.map((x) => x.saveMs)), 0)} ms | ${range(rs.map((x) => x.loadMs))} ms | ${range(rs.map((x) => x.spawnToRunningMs))} ms | ${verified} | ${slimMs !== null ? `${f(slimMs, 0)} ms (${f((med(rs.map((x) => x.spawnToRunningMs)) ?? 0) / slimMs, 1)}× faster)` : 'not measured in this run'} | ${g === 1 ? `full restore ${PAPER.fullRestore!.paper}` : 'not measured'} |`);
      cats.push(`${g} GB ${cache}`);
      full.push(med(rs.map((x) => x.spawnToRunningMs)));
      slim.push(slimMs);
    }
  }
  if (cats.length) r.charts['baseline-restore.svg'] = barChart({ title: 'QEMU full restore vs HydraVM slim restore (spawn → running)', unit: 'ms', categories: cats, series: [{ name: 'QEMU full restore', values: full }, { name: 'HydraVM slim restore', values: slim }] });
  out.push('', 'Plot: `baseline-restore.svg`.', '', `Why it differs from the paper: ${PAPER.fullRestore!.why}`, '');
  return out;
}

/** Per round: 1 - protected / unprotected steps/s, in %. */
function overheads(rs: OverheadSample[]): number[] {
  return rs.filter((x) => x.unprotectedStepsPerS && x.protectedStepsPerS !== null).map((x) => (1 - x.protectedStepsPerS! / x.unprotectedStepsPerS!) * 100);
}

function overheadSection(p: PartResult<OverheadSample>, r: Rendered): string[] {
  const s = p.samples;
  const out = [`## Protection overhead (same VM, unprotected vs protected)`, '', ...statusBlock(p), `${loadLine(p)}. A ${p.config.memoryMb} MB guest runs memcheck unthrottled over ${p.config.workingSetMb} MB (a worst case: it writes as fast as the vCPU can); each round measures its steps/s for ${p.config.windowS} s unprotected, then ${p.config.windowS} s protected every ${Number(p.config.intervalMs) / 1000} s (the paper's interval).`, ''];
  out.push('| round | mode | unprotected steps/s | protected steps/s | overhead | checkpoints | pause median | MB per ckpt | paper |');
  out.push('|---|---|---|---|---|---|---|---|---|');
  for (const x of s) {
    const pct = x.unprotectedStepsPerS && x.protectedStepsPerS !== null ? (1 - x.protectedStepsPerS / x.unprotectedStepsPerS) * 100 : null;
    out.push(`| ${x.round} | ${x.mode} | ${f(x.unprotectedStepsPerS)} | ${f(x.protectedStepsPerS)} | ${f(pct)} % | ${x.checkpoints} | ${f(med(x.pauseMs))} ms | ${f(med(x.checkpointMb))} | ${PAPER.overhead!.paper} |`);
  }
  for (const mode of [...new Set(s.map((x) => x.mode))]) {
    const pcts = overheads(s.filter((x) => x.mode === mode));
    out.push('', `${mode}: overhead **${range(pcts, 1)} %** (median (min-max) of ${pcts.length} round(s), each protected against the unprotected window just before it).`);
  }
  if (s.length) r.charts['overhead.svg'] = barChart({ title: 'memcheck throughput, same VM', unit: 'steps/s', categories: s.map((x) => `round ${x.round} ${x.mode}`), series: [{ name: 'unprotected', values: s.map((x) => x.unprotectedStepsPerS) }, { name: `protected every ${Number(p.config.intervalMs) / 1000} s`, values: s.map((x) => x.protectedStepsPerS) }] });
  out.push('', 'Plot: `overhead.svg`.', '', `Why it differs from the paper: ${PAPER.overhead!.why}`, '');
  return out;
}

const pct = (a: number | null | undefined, b: number | null | undefined) => (a && b ? (a / b - 1) * 100 : null);
function warmBaseline(unprot: UnprotectedSample[], w: string): number | null {
  const mine = unprot.filter((x) => x.workload === w);
  const warm = mine.filter((x) => x.run !== 1);
  return med((warm.length ? warm : mine).map((x) => x.runS));
}

function paperSection(p: PartResult<PaperSample>, r: Rendered): string[] {
  const cfg = p.config as { workloads?: { id: string; title: string; paper: string; scale: number; step: string }[]; intervalsS?: number[]; failoverIntervalS?: number; image?: string };
  const out = [`## The paper's Figures 2-4 and Table II on its own workloads`, '', ...statusBlock(p)];
  out.push(`${loadLine(p)}. Each run boots a fresh 512 MB, 1-vCPU Debian guest (an overlay on the workload image${cfg.image ? `, ${cfg.image}` : ''}); its runner starts the job at boot (\`hydra.workload=<id> hydra.scale=<n>\`) and prints a line per step on the serial console, which the harness timestamps. A protected run is protected at the runner's gate, so the initial full copy is over before the job starts (column "full copy before start"). Run time is the host's time from the job's start line to its done line.`, '');
  for (const w of cfg.workloads ?? []) out.push(`- **${w.id}** (the paper's ${w.paper}): ${w.title}; scale ${w.scale}, one step per ${w.step}.`);
  out.push('');
  const la = p.load.start.loadavg[0] ?? 0, lb = p.load.end.loadavg[0] ?? 0;
  if (Math.max(la, lb) >= 4 && Math.max(la, lb) >= 1.5 * Math.min(la, lb)) {
    out.push(`**Caution:** the 1-minute load went from ${la} to ${lb} during this part, which runs its workloads one after another (${(cfg.workloads ?? []).map((w) => w.id).join(', then ')}), so the first ran on a ${la > lb ? 'busier' : 'quieter'} host than the last. Every comparison across runs here (Figure 3's overhead against the unprotected run, Table II's remaining time against the never-failed run) carries that noise: an overhead or slowdown below zero is the load's, not the protection's.`, '');
  }
  const s = p.samples;
  const unprot = s.filter((x): x is UnprotectedSample => x.figure === 'unprotected');
  const prot = s.filter((x): x is ProtectedSample => x.figure === 'protected');
  const fo = s.filter((x): x is FailoverSample => x.figure === 'failover');
  // Figure 3's baseline: the warm unprotected runs of the boot the protected runs share (the first run of a boot is cold).
  const base = (w: string) => warmBaseline(unprot, w);
  const workloads = [...new Set(s.map((x) => x.workload))];
  if (unprot.length) {
    out.push('### Unprotected runs', '', 'The protected runs of a workload share one boot with its unprotected runs (the job runs once per run, in a fresh RAM directory; the runner waits at a gate between runs while the harness protects or unprotects the VM). Run 1 of a boot meets a cold page cache, as the fail-over runs\' single-run boots do: it is Table II\'s never-failed reference. The later unprotected runs, warm like the protected runs after them, are Figure 3\'s baseline (their median).', '');
    out.push('| workload | run in boot | boot → runner ready | run time | last 50 % |', '|---|---|---|---|---|');
    for (const x of unprot) out.push(`| ${x.workload} | ${x.run} | ${x.bootS === null ? '-' : `${f(x.bootS)} s`} | ${f(x.runS)} s | ${f(x.lastHalfS)} s |`);
    out.push('');
  }
  if (prot.length || fo.some((x) => x.pauses.length)) {
    out.push('### Figure 2: pause per checkpoint and its phases', '', 'Medians over the incremental checkpoints taken while the job ran. Phases: stop = QMP `stop` answered; collect = finding the dirty pages (basic: PAGEMAP_SCAN; CoW: re-arming write protection); copy = copying them (basic: inside the pause; CoW: after `cont` while the guest runs, so outside the pause); device = QEMU saving the device state (overlaps collect and copy); disk = freezing the root disk\'s qcow2 layer; cont = QMP `cont` answered.', '');
    out.push('| workload | mode | interval | checkpoints | pause median | pause p99 | stop | collect | copy | device | disk | cont | MB per ckpt | paper |', '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|');
    const rows = [...prot.map((x) => ({ w: x.workload, mode: x.mode, iv: `${x.intervalS} s`, pauses: x.pauses })), ...fo.filter((x) => x.pauses.length).map((x) => ({ w: x.workload, mode: 'basic' as const, iv: `${x.intervalS} s (fail-over run, ${x.config}, to the kill)`, pauses: x.pauses }))];
    for (const x of rows) {
      const q = (k: keyof PausePhases) => f(med(x.pauses.map((h) => h[k] as number)));
      out.push(`| ${x.w} | ${x.mode} | ${x.iv} | ${x.pauses.length} | ${q('pauseMs')} ms | ${f(summary(x.pauses.map((h) => h.pauseMs)).p99)} ms | ${q('stopMs')} | ${q('collectMs')} | ${q('copyMs')} | ${q('devstateMs')} | ${q('diskMs')} | ${q('contMs')} | ${f(med(x.pauses.map((h) => h.bytes / 2 ** 20)))} | ${x.w === 'compile' ? (x.mode === 'cow' ? '~5-7 ms (CoW)' : '~70-80 ms (basic)') : 'not shown (Figure 2 is the compile)'} |`);
    }
    for (const w of workloads) {
      const xs = prot.filter((x) => x.workload === w);
      if (!xs.length) continue;
      const phase = (k: keyof PausePhases) => xs.map((x) => med(x.pauses.map((h) => h[k] as number)));
      r.charts[`paper-fig2-${w}.svg`] = barChart({ title: `Figure 2 (${w}): pause per checkpoint, medians by phase`, unit: 'ms', categories: xs.map((x) => `${x.mode} ${x.intervalS} s`), series: [{ name: 'pause', values: phase('pauseMs') }, { name: 'collect', values: phase('collectMs') }, { name: 'copy', values: phase('copyMs') }, { name: 'device state', values: phase('devstateMs') }, { name: 'disk', values: phase('diskMs') }] });
    }
    out.push('', `Plots: ${workloads.filter((w) => prot.some((x) => x.workload === w)).map((w) => `\`paper-fig2-${w}.svg\``).join(', ') || '-'}.`, '', `Why it differs from the paper: ${PAPER.fig2!.why}`, '');
  }
  if (prot.length) {
    out.push('### Figure 3: workload overhead and level of protection', '', 'Overhead = protected run time / the median warm unprotected run time of the same boot - 1 (one run per mode and interval). Level of protection = incremental checkpoints taken per second of the job\'s run, the paper\'s measure (it counts 1 per second as 100 %).', '');
    out.push('| workload | mode | interval | run time | unprotected | overhead | checkpoints | level of protection | full copy before start | paper |', '|---|---|---|---|---|---|---|---|---|---|');
    for (const x of prot) out.push(`| ${x.workload} | ${x.mode} | ${x.intervalS} s | ${f(x.runS)} s | ${f(base(x.workload))} s | ${f(pct(x.runS, base(x.workload)))} % | ${x.checkpoints} | ${f(x.checkpointsPerS, 2)} /s | ${x.protectedBeforeStart ? 'yes' : 'no'} | ${x.workload === 'compile' ? '< 13 %' : '< 4 %'} |`);
    for (const w of workloads) {
      const xs = prot.filter((x) => x.workload === w);
      if (!xs.length) continue;
      const ivs = [...new Set(xs.map((x) => x.intervalS))].sort((a, b) => a - b);
      const modes = [...new Set(xs.map((x) => x.mode))];
      r.charts[`paper-fig3-${w}.svg`] = barChart({ title: `Figure 3 (${w}): slowdown while protected`, unit: '% over unprotected', categories: ivs.map((i) => `every ${i} s`), series: modes.map((m) => ({ name: m, values: ivs.map((i) => pct(xs.find((x) => x.mode === m && x.intervalS === i)?.runS, base(w))) })) });
    }
    out.push('', `Plots: ${workloads.filter((w) => prot.some((x) => x.workload === w)).map((w) => `\`paper-fig3-${w}.svg\``).join(', ')}.`, '', `Why it differs from the paper: ${PAPER.fig3!.why}`, '');
  }
  if (fo.length) {
    out.push('### Figure 4: fail-over time split', '', `Protected every ${cfg.failoverIntervalS ?? 2} s (basic); once the job is past 50 % and a checkpoint begun after that has committed, checkpointing stops and QEMU is SIGKILLed. detect = kill → the VM's supervisor records the crash; supervisor gone = kill → it has exited; restore called = kill → the restore begins (the harness also waits for the dead VM's checkpointer to exit); then the restore: prepare (image metadata, device state, disk overlays), start (the VM's supervisor and QEMU, to QEMU waiting for its state), pager + QMP (the network pager taking over guest RAM, connecting to QMP), device load (\`migrate-incoming\` of the device state) and \`cont\`; QEMU spawn → running is the same span from QEMU's own start. All in ms.`, '');
    out.push('| workload | restore | detect | supervisor gone | restore called | prepare | start | pager + QMP | device load + cont | QEMU spawn → running | restore → running | kill → running | paper |', '|---|---|---|---|---|---|---|---|---|---|---|---|---|');
    for (const x of fo) {
      const t = x.timings;
      out.push(`| ${x.workload} | ${x.config} | ${f(x.detectMs, 0)} | ${f(x.supervisorGoneMs, 0)} | ${f(x.restoreCalledMs, 0)} | ${f(t.prepareMs, 0)} | ${f(t.spawnMs, 0)} | ${f(t.launchToRunningMs - t.spawnMs - t.deviceLoadMs, 0)} | ${f(t.deviceLoadMs, 0)} | ${f(t.spawnToRunningMs, 0)} | ${f(t.totalMs, 0)} | ${f(x.killToRunningMs, 0)} | < 1.6 s |`);
    }
    r.charts['paper-fig4.svg'] = barChart({ title: 'Figure 4: fail-over time split', unit: 'ms', categories: fo.map((x) => `${x.workload} ${x.config}`), series: [
      { name: 'until the restore is called', values: fo.map((x) => x.restoreCalledMs) },
      { name: 'prepare', values: fo.map((x) => x.timings.prepareMs) },
      { name: 'start (supervisor, QEMU)', values: fo.map((x) => x.timings.spawnMs) },
      { name: 'pager + QMP', values: fo.map((x) => x.timings.launchToRunningMs - x.timings.spawnMs - x.timings.deviceLoadMs) },
      { name: 'device load + cont', values: fo.map((x) => x.timings.deviceLoadMs) },
      { name: 'kill → running', values: fo.map((x) => x.killToRunningMs) },
    ] });
    out.push('', 'Plot: `paper-fig4.svg`.', '', `Why it differs from the paper: ${PAPER.fig4!.why}`, '');
    out.push('### Table II: the last 50 % after a slim restore', '', 'Remaining = from the restored guest running to the job\'s done line; never failed = the unprotected run\'s time from the same fraction of the job (the restored checkpoint\'s) to its end. Memory complete = from running until the pager held every page (network mode; "-" when not within the job).', '');
    out.push('| workload | restore | resumed at | remaining | never failed | slowdown | memory complete | pages fetched on fault / prefetched | paper |', '|---|---|---|---|---|---|---|---|---|');
    for (const x of fo) out.push(`| ${x.workload} | ${x.config} | ${f(x.resumedAt * 100, 0)} % | ${f(x.remainingS)} s | ${f(x.referenceS)} s | ${f(pct(x.remainingS, x.referenceS))} % | ${x.memoryCompleteMs === null ? '-' : `${f(x.memoryCompleteMs / 1000)} s`} | ${x.faultPages ?? '-'} / ${x.prefetchedPages ?? '-'} | not prohibitive (figures not legible) |`);
    out.push('', `Why it differs from the paper: ${PAPER.table2!.why}`, '');
  }
  return out;
}

function comparisonTable(doc: EvalDocument): string[] {
  const size = part<SizeSample>(doc, 'size');
  const vms = part<VmsSample>(doc, 'vms');
  const base = part<BaselineSample>(doc, 'baseline');
  const over = part<OverheadSample>(doc, 'overhead');
  const half = size?.samples.filter((x) => x.sizeGb === 0.5) ?? [];
  const one = vms?.samples.find((x) => x.vms === 1);
  // The paper's full restore was of 1 GB: ours at 1 GB if measured, else the largest size measured.
  const coldAll = base?.samples.filter((x) => x.cache === 'cold') ?? [];
  const coldGb = coldAll.some((x) => x.sizeGb === 1) ? 1 : Math.max(0, ...coldAll.map((x) => x.sizeGb));
  const coldGb1 = coldAll.filter((x) => x.sizeGb === coldGb);
  const basicPct = overheads(over?.samples.filter((x) => x.mode === 'basic') ?? []);
  const rows: [string, string, string][] = [
    ['pause', half.length ? `${f(med(half.flatMap((x) => x.pauseMs)))} ms median (0.5 GB, basic)` : '-', PAPER.pause!.why],
    ['commit', one ? `${f(med(one.commitMs), 0)} ms median for ~${f(med(one.checkpointMb ?? []), 0)} MB per checkpoint (1 VM)` : '-', PAPER.commit!.why],
    ['interval', one ? `${f(med(one.intervalMs), 0)} ms achieved for 1000 ms configured` : '-', PAPER.interval!.why],
    ['failover', half.length ? `${range(half.map((x) => x.restore?.killToRunningMs))} ms QEMU death → running (0.5 GB, network)` : '-', PAPER.failover!.why],
    ['fullRestore', coldGb1.length ? `${range(coldGb1.map((x) => x.spawnToRunningMs))} ms QEMU full restore, ${coldGb} GB fully populated, cold cache` : '-', PAPER.fullRestore!.why],
    ['overhead', basicPct.length ? `${range(basicPct, 1)} % (basic; memcheck unthrottled, every 2 s; median (min-max) of rounds)` : '-', PAPER.overhead!.why],
  ];
  // The paper's own workloads, when this run had them.
  const paper = part<PaperSample>(doc, 'paper');
  const ps = paper?.samples ?? [];
  const prot = ps.filter((x): x is ProtectedSample => x.figure === 'protected');
  const fo = ps.filter((x): x is FailoverSample => x.figure === 'failover');
  const unprotRun = (w: string) => warmBaseline(ps.filter((x): x is UnprotectedSample => x.figure === 'unprotected'), w);
  if (prot.length || fo.length) {
    const at2 = (w: string, m: string) => prot.find((x) => x.workload === w && x.mode === m && x.intervalS === 2);
    const pauseOf = (x: ProtectedSample | undefined) => (x ? `${f(med(x.pauses.map((h) => h.pauseMs)))} ms` : '-');
    rows.push(['fig2', `compile every 2 s: basic ${pauseOf(at2('compile', 'basic'))}, CoW ${pauseOf(at2('compile', 'cow'))} (median)`, PAPER.fig2!.why]);
    const ov = (w: string) => prot.filter((x) => x.workload === w).map((x) => pct(x.runS, unprotRun(w)));
    rows.push(['fig3', ['compile', 'transcode'].map((w) => `${w} ${range(ov(w), 1)} %`).join('; ') + ' (median (min-max) over intervals 1-10 s and modes; one run each)', PAPER.fig3!.why]);
    const net = fo.filter((x) => x.config === 'network');
    rows.push(['fig4', net.length ? `${net.map((x) => `${x.workload} ${f(x.killToRunningMs, 0)} ms`).join(', ')} QEMU death → running (network), of which ${net.map((x) => f(x.restoreCalledMs, 0)).join(', ')} ms before the restore began (the harness waits for the dead VM's checkpointer to exit) and ${net.map((x) => f(x.timings.totalMs, 0)).join(', ')} ms the restore itself` : '-', PAPER.fig4!.why]);
    const boots = ps.filter((x): x is UnprotectedSample => x.figure === 'unprotected' && x.bootS !== null).map((x) => x.bootS! * 1000);
    if (boots.length) rows.push(['reboot', `${range(boots)} ms from QEMU start to the Debian guest's first service (the workload runner) ready, against ${range(fo.map((x) => x.killToRunningMs))} ms fail-over QEMU death → running`, PAPER.reboot!.why]);
    rows.push(['table2', fo.length ? fo.map((x) => `${x.workload} ${x.config} ${f(pct(x.remainingS, x.referenceS))} %`).join('; ') + ' slower than never failed' : '-', PAPER.table2!.why]);
  }
  return [
    `## Beside the paper`, '', `Paper: ${PAPER_SETUP}. Ours: this run (${doc.environment.accel.toUpperCase()}, ${doc.environment.machine.cores} cores).`, '',
    '| what | HydraVM (this run) | paper | why they differ |', '|---|---|---|---|',
    ...rows.map(([k, ours, why]) => `| ${PAPER[k]!.what} | ${ours} | ${PAPER[k]!.paper} | ${why} |`), '',
  ];
}

export function renderReport(doc: EvalDocument): Rendered {
  const r: Rendered = { markdown: '', charts: {}, fits: [] };
  const e = doc.environment;
  const out: string[] = [
    `# HydraVM evaluation${doc.quick ? ' (--quick)' : ''}`, '',
    ...(doc.runs && doc.runs.length > 1
      ? [`Merged from ${doc.runs.length} runs (${doc.startedAt} → ${doc.finishedAt}, ${(doc.durationS / 60).toFixed(1)} min of wall time; a run that overlapped another shared the 2 cores with it, see the load columns):`, '', ...doc.runs.map((x) => `- \`${x.command.join(' ')}\`: ${x.startedAt} → ${x.finishedAt} (${(x.durationS / 60).toFixed(1)} min), parts ${x.parts.join(', ')}${x.unfinished?.length ? `; stopped before ${x.unfinished.join(', ')}` : ''}, commit ${x.commit.slice(0, 12)}.`), '']
      : [`Run ${doc.startedAt} → ${doc.finishedAt} (${(doc.durationS / 60).toFixed(1)} min): \`${doc.command.join(' ')}\`.${doc.unfinished?.length ? ` **The run stopped before its parts ${doc.unfinished.join(', ')}: they are not in this file.**` : ''}`, '']),
    `Machine: ${e.machine.cpuModel}, ${e.machine.cores} cores, ${e.machine.memGiB} GiB, Linux ${e.machine.kernel}; ${e.qemu.version}; accelerator ${e.accel}; commit ${e.git.commit.slice(0, 12)}${e.git.dirty ? ' (with uncommitted changes)' : ''} on ${e.git.branch}; Node ${e.node}.`, '',
    `Protection modes measured: ${doc.capabilities.modes.join(', ')}${doc.capabilities.cow ? '' : ' (copy-on-write waits for `hydravm protect --cow`)'}; Debian guest image: ${doc.capabilities.debianImage ? 'available' : 'not yet (`hydravm image build` is absent)'}; its workload runner: ${doc.capabilities.debianWorkloads ? 'available' : 'not yet'}.`, '',
    '| part | status | started | duration | load average at start → end (1 min) |', '|---|---|---|---|---|',
    ...doc.parts.map((p) => `| ${p.title} | ${p.status}${p.waitingFor ? ` (for ${p.waitingFor.join(', ')})` : ''} | ${p.startedAt.slice(11, 19)} | ${p.durationS.toFixed(0)} s | ${p.load.start.loadavg[0]} → ${p.load.end.loadavg[0]} |`), '',
  ];
  const size = part<SizeSample>(doc, 'size');
  if (doc.parts.some((p) => p.id !== 'paper' && p.status === 'done')) out.push(...comparisonTable(doc));
  if (size) out.push(...sizeSection(size, r));
  const vms = part<VmsSample>(doc, 'vms');
  if (vms) out.push(...vmsSection(vms, r, doc.environment.machine.cores));
  const base = part<BaselineSample>(doc, 'baseline');
  if (base) out.push(...baselineSection(base, size, r));
  const over = part<OverheadSample>(doc, 'overhead');
  if (over) out.push(...overheadSection(over, r));
  const paper = part<PaperSample>(doc, 'paper');
  if (paper) out.push(...paperSection(paper, r));
  r.markdown = out.join('\n') + '\n';
  return r;
}
