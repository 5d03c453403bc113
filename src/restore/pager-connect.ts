// Store connections for a network-mode restore's pager: pinned to the image being restored, on the store or on another one when it fails.
import { HydraError, RestoreError } from '../errors.js';
import { StoreClient, type StoreMeta } from '../protocol/index.js';

export const DEFAULT_GUEST_DELAY = 0.05;
export const DEFAULT_MIN_BYTES_PER_S = 64e6;

export interface PagingOptions {
  /** Background connections streaming the image (default 2). */
  streams?: number;
  /** Bytes per background request (default 8 MiB: one reply frame). */
  batchBytes?: number;
  /** Upper bound of the background stream in bytes per second (default: none). Faults are never limited. */
  maxBytesPerS?: number;
  /**
   * Rate control: the largest share of time the guest's vCPUs may wait for a
   * CPU before the stream slows down (default 0.05; 0 turns the control off),
   * and the rate it never goes below (default 64 MB/s, so memory completes).
   */
  guestDelay?: number;
  minBytesPerS?: number;
  /** How long the pager tries to reach a store after a connection failed before it stops the VM (default 10 s). */
  reconnectMs?: number;
  /**
   * Other store addresses serving the same image (a standby store), tried in
   * order after the restore's own store when a connection fails; or a function
   * asked each time (e.g. what is registered in etcd now).
   */
  alternates?: string[] | (() => Promise<string[]>);
}

interface ConnectTarget {
  vm: string;
  store: string;
  secret: string;
  paging?: PagingOptions;
}

/**
 * `to(address)`: a reader connection to one store, of the image's generation,
 * pinned to its epoch: the store refuses it (HYDRA_STORE_EPOCH_MOVED) unless
 * that epoch still is the committed one, and its device state must be the
 * same (a store serving another copy never answers a page). `any(why)`: the
 * restore's store, then each alternate, the first that works.
 */
export function pagerConnect(opts: ConnectTarget, meta: StoreMeta): { to: (address: string) => Promise<StoreClient>; any: (why?: string) => Promise<StoreClient> } {
  const to = async (address: string): Promise<StoreClient> => {
    const c = await StoreClient.connect({ address, secret: opts.secret, vm: opts.vm, generation: meta.generation, role: 'reader' });
    try {
      const m = await c.getMeta(meta.generation, { epoch: meta.committedEpoch, pin: true });
      if (!m || m.committedEpoch !== meta.committedEpoch || m.ramSize !== meta.ramSize || m.devstate.sha256 !== meta.devstate.sha256) {
        throw new RestoreError('HYDRA_RESTORE_EPOCH_MISMATCH', `VM "${opts.vm}": store ${address} serves another image of generation ${meta.generation} (epoch ${m?.committedEpoch ?? 'none'}) than the one being restored (epoch ${meta.committedEpoch})`);
      }
      return c;
    } catch (err) {
      // Refused or unusable: the connection is discarded, the error below says why.
      await c.close().catch(() => undefined);
      throw err;
    }
  };
  const any = async (why = 'a failure'): Promise<StoreClient> => {
    const alt = opts.paging?.alternates;
    const others = typeof alt === 'function' ? await alt() : alt ?? [];
    const errors: string[] = [];
    let refusal: HydraError | undefined;
    let refusals = 0;
    for (const address of [...new Set([opts.store, ...others])]) {
      try {
        return await to(address);
      } catch (err) {
        errors.push(`${address}: ${(err as Error).message}`);
        if (err instanceof HydraError && (err.code === 'HYDRA_STORE_EPOCH_MOVED' || err.code === 'HYDRA_RESTORE_EPOCH_MISMATCH')) {
          refusal ??= err;
          refusals++;
        }
      }
    }
    const msg = `VM "${opts.vm}": no store serves epoch ${meta.committedEpoch} of generation ${meta.generation} after ${why}: ${errors.join('; ')}`;
    // Only stores holding another image answered: waiting will not bring the pages back.
    if (refusal && refusals === errors.length) throw new RestoreError('HYDRA_RESTORE_EPOCH_MISMATCH', msg, { cause: refusal });
    throw new RestoreError('HYDRA_RESTORE_STORE_UNREACHABLE', msg);
  };
  return { to, any };
}
