import type { Command } from 'commander';
import path from 'node:path';

export function registerBenchCommand(program: Command): void {
  const bench = program.command('bench').description('benchmarks: write JSON, a Markdown table and SVG plots');
  bench.command('checkpoint')
    .description('pause, size and commit time of incremental checkpoints (memcheck working sets x intervals)')
    .option('--out <dir>', 'output directory', path.join('bench', 'results'))
    .option('--working-sets <mb>', 'comma-separated memcheck working sets in MB', '64,16')
    .option('--intervals <s>', 'comma-separated checkpoint intervals in seconds', '1,2,5,10')
    .option('--checkpoints <n>', 'incremental checkpoints measured per configuration', '10')
    .option('--memory <size>', 'guest memory', '512M')
    .action(async (opts: { out: string; workingSets: string; intervals: string; checkpoints: string; memory: string }) => {
      const { runCheckpointBench } = await import('../bench/checkpoint-bench.js');
      const r = await runCheckpointBench({
        outDir: opts.out,
        workingSetsMb: opts.workingSets.split(',').map(Number),
        intervalsS: opts.intervals.split(',').map(Number),
        checkpoints: Number(opts.checkpoints),
        memory: opts.memory,
        log: (m) => process.stderr.write(`${m}\n`),
      });
      process.stdout.write(r.markdown);
      process.stdout.write(`written: ${r.files.join(', ')}\n`);
    });
}
