/**
 * Entry of the detached VM supervisor process. Kept apart from the CLI so a
 * restore does not pay for loading the command-line layer before QEMU starts.
 */
import { runSupervisor } from './supervisor.js';

const name = process.argv[2];
if (!name) {
  process.stderr.write('usage: supervisor-main NAME\n');
  process.exit(2);
}
await runSupervisor(name);
// The VM is over: nothing this process holds open should keep it around.
process.exit(0);
