import fs from 'node:fs';
import path from 'node:path';
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

export interface FullVerify {
  step: number;
  pages: number;
  violations: number;
  /** Violations found by this verification alone. */
  found: number;
  ms: number;
  reason: string;
}

const fullRe = /memcheck: full-verify step=(\d+) pages=(\d+) violations=(\d+) new=(\d+) ms=(\d+) reason=(\S+)/g;

/** Every full verification memcheck reported in a log (after `fromOffset`). */
export function fullVerifications(file: string, fromOffset = 0): FullVerify[] {
  const text = readSerial(file).slice(fromOffset);
  return [...text.matchAll(fullRe)].map((m) => ({ step: Number(m[1]), pages: Number(m[2]), violations: Number(m[3]), found: Number(m[4]), ms: Number(m[5]), reason: m[6]! }));
}

/** Type a line on the guest's serial console (through the FIFO the supervisor holds; see qemu-args.ts). */
export function typeOnConsole(serialIn: string, line: string): void {
  let fd: number;
  try {
    fd = fs.openSync(serialIn, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
  } catch (err) {
    throw new VmError('HYDRA_VM_CONSOLE', `cannot write to the serial console input ${serialIn}: ${(err as Error).message}`, { cause: err });
  }
  try {
    fs.writeSync(fd, `${line}\n`);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Ask memcheck for a full verification of every page now and wait for its
 * report. After a restore nothing else triggers one (the guest sees no time
 * jump), so this is how a test proves the whole guest, not a sample.
 * The request is repeated every few seconds until it is answered (the guest
 * may be busy faulting its memory back in).
 */
export async function requestFullVerify(serialLog: string, serialIn = path.join(path.dirname(serialLog), 'serial.in'), timeoutMs = 120_000): Promise<FullVerify> {
  const from = readSerial(serialLog).length;
  const deadline = Date.now() + timeoutMs;
  let nextAsk = 0;
  for (;;) {
    const done = fullVerifications(serialLog, from).find((v) => v.reason === 'request');
    if (done) return done;
    if (Date.now() > deadline) {
      throw new VmError('HYDRA_VM_SERIAL_TIMEOUT', `memcheck did not report a requested full verification within ${timeoutMs} ms (serial log ${serialLog}); last lines:\n${readSerial(serialLog).slice(from).split('\n').slice(-5).join('\n')}`);
    }
    if (Date.now() >= nextAsk) {
      typeOnConsole(serialIn, 'verify');
      nextAsk = Date.now() + 5000;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}
