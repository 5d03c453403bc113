// An I/O call whose failure names the step and the file (HYDRA_IO_* errors).
import { HydraError, ioStepError } from '../errors.js';

export async function step<T>(name: string, subject: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    if (err instanceof HydraError) throw err;
    throw ioStepError(name, subject, err);
  }
}

export function stepSync<T>(name: string, subject: string, fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    if (err instanceof HydraError) throw err;
    throw ioStepError(name, subject, err);
  }
}
