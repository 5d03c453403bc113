import type { DiskFreezer } from './freezer.js';

/**
 * The calls the checkpointer needs: `freezeDisks` goes into
 * CheckpointerOptions.freezeDisks (called inside the pause, after the device
 * state); `committed` is called with each epoch the store acknowledged;
 * `beforePause` (optional but recommended) is awaited just before `stop`: a
 * no-op when the next overlay is ready, otherwise it prepares it outside the
 * pause (and surfaces HYDRA_DISK_NO_SPACE before the VM is stopped).
 * The first overlay must exist before the first pause: `await freezer.prepare()`
 * once after DiskFreezer.open() (or rely on beforePause).
 */
export interface DiskHook {
  beforePause: () => Promise<void>;
  freezeDisks: (epoch: number) => Promise<string[]>;
  committed: (epoch: number) => void;
}

export function makeDiskHook(freezer: DiskFreezer): DiskHook {
  return {
    beforePause: () => freezer.prepare(),
    freezeDisks: (epoch) => freezer.freeze(epoch),
    committed: (epoch) => freezer.committed(epoch),
  };
}
