import { constants as fsc } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { nativeAddonPath, packageRoot, shimPath } from '../config/paths.js';
import { SetupError } from '../errors.js';
import { ensureGuestArtifacts, exists, guestArtifactsStatus, runCommand, type GuestArtifacts } from './guest-artifacts.js';

export { ensureGuestArtifacts, guestArtifactsStatus, type GuestArtifacts } from './guest-artifacts.js';
export { extractVmlinux, withLock, resolveKernelPackage, runCommand, exists } from './guest-artifacts.js';

/**
 * `hydravm setup`: everything a host needs, idempotent.
 *   (a) Debian packages (scripts/install-host-packages.sh)
 *   (b) the native addon and the LD_PRELOAD shim (rebuilt when native/ sources are newer)
 *   (c) the test guest's kernel and initramfs
 */
export interface SetupOptions {
  /** Rebuild native code and guest artifacts even if current. */
  force?: boolean;
  log?: (msg: string) => void;
  skipPackages?: boolean;
  skipNative?: boolean;
  skipGuest?: boolean;
}

export interface SetupResult {
  packages: 'installed' | 'skipped';
  native: 'built' | 'current' | 'skipped';
  guest?: GuestArtifacts;
}

export interface SetupCheck {
  ok: boolean;
  /** One human-readable line per missing or stale item. */
  missing: string[];
}

const REQUIRED_TOOLS = ['qemu-system-x86_64', 'qemu-img', 'busybox', 'cpio', 'dpkg-deb', 'gcc', 'etcd'];
const MIN_QEMU_MAJOR = 10;

async function onPath(tool: string): Promise<string | undefined> {
  for (const dir of (process.env.PATH ?? '/usr/local/bin:/usr/bin:/bin').split(':')) {
    if (!dir) continue;
    const p = path.join(dir, tool);
    if (await exists(p, fsc.X_OK)) return p;
  }
  return undefined;
}

async function mtimeMs(p: string): Promise<number | undefined> {
  try {
    return (await fs.stat(p)).mtimeMs;
  } catch {
    return undefined;
  }
}

/** Newest modification time of the native sources (excluding build output). */
async function newestNativeSource(dir: string): Promise<number> {
  let newest = 0;
  const walk = async (d: string): Promise<void> => {
    let entries;
    try {
      entries = await fs.readdir(d, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries) {
      if (e.name === 'build' || e.name === 'node_modules' || e.name.startsWith('.')) continue;
      const p = path.join(d, e.name);
      if (e.isDirectory()) await walk(p);
      else if (e.isFile()) newest = Math.max(newest, (await mtimeMs(p)) ?? 0);
    }
  };
  await walk(dir);
  return newest;
}

/** Why the native addon/shim need building; empty when current. */
async function nativeProblems(): Promise<string[]> {
  const problems: string[] = [];
  const src = await newestNativeSource(path.join(packageRoot, 'native'));
  for (const [what, p] of [['native addon', nativeAddonPath], ['preload shim', shimPath]] as const) {
    const m = await mtimeMs(p);
    if (m === undefined) problems.push(`${what} not built: ${p}`);
    else if (m < src) problems.push(`${what} older than the sources under native/: ${p}`);
  }
  return problems;
}

async function qemuMajor(): Promise<number | undefined> {
  try {
    const { stdout } = await runCommand('qemu-system-x86_64 --version', 'qemu-system-x86_64', ['--version']);
    const m = /version (\d+)\./.exec(stdout);
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

/** Reports what `runSetup` would have to do, without doing anything. */
export async function checkSetup(): Promise<SetupCheck> {
  const missing: string[] = [];
  for (const tool of REQUIRED_TOOLS) {
    if (!(await onPath(tool))) missing.push(`host tool missing: ${tool}`);
  }
  if (await onPath('qemu-system-x86_64')) {
    const major = await qemuMajor();
    if (major === undefined || major < MIN_QEMU_MAJOR) missing.push(`QEMU ${major ?? '?'} is too old: need ${MIN_QEMU_MAJOR} or later (bookworm-backports)`);
  }
  if (!(await exists('/usr/lib/x86_64-linux-gnu/libc.a'))) missing.push('host package missing: libc6-dev (static libc for guest programs)');
  missing.push(...(await nativeProblems()));
  const guest = await guestArtifactsStatus();
  for (const r of guest.reasons) missing.push(`guest artifacts: ${r}`);
  return { ok: missing.length === 0, missing };
}

async function runLogged(step: string, cmd: string, args: string[], log: (m: string) => void): Promise<void> {
  log(`setup: ${step}`);
  const { stdout } = await runCommand(step, cmd, args, { cwd: packageRoot });
  const last = stdout.trim().split('\n').at(-1);
  if (last) log(`setup: ${last}`);
}

export async function runSetup(opts: SetupOptions = {}): Promise<SetupResult> {
  const log = opts.log ?? (() => {});
  const result: SetupResult = { packages: 'skipped', native: 'skipped' };

  if (!opts.skipPackages) {
    const script = path.join(packageRoot, 'scripts', 'install-host-packages.sh');
    if (!(await exists(script))) throw new SetupError(`installing host packages failed: ${script} not found`);
    await runLogged('installing host packages (scripts/install-host-packages.sh)', 'bash', [script], log);
    result.packages = 'installed';
  }

  if (!opts.skipNative) {
    const problems = await nativeProblems();
    if (opts.force || problems.length > 0) {
      for (const p of problems) log(`setup: ${p}`);
      await runLogged('building the native addon and the preload shim (make -C native)', 'make', ['-C', 'native'], log);
      const still = await nativeProblems();
      if (still.length > 0) throw new SetupError(`building native code failed: ${still.join('; ')}`);
      result.native = 'built';
    } else {
      log('setup: native addon and shim are current');
      result.native = 'current';
    }
  }

  if (!opts.skipGuest) {
    result.guest = await ensureGuestArtifacts({ force: opts.force, log });
  }
  return result;
}
