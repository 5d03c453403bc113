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
    .option('--no-disk', 'skip the run with a qcow2 disk')
    .action(async (opts: { out: string; workingSets: string; intervals: string; checkpoints: string; memory: string; disk: boolean }) => {
      const { runCheckpointBench } = await import('../bench/index.js');
      const r = await runCheckpointBench({
        outDir: opts.out,
        workingSetsMb: opts.workingSets.split(',').map(Number),
        intervalsS: opts.intervals.split(',').map(Number),
        checkpoints: Number(opts.checkpoints),
        memory: opts.memory,
        disk: opts.disk,
        log: (m) => process.stderr.write(`${m}\n`),
      });
      process.stdout.write(r.markdown);
      process.stdout.write(`written: ${r.files.join(', ')}\n`);
    });

  bench.command('protocol')
    .description('cost of frame tags (HMAC) in the frame codec, and checkpoint / page-read throughput through a store over TCP vs TLS')
    .option('--out <dir>', 'output directory', path.join('bench', 'results'))
    .option('--codec-mb <n>', 'MiB pushed through the frame codec per measurement', '512')
    .option('--checkpoint-mb <n>', 'size of the full checkpoint sent through the store', '256')
    .option('--repeats <n>', 'measurements per configuration; medians are reported', '5')
    .action(async (opts: { out: string; codecMb: string; checkpointMb: string; repeats: string }) => {
      const { runProtocolBench } = await import('../bench/index.js');
      const r = await runProtocolBench({
        outDir: opts.out,
        codecMb: Number(opts.codecMb),
        checkpointMb: Number(opts.checkpointMb),
        repeats: Number(opts.repeats),
        log: (m) => process.stderr.write(`${m}\n`),
      });
      process.stdout.write(r.markdown);
      process.stdout.write(`written: ${r.files.join(', ')}\n`);
    });

  bench.command('failover')
    .description('fail-over time split (detection, slim restore, guest progress) vs QEMU full save/restore and reboot; network paging; slowdown after restore')
    .option('--out <dir>', 'output directory', path.join('bench', 'results'))
    .option('--repeats <n>', 'fail-overs per memory mode (file, network); medians are reported', '3')
    .option('--memory <size>', 'guest memory', '512M')
    .option('--working-set <mb>', 'memcheck working set in MB', '64')
    .option('--rate <mbps>', 'memcheck write rate in MB/s (0 = unlimited)', '32')
    .option('--interval <s>', 'checkpoint interval in seconds', '1')
    .option('--window <s>', 'seconds of memcheck progress measured before the kill and after the restore', '10')
    .option('--demand-only-seconds <s>', 'how long the pure on-demand (no prefetch) restore runs', '15')
    .action(async (opts: { out: string; repeats: string; memory: string; workingSet: string; rate: string; interval: string; window: string; demandOnlySeconds: string }) => {
      const { runFailoverBench } = await import('../bench/index.js');
      const r = await runFailoverBench({
        outDir: opts.out,
        repeats: Number(opts.repeats),
        memory: opts.memory,
        workingSetMb: Number(opts.workingSet),
        rateMb: Number(opts.rate),
        intervalMs: Number(opts.interval) * 1000,
        windowS: Number(opts.window),
        noPrefetchS: Number(opts.demandOnlySeconds),
        log: (m) => process.stderr.write(`${m}\n`),
      });
      process.stdout.write(r.markdown);
      process.stdout.write(`written: ${r.files.join(', ')}\n`);
    });
}
