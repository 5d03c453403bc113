// Entry of the detached HA daemons (agent, manager) an embedded cluster starts.
/**
 * Entry of the detached HA daemons started by `hydravm cluster up` /
 * startEmbeddedCluster(): `ha-daemon.js agent ...` and `ha-daemon.js manager ...`
 * take the same options as `hydravm agent` and `hydravm manager`. It exists
 * so the embedded cluster can run from the sources (tsx) as well as from dist.
 */
import { Command } from 'commander';
import { HydraError } from '../errors.js';
import { registerHaCommands } from './ha-commands.js';

const program = new Command();
program.name('hydravm-ha-daemon');
registerHaCommands(program);
try {
  await program.parseAsync(process.argv);
} catch (err) {
  process.stderr.write(`${err instanceof HydraError ? 'error' : 'unexpected error'}: ${(err as Error)?.stack ?? String(err)}\n`);
  process.exitCode = 1;
}
