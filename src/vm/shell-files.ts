// Moving an idle restore shell's runtime files into the directory of the VM that adopts it.
import fs from 'node:fs';
import type { VmPaths } from './runtime.js';

export { SERIAL_CHARDEV } from './qemu-args.js';

/**
 * A listening Unix socket keeps its listener when its file is renamed, and an
 * open log keeps its writer: renaming is how QEMU's three QMP sockets, the
 * supervisor's control socket and both logs become the VM's without QEMU or
 * the supervisor reopening anything. Same filesystem (both under HOME).
 * Whatever the VM's directory held under those names (a dead incarnation's
 * logs and sockets) is replaced.
 */
export function moveShellFiles(from: VmPaths, to: VmPaths): void {
  fs.mkdirSync(to.dir, { recursive: true });
  const pairs: [string, string][] = [
    [from.qmpSocket, to.qmpSocket],
    [from.supervisorQmpSocket, to.supervisorQmpSocket],
    [from.hydraQmpSocket, to.hydraQmpSocket],
    [from.controlSocket, to.controlSocket],
    [from.qemuLog, to.qemuLog],
    [from.supervisorLog, to.supervisorLog],
  ];
  for (const [a, b] of pairs) {
    fs.rmSync(b, { force: true });
    fs.renameSync(a, b);
  }
}
