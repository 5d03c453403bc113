import fs from 'node:fs';
import { spawn, type ChildProcess } from 'node:child_process';
import { cliEntry } from '../config/paths.js';
import { StoreError } from '../errors.js';

export interface StoreProcess {
  address: string;
  proc: ChildProcess;
  stop(): Promise<void>;
}

/**
 * Run `hydravm store` as its own process, as a user would, and resolve with
 * the address it listens on (port 0 picks a free one; '' for a standby store still waiting for its directory). Used by the demo, the
 * benchmarks and the tests.
 */
export async function spawnStore(opts: { dir: string; listen?: string; secretFile?: string; env?: NodeJS.ProcessEnv; logFile?: string; timeoutMs?: number; extraArgs?: string[]; standby?: boolean }): Promise<StoreProcess> {
  const args = [cliEntry, 'store', '--dir', opts.dir, '--listen', opts.listen ?? '127.0.0.1:0'];
  if (opts.secretFile) args.push('--secret-file', opts.secretFile);
  if (opts.extraArgs) args.push(...opts.extraArgs);
  if (opts.standby) args.push('--standby');
  const logFd = opts.logFile ? fs.openSync(opts.logFile, 'a') : undefined;
  const proc = spawn(process.execPath, args, { env: opts.env ?? process.env, stdio: ['ignore', 'pipe', logFd ?? 'pipe'] });
  if (logFd !== undefined) fs.closeSync(logFd);
  let stderr = '';
  proc.stderr?.on('data', (d) => (stderr += d));
  const address = await new Promise<string>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => { proc.kill('SIGKILL'); reject(new StoreError('HYDRA_STORE_START_FAILED', `checkpoint store did not start within ${(opts.timeoutMs ?? 15_000) / 1000} s: ${stderr}`)); }, opts.timeoutMs ?? 15_000);
    proc.stdout!.on('data', (d) => {
      out += d;
      const m = /listening on (\S+),/.exec(out);
      if (m) { clearTimeout(timer); resolve(m[1]!); }
      // A standby (`--standby`) serves only once it takes the directory's lock: its address is etcd's to tell.
      else if (opts.standby && /^standby store /m.test(out)) { clearTimeout(timer); resolve(''); }
    });
    proc.once('exit', (code) => { clearTimeout(timer); reject(new StoreError('HYDRA_STORE_START_FAILED', `checkpoint store exited (code ${code})${opts.logFile ? `; see ${opts.logFile}` : `: ${stderr}`}`)); });
  });
  return {
    address,
    proc,
    stop: () => new Promise<void>((resolve) => {
      if (proc.exitCode !== null || proc.signalCode !== null) return resolve();
      proc.once('exit', () => resolve());
      proc.kill('SIGTERM');
    }),
  };
}
