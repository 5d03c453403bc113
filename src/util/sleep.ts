// A promise that resolves after a delay.
export function sleep(ms: number): Promise<void> {
  return new Promise<void>((resolve) => setTimeout(resolve, ms));
}

/**
 * `p`'s value, or `undefined` once `ms` have passed first. The timer is
 * cleared when `p` settles, so a long limit never keeps the process alive
 * after the work is done (a bare `sleep` in a race would).
 */
export async function within<T>(p: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<undefined>((resolve) => { timer = setTimeout(() => resolve(undefined), ms); })]);
  } finally {
    clearTimeout(timer);
  }
}
