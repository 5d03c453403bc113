import type { Command } from 'commander';

export function registerDemoCommand(program: Command): void {
  program.command('demo')
    .description('the main job end to end on an embedded default: start a guest running memcheck, show it running, stop it')
    .option('--memory <size>', 'guest memory', '512M')
    .option('--working-set <mb>', 'memcheck working set in MB', '64')
    .option('--keep', 'leave the VM running at the end')
    .action(async (opts: { memory: string; workingSet: string; keep?: boolean }) => {
      const { runDemo } = await import('../demo/demo.js');
      await runDemo({ memory: opts.memory, workingSetMb: Number(opts.workingSet), keep: !!opts.keep });
    });
}
