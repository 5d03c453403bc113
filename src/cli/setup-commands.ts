import type { Command } from 'commander';

export function registerSetupCommands(program: Command): void {
  program.command('setup')
    .description('install QEMU 10 and tools, build the native addon, shim and guest images (idempotent)')
    .option('--force', 'rebuild guest artifacts even if up to date')
    .option('--check', 'only report what is missing')
    .action(async (opts: { force?: boolean; check?: boolean }) => {
      const setup = await import('../setup/index.js');
      if (opts.check) {
        const { missing } = await setup.checkSetup();
        if (missing.length === 0) process.stdout.write('setup complete\n');
        else {
          process.stdout.write(`missing:\n${missing.map((m: string) => `  - ${m}`).join('\n')}\n`);
          process.exitCode = 1;
        }
        return;
      }
      await setup.runSetup({ force: opts.force, log: (msg: string) => process.stderr.write(`setup: ${msg}\n`) });
      process.stderr.write('setup: done\n');
    });
}
