/** Shared helpers for the store tests (not a test file itself). */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import type { PageRun } from '../protocol/index.js';

export const PAGE = 4096;
export const SECRET = 'test-cluster-secret';

const created: string[] = [];
process.on('exit', () => {
  for (const d of created) {
    try {
      fs.rmSync(d, { recursive: true, force: true });
    } catch {
      // a still-mounted tmpfs: the test's own cleanup reports it
    }
  }
});

/** A fresh temp directory, removed when the test process exits. */
export function tmpDir(prefix = 'hydra-store-'): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  created.push(d);
  return d;
}

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

const here = path.dirname(fileURLToPath(import.meta.url));

export interface StoreProcess {
  address: string;
  /** Resolves with the exit signal (or code). */
  exited: Promise<NodeJS.Signals | number | null>;
  kill(signal?: NodeJS.Signals): void;
}

/** Run the store as its own process (src/store/store-process.ts), with extra env (e.g. HYDRAVM_STORE_CRASH_AT). */
export function spawnStore(dir: string, env: Record<string, string> = {}): Promise<StoreProcess> {
  // Compiled tests (dist/) run the compiled entry; tests run from sources go through tsx.
  const entry = import.meta.url.endsWith('.ts') ? ['--import', 'tsx', path.join(here, 'store-process.ts')] : [path.join(here, 'store-process.js')];
  const child = spawn(process.execPath, [...entry, '--dir', dir, '--secret', SECRET], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, HYDRAVM_LOG_LEVEL: 'error', ...env },
  });
  let stderr = '';
  child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
  const exited = new Promise<NodeJS.Signals | number | null>((r) => child.on('exit', (code, sig) => r(sig ?? code)));
  return new Promise((resolve, reject) => {
    let out = '';
    child.stdout.on('data', (b: Buffer) => {
      out += b.toString();
      const m = /LISTENING (\S+)/.exec(out);
      if (m) resolve({ address: m[1]!, exited, kill: (sig = 'SIGKILL') => child.kill(sig) });
    });
    child.on('exit', () => reject(new Error(`store process exited before listening: ${stderr}`)));
  });
}
