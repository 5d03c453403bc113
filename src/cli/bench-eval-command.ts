// `hydravm bench eval` and `hydravm bench eval-page`: the evaluation run and the docs page generated from its JSON.
import fs from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';

const list = (v: string | undefined) => (v === undefined ? undefined : v.split(',').map((x) => x.trim()).filter(Boolean));
const nums = (v: string | undefined) => list(v)?.map(Number);

export function registerEvalCommands(bench: Command): void {
  bench.command('eval')
    .description('the evaluation: scaling with VM size and VMs per store, memory cost, QEMU baselines, overhead, the paper\'s figures (JSON, Markdown, SVG)')
    .option('--quick', 'smallest sizes, one sample (< 5 min)', false)
    .option('--only <parts>', 'comma-separated parts: size, vms, baseline, overhead, paper')
    .option('--out <dir>', 'output directory', path.join('bench', 'results', 'eval'))
    .option('--sizes <gb>', 'VM sizes in GB for the size part (default 0.5,1,2,4,8; --quick 0.5)')
    .option('--vms <n>', 'VM counts per store (default 1,2,4,8; --quick 1)')
    .option('--baseline-sizes <gb>', 'guest sizes for QEMU full save/restore (default 0.5,1; --quick 0.5)')
    .option('--repeats <n>', 'QEMU full restores per size and cache state (default 3; --quick 1)')
    .option('--rounds <n>', 'protect/kill/restore rounds per VM size (default 2; --quick 1)')
    .option('--checkpoints <n>', 'incremental checkpoints per protection in the size part (default 6; --quick 3)')
    .option('--window <s>', 'seconds per measuring window (default 15; --quick 8)')
    .action(async (o: { quick: boolean; only?: string; out: string; sizes?: string; vms?: string; baselineSizes?: string; repeats?: string; rounds?: string; checkpoints?: string; window?: string }) => {
      const { runEval, parseOnly } = await import('../bench/index.js');
      const only = parseOnly(list(o.only));
      const overrides = Object.fromEntries(Object.entries({
        sizesGb: nums(o.sizes), vmCounts: nums(o.vms), baselineSizesGb: nums(o.baselineSizes),
        baselineRepeats: o.repeats ? Number(o.repeats) : undefined, restoreRounds: o.rounds ? Number(o.rounds) : undefined,
        checkpoints: o.checkpoints ? Number(o.checkpoints) : undefined, windowS: o.window ? Number(o.window) : undefined,
      }).filter(([, v]) => v !== undefined));
      const { doc, files } = await runEval({ outDir: o.out, quick: o.quick, only, overrides, command: ['hydravm', ...process.argv.slice(2)], log: (l) => process.stderr.write(`${l}\n`) });
      process.stdout.write(`evaluation ${doc.parts.map((p) => `${p.id}: ${p.status}`).join(', ')} in ${(doc.durationS / 60).toFixed(1)} min\n`);
      process.stdout.write(`written: ${files.join(', ')}\n`);
      if (doc.parts.some((p) => p.status === 'failed')) process.exitCode = 1;
    });

  bench.command('eval-merge')
    .description('one evaluation from several runs\' JSON (each part from the last run that measured it; every run listed): JSON, Markdown and plots')
    .argument('<json...>', 'evaluation results, in order')
    .option('--out <dir>', 'output directory', path.join('bench', 'results', 'eval'))
    .action(async (files: string[], o: { out: string }) => {
      const { readEvalDocument, mergeEvalDocuments, renderReport } = await import('../bench/index.js');
      const { writeResults } = await import('../bench/index.js');
      const doc = mergeEvalDocuments(files.map((f) => readEvalDocument(f)));
      const r = renderReport(doc);
      const written = writeResults(o.out, 'eval', doc, r.markdown, r.charts);
      process.stdout.write(`merged ${files.length} runs (${doc.parts.map((p) => p.id).join(', ')}): ${written.join(', ')}\n`);
    });

  bench.command('eval-page')
    .description('generate docs/evaluation.md from an evaluation JSON (or, with none, the method and how to produce it)')
    .option('--json <file>', 'evaluation results', path.join('bench', 'results', 'eval', 'eval.json'))
    .option('--out <file>', 'page to write', path.join('docs', 'evaluation.md'))
    .option('--none', 'write the page without results (method and how to reproduce only)', false)
    .option('--rerender', 'also rewrite eval.md and the SVG plots beside the JSON (after a change to the report code)', false)
    .action(async (o: { json: string; out: string; none: boolean; rerender: boolean }) => {
      const { readEvalDocument, renderPage, renderReport } = await import('../bench/index.js');
      const doc = o.none || !fs.existsSync(o.json) ? null : readEvalDocument(o.json);
      fs.writeFileSync(o.out, renderPage(doc, o.json));
      if (doc && o.rerender) {
        const r = renderReport(doc);
        const dir = path.dirname(o.json);
        fs.writeFileSync(path.join(dir, 'eval.md'), r.markdown);
        for (const [file, svg] of Object.entries(r.charts)) fs.writeFileSync(path.join(dir, file), svg);
        process.stdout.write(`rewritten: eval.md and ${Object.keys(r.charts).length} plots in ${dir}\n`);
      }
      process.stdout.write(`written: ${o.out}${doc ? ` from ${o.json}` : ' (no results)'}\n`);
    });
}
