// The checkpoint benchmark's Markdown: its tables, the targets checked against the numbers, and the section of docs/benchmarks.md they fill.
import fs from 'node:fs';
import { BenchError } from '../errors.js';
import { fmt, type Summary } from './harness.js';

export interface CheckpointModeResult {
  memory: string;
  workingSetMb: number;
  mode: string;
  checkpoints: number;
  pauseMs: Summary;
  /** QEMU's STOP to RESUME event (absent in results from before it was measured). */
  vmPausedMs?: Summary;
  parts: Record<'stopMs' | 'collectMs' | 'copyMs' | 'devstateMs' | 'diskMs' | 'contMs', Summary>;
  mb: Summary;
  commitMs: Summary;
  sendMs: Summary;
  precopyRounds: number;
  cowCopies: Summary | null;
  faults: Summary | null;
  serviceMeanUs: Summary | null;
  serviceMaxUs: Summary | null;
}

export interface CheckpointSlowdown {
  rateMb: number;
  mode: string;
  stepsPerS: number;
  slowdownPct: number | null;
}

export interface CheckpointBenchJson {
  benchmark: 'checkpoint';
  date: string;
  host: { cpus: number; memGiB: number; kernel: string };
  /** `uptime` before and after the run. */
  load?: { before: string; after: string };
  command?: string;
  durationS?: number;
  guest: { memories: string[]; intervalS: number };
  paper: { basicPauseMs: string; cowPauseMs: string };
  results: CheckpointModeResult[];
  slowdown: CheckpointSlowdown[];
  slowdownWindowS?: number;
  disk: { checkpoints: number; pauseMs: Summary; diskFreezeMs: Summary; chainLength: Summary; merges: number; layersMerged: number; meanMergeMs: number | null } | null;
}

const ms = (v: number | null | undefined, d = 1) => (v === null || v === undefined ? '-' : `${fmt(v, d)} ms`);

/** The targets of the copy-on-write work, checked against one run's numbers. */
function targets(j: CheckpointBenchJson): string[] {
  const rows: string[] = [];
  const big = j.results.filter((r) => r.memory === j.guest.memories.at(-1));
  const cow = big.filter((r) => r.mode.startsWith('cow'));
  for (const r of cow) {
    const vm = r.vmPausedMs;
    const met = vm?.median != null && vm.p99 != null && vm.median <= 5 && vm.p99 <= 10;
    rows.push(`| CoW pause <= 5 ms median, <= 10 ms p99 (${r.memory}, ${r.workingSetMb} MB, ${r.mode}) | VM paused ${ms(vm?.median)} / ${ms(vm?.p99)}; stop sent to cont answered ${ms(r.pauseMs.median)} / ${ms(r.pauseMs.p99)} | ${met ? 'met (VM paused)' : 'missed'} |`);
  }
  for (const r of j.results.filter((x) => x.mode === 'basic')) {
    const ratio = r.pauseMs.median && r.pauseMs.p99 ? r.pauseMs.p99 / r.pauseMs.median : null;
    rows.push(`| basic pause p99 <= 2x median (${r.memory}, ${r.workingSetMb} MB) | ${ms(r.pauseMs.median)} / ${ms(r.pauseMs.p99)} = ${ratio === null ? '-' : `${fmt(ratio, 2)}x`}, pre-copy rounds ${r.precopyRounds} | ${ratio !== null && ratio <= 2 ? 'met' : 'missed'} |`);
  }
  const sizes = j.guest.memories;
  if (sizes.length >= 2) {
    const [small, large] = [sizes[0]!, sizes.at(-1)!];
    for (const mode of [...new Set(j.results.map((r) => r.mode))]) {
      for (const ws of [...new Set(j.results.map((r) => r.workingSetMb))]) {
        const a = j.results.find((r) => r.memory === small && r.mode === mode && r.workingSetMb === ws)?.parts.collectMs.median;
        const b = j.results.find((r) => r.memory === large && r.mode === mode && r.workingSetMb === ws)?.parts.collectMs.median;
        if (a == null || b == null) continue;
        // The target is about growth with the RAM size: the larger guest at most 1 ms above the smaller (below is noise).
        rows.push(`| collect ${large} at most 1 ms above ${small} (${mode}, ${ws} MB) | ${fmt(b, 2)} vs ${fmt(a, 2)} ms (difference ${fmt(b - a, 2)} ms) | ${b - a <= 1 ? 'met' : 'missed'} |`);
      }
    }
  }
  for (const s of j.slowdown.filter((x) => x.slowdownPct !== null)) {
    const bound = s.mode === 'basic' ? 5 : 10;
    const label = s.rateMb ? `${s.rateMb} MB/s` : 'unthrottled';
    rows.push(`| guest slowdown ${label}, ${s.mode}${s.rateMb ? ` <= ${bound} %` : ' (reported)'} | ${fmt(s.slowdownPct!, 1)} % | ${s.rateMb ? (s.slowdownPct! <= bound ? 'met' : 'missed') : '-'} |`);
  }
  return rows.length ? ['| target | measured | |', '|---|---|---|', ...rows] : [];
}

/** The run's tables: every configuration, the slowdown, the disk run, the targets. */
export function checkpointMarkdown(j: CheckpointBenchJson): string {
  const r = j.results;
  const lines = [
    `Run ${j.date.slice(0, 16).replace('T', ' ')} UTC, ${j.host.cpus} CPUs, kernel ${j.host.kernel}${j.durationS ? `, ${Math.round(j.durationS / 60)} min` : ''}.`,
    // Where the files went is no part of the result (and a local path has no place in the docs).
    ...(j.command ? ['', `Command: \`${j.command.replace(/ --out(=| )\S+/, '')}\``] : []),
    ...(j.load ? ['', `Load before: \`${j.load.before}\`; after: \`${j.load.after}\`.`] : []),
    '',
    `Paper (Xen, 512 MB VM): pause ${j.paper.basicPauseMs} ms basic, ${j.paper.cowPauseMs} ms copy-on-write.`,
    '',
    '*VM paused* is QEMU\'s own clock, its STOP event (vCPUs halted) to its RESUME event; *stop → cont* is the checkpointer\'s view, from sending `stop` to `cont` answered, which adds QEMU\'s wake-up before the stop takes effect and the answer\'s way back after the VM runs again.',
    '',
    '| guest | dirty set | mode | ckpts | VM paused median / p99 | stop → cont median / p99 | stop | collect | copy | devstate | cont | MB/ckpt | pre-copy rounds | CoW copies before a write (median) | fault service mean / max (median) |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
    ...r.map((x) => `| ${x.memory} | ${x.workingSetMb} MB | ${x.mode} | ${x.checkpoints} | ${ms(x.vmPausedMs?.median)} / ${ms(x.vmPausedMs?.p99)} | ${ms(x.pauseMs.median)} / ${ms(x.pauseMs.p99)} | ${ms(x.parts.stopMs.median)} | ${ms(x.parts.collectMs.median, 2)} | ${ms(x.parts.copyMs.median)}${x.mode.startsWith('cow') ? ' (after cont)' : ''} | ${ms(x.parts.devstateMs.median)} | ${ms(x.parts.contMs.median)} | ${fmt(x.mb.median)} | ${x.precopyRounds} | ${x.cowCopies ? fmt(x.cowCopies.median, 0) : '-'} | ${x.serviceMeanUs ? `${fmt(x.serviceMeanUs.median, 0)} / ${fmt(x.serviceMaxUs!.median, 0)} µs` : '-'} |`),
    '',
  ];
  if (j.slowdown.length) {
    lines.push(
      `Guest slowdown from protection (${j.guest.memories[0]} guest, memcheck over 64 MB, interval ${j.guest.intervalS} s${j.slowdownWindowS ? `, ${j.slowdownWindowS} s windows` : ''}; unprotected = mean of a window before and after):`,
      '',
      '| memcheck rate | mode | steps/s | slowdown vs unprotected |',
      '|---|---|---|---|',
      ...j.slowdown.map((s) => `| ${s.rateMb ? `${s.rateMb} MB/s` : 'unthrottled'} | ${s.mode} | ${fmt(s.stepsPerS)} | ${s.slowdownPct === null ? '-' : `${fmt(s.slowdownPct)} %`} |`),
      '',
    );
  }
  if (j.disk) {
    const d = j.disk;
    lines.push(`With a qcow2 disk (memcheck 16 MB + diskcheck, interval 1 s, ${d.checkpoints} checkpoints): pause median ${fmt(d.pauseMs.median)} ms, p99 ${fmt(d.pauseMs.p99)} ms, of which the disk freeze median ${fmt(d.diskFreezeMs.median, 2)} ms, p99 ${fmt(d.diskFreezeMs.p99, 2)} ms; chain length max ${d.chainLength.max}; ${d.merges} background merges of ${d.layersMerged} layers, mean ${fmt(d.meanMergeMs)} ms each.`, '');
  }
  const t = targets(j);
  if (t.length) lines.push('Against the targets (computed from the numbers above):', '', ...t, '');
  return lines.join('\n');
}

export const DOC_BEGIN = '<!-- checkpoint-bench:begin (generated by `hydravm bench checkpoint-page`; do not edit) -->';
export const DOC_END = '<!-- checkpoint-bench:end -->';

/** Replace the generated section of `docFile` (between DOC_BEGIN and DOC_END) by the run in `jsonFile`. */
export function writeCheckpointDoc(jsonFile: string, docFile: string): void {
  let j: CheckpointBenchJson;
  try {
    j = JSON.parse(fs.readFileSync(jsonFile, 'utf8')) as CheckpointBenchJson;
  } catch (err) {
    throw new BenchError('HYDRA_BENCH_BAD_RESULTS', `${jsonFile}: not a checkpoint benchmark result: ${(err as Error).message}`, { cause: err });
  }
  if (j.benchmark !== 'checkpoint' || !Array.isArray(j.results)) throw new BenchError('HYDRA_BENCH_BAD_RESULTS', `${jsonFile}: not a checkpoint benchmark result (benchmark: ${String(j.benchmark)})`);
  const doc = fs.readFileSync(docFile, 'utf8');
  const a = doc.indexOf(DOC_BEGIN);
  const b = doc.indexOf(DOC_END);
  if (a < 0 || b < a) throw new BenchError('HYDRA_BENCH_BAD_RESULTS', `${docFile}: no generated checkpoint section (the lines ${DOC_BEGIN} and ${DOC_END})`);
  fs.writeFileSync(docFile, doc.slice(0, a + DOC_BEGIN.length) + '\n\n' + checkpointMarkdown(j) + '\n' + doc.slice(b));
}
