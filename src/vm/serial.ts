import fs from 'node:fs';
import { VmError } from '../errors.js';
import { sleep } from '../util/sleep.js';

/** Reading what the guest printed on its serial console (the serial log). */

export interface MemcheckProgress {
  step: number;
  violations: number;
}

const stepRe = /memcheck: step=(\d+)\b.*?violations=(\d+)/g;

export function readSerial(file: string): string {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    return '';
  }
}

/** The last memcheck progress line in a log (or in the part after `fromOffset`). */
export function lastMemcheckProgress(file: string, fromOffset = 0): MemcheckProgress | undefined {
  const text = readSerial(file).slice(fromOffset);
  let last: MemcheckProgress | undefined;
  for (const m of text.matchAll(stepRe)) last = { step: Number(m[1]), violations: Number(m[2]) };
  return last;
}

/** Count loud violation lines printed by the guest checkers. */
export function countViolations(file: string, fromOffset = 0): number {
  const text = readSerial(file).slice(fromOffset);
  return (text.match(/^(MEMCHECK|DISKCHECK) VIOLATION/gm) ?? []).length;
}

/** Poll the serial log until `predicate` holds on its text, or time out. */
export async function waitForSerial(file: string, predicate: (text: string) => boolean, timeoutMs: number, fromOffset = 0): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const text = readSerial(file).slice(fromOffset);
    if (predicate(text)) return text;
    if (Date.now() > deadline) throw new VmError('HYDRA_VM_SERIAL_TIMEOUT', `timed out after ${timeoutMs} ms waiting on serial log ${file}; last lines:\n${text.split('\n').slice(-5).join('\n')}`);
    await sleep(100);
  }
}

/** Wait until memcheck has reported at least `minStep`. */
export async function waitForMemcheckStep(file: string, minStep: number, timeoutMs: number, fromOffset = 0): Promise<MemcheckProgress> {
  let progress: MemcheckProgress | undefined;
  await waitForSerial(file, () => {
    progress = lastMemcheckProgress(file, fromOffset);
    return !!progress && progress.step >= minStep;
  }, timeoutMs, fromOffset);
  return progress!;
}
