import { fileURLToPath } from 'node:url';
import path from 'node:path';
import os from 'node:os';

/**
 * Where HydraVM keeps things. All overridable by environment so tests and
 * several "hosts" on one machine stay apart.
 *
 *   HYDRAVM_HOME   runtime state: one directory per VM under vms/ (default /var/lib/hydravm)
 *   HYDRAVM_CACHE  built guest artifacts: kernel, initramfs, guest images (default ~/.cache/hydravm)
 */
const here = path.dirname(fileURLToPath(import.meta.url));

/** The repository / package root (dist/src/config -> root, or src/config under tsx). */
export const packageRoot: string = (() => {
  let dir = here;
  for (let i = 0; i < 6; i++) {
    if (path.basename(dir) === 'dist') return path.dirname(dir);
    dir = path.dirname(dir);
  }
  return path.resolve(here, '..', '..');
})();

export function hydraHome(): string {
  return process.env.HYDRAVM_HOME ?? '/var/lib/hydravm';
}

export function vmsDir(): string {
  return path.join(hydraHome(), 'vms');
}

export function vmDir(name: string): string {
  return path.join(vmsDir(), name);
}

/** Pre-started restore shells, one directory each (see src/vm/shell.ts). */
export function shellsDir(): string {
  return path.join(hydraHome(), 'shells');
}

export function cacheDir(): string {
  return process.env.HYDRAVM_CACHE ?? path.join(os.homedir(), '.cache', 'hydravm');
}

export function guestArtifactsDir(): string {
  return path.join(cacheDir(), 'guest');
}

/** Built guest images (`hydravm image build`): one directory per build, plus a link per image name. */
export function imagesDir(): string {
  return path.join(cacheDir(), 'images');
}

export const nativeAddonPath = path.join(packageRoot, 'native', 'build', 'Release', 'hydra_native.node');
export const shimPath = path.join(packageRoot, 'native', 'build', 'libhydra_shim.so');
export const cliEntry = path.join(packageRoot, 'dist', 'src', 'cli', 'main.js');
export const supervisorEntry = path.join(packageRoot, 'dist', 'src', 'vm', 'supervisor-main.js');
