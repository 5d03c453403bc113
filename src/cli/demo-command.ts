import type { Command } from 'commander';

export function registerDemoCommand(program: Command): void {
  program.command('demo')
    .description('the main job end to end on an embedded default: a protected VM, its QEMU killed, its host killed, automatic restores')
    .option('--memory <size>', 'guest memory', '512M')
    .option('--working-set <mb>', 'memcheck working set in MB', '64')
    .option('--interval <duration>', 'checkpoint interval', '1s')
    .option('--keep', 'leave the cluster and the VM running at the end')
    .action(async (opts: { memory: string; workingSet: string; interval: string; keep?: boolean }) => {
      const { runDemo } = await import('../demo/index.js');
      const { parseDuration } = await import('./duration.js');
      await runDemo({ memory: opts.memory, workingSetMb: Number(opts.workingSet), intervalMs: parseDuration(opts.interval, '--interval'), keep: !!opts.keep });
      process.exit(0);
    });
}
