// A VM's NICs on this host: no MAC or tap shared with another running VM, taps made before QEMU and removed after it.
import fs from 'node:fs';
import { NetError } from '../errors.js';
import { assertBridge, createTap, removeTap } from '../net/index.js';
import { vmLog } from '../util/log.js';
import { isLive, listVmNames, readState, vmPaths } from './runtime.js';
import type { NicSpec, VmSpec } from './spec.js';

/** The NICs of the other VMs running on this host, from their recorded specs. */
function runningNics(except: string): { vm: string; nic: NicSpec }[] {
  const out: { vm: string; nic: NicSpec }[] = [];
  for (const vm of listVmNames()) {
    if (vm === except || !isLive(readState(vm))) continue;
    try {
      const launch = JSON.parse(fs.readFileSync(vmPaths(vm).spec, 'utf8')) as { spec?: { nics?: NicSpec[] } };
      for (const nic of launch.spec?.nics ?? []) out.push({ vm, nic });
    } catch {
      // a VM without a readable spec is starting or debris: it has no NIC we could clash with yet
    }
  }
  return out;
}

/** Refuse a missing bridge, or a MAC or tap name another running VM on this host already uses. */
export function checkNics(spec: VmSpec): void {
  const others = runningNics(spec.name);
  (spec.nics ?? []).forEach((nic, i) => {
    assertBridge({ owner: `VM "${spec.name}" nics.${i}`, bridge: nic.bridge });
    for (const o of others) {
      if (o.nic.mac === nic.mac) {
        throw new NetError('HYDRA_NET_MAC_CLASH', `VM "${spec.name}": nics.${i}: MAC ${nic.mac} is already used by running VM "${o.vm}" on this host (give each VM its own MAC)`);
      }
      if (o.nic.tap === nic.tap) {
        throw new NetError('HYDRA_NET_MAC_CLASH', `VM "${spec.name}": nics.${i}: tap "${nic.tap}" is already used by running VM "${o.vm}" on this host`);
      }
    }
  });
}

/** Create every tap of the spec on its bridge; on failure, the ones made so far are removed again. */
export async function prepareNics(spec: VmSpec): Promise<void> {
  const nics = spec.nics ?? [];
  if (nics.length === 0) return;
  checkNics(spec);
  const made: string[] = [];
  try {
    for (const [i, nic] of nics.entries()) {
      await createTap({ owner: `VM "${spec.name}" nics.${i}`, tap: nic.tap, bridge: nic.bridge });
      made.push(nic.tap);
    }
  } catch (err) {
    for (const tap of made) await removeTap(tap);
    throw err;
  }
}

/** Remove the VM's taps once its QEMU is gone (a tap still held open is left alone and logged). */
export async function releaseNics(spec: VmSpec): Promise<void> {
  for (const nic of spec.nics ?? []) {
    if (!(await removeTap(nic.tap))) vmLog(spec.name).warn({ tap: nic.tap }, 'tap still held open by a process; left in place');
  }
}

/** Remove the taps of a VM that is no longer live, from its recorded spec. */
export async function releaseRecordedNics(vm: string): Promise<void> {
  if (isLive(readState(vm))) return;
  let spec: VmSpec | undefined;
  try {
    spec = (JSON.parse(fs.readFileSync(vmPaths(vm).spec, 'utf8')) as { spec?: VmSpec }).spec;
  } catch {
    return; // no recorded spec: nothing was created for it
  }
  if (spec) await releaseNics(spec);
}
