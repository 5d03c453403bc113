// Restoring into a pre-started restore shell: adopt it, point its disks at the restore overlays, plug in its NICs.
import { adoptShell, idleShellsFor, nicDevices, placeholderNode, prepareNics, SHELL_THROTTLE_GROUP, type QemuLaunchOptions, type VmSpec, type VmState } from '../vm/index.js';
import { connectWhenReady } from '../qmp/index.js';
import { vmPaths } from '../vm/index.js';

export interface Handoff {
  state: VmState;
  shellId: string;
}

/**
 * Take the oldest idle shell with `key` (another restore may win a race for
 * one; the next is tried) and give it the VM's devices. Each restore overlay is
 * opened with blockdev-add (inactive, as every node is while QEMU waits for
 * its incoming state) and the throttle filter the device is attached to is
 * reopened onto it; the placeholder goes. Each NIC's tap is created on its
 * bridge, opened with netdev_add, and the device (the VM's MAC) plugged into
 * the shell's empty root port, the slot it has at the source: the incoming
 * device state then loads into the same device at the same address. Returns
 * undefined, with the reason, when no shell could be adopted; a failure after
 * adoption throws (the VM's QEMU is then the caller's to stop; its supervisor
 * removes the taps made here).
 */
export async function handOff(spec: VmSpec, launch: QemuLaunchOptions, key: string, diskFiles: string[]): Promise<Handoff | { reason: string }> {
  const idle = idleShellsFor(key);
  if (idle.length === 0) return { reason: `no idle restore shell for ${key}` };
  let adopted: Handoff | undefined;
  const refusals: string[] = [];
  for (const s of idle) {
    try {
      const r = await adoptShell(s.id, spec, launch, key);
      adopted = { state: r.state, shellId: s.id };
      break;
    } catch (err) {
      refusals.push((err as Error).message);
      if ((err as { code?: string }).code === 'HYDRA_VM_EXISTS') break;
    }
  }
  if (!adopted) return { reason: `no restore shell could be adopted: ${refusals.join('; ')}` };
  const nics = spec.nics ?? [];
  if (diskFiles.length === 0 && nics.length === 0) return adopted;
  // The taps are made while the monitor connects (a few `ip` runs each).
  const taps = prepareNics(spec);
  // Settled here so an early failure leaves no unhandled rejection; awaited below.
  taps.catch(() => undefined);
  // Whatever fails, the taps are settled before the caller stops the VM, so its supervisor removes all of them.
  const settled = () => taps.then(() => undefined, () => undefined);
  const qmp = await connectWhenReady(vmPaths(spec.name).hydraQmpSocket, { label: `VM ${spec.name}`, deadlineMs: 5000 })
    .catch(async (err: unknown) => { await settled(); throw err; });
  try {
    for (let i = 0; i < diskFiles.length; i++) {
      await qmp.execute('blockdev-add', {
        driver: 'qcow2', 'node-name': `disk${i}-top`,
        file: { driver: 'file', filename: diskFiles[i], 'node-name': `disk${i}-file`, cache: { direct: false } },
      });
    }
    if (diskFiles.length > 0) {
      await qmp.execute('blockdev-reopen', { options: diskFiles.map((_, i) => ({ driver: 'throttle', 'node-name': `disk${i}`, 'throttle-group': SHELL_THROTTLE_GROUP, file: `disk${i}-top` })) });
      for (let i = 0; i < diskFiles.length; i++) await qmp.execute('blockdev-del', { 'node-name': placeholderNode(i) });
    }
    await taps;
    for (const [i, nic] of nics.entries()) {
      const { netdev, device } = nicDevices(nic, i, true);
      await qmp.execute('netdev_add', netdev);
      await qmp.execute('device_add', device);
    }
  } finally {
    qmp.close();
    await settled();
  }
  return adopted;
}
