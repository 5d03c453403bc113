// Several evaluation runs as one document: each part from the run that measured it (e.g. a part re-run, or parts run side by side to fit a deadline).
import { BenchError } from '../../errors.js';
import { PART_IDS, type EvalDocument } from './types.js';

/**
 * Parts come from the last document that has them done (else the last that
 * has them at all), in the evaluation's part order; every run is listed in
 * `runs` with its command, times, commit and parts, so the report can say
 * which number came from which run and how they overlapped.
 */
export function mergeEvalDocuments(docs: EvalDocument[]): EvalDocument {
  if (!docs.length) throw new BenchError('HYDRA_BENCH_BAD_OPTION', 'bench eval-merge: no evaluation results given');
  const quick = new Set(docs.map((d) => d.quick));
  if (quick.size > 1) throw new BenchError('HYDRA_BENCH_BAD_OPTION', 'bench eval-merge: cannot merge a --quick run with a full one');
  const parts = PART_IDS.flatMap((id) => {
    const all = docs.flatMap((d) => d.parts.filter((p) => p.id === id));
    const done = all.filter((p) => p.status === 'done');
    const pick = done.at(-1) ?? all.at(-1);
    return pick ? [pick] : [];
  });
  // Execution order of the first run, then any part only the others have.
  const order = docs.flatMap((d) => d.parts.map((p) => p.id));
  parts.sort((a, b) => order.indexOf(a.id) - order.indexOf(b.id));
  const runs = docs.flatMap((d) => d.runs ?? [{ command: d.command, startedAt: d.startedAt, finishedAt: d.finishedAt, durationS: d.durationS, commit: d.environment.git.commit, parts: d.parts.map((p) => p.id), ...(d.unfinished?.length ? { unfinished: d.unfinished } : {}) }]);
  const startedAt = runs.map((r) => r.startedAt).sort()[0]!;
  const finishedAt = runs.map((r) => r.finishedAt).sort().at(-1)!;
  const last = docs.at(-1)!;
  return {
    ...docs[0]!,
    startedAt, finishedAt,
    durationS: (Date.parse(finishedAt) - Date.parse(startedAt)) / 1000,
    capabilities: last.capabilities,
    parts,
    unfinished: undefined,
    runs,
  };
}
