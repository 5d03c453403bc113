// What this build can measure: whether the Debian guest image and copy-on-write checkpoints have landed.
import { spawnSync } from 'node:child_process';
import { cliEntry } from '../../config/paths.js';
import type { Capabilities } from './types.js';

export const WAITING_DEBIAN = 'the Debian guest image (`hydravm image build debian`, specs with `root:` and `nics:`)';
export const WAITING_WORKLOADS = 'the workload image (`hydravm image build debian --workloads`: a runner started by `hydra.workload=<id>` on the kernel command line, gcc, make, Lua source, ffmpeg)';
export const WAITING_COW = 'copy-on-write checkpoints (`hydravm protect --cow`)';

/** `hydravm <args> --help` of this very build: exit 0 and its text. */
function help(args: string[]): { ok: boolean; text: string } {
  const r = spawnSync(process.execPath, [cliEntry, ...args, '--help'], { encoding: 'utf8', timeout: 30_000 });
  return { ok: r.status === 0, text: `${r.stdout ?? ''}${r.stderr ?? ''}` };
}

/**
 * Asks the CLI itself rather than importing the modules, so the evaluation
 * picks up the image builder and `--cow` as soon as they exist, with no edit here.
 */
export function detectCapabilities(): Capabilities {
  const image = help(['image', 'build']);
  // An unknown subcommand makes commander print the top-level help (exit 0), so the usage line must name it.
  const debianImage = image.ok && /Usage: hydravm image build\b/.test(image.text);
  const cow = /--cow\b/.test(help(['protect']).text);
  // The runner contract is in src/bench/eval/workloads.ts; the image builder names it in its help once it carries one.
  const debianWorkloads = debianImage && /hydra\.workload/.test(image.text);
  return { debianImage, debianWorkloads, cow, modes: cow ? ['basic', 'cow'] : ['basic'] };
}
