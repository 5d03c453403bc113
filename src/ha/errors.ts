import { HydraError } from '../errors.js';

/**
 * Errors of the HA layer (etcd, agent, manager). Codes start with HYDRA_HA_
 * or HYDRA_ETCD_. (Kept here so src/errors.ts is untouched; the lead may move
 * it there.)
 */
export class HaError extends HydraError {
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}
