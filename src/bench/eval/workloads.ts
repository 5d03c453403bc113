// The evaluation's workloads: the memcheck test guest, and the paper's two jobs run by the workload image's runner.
import type { Capabilities } from './types.js';
import { WAITING_COW, WAITING_DEBIAN, WAITING_WORKLOADS } from './capabilities.js';

export type Need = 'debian-image' | 'debian-workloads' | 'cow';

export const NEED_TEXT: Record<Need, string> = { 'debian-image': WAITING_DEBIAN, 'debian-workloads': WAITING_WORKLOADS, cow: WAITING_COW };

export function missing(needs: Need[], caps: Capabilities): Need[] {
  return needs.filter((n) => (n === 'debian-image' ? !caps.debianImage : n === 'debian-workloads' ? !caps.debianWorkloads : !caps.cow));
}

/**
 * A job of the workload image (`hydravm image build debian --workloads`).
 * Its runner starts it at boot when the kernel command line says
 * `hydra.workload=<id> hydra.scale=<n>` and prints on the serial console:
 *
 *   hydra-workload: start name=<id>
 *   hydra-workload: name=<id> step=<n> of=<total>
 *   hydra-workload: done name=<id> seconds=<s> status=<exit code>
 *
 * The step lines let the harness fail the VM at 50 % (Table II) and time the
 * remaining half; `done` ends a run. The jobs themselves are shell scripts in
 * guest/debian/workloads/.
 */
export interface DebianWorkload {
  id: 'compile' | 'transcode';
  title: string;
  /** The paper's counterpart. */
  paper: string;
  /** Guest memory (the paper's 512 MB). */
  memoryMb: number;
  /** hydra.scale of a full run, and of --quick. */
  scale: number;
  quickScale: number;
  /** What a step is. */
  step: string;
  /** About how long one unprotected run takes at `scale` under TCG on a quiet 2-core host (for the ETA and time-outs). */
  expectedS: number;
}

/** A real C code base built from clean with gcc and make (the paper built a Linux kernel, far beyond TCG's reach). */
export const COMPILE: DebianWorkload = {
  id: 'compile',
  title: 'gcc + make build Lua 5.4 (Debian\'s lua5.4 source package, upstream Makefile, at -O0 to fit TCG) from clean (34 objects, a library, two executables)',
  paper: 'Linux kernel compilation',
  memoryMb: 512,
  scale: 1,
  quickScale: 1,
  step: 'compiled object',
  expectedS: 50,
};

/** The paper's video transcoding on a generated input: H.264 (lavfi testsrc, 640x360, 25 fps) decoded and encoded to MPEG-4. */
export const TRANSCODE: DebianWorkload = {
  id: 'transcode',
  title: 'ffmpeg transcodes a generated H.264 video (lavfi testsrc, 640x360, 25 fps) to MPEG-4',
  paper: 'video transcoding',
  memoryMb: 512,
  scale: 40,
  quickScale: 16,
  step: 'frame',
  expectedS: 25,
};

export const DEBIAN_WORKLOADS: DebianWorkload[] = [COMPILE, TRANSCODE];
