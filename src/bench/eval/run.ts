// `hydravm bench eval`: runs the chosen parts in order, records each with its load and raw samples, writes JSON, Markdown and plots.
import fs from 'node:fs';
import path from 'node:path';
import { BenchError } from '../../errors.js';
import { writeResults } from '../harness.js';
import { environment, loadSample } from './environment.js';
import { detectCapabilities } from './capabilities.js';
import { Progress } from './progress.js';
import { defaultOptions, type EvalOptions, type Part } from './part.js';
import { renderReport } from './report.js';
import { PART_IDS, type EvalDocument, type PartId, type PartResult } from './types.js';
import { sizePart } from './parts/size.js';
import { vmsPart } from './parts/vms.js';
import { baselinePart } from './parts/baseline.js';
import { overheadPart } from './parts/overhead.js';
import { paperPart } from './parts/paper.js';

// The paper's figures first: they are the longest part and compare run times across runs, so they get
// the run's first (and, on a long run, most predictable) stretch; the size part, the most open-ended, last.
const PARTS: Part[] = [paperPart, overheadPart, baselinePart, vmsPart, sizePart] as Part[];

export interface EvalRunOptions {
  outDir: string;
  quick: boolean;
  only?: string[];
  /** Overrides of the defaults (sizes, counts, repeats). */
  overrides?: Partial<EvalOptions>;
  command: string[];
  log: (line: string) => void;
}

export function parseOnly(only: string[] | undefined): PartId[] {
  if (!only || !only.length) return PART_IDS;
  const bad = only.filter((p) => !PART_IDS.includes(p as PartId));
  if (bad.length) throw new BenchError('HYDRA_BENCH_BAD_OPTION', `bench eval --only: unknown part${bad.length > 1 ? 's' : ''} ${bad.join(', ')} (parts: ${PART_IDS.join(', ')})`);
  return only as PartId[];
}

export async function runEval(o: EvalRunOptions): Promise<{ doc: EvalDocument; files: string[] }> {
  const ids = parseOnly(o.only);
  const opts: EvalOptions = { ...defaultOptions(o.quick), ...o.overrides };
  const parts = PARTS.filter((p) => ids.includes(p.id));
  const caps = detectCapabilities();
  // Read before the run: the checkout may move while a long run goes on.
  const env = environment();
  const t0 = performance.now();
  const startedAt = new Date().toISOString();
  const progress = new Progress(parts.map((p) => ({ id: p.id, ...p.plan(opts, caps) })), o.log);
  const results: PartResult[] = [];
  try {
    for (const p of parts) {
      const start = loadSample();
      const ts = performance.now();
      progress.startPart(p.id);
      let r: PartResult;
      try {
        const out = await p.run({ opts, caps, progress });
        r = { id: p.id, title: p.title, status: out.waitingFor?.length ? 'waiting' : 'done', waitingFor: out.waitingFor, startedAt: start.at, durationS: 0, load: { start, end: start }, config: out.config, samples: out.samples, waiting: out.waiting, errors: out.errors?.length ? out.errors : undefined };
      } catch (err) {
        // A failed part is recorded and the run goes on: the report says which part failed and why.
        r = { id: p.id, title: p.title, status: 'failed', error: (err as Error).message, startedAt: start.at, durationS: 0, load: { start, end: start }, config: {}, samples: [] };
      }
      r.durationS = (performance.now() - ts) / 1000;
      r.load.end = loadSample();
      progress.endPart(r.status + (r.error ? `: ${r.error}` : ''));
      results.push(r);
      // Written after every part, so a long run stopped early keeps what it measured (`unfinished` names the rest).
      if (results.length < parts.length) write(parts.slice(results.length).map((x) => x.id));
    }
  } finally {
    progress.close();
  }
  return write([]);

  function write(unfinished: PartId[]): { doc: EvalDocument; files: string[] } {
    const doc: EvalDocument = {
      schema: 'hydravm-eval/1',
      startedAt, finishedAt: new Date().toISOString(), durationS: (performance.now() - t0) / 1000,
      quick: o.quick, command: o.command, environment: env, capabilities: caps, parts: results,
      ...(unfinished.length ? { unfinished } : {}),
    };
    const rendered = renderReport(doc);
    fs.mkdirSync(o.outDir, { recursive: true });
    const files = writeResults(o.outDir, 'eval', doc, rendered.markdown, rendered.charts);
    return { doc, files };
  }
}

/** Read an evaluation JSON back, checking it is one. */
export function readEvalDocument(file: string): EvalDocument {
  let doc: EvalDocument;
  try {
    doc = JSON.parse(fs.readFileSync(file, 'utf8')) as EvalDocument;
  } catch (err) {
    throw new BenchError('HYDRA_BENCH_BAD_RESULTS', `cannot read evaluation results ${path.resolve(file)}: ${(err as Error).message}`, { cause: err });
  }
  if (doc?.schema !== 'hydravm-eval/1' || !Array.isArray(doc.parts)) throw new BenchError('HYDRA_BENCH_BAD_RESULTS', `${path.resolve(file)} is not a \`hydravm bench eval\` result (schema hydravm-eval/1)`);
  return doc;
}
