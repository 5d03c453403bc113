/**
 * Front door to the native layer: loads the addon (native/addon, built to
 * native/build/Release/hydra_native.node) and locates the LD_PRELOAD shim
 * (native/shim, built to native/build/libhydra_shim.so).
 *
 * Build both with `make -C native` (or `hydravm setup`); `buildNative()` below
 * does it on demand (tests use it).
 */
import { existsSync } from 'node:fs';
import { nativeAddonPath, shimPath } from '../config/paths.js';
import { NativeError } from '../errors.js';
import type { RawAddon } from './raw.js';

export type { RawAddon, RawNativeError, ScanResult, UffdApiResult, WaitFaultsResult, RawConstants, ScanSpec } from './raw.js';
export { isRawNativeError } from './raw.js';
export type { RawCowAddon, CowHandle, CowBatch, CowCollectResult, CowStats } from './raw-cow.js';
export { nativeAddonPath, shimPath };
export { loadNative } from './load.js';

/**
 * Path of the LD_PRELOAD shim to give QEMU. Throws NativeError
 * HYDRA_NATIVE_SHIM_MISSING if it was not built.
 *
 * Shim contract: when preloaded it creates HYDRAVM_SHIM_UFFDS (default 2)
 * userfaultfds inside the process and keeps them open; HYDRAVM_SHIM=0 disables
 * it; after fork() the child makes its own (so -daemonize is safe).
 */
export function requireShim(): string {
  if (!existsSync(shimPath)) {
    throw new NativeError('HYDRA_NATIVE_SHIM_MISSING', `the userfaultfd shim ${shimPath} is missing; run \`hydravm setup\` (or \`make -C native shim\`) to build it`);
  }
  return shimPath;
}

export { buildNative, nativeBuildIsFresh } from './build.js';

export { killProcess, type ProcessIdentity } from './kill.js';
