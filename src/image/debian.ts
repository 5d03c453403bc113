// `hydravm image build debian`: a Debian guest root disk, kernel and initramfs, from Debian packages only.
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { imagesDir, guestArtifactsDir, packageRoot } from '../config/paths.js';
import { ImageError, HydraError } from '../errors.js';
import { exists, extractVmlinux, resolveKernelPackage, withLock } from '../setup/index.js';
import { parseSize } from '../vm/index.js';
import { hostDebianSources } from './sources.js';
import { assertFreeSpace, debianBuildNeeds } from './space.js';

/** Bump when the recipe changes in a way the inputs below do not capture. */
const RECIPE_VERSION = 1;
export const DEFAULT_PACKAGES = ['redis-server'];
export const DEFAULT_SIZE = '4G';
/** What every image has besides the workload packages: an init, a network stack, the kernel's initramfs tool. */
const BASE_PACKAGES = ['systemd-sysv', 'udev', 'dbus', 'iproute2', 'procps', 'e2fsprogs', 'initramfs-tools'];
const HOOKS = ['guest/debian/essential-hook.sh', 'guest/debian/customize-hook.sh'];
/**
 * A workload image (`--workloads`) adds the benchmark runner (hydra.workload= on the kernel
 * command line), the compiler and ffmpeg its two jobs use, and the compile job's C source
 * from Debian's source archive; its hook runs before the common one, which drops apt's lists.
 */
const WORKLOAD_HOOK = 'guest/debian/workloads/customize-hook.sh';
const WORKLOAD_FILES = [WORKLOAD_HOOK, 'guest/debian/workloads/hydra-workload', 'guest/debian/workloads/hydra-workload.service', 'guest/debian/workloads/compile.sh', 'guest/debian/workloads/transcode.sh'];
export const WORKLOAD_PACKAGES = ['gcc', 'make', 'libc6-dev', 'ffmpeg'];
export const WORKLOAD_IMAGE = 'debian-workloads';
/** The kernel command line an image boots with; a spec adds `ip=` for a static address. */
export const DEBIAN_CMDLINE = 'console=ttyS0 root=/dev/vda rw net.ifnames=0';

export interface BuildImageOptions {
  /** Name of the link under the images directory (default "debian", "debian-workloads" with `workloads`): specs say image:NAME/... */
  name?: string;
  size?: string;
  packages?: string[];
  /** Add the benchmark workloads (runner, gcc, make, Lua source, ffmpeg and its input video). */
  workloads?: boolean;
  force?: boolean;
  log?: (msg: string) => void;
}

export interface BuiltImage {
  name: string;
  /** The build's own directory (images/debian-<key>); `link` points at it. */
  dir: string;
  link: string;
  root: string;
  kernel: string;
  /** The uncompressed kernel (PVH entry), faster to boot under TCG, if it could be extracted. */
  vmlinux?: string;
  initrd: string;
  cmdline: string;
  key: string;
  /** Whether this call built it (false: it was cached). */
  built: boolean;
  info: ImageInfo;
}

export interface ImageInfo {
  recipe: number;
  distribution: 'debian';
  suite: string;
  packages: string[];
  /** Whether the image carries the benchmark workloads (hydra.workload=compile|transcode). */
  workloads?: boolean;
  sizeBytes: number;
  kernelPackage: string;
  mirrors: string[];
  cmdline: string;
  builtAt: string;
  buildSeconds: number;
  steps: Record<string, number>;
}

const PKG_RE = /^[a-z0-9][a-z0-9+.-]+$/;

function checkArgs(opts: BuildImageOptions): { name: string; sizeBytes: number; packages: string[] } {
  const name = opts.name ?? (opts.workloads ? WORKLOAD_IMAGE : 'debian');
  if (!/^[a-z0-9][a-z0-9_.-]{0,31}$/i.test(name) || name.includes('..')) throw new ImageError('HYDRA_IMAGE_BAD_ARGS', `image name "${name}" is not valid (letters, digits, "-", "_", ".")`);
  let sizeBytes: number;
  try {
    sizeBytes = parseSize(opts.size ?? DEFAULT_SIZE, '--size');
  } catch (err) {
    throw new ImageError('HYDRA_IMAGE_BAD_ARGS', (err as Error).message, { cause: err });
  }
  if (sizeBytes < 1024 ** 3) throw new ImageError('HYDRA_IMAGE_BAD_ARGS', `--size ${opts.size}: a Debian root disk needs at least 1G`);
  const packages = [...new Set((opts.packages ?? DEFAULT_PACKAGES).map((p) => p.trim()).filter(Boolean))].sort();
  for (const p of packages) {
    if (!PKG_RE.test(p)) throw new ImageError('HYDRA_IMAGE_BAD_ARGS', `--packages: "${p}" is not a Debian package name`);
  }
  return { name, sizeBytes, packages };
}

/** The kernel the test guest uses (same package: one kernel for every guest on the host). */
async function kernelPackage(): Promise<string> {
  const cached = (await fs.readFile(path.join(guestArtifactsDir(), 'kernel', 'kernel-package'), 'utf8').catch(() => '')).split('\n')[0]?.trim();
  return cached || resolveKernelPackage();
}

async function hooksHash(files: string[]): Promise<string> {
  const h = createHash('sha256');
  for (const rel of files) {
    const file = path.join(packageRoot, rel);
    const data = await fs.readFile(file).catch((err: Error) => {
      throw new ImageError('HYDRA_IMAGE_BUILD_FAILED', `reading the image hook ${file} failed: ${err.message}`, { cause: err });
    });
    h.update(`${rel}\n`).update(data);
  }
  return h.digest('hex');
}

/** Run a build step, passing its output lines to `onLine`; a failure names the step and ends with its last lines. */
function step(what: string, cmd: string, args: string[], onLine: (l: string) => void): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LC_ALL: 'C.UTF-8', DEBIAN_FRONTEND: 'noninteractive' } });
    const tail: string[] = [];
    const feed = (buf: Buffer) => {
      for (const line of buf.toString().split(/[\r\n]+/)) {
        if (!line.trim()) continue;
        tail.push(line);
        if (tail.length > 8) tail.shift();
        onLine(line);
      }
    };
    child.stdout.on('data', feed);
    child.stderr.on('data', feed);
    child.on('error', (err) => reject(new ImageError('HYDRA_IMAGE_BUILD_FAILED', `${what} failed: cannot run ${cmd}: ${err.message}${cmd === 'mmdebstrap' ? ' (install it: scripts/install-host-packages.sh)' : ''}`, { cause: err })));
    child.on('close', (code, signal) => {
      if (code === 0) resolve();
      else reject(new ImageError('HYDRA_IMAGE_BUILD_FAILED', `${what} failed (${signal ? `signal ${signal}` : `exit ${code}`}):\n${tail.join('\n')}`));
    });
  });
}

async function readInfo(dir: string): Promise<ImageInfo | undefined> {
  try {
    return JSON.parse(await fs.readFile(path.join(dir, 'image.json'), 'utf8')) as ImageInfo;
  } catch {
    return undefined;
  }
}

async function describe(name: string, dir: string, key: string, built: boolean, info: ImageInfo): Promise<BuiltImage> {
  const link = path.join(imagesDir(), name);
  const vmlinux = path.join(dir, 'vmlinux');
  return {
    name, dir, link, key, built, info,
    root: path.join(dir, 'root.qcow2'),
    kernel: path.join(dir, 'vmlinuz'),
    ...((await exists(vmlinux)) ? { vmlinux } : {}),
    initrd: path.join(dir, 'initrd.img'),
    cmdline: info.cmdline,
  };
}

/** Point images/NAME at the build directory (atomically: a new link renamed over the old). */
async function linkName(name: string, dir: string): Promise<void> {
  const link = path.join(imagesDir(), name);
  const tmp = `${link}.link-${process.pid}`;
  await fs.rm(tmp, { force: true });
  await fs.symlink(path.basename(dir), tmp);
  await fs.rename(tmp, link);
}

/**
 * Build (or find in the cache) a Debian guest image:
 *   mmdebstrap (packages from this host's Debian mirror into a directory)
 *   -> mkfs.ext4 -d (the tree into a raw ext4 file, no loop mount, no root needed for it)
 *   -> qemu-img convert (raw -> qcow2, zeros skipped)
 * plus the Debian kernel and the initramfs initramfs-tools made inside the tree.
 * The cache key covers the packages, the size, the kernel, the mirror and the
 * hook scripts; a finished build is never changed (the qcow2 is read-only),
 * VMs put their own overlay on it.
 */
/** What identifies a build: its arguments checked, the mirror, the kernel, and the cache key over all of them. */
async function resolveBuild(opts: BuildImageOptions) {
  const { name, sizeBytes, packages } = checkArgs({ ...opts, packages: opts.workloads ? [...(opts.packages ?? []), ...WORKLOAD_PACKAGES] : opts.packages });
  const workloads = opts.workloads === true;
  // The compile job's source comes from the same mirror's source archive.
  const sources = hostDebianSources({ withSource: workloads });
  const kpkg = await kernelPackage();
  const hooks = await hooksHash(workloads ? [...HOOKS, ...WORKLOAD_FILES] : HOOKS);
  // A plain image's key has no workloads field, so images built before it existed stay cached.
  const key = createHash('sha256')
    .update(JSON.stringify({ recipe: RECIPE_VERSION, packages, sizeBytes, kpkg, suite: sources.suite, sources: sources.text, hooks, ...(workloads ? { workloads } : {}) }))
    .digest('hex').slice(0, 12);
  return { name, sizeBytes, packages, workloads, sources, kpkg, key, dir: path.join(imagesDir(), `debian-${key}`) };
}

/** The image `buildDebianImage(opts)` would return, if it is already built (nothing is built or linked). */
export async function findDebianImage(opts: BuildImageOptions = {}): Promise<BuiltImage | undefined> {
  const b = await resolveBuild(opts);
  const info = await readInfo(b.dir);
  if (!info || !(await exists(path.join(b.dir, 'root.qcow2')))) return undefined;
  return describe(b.name, b.dir, b.key, false, info);
}

export async function buildDebianImage(opts: BuildImageOptions = {}): Promise<BuiltImage> {
  const log = opts.log ?? (() => {});
  const { name, sizeBytes, packages, workloads, sources, kpkg, key, dir } = await resolveBuild(opts);
  const root = imagesDir();
  await fs.mkdir(root, { recursive: true }).catch((err: Error) => {
    throw new ImageError('HYDRA_IMAGE_BUILD_FAILED', `creating ${root} failed: ${err.message}`, { cause: err });
  });

  const cached = async (): Promise<BuiltImage | undefined> => {
    const info = await readInfo(dir);
    if (!info || !(await exists(path.join(dir, 'root.qcow2')))) return undefined;
    await linkName(name, dir);
    return describe(name, dir, key, false, info);
  };
  if (!opts.force) {
    const hit = await cached();
    if (hit) return hit;
  }

  return withLock(root, async () => {
    if (!opts.force) {
      const hit = await cached();
      if (hit) return hit;
    }
    assertFreeSpace(root, debianBuildNeeds(packages), `building the Debian image (${packages.join(', ') || 'no extra packages'})`);
    const t0 = performance.now();
    const steps: Record<string, number> = {};
    const timed = async (label: string, fn: () => Promise<void>) => {
      const t = performance.now();
      await fn();
      steps[label] = Math.round(performance.now() - t) / 1000;
      log(`image: ${label} done in ${steps[label]!.toFixed(1)} s`);
    };
    const tmp = await fs.mkdtemp(path.join(root, '.build-'));
    try {
      const tree = path.join(tmp, 'rootfs');
      const sourcesFile = path.join(tmp, 'mirror.sources');
      await fs.writeFile(sourcesFile, sources.text);
      const include = [...BASE_PACKAGES, kpkg, ...packages];
      log(`image: installing ${include.length} packages (${packages.join(', ') || 'no workload packages'}, kernel ${kpkg}) from ${sources.uris.join(', ')}`);
      await timed('mmdebstrap', () => step('mmdebstrap', 'mmdebstrap', [
        '--variant=minbase',
        '--mode=root',
        '--format=directory',
        '--aptopt=APT::Install-Recommends "false"',
        `--include=${include.join(',')}`,
        `--essential-hook=${path.join(packageRoot, HOOKS[0]!)} "$1"`,
        ...(workloads ? [`--customize-hook=${path.join(packageRoot, WORKLOAD_HOOK)} "$1"`] : []),
        `--customize-hook=${path.join(packageRoot, HOOKS[1]!)} "$1"`,
        sources.suite, tree, sourcesFile,
      ], (l) => { if (/^I: /.test(l)) log(`image: mmdebstrap: ${l.slice(3)}`); }));

      const boot = path.join(tree, 'boot');
      const bootFiles = await fs.readdir(boot);
      const vmlinuz = bootFiles.find((f) => f.startsWith('vmlinuz-'));
      const initrd = bootFiles.find((f) => f.startsWith('initrd.img-'));
      if (!vmlinuz || !initrd) throw new ImageError('HYDRA_IMAGE_BUILD_FAILED', `mmdebstrap left no kernel or initramfs in ${boot} (found: ${bootFiles.join(', ') || 'nothing'})`);
      await fs.copyFile(path.join(boot, vmlinuz), path.join(tmp, 'vmlinuz'));
      await fs.copyFile(path.join(boot, initrd), path.join(tmp, 'initrd.img'));
      await extractVmlinux(path.join(tmp, 'vmlinuz'), path.join(tmp, 'vmlinux'), log);

      const raw = path.join(tmp, 'root.raw');
      await timed('mkfs.ext4', () => step('mkfs.ext4 -d (root file system from the tree)', 'mkfs.ext4', ['-q', '-F', '-L', 'hydravm-root', '-d', tree, raw, String(Math.floor(sizeBytes / 1024)) + 'k'], () => {}));
      await fs.rm(tree, { recursive: true, force: true });
      await timed('qemu-img convert', () => step('qemu-img convert (raw to qcow2)', 'qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, path.join(tmp, 'root.qcow2')], () => {}));
      await fs.rm(raw, { force: true });
      // VMs write to their own overlays; the shared base never changes.
      await fs.chmod(path.join(tmp, 'root.qcow2'), 0o444);
      await fs.chmod(tmp, 0o755);

      const info: ImageInfo = {
        recipe: RECIPE_VERSION, distribution: 'debian', suite: sources.suite, packages, ...(workloads ? { workloads } : {}), sizeBytes, kernelPackage: kpkg,
        mirrors: sources.uris, cmdline: DEBIAN_CMDLINE, builtAt: new Date().toISOString(),
        buildSeconds: Math.round(performance.now() - t0) / 1000, steps,
      };
      // image.json last: its presence marks a finished build.
      await fs.writeFile(path.join(tmp, 'image.json'), JSON.stringify(info, null, 2) + '\n');
      await fs.rm(dir, { recursive: true, force: true });
      await fs.rename(tmp, dir);
      await linkName(name, dir);
      log(`image: ${name} ready in ${dir} (${info.buildSeconds.toFixed(1)} s)`);
      return describe(name, dir, key, true, info);
    } catch (err) {
      if (err instanceof HydraError) throw err;
      throw new ImageError('HYDRA_IMAGE_BUILD_FAILED', `building the Debian image in ${tmp} failed: ${(err as Error).message}`, { cause: err });
    } finally {
      await fs.rm(tmp, { recursive: true, force: true });
    }
  }, log);
}
