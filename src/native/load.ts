// Loading the native addon once (native/build/Release/hydra_native.node).
import { createRequire } from 'node:module';
import { nativeAddonPath } from '../config/paths.js';
import { NativeError } from '../errors.js';
import type { RawAddon } from './raw.js';

let cached: RawAddon | undefined;

/** The loaded addon. Throws NativeError HYDRA_NATIVE_NOT_BUILT naming the path tried. */
export function loadNative(): RawAddon {
  if (cached) return cached;
  const require = createRequire(import.meta.url);
  try {
    cached = require(nativeAddonPath) as RawAddon;
  } catch (err) {
    const why = err instanceof Error ? err.message.split('\n')[0] : String(err);
    throw new NativeError(
      'HYDRA_NATIVE_NOT_BUILT',
      `cannot load the HydraVM native addon from ${nativeAddonPath} (${why}); run \`hydravm setup\` (or \`make -C native\`) to build it`,
      { cause: err },
    );
  }
  return cached;
}

