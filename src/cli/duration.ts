import { SpecError } from '../errors.js';

/** "2s", "500ms", "1.5s", "1m" or a bare number of seconds, to milliseconds. */
export function parseDuration(text: string, what = 'duration'): number {
  const m = /^(\d+(?:\.\d+)?)\s*(ms|s|m)?$/.exec(text.trim());
  if (!m) throw new SpecError(`${what}: "${text}" is not a duration (e.g. 2s, 500ms)`);
  const n = Number(m[1]);
  const ms = m[2] === 'ms' ? n : m[2] === 'm' ? n * 60_000 : n * 1000;
  if (ms <= 0) throw new SpecError(`${what}: must be positive`);
  return Math.round(ms);
}
