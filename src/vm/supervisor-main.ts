/**
 * Entry of the detached VM supervisor process. Kept apart from the CLI so a
 * restore does not pay for loading the command-line layer before QEMU starts.
 * `supervisor-main NAME` runs a VM; `supervisor-main --shell ID` a restore shell.
 */
import { runSupervisor } from './supervisor.js';

const [first, second] = process.argv.slice(2);
if (!first || (first === '--shell' && !second)) {
  process.stderr.write('usage: supervisor-main NAME | --shell ID\n');
  process.exit(2);
}
await runSupervisor(first === '--shell' ? { shell: second! } : { vm: first });
// The VM is over: nothing this process holds open should keep it around.
process.exit(0);
