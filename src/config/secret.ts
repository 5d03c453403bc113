import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { hydraHome } from './paths.js';
import { ConfigError } from '../errors.js';

/**
 * The cluster's shared secret authenticates checkpointers and readers to the
 * store. Taken from HYDRAVM_SECRET, else from a file (default
 * $HYDRAVM_HOME/cluster.secret, mode 0600), which the store creates on first
 * start in the embedded single-machine setup. Both sources must hold at least
 * 16 characters: the store protocol's proofs (src/protocol/auth.ts) are only
 * as strong as the secret against offline guessing.
 */
export function defaultSecretFile(): string {
  return path.join(hydraHome(), 'cluster.secret');
}

export function loadSecret(opts: { secretFile?: string; create?: boolean } = {}): string {
  const fromEnv = process.env.HYDRAVM_SECRET;
  if (fromEnv) {
    if (fromEnv.length < 16) throw new ConfigError('HYDRA_SECRET_WEAK', 'cluster secret in HYDRAVM_SECRET is shorter than 16 characters');
    return fromEnv;
  }
  const file = opts.secretFile ?? defaultSecretFile();
  try {
    const s = fs.readFileSync(file, 'utf8').trim();
    if (s.length < 16) throw new ConfigError('HYDRA_SECRET_WEAK', `cluster secret in ${file} is shorter than 16 characters`);
    return s;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    if (!opts.create) {
      throw new ConfigError('HYDRA_SECRET_MISSING', `no cluster secret: set HYDRAVM_SECRET or create ${file} (the store creates it on first start)`);
    }
    fs.mkdirSync(path.dirname(file), { recursive: true });
    const secret = crypto.randomBytes(32).toString('hex');
    fs.writeFileSync(file, secret + '\n', { mode: 0o600, flag: 'wx' });
    return secret;
  }
}
