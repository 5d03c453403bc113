import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { constants as fsc } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import zlib from 'node:zlib';
import { promisify } from 'node:util';
import { guestArtifactsDir, packageRoot } from '../config/paths.js';
import { SetupError } from '../errors.js';
import { sleep } from '../util/sleep.js';

/**
 * The test guest: the Debian kernel plus an initramfs with busybox, /init and
 * the checkers (guest/memcheck.c, guest/diskcheck.c). Built once into
 * guestArtifactsDir() and rebuilt only when the guest sources change (a stamp
 * holds their hash) or on `force`.
 */
export interface GuestArtifacts {
  /** bzImage (Debian's vmlinuz): the kernel to boot with -kernel. */
  kernel: string;
  initrd: string;
  dir: string;
  /**
   * The same kernel uncompressed (ELF with a PVH entry), if it could be
   * extracted: `-kernel vmlinux` skips the in-guest decompressor, ~2.5 s
   * faster to /init under TCG. Optional.
   */
  vmlinux?: string;
}

export interface EnsureGuestOptions {
  force?: boolean;
  log?: (msg: string) => void;
}

/** Bump when the build recipe itself changes (not the sources). */
const RECIPE_VERSION = 2;
const GUEST_SOURCES = ['guest/memcheck.c', 'guest/diskcheck.c', 'guest/init'];
/** Load order matters: each depends on the ones before. */
export const VIRTIO_MODULES = ['virtio_ring', 'virtio', 'virtio_pci_modern_dev', 'virtio_pci_legacy_dev', 'virtio_pci', 'virtio_blk'];
const BUSYBOX_APPLETS = [
  'sh', 'ash', 'mount', 'umount', 'insmod', 'lsmod', 'awk', 'cat', 'echo', 'ls', 'mkdir', 'sleep', 'uname',
  'setsid', 'cttyhack', 'dmesg', 'ps', 'top', 'free', 'kill', 'grep', 'sed', 'hexdump', 'dd', 'sync',
  'blockdev', 'df', 'poweroff', 'reboot', 'halt', 'true', 'false', 'test', '[', 'date', 'tr', 'head', 'tail',
];
const STAMP = 'stamp.json';

interface Stamp {
  recipe: number;
  sourcesHash: string;
  kernelPackage: string;
  builtAt: string;
}

function guestSourceDir(): string {
  return path.join(packageRoot, 'guest');
}

async function sourcesHash(): Promise<string> {
  const h = createHash('sha256');
  h.update(`recipe ${RECIPE_VERSION}\n`);
  for (const rel of GUEST_SOURCES) {
    const file = path.join(packageRoot, rel);
    let data: Buffer;
    try {
      data = await fs.readFile(file);
    } catch (err) {
      throw new SetupError(`reading guest source ${file} failed: ${(err as Error).message}`, { cause: err });
    }
    h.update(`${rel} ${data.length}\n`);
    h.update(data);
  }
  return h.digest('hex').slice(0, 16);
}

export interface RunResult {
  stdout: string;
  stderr: string;
}

/** Run a command (no shell); reject with a SetupError naming `step` and the tail of its output on failure. */
export function runCommand(step: string, cmd: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: opts.cwd, env: opts.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const errb: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => errb.push(d));
    child.on('error', (err) => reject(new SetupError(`${step} failed: cannot run ${cmd}: ${err.message}`, { cause: err })));
    child.on('close', (code, signal) => {
      const stdout = Buffer.concat(out).toString();
      const stderr = Buffer.concat(errb).toString();
      if (code === 0) return resolve({ stdout, stderr });
      const detail = (stderr.trim() || stdout.trim()).split('\n').slice(-6).join('\n');
      reject(new SetupError(`${step} failed (${signal ? `signal ${signal}` : `exit ${code}`}): ${detail}`));
    });
  });
}

/** Whether `p` exists (or, with `mode`, is accessible so: fsc.X_OK for a program). */
export async function exists(p: string, mode: number = fsc.F_OK): Promise<boolean> {
  try {
    await fs.access(p, mode);
    return true;
  } catch {
    return false;
  }
}

async function readStamp(dir: string): Promise<Stamp | undefined> {
  try {
    return JSON.parse(await fs.readFile(path.join(dir, STAMP), 'utf8')) as Stamp;
  } catch {
    return undefined;
  }
}

export interface GuestArtifactsStatus {
  ready: boolean;
  /** Why not ready: missing files, stale sources. Empty when ready. */
  reasons: string[];
  artifacts: GuestArtifacts;
}

function artifactPaths(dir: string): GuestArtifacts {
  return { kernel: path.join(dir, 'vmlinuz'), initrd: path.join(dir, 'initrd.img'), dir };
}

async function withVmlinux(a: GuestArtifacts): Promise<GuestArtifacts> {
  const v = path.join(a.dir, 'vmlinux');
  return (await exists(v)) ? { ...a, vmlinux: v } : a;
}

/** Hard-link (or copy across filesystems) src to dst. */
async function linkOrCopy(src: string, dst: string): Promise<void> {
  try {
    await fs.link(src, dst);
  } catch {
    await fs.copyFile(src, dst);
  }
}

/**
 * Extract the uncompressed ELF kernel from an xz-compressed bzImage (the
 * first xz stream inside it). Returns false if it is not xz or not ELF.
 */
export async function extractVmlinux(bzImage: string, out: string, log: (m: string) => void): Promise<boolean> {
  const data = await fs.readFile(bzImage);
  const off = data.indexOf(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]));
  if (off < 0) {
    log('guest: kernel is not xz-compressed; no uncompressed vmlinux');
    return false;
  }
  const xz = path.join(path.dirname(out), 'vmlinux.xz');
  await fs.writeFile(xz, data.subarray(off));
  try {
    await runCommand('extracting vmlinux from vmlinuz', 'bash', ['-c', 'xz -dc --single-stream < "$1" > "$2"', 'x', xz, out]);
  } catch (err) {
    log(`guest: ${(err as Error).message}; no uncompressed vmlinux`);
    await fs.rm(out, { force: true });
    return false;
  } finally {
    await fs.rm(xz, { force: true });
  }
  const h = await fs.open(out, 'r');
  const magic = Buffer.alloc(4);
  await h.read(magic, 0, 4, 0);
  await h.close();
  if (!magic.equals(Buffer.from([0x7f, 0x45, 0x4c, 0x46]))) {
    await fs.rm(out, { force: true });
    return false;
  }
  return true;
}

/** Checks whether the artifacts are built and current, without building anything. */
export async function guestArtifactsStatus(): Promise<GuestArtifactsStatus> {
  const dir = guestArtifactsDir();
  const artifacts = artifactPaths(dir);
  const reasons: string[] = [];
  for (const f of [artifacts.kernel, artifacts.initrd]) {
    if (!(await exists(f))) reasons.push(`missing ${f}`);
  }
  const stamp = await readStamp(dir);
  if (!stamp) reasons.push(`missing ${path.join(dir, STAMP)}`);
  else if (stamp.recipe !== RECIPE_VERSION || stamp.sourcesHash !== (await sourcesHash())) {
    reasons.push('guest sources changed since the last build');
  }
  return { ready: reasons.length === 0, reasons, artifacts };
}

/** The real kernel package linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64. */
export async function resolveKernelPackage(): Promise<string> {
  const { stdout } = await runCommand('apt-cache depends linux-image-amd64', 'apt-cache', ['depends', 'linux-image-amd64']);
  const m = /Depends:\s*(linux-image-[0-9][^\s]*)/.exec(stdout);
  if (m) return m[1]!;
  const show = await runCommand('apt-cache show linux-image-amd64', 'apt-cache', ['show', 'linux-image-amd64']);
  const d = /^Depends:.*?(linux-image-[0-9][^\s,]*)/m.exec(show.stdout);
  if (d) return d[1]!;
  throw new SetupError('resolving the kernel package failed: linux-image-amd64 has no linux-image-<version> dependency (apt-get update?)');
}

const xzDecompress = (file: string) => runCommand(`decompressing ${path.basename(file)}`, 'xz', ['-d', '-f', file]);
const zstdDecompress = (file: string) => runCommand(`decompressing ${path.basename(file)}`, 'zstd', ['-d', '-q', '-f', '--rm', file]);

/** Download the kernel package, extract vmlinuz and the virtio modules into `into`. */
async function fetchKernel(pkg: string, into: string, log: (m: string) => void): Promise<void> {
  const dl = path.join(into, 'dl');
  await fs.mkdir(dl, { recursive: true });
  await fs.chmod(dl, 0o777); // apt's _apt sandbox user may write here
  log(`guest: downloading ${pkg}`);
  await runCommand(`apt-get download ${pkg}`, 'apt-get', ['download', '-q', pkg], { cwd: dl });
  const debs = (await fs.readdir(dl)).filter((f) => f.endsWith('.deb'));
  if (debs.length !== 1) throw new SetupError(`apt-get download ${pkg} failed: expected one .deb in ${dl}, found ${debs.length}`);
  const deb = path.join(dl, debs[0]!);

  const x = path.join(into, 'x');
  await fs.mkdir(x);
  log(`guest: extracting kernel and virtio modules from ${debs[0]}`);
  // Only what we need: dpkg-deb's data tar, filtered (the full package is ~400 MB unpacked).
  await runCommand(`dpkg-deb extract of ${debs[0]}`, 'bash', [
    '-c',
    'set -o pipefail; dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" --wildcards "./boot/vmlinuz-*" "*/virtio*.ko*"',
    'extract', deb, x,
  ]);
  await fs.rm(deb, { force: true });

  const bootDir = path.join(x, 'boot');
  const vmlinuz = (await fs.readdir(bootDir).catch(() => [] as string[])).find((f) => f.startsWith('vmlinuz-'));
  if (!vmlinuz) throw new SetupError(`dpkg-deb extract of ${debs[0]} failed: no boot/vmlinuz-* in the package`);
  await fs.copyFile(path.join(bootDir, vmlinuz), path.join(into, 'vmlinuz'));
  await extractVmlinux(path.join(into, 'vmlinuz'), path.join(into, 'vmlinux'), log);

  const found = new Map<string, string>();
  const walk = async (d: string): Promise<void> => {
    for (const e of await fs.readdir(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) await walk(p);
      else {
        const base = e.name.replace(/\.ko(\.(xz|zst|gz))?$/, '');
        if (VIRTIO_MODULES.includes(base) && !found.has(base)) found.set(base, p);
      }
    }
  };
  await walk(x);
  const modDir = path.join(into, 'modules');
  await fs.mkdir(modDir);
  for (const name of VIRTIO_MODULES) {
    const src = found.get(name);
    if (!src) {
      // Built into this kernel (or absent): /init skips modules it does not have.
      log(`guest: module ${name} not in ${pkg} (built in?), skipping`);
      continue;
    }
    const ext = src.slice(src.lastIndexOf('.ko') + 3);
    const dst = path.join(modDir, `${name}.ko${ext}`);
    await fs.copyFile(src, dst);
    // busybox insmod loads plain .ko files only: decompress here.
    if (ext === '.xz') await xzDecompress(dst);
    else if (ext === '.zst') await zstdDecompress(dst);
    else if (ext === '.gz') {
      await fs.writeFile(path.join(modDir, `${name}.ko`), await promisify(zlib.gunzip)(await fs.readFile(dst)));
      await fs.rm(dst);
    }
  }
  await fs.writeFile(path.join(into, 'kernel-package'), `${pkg}\n${vmlinuz}\n`);
  await fs.rm(x, { recursive: true, force: true });
  await fs.rm(dl, { recursive: true, force: true });
}

async function findBusybox(): Promise<string> {
  for (const p of ['/bin/busybox', '/usr/bin/busybox']) {
    if (!(await exists(p))) continue;
    const { stdout } = await runCommand('checking busybox', 'file', ['-L', p]).catch(() => ({ stdout: 'statically linked' }));
    if (/statically linked|static-pie/.test(stdout)) return p;
  }
  throw new SetupError('finding busybox failed: no statically linked /bin/busybox (install busybox-static)');
}

async function buildInitrd(tmp: string, kernelDir: string, log: (m: string) => void): Promise<string> {
  const root = path.join(tmp, 'root');
  for (const d of ['bin', 'sbin', 'dev', 'proc', 'sys', 'tmp', 'lib/modules']) await fs.mkdir(path.join(root, d), { recursive: true });

  for (const prog of ['memcheck', 'diskcheck']) {
    log(`guest: compiling ${prog}`);
    await runCommand(`gcc -static ${prog}.c`, 'gcc', ['-static', '-O2', '-Wall', '-o', path.join(root, 'bin', prog), path.join(guestSourceDir(), `${prog}.c`)]);
  }

  await fs.copyFile(await findBusybox(), path.join(root, 'bin', 'busybox'));
  await fs.chmod(path.join(root, 'bin', 'busybox'), 0o755);
  for (const a of BUSYBOX_APPLETS) await fs.symlink('busybox', path.join(root, 'bin', a));
  await fs.copyFile(path.join(guestSourceDir(), 'init'), path.join(root, 'init'));
  await fs.chmod(path.join(root, 'init'), 0o755);

  const modSrc = path.join(kernelDir, 'modules');
  for (const f of await fs.readdir(modSrc).catch(() => [] as string[])) {
    if (f.endsWith('.ko')) await fs.copyFile(path.join(modSrc, f), path.join(root, 'lib', 'modules', f));
  }
  // The kernel opens /dev/console for /init before devtmpfs is mounted.
  await runCommand('mknod /dev/console', 'mknod', ['-m', '600', path.join(root, 'dev', 'console'), 'c', '5', '1']).catch((err: Error) => {
    log(`guest: ${err.message} (not root?); /init reopens the console after mounting devtmpfs`);
  });

  log('guest: packing initrd.img (cpio newc + gzip)');
  const out = path.join(tmp, 'initrd.img');
  await runCommand('cpio -H newc | gzip (initrd)', 'bash', [
    '-c',
    'set -o pipefail; cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -H newc -o -R 0:0 | gzip -9n > "$2"',
    'pack', root, out,
  ]);
  return out;
}

/** Exclusive lock across processes (tests may build concurrently). */
export async function withLock<T>(dir: string, fn: () => Promise<T>, log: (m: string) => void): Promise<T> {
  const lock = path.join(dir, '.lock');
  const deadline = Date.now() + 15 * 60_000;
  let said = false;
  for (;;) {
    try {
      const h = await fs.open(lock, 'wx');
      await h.writeFile(String(process.pid));
      await h.close();
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw new SetupError(`locking ${lock} failed: ${(err as Error).message}`, { cause: err });
      const pid = Number((await fs.readFile(lock, 'utf8').catch(() => '')).trim());
      let alive = false;
      if (pid > 0) {
        try {
          process.kill(pid, 0);
          alive = true;
        } catch (e) {
          alive = (e as NodeJS.ErrnoException).code === 'EPERM';
        }
      }
      if (!alive && pid > 0) {
        await fs.rm(lock, { force: true });
        continue;
      }
      if (Date.now() > deadline) throw new SetupError(`locking ${lock} failed: held by pid ${pid} for too long`);
      if (!said) {
        log(`waiting for another build (pid ${pid} holds ${lock})`);
        said = true;
      }
      await sleep(250);
    }
  }
  try {
    return await fn();
  } finally {
    await fs.rm(lock, { force: true });
  }
}

/**
 * Builds (if needed) and returns the guest kernel and initramfs. Idempotent: a
 * current build returns at once. Files are built in a temp dir and renamed in,
 * the stamp last, so a crash never leaves a half-written artifact in place.
 */
export async function ensureGuestArtifacts(opts: EnsureGuestOptions = {}): Promise<GuestArtifacts> {
  const log = opts.log ?? (() => {});
  const dir = guestArtifactsDir();
  const artifacts = artifactPaths(dir);
  if (!opts.force && (await guestArtifactsStatus()).ready) return withVmlinux(artifacts);

  await fs.mkdir(dir, { recursive: true }).catch((err: Error) => {
    throw new SetupError(`creating ${dir} failed: ${err.message}`, { cause: err });
  });
  return withLock(dir, async () => {
    // Someone else may have built it while we waited.
    if (!opts.force && (await guestArtifactsStatus()).ready) return withVmlinux(artifacts);
    const hash = await sourcesHash();
    const tmp = await fs.mkdtemp(path.join(dir, '.build-'));
    try {
      // Kernel: reuse the cached one unless forced or missing.
      const kdir = path.join(dir, 'kernel');
      let kernelPackage = (await fs.readFile(path.join(kdir, 'kernel-package'), 'utf8').catch(() => '')).split('\n')[0] ?? '';
      if (opts.force || !kernelPackage || !(await exists(path.join(kdir, 'vmlinuz')))) {
        kernelPackage = await resolveKernelPackage();
        const knew = path.join(tmp, 'kernel');
        await fs.mkdir(knew);
        await fetchKernel(kernelPackage, knew, log);
        await fs.rm(kdir, { recursive: true, force: true });
        await fs.rename(knew, kdir);
      } else {
        log(`guest: kernel ${kernelPackage} already cached`);
        if (!(await exists(path.join(kdir, 'vmlinux')))) await extractVmlinux(path.join(kdir, 'vmlinuz'), path.join(kdir, 'vmlinux'), log);
      }

      const initrd = await buildInitrd(tmp, kdir, log);
      const kernelTmp = path.join(tmp, 'vmlinuz');
      await linkOrCopy(path.join(kdir, 'vmlinuz'), kernelTmp);
      await fs.rename(kernelTmp, artifacts.kernel);
      if (await exists(path.join(kdir, 'vmlinux'))) {
        const elfTmp = path.join(tmp, 'vmlinux');
        await linkOrCopy(path.join(kdir, 'vmlinux'), elfTmp);
        await fs.rename(elfTmp, path.join(dir, 'vmlinux'));
      } else {
        await fs.rm(path.join(dir, 'vmlinux'), { force: true });
      }
      await fs.rename(initrd, artifacts.initrd);
      const stamp: Stamp = { recipe: RECIPE_VERSION, sourcesHash: hash, kernelPackage, builtAt: new Date().toISOString() };
      const stampTmp = path.join(tmp, STAMP);
      await fs.writeFile(stampTmp, JSON.stringify(stamp, null, 2) + '\n');
      await fs.rename(stampTmp, path.join(dir, STAMP));
      log(`guest: artifacts ready in ${dir} (kernel ${kernelPackage})`);
      return withVmlinux(artifacts);
    } finally {
      await fs.rm(tmp, { recursive: true, force: true });
    }
  }, log);
}
