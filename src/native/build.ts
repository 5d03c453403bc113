/**
 * Builds the addon and the shim with `make -C native` when they are missing or
 * older than their sources. Synchronous: used by tests and setup, never on a
 * hot path.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, rmdirSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { nativeAddonPath, packageRoot, shimPath } from '../config/paths.js';
import { NativeError } from '../errors.js';

const nativeDir = path.join(packageRoot, 'native');

function newestSource(): number {
  let newest = 0;
  const visit = (dir: string): void => {
    for (const name of readdirSync(dir)) {
      const p = path.join(dir, name);
      if (/\.(cc|c|h)$/.test(name)) newest = Math.max(newest, statSync(p).mtimeMs);
    }
  };
  visit(path.join(nativeDir, 'addon'));
  visit(path.join(nativeDir, 'shim'));
  for (const f of ['binding.gyp', 'Makefile']) newest = Math.max(newest, statSync(path.join(nativeDir, f)).mtimeMs);
  return newest;
}

export function nativeBuildIsFresh(): boolean {
  if (!existsSync(nativeAddonPath) || !existsSync(shimPath)) return false;
  const src = newestSource();
  return statSync(nativeAddonPath).mtimeMs >= src && statSync(shimPath).mtimeMs >= src;
}

/** Blocks the thread: the build runs before anything asynchronous may. */
const sleepSync = (ms: number) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);

/** Serialises builds across processes (node --test runs files in parallel; node-gyp rebuild wipes build/). */
function withBuildLock(fn: () => void): void {
  const lock = path.join(os.tmpdir(), `hydravm-native-build-${Buffer.from(nativeDir).toString('hex').slice(-32)}.lock`);
  const t0 = Date.now();
  for (;;) {
    try {
      mkdirSync(lock);
      break;
    } catch {
      // A build takes ~10 s; a lock older than 5 minutes is a crashed builder's.
      try {
        if (Date.now() - statSync(lock).mtimeMs > 300_000) rmdirSync(lock);
      } catch { /* raced */ }
      if (Date.now() - t0 > 600_000) throw new NativeError('HYDRA_NATIVE_BUILD_FAILED', `timed out waiting for the native build lock ${lock}`);
      sleepSync(100);
    }
  }
  try {
    fn();
  } finally {
    try { rmdirSync(lock); } catch { /* gone */ }
  }
}

/** Build unless fresh (or always with force). Throws NativeError HYDRA_NATIVE_BUILD_FAILED with make's output. */
export function buildNative(opts: { force?: boolean } = {}): void {
  if (!opts.force && nativeBuildIsFresh()) return;
  withBuildLock(() => {
    if (!opts.force && nativeBuildIsFresh()) return;
    runMake();
  });
}

function runMake(): void {
  try {
    execFileSync('make', ['-C', nativeDir, 'all'], { stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8' });
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string; message: string };
    const out = `${e.stdout ?? ''}${e.stderr ?? ''}`.trim().split('\n').slice(-30).join('\n');
    throw new NativeError('HYDRA_NATIVE_BUILD_FAILED', `building the native addon and shim (make -C ${nativeDir}) failed:\n${out || e.message}`, { cause: err });
  }
}
