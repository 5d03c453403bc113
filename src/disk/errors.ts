import { HydraError } from '../errors.js';

/**
 * Disk-state errors. Codes:
 *   HYDRA_DISK_UNSUPPORTED      a protected disk is not a writable qcow2 (raw, read-only, missing, not attached)
 *   HYDRA_DISK_NO_SPACE         the layer directory's filesystem is full (preparing an overlay failed)
 *   HYDRA_DISK_PREPARE_FAILED   preparing the next overlay failed for another reason
 *   HYDRA_DISK_NOT_PREPARED     freeze() found no prepared overlay (the last prepare failed); nothing was changed
 *   HYDRA_DISK_FREEZE_FAILED    the QMP snapshot transaction failed; nothing was changed (transactions are atomic)
 *   HYDRA_DISK_LAYER_ID_INVALID a layer id from the store cannot be parsed
 *   HYDRA_DISK_LAYER_MISSING    restore: a frozen layer or one of its backing files does not exist
 *   HYDRA_DISK_LAYER_CORRUPT    restore: qemu-img info/check refuses a layer of the chain
 *   HYDRA_DISK_RESTORE_FAILED   restore: creating the overlay failed
 *   HYDRA_DISK_MERGE_FAILED     merging layers back into the VM disk when protection ends failed (the chain stays usable)
 *
 * (Kept here rather than in src/errors.ts, which another engineer owns; the
 * class extends HydraError so callers match on `code` as everywhere else.)
 */
export class DiskError extends HydraError {
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}
