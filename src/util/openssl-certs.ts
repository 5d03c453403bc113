/** A throw-away CA and a store certificate made with the openssl command, for tests and benchmarks of the TLS transport. */
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';

/**
 * Writes `<name>-ca.pem`, `<name>-store.pem` and `<name>-store.key` into dir:
 * a CA valid for two days and a store certificate it signed, naming 127.0.0.1
 * and localhost. The same openssl steps are how docs/formats.md sets up TLS by hand.
 */
export function makeTlsFiles(dir: string, name = 'ca'): { ca: string; cert: string; key: string } {
  fs.mkdirSync(dir, { recursive: true });
  const f = (n: string) => path.join(dir, `${name}-${n}`);
  const run = (args: string[]) => execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  run(['req', '-x509', ...ec, '-keyout', f('ca.key'), '-out', f('ca.pem'), '-days', '2', '-subj', `/CN=hydravm test ${name}`]);
  run(['req', ...ec, '-keyout', f('store.key'), '-out', f('store.csr'), '-subj', '/CN=hydravm store']);
  fs.writeFileSync(f('ext.cnf'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\n');
  run(['x509', '-req', '-in', f('store.csr'), '-CA', f('ca.pem'), '-CAkey', f('ca.key'), '-CAcreateserial', '-out', f('store.pem'), '-days', '2', '-extfile', f('ext.cnf')]);
  return { ca: f('ca.pem'), cert: f('store.pem'), key: f('store.key') };
}
