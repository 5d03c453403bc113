/**
 * A bare store daemon process (used by the crash-consistency test; the CLI's
 * `hydravm store` is the production entry):
 *   node --import tsx src/store/store-process.ts --dir DIR [--listen 127.0.0.1:0] [--secret S]
 * Prints "LISTENING host:port" on stdout when ready. HYDRAVM_STORE_CRASH_AT applies.
 */
import { parseArgs } from 'node:util';
import { startStoreServer } from './server.js';

const { values } = parseArgs({
  options: {
    dir: { type: 'string' },
    listen: { type: 'string', default: '127.0.0.1:0' },
    secret: { type: 'string', default: process.env.HYDRAVM_SECRET ?? '' },
  },
});
if (!values.dir || !values.secret) {
  process.stderr.write('usage: store-process --dir DIR [--listen host:port] --secret S (or HYDRAVM_SECRET)\n');
  process.exit(2);
}
const server = await startStoreServer({ dir: values.dir, listen: values.listen!, secret: values.secret });
process.stdout.write(`LISTENING ${server.address}\n`);
const stop = () => void server.close().then(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
