import type { NicSpec, VmSpec } from './spec.js';
import type { Accel } from './accel.js';

/** Where the per-VM runtime files live; see src/vm/runtime.ts. */
export interface QemuRuntimePaths {
  /** QMP for users and scripts. */
  qmpSocket: string;
  /** QMP kept by the VM's supervisor (status, stop). */
  supervisorQmpSocket: string;
  /** QMP reserved for HydraVM's checkpointer (one client per QMP monitor). */
  hydraQmpSocket: string;
  serialLog: string;
  /**
   * A FIFO whose bytes reach the guest's serial console (the supervisor
   * creates it and holds it open, so QEMU's open does not block). Optional:
   * without it the console is output only.
   */
  serialIn?: string;
}

/** How guest RAM is backed. Protection needs a shared, named mapping the tracker can map. */
export type RamBacking =
  | { kind: 'memfd' }
  | { kind: 'file-private'; path: string };

export interface QemuLaunchOptions {
  accel: Accel;
  ram?: RamBacking;
  /** Restore: wait for `migrate-incoming` instead of booting. */
  incomingDefer?: boolean;
  /** Block node names and files to open instead of the spec's disks (restore overlays). */
  diskFiles?: string[];
  /** Where this VM's frozen disk layers live (set by a restore, so later protections keep one root). */
  layerDir?: string;
  /**
   * A restore shell: each disk is a throttle filter without limits (node diskN, the device's drive) over an
   * empty null-co node of this virtual size, swapped for the restore overlay at hand-off.
   */
  placeholderDisks?: number[];
  /**
   * Each NIC sits alone behind its own pcie-root-port (nicportN) instead of on
   * the root bus, so a restore shell can plug it in at hand-off: q35's root bus
   * takes no hot-plugged device. Every start records it; launches recorded
   * before it existed have their NICs on the root bus and restore cold only.
   */
  nicPorts?: boolean;
  /** A restore shell: this many empty NIC ports (nicPorts' layout), filled at hand-off. */
  placeholderNics?: number;
}

/** The (limitless) throttle group of a restore shell's disk filters. */
export const SHELL_THROTTLE_GROUP = 'hvshell';

/** The node a restore shell's disk N holds until hand-off (see restore/shell-handoff.ts). */
export const placeholderNode = (i: number): string => `disk${i}-hold`;

/** The root port NIC N sits behind (with `nicPorts`). */
export const nicPort = (i: number): string => `nicport${i}`;

/** The pcie-root-port behind which NIC N sits: slots after the disks, numbered like the NICs. */
function nicPortArgs(i: number): string[] {
  return ['-device', `pcie-root-port,id=${nicPort(i)},chassis=${i + 1},slot=${i + 1}`];
}

/**
 * NIC N's backend and device, as QMP arguments (netdev_add, device_add): the
 * command line is written from the same values, so a NIC plugged into a
 * restore shell is the device a cold start would have made. Userspace
 * virtio-net (vhost off): QEMU itself writes received packets into guest RAM,
 * so the dirty tracker sees every write and the ring state is in QEMU's device
 * state. No option ROM: the guest boots with -kernel.
 */
export function nicDevices(nic: NicSpec, i: number, ports: boolean): { netdev: { type: 'tap' } & Record<string, string | boolean>; device: { driver: string } & Record<string, string> } {
  return {
    netdev: { type: 'tap', id: `net${i}`, ifname: nic.tap, script: 'no', downscript: 'no', vhost: false },
    device: { driver: nic.model, netdev: `net${i}`, mac: nic.mac, id: `vnet${i}`, romfile: '', ...(ports ? { bus: nicPort(i), addr: '0' } : {}) },
  };
}

/** key=value options of a -netdev/-device argument (booleans as on/off). */
function optionList(props: Record<string, string | boolean>): string[] {
  return Object.entries(props).map(([k, v]) => `${k}=${typeof v === 'boolean' ? (v ? 'on' : 'off') : v}`);
}

export const RAM_BACKEND_ID = 'ram0';
/** The serial console's chardev (a restore shell re-points it at the adopting VM's log). */
export const SERIAL_CHARDEV = 'serial0';

/**
 * The QEMU command line for a VM. Primary and restored VMs must present the
 * same device configuration, or the saved device state will not load: keep
 * every device here, parameterised only by what legitimately differs.
 */
export function buildQemuArgs(spec: VmSpec, paths: QemuRuntimePaths, opts: QemuLaunchOptions): string[] {
  const mem = `${spec.memoryBytes / (1024 * 1024)}M`;
  const ram = opts.ram ?? { kind: 'memfd' };
  const backend = ram.kind === 'memfd'
    ? `memory-backend-memfd,id=${RAM_BACKEND_ID},size=${mem},share=on`
    : `memory-backend-file,id=${RAM_BACKEND_ID},size=${mem},mem-path=${ram.path},share=off`;
  const args = [
    '-name', `${spec.name},debug-threads=on`,
    '-accel', opts.accel,
    '-machine', `q35,memory-backend=${RAM_BACKEND_ID},suppress-vmdesc=on`,
    '-cpu', opts.accel === 'kvm' ? 'host' : 'qemu64',
    '-smp', String(spec.vcpus),
    '-m', mem,
    '-object', backend,
    '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot',
    // The RTC follows the VM's clock: a stopped VM's device state is then the
    // same whenever it is saved, and the guest never reads the RTC after boot.
    '-rtc', 'base=utc,clock=vm',
    '-chardev', `file,id=${SERIAL_CHARDEV},path=${paths.serialLog},append=on${paths.serialIn ? `,input-path=${paths.serialIn}` : ''}`,
    '-serial', `chardev:${SERIAL_CHARDEV}`,
    '-qmp', `unix:${paths.qmpSocket},server=on,wait=off`,
    '-qmp', `unix:${paths.supervisorQmpSocket},server=on,wait=off`,
    '-qmp', `unix:${paths.hydraQmpSocket},server=on,wait=off`,
    '-kernel', spec.kernel,
    '-append', spec.cmdline,
  ];
  if (spec.initrd) args.push('-initrd', spec.initrd);
  // The device only names its drive, so a filter can stand in for the qcow2 node until
  // blockdev-reopen points it at the real overlay; the guest sees the same virtio-blk device.
  // A throttle node without limits is a true filter: block jobs see through it to the qcow2 chain.
  if ((opts.placeholderDisks ?? []).length > 0) args.push('-object', `throttle-group,id=${SHELL_THROTTLE_GROUP}`);
  (opts.placeholderDisks ?? []).forEach((size, i) => {
    args.push(
      '-blockdev', `driver=null-co,node-name=${placeholderNode(i)},size=${size}`,
      '-blockdev', `driver=throttle,throttle-group=${SHELL_THROTTLE_GROUP},file=${placeholderNode(i)},node-name=disk${i}`,
      '-device', `virtio-blk-pci,drive=disk${i},id=vblk${i}`,
    );
  });
  const diskFiles = opts.placeholderDisks ? [] : opts.diskFiles ?? spec.disks.map((d) => d.path);
  diskFiles.forEach((file, i) => {
    args.push(
      '-blockdev', `driver=file,filename=${file},node-name=disk${i}-file,cache.direct=off`,
      '-blockdev', `driver=qcow2,file=disk${i}-file,node-name=disk${i}`,
      '-device', `virtio-blk-pci,drive=disk${i},id=vblk${i}`,
    );
  });
  // Behind root ports (nicPorts), a shell's empty ports take the same slots as a
  // cold start's, so the device plugged in at hand-off has the source's address.
  (spec.nics ?? []).forEach((nic, i) => {
    if (opts.nicPorts) args.push(...nicPortArgs(i));
    const { netdev, device } = nicDevices(nic, i, opts.nicPorts === true);
    const { type, ...netdevProps } = netdev;
    const { driver, ...deviceProps } = device;
    args.push('-netdev', [type, ...optionList(netdevProps)].join(','), '-device', [driver, ...optionList(deviceProps)].join(','));
  });
  for (let i = 0; i < (opts.placeholderNics ?? 0); i++) args.push(...nicPortArgs(i));
  if (opts.incomingDefer) {
    args.push('-incoming', 'defer', '-global', 'migration.send-configuration=off');
  }
  return args;
}
