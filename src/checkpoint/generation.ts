import { loadSecret } from '../config/secret.js';
import { StoreClient } from '../protocol/index.js';
import { StoreError } from '../errors.js';

/**
 * A new protection starts a new image generation: the guest's memory no longer
 * matches any older image, and a higher generation is what fences an older
 * incarnation at the store.
 */
export async function nextGeneration(vm: string, store: string, secretFile?: string): Promise<number> {
  const client = await StoreClient.connect({ address: store, secret: loadSecret({ secretFile }), vm, generation: 0, role: 'reader' })
    .catch((err: unknown) => { throw new StoreError('HYDRA_STORE_UNREACHABLE', `VM "${vm}": cannot reach the store at ${store}: ${(err as Error).message}`, { cause: err }); });
  try {
    return client.welcome.highestGeneration + 1;
  } finally {
    await client.close();
  }
}
