// The fencing error and the u32 bound shared by the store's registration and commit paths.
import { StoreError } from '../errors.js';

/** Generations and epochs are u32 in the journal, meta and protocol: anything above is refused. */
export const MAX_U32 = 0xffffffff;

export function staleGeneration(vm: string, generation: number, highest: number): StoreError {
  return new StoreError('HYDRA_STORE_STALE_GENERATION', `VM ${vm} generation ${generation} is stale: generation ${highest} has been registered, so this (older) incarnation is fenced and may not checkpoint`);
}
