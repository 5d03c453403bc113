// Waiting in tests for a condition another process brings about.
import { sleep } from '../../src/util/sleep.js';

/**
 * Wait until `fn` returns a truthy value (a throw counts as not yet). On
 * timeout the error names `what` and the last error `fn` threw.
 */
export async function until<T>(what: string, fn: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs = 10_000, everyMs = 20): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let lastErr: unknown;
  for (;;) {
    let v: T | undefined | false;
    try {
      v = await fn();
    } catch (err) {
      lastErr = err;
      v = undefined;
    }
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for: ${what}${lastErr ? ` (last error: ${(lastErr as Error).message})` : ''}`, { cause: lastErr });
    await sleep(everyMs);
  }
}

export { sleep };
