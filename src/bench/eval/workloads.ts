// The evaluation's workloads: the memcheck test guest (runs now) and the paper's two Debian workloads (wait for the Debian guest image).
import type { Capabilities } from './types.js';
import { WAITING_COW, WAITING_DEBIAN, WAITING_WORKLOADS } from './capabilities.js';

export type Need = 'debian-image' | 'debian-workloads' | 'cow';

export const NEED_TEXT: Record<Need, string> = { 'debian-image': WAITING_DEBIAN, 'debian-workloads': WAITING_WORKLOADS, cow: WAITING_COW };

export function missing(needs: Need[], caps: Capabilities): Need[] {
  return needs.filter((n) => (n === 'debian-image' ? !caps.debianImage : n === 'debian-workloads' ? !caps.debianWorkloads : !caps.cow));
}

/**
 * A workload that runs to completion inside the Debian guest. The guest's
 * runner (part of the Debian image) starts `script` at boot when the kernel
 * command line says `hydra.workload=<id>`, and prints on the serial console:
 *
 *   hydra-workload: start id=<id>
 *   hydra-workload: progress=<done>/<total>
 *   hydra-workload: done id=<id> seconds=<s> status=<exit code>
 *
 * Progress lines let the harness fail the VM at 50 % (Table II) and time the
 * remaining half; `done` ends a run.
 */
export interface DebianWorkload {
  id: 'compile' | 'transcode';
  title: string;
  /** The paper's counterpart. */
  paper: string;
  /** Guest memory (the paper's 512 MB). */
  memoryMb: number;
  /** What the guest runs, as a shell script (progress printed as above). */
  script: string;
  /** Packages the Debian image must carry for it. */
  packages: string[];
  /** Scaled to TCG: roughly how long one unprotected run takes there. */
  expectedS: number;
}

/**
 * A kernel-style build: BusyBox uses the Linux kernel's Kconfig/Kbuild, and
 * its source is Debian's (`apt-get source busybox` when the image is built,
 * unpacked to /usr/src/busybox). Progress counts compiled objects against the
 * count `make -n` plans.
 */
export const COMPILE: DebianWorkload = {
  id: 'compile',
  title: 'BusyBox build (gcc + make, Kbuild, Debian source)',
  paper: 'Linux kernel compilation',
  memoryMb: 512,
  packages: ['gcc', 'make', 'libc6-dev', 'busybox source (apt-get source busybox)'],
  expectedS: 900,
  script: [
    'set -e',
    'cd /usr/src/busybox',
    'make -s distclean >/dev/null 2>&1 || true',
    'make -s defconfig >/dev/null',
    'total=$(make -n 2>/dev/null | grep -c -- " -c -o " || echo 1)',
    'echo "hydra-workload: start id=compile"',
    't0=$(date +%s.%N)',
    'make -j"$(nproc)" V=1 2>&1 | awk -v t="$total" \'/ -c -o /{n++; printf "hydra-workload: progress=%d/%d\\n", n, t; fflush()}\'',
    'st=${PIPESTATUS[0]:-0}',
    'echo "hydra-workload: done id=compile seconds=$(echo "$(date +%s.%N) - $t0" | bc) status=$st"',
  ].join('\n'),
};

/** The paper's video transcoding, on a generated input: ffmpeg's lavfi test source encoded to MPEG-4, 60 s at 25 fps, 640x360. */
export const TRANSCODE: DebianWorkload = {
  id: 'transcode',
  title: 'ffmpeg transcode of -f lavfi testsrc (640x360, 25 fps, 60 s → MPEG-4)',
  paper: 'video transcoding',
  memoryMb: 512,
  packages: ['ffmpeg', 'bc'],
  expectedS: 600,
  script: [
    'total=1500',
    'echo "hydra-workload: start id=transcode"',
    't0=$(date +%s.%N)',
    'ffmpeg -hide_banner -nostats -loglevel error -f lavfi -i testsrc=duration=60:size=640x360:rate=25 -c:v mpeg4 -q:v 5 -progress pipe:1 -y /tmp/out.mp4 | awk -v t="$total" -F= \'$1=="frame"{printf "hydra-workload: progress=%d/%d\\n", $2, t; fflush()}\'',
    'st=${PIPESTATUS[0]:-0}',
    'echo "hydra-workload: done id=transcode seconds=$(echo "$(date +%s.%N) - $t0" | bc) status=$st"',
  ].join('\n'),
};

export const DEBIAN_WORKLOADS: DebianWorkload[] = [COMPILE, TRANSCODE];

/** The guest kinds the evaluation knows, and what each needs. */
export const GUESTS = {
  memcheck: { title: 'memcheck test guest (busybox initramfs; writes and verifies pages at a set rate)', needs: [] as Need[] },
  debian: { title: 'Debian guest with gcc, make and ffmpeg', needs: ['debian-image'] as Need[] },
};
