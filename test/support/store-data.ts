// Helpers of the store tests: deterministic page data, synthetic incrementals, a store process to crash.
import { createHash, randomBytes } from 'node:crypto';
import type { PageRun } from '../../src/protocol/index.js';
import { spawnStore as spawnStoreProcess } from '../../src/store/index.js';
import type { StoreClient } from '../../src/protocol/index.js';

export const PAGE = 4096;
export const SECRET = 'test-cluster-secret';

export { tmpDir } from './tmp.js';

export function sha256(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

/** Deterministic pseudo-random bytes (fast xorshift), so child processes and parents agree. */
export function prng(seed: number, n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  let x = seed >>> 0 || 1;
  let i = 0;
  for (; i + 4 <= n; i += 4) {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    b.writeUInt32LE(x, i);
  }
  for (; i < n; i++) b[i] = i & 0xff;
  return b;
}

/**
 * A synthetic incremental: `pages` random distinct pages (grouped into runs of
 * 1..maxRun pages) with deterministic content. Returns runs sorted by offset
 * and their contiguous data.
 */
/** Commit a full checkpoint of `ram` pseudo-random bytes (seeded) at `epoch`; returns the image sent. */
export async function commitFullCheckpoint(c: StoreClient, epoch: number, ram: number, seed: number): Promise<Buffer> {
  const img = prng(seed, ram);
  await c.begin(epoch, 'full', { ramSize: ram });
  await c.sendPages([{ offset: 0, length: ram }], img);
  await c.sendDeviceState(prng(seed + 1, 1000));
  await c.commit();
  return img;
}

export function makeIncremental(ramSize: number, pages: number, seed: number, maxRun = 16): { runs: PageRun[]; data: Buffer } {
  const total = ramSize / PAGE;
  const picked = new Set<number>();
  let x = seed >>> 0 || 7;
  const rnd = () => {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    return x;
  };
  while (picked.size < pages) {
    const start = rnd() % total;
    const len = 1 + (rnd() % maxRun);
    for (let p = start; p < Math.min(total, start + len) && picked.size < pages; p++) picked.add(p);
  }
  const sorted = [...picked].sort((a, b) => a - b);
  const runs: PageRun[] = [];
  for (const p of sorted) {
    const last = runs[runs.length - 1];
    if (last && last.offset + last.length === p * PAGE) last.length += PAGE;
    else runs.push({ offset: p * PAGE, length: PAGE });
  }
  return { runs, data: prng(seed * 7919 + 1, pages * PAGE) };
}

export function applyToBuffer(img: Buffer, runs: PageRun[], data: Buffer): void {
  let pos = 0;
  for (const r of runs) {
    data.copy(img, r.offset, pos, pos + r.length);
    pos += r.length;
  }
}

export { randomBytes };

export interface TestStoreProcess {
  address: string;
  /** Resolves with the exit signal (or code). */
  exited: Promise<NodeJS.Signals | number | null>;
  kill(signal?: NodeJS.Signals): void;
}

/**
 * Run the store as its own process (`hydravm store`, as the demo and the
 * benchmarks do), with the tests' secret and extra env (e.g. HYDRAVM_STORE_CRASH_AT).
 */
export async function spawnStore(dir: string, env: Record<string, string> = {}): Promise<TestStoreProcess> {
  const p = await spawnStoreProcess({ dir, env: { ...process.env, HYDRAVM_SECRET: SECRET, HYDRAVM_LOG_LEVEL: 'error', ...env } });
  const { proc } = p;
  const exited = new Promise<NodeJS.Signals | number | null>((r) => {
    if (proc.exitCode !== null || proc.signalCode !== null) r(proc.signalCode ?? proc.exitCode);
    else proc.once('exit', (code, sig) => r(sig ?? code));
  });
  return { address: p.address, exited, kill: (sig = 'SIGKILL') => proc.kill(sig) };
}
