#!/usr/bin/env node
import path from 'node:path';
import { Command } from 'commander';
import { HydraError } from '../errors.js';
import { registerVmCommands } from './vm-commands.js';
import { registerSetupCommands } from './setup-commands.js';
import { registerDemoCommand } from './demo-command.js';
import { registerProtectCommands } from './protect-commands.js';
import { registerStoreCommand } from './store-command.js';
import { registerRestoreCommand } from './restore-command.js';
import { registerBenchCommand } from './bench-command.js';
import { registerHaCommands } from './ha-commands.js';
import { registerImageCommands } from './image-command.js';

// `hydravm ... | head` closes our stdout early: that is the reader's choice, not an error.
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code === 'EPIPE') process.exit(0);
  throw err;
});

const program = new Command();
program
  .name('hydravm')
  .description('High availability for QEMU VMs without backup memory')
  .version('0.1.0')
  .option('--store-tls-ca <path>', 'connect to the checkpoint store over TLS, trusting this CA (PEM file or directory); sets HYDRAVM_STORE_TLS_CA for this command and every process it starts')
  .showHelpAfterError()
  .hook('preAction', () => {
    const ca = program.opts<{ storeTlsCa?: string }>().storeTlsCa;
    // Through the environment, so checkpointers, restores and agents started from here inherit it.
    if (ca) process.env.HYDRAVM_STORE_TLS_CA = path.resolve(ca);
  });

registerSetupCommands(program);
registerImageCommands(program);
registerVmCommands(program);
registerStoreCommand(program);
registerProtectCommands(program);
registerRestoreCommand(program);
registerBenchCommand(program);
registerHaCommands(program);
registerDemoCommand(program);

try {
  await program.parseAsync(process.argv);
} catch (err) {
  if (err instanceof HydraError) {
    process.stderr.write(`hydravm: error: ${err.message}\n`);
    process.exitCode = 1;
  } else {
    process.stderr.write(`hydravm: unexpected error: ${(err as Error)?.stack ?? String(err)}\n`);
    process.exitCode = 70;
  }
}
// HYDRAVM_DEBUG_HANDLES=1: after a command returns, say what still keeps the process alive (leak hunting).
if (process.env.HYDRAVM_DEBUG_HANDLES) setTimeout(() => process.stderr.write(`hydravm: still active: ${process.getActiveResourcesInfo().join(', ')}\n`), 2000).unref();
