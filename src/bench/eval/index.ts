// The evaluation (`hydravm bench eval`): the paper's Section V on real workloads, scaling, memory cost and baselines.
export { runEval, readEvalDocument, parseOnly, type EvalRunOptions } from './run.js';
export { renderReport } from './report.js';
export { mergeEvalDocuments } from './merge.js';
export { renderPage } from './page.js';
export { linearFit, type LinearFit } from './fit.js';
export type { EvalDocument, PartResult, PartId } from './types.js';
export { PART_IDS } from './types.js';
