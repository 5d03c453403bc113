import fs from 'node:fs';
import { SpecError } from '../errors.js';

export type Accel = 'tcg' | 'kvm';

/**
 * Why not just "use KVM if /dev/kvm exists": on these lab machines /dev/kvm is
 * PVM (kvm_pvm module, nested), where a normal guest kernel hangs in its
 * decompressor. KVM is chosen only with the real kvm_intel / kvm_amd module.
 */
export function kvmUsable(): { ok: boolean; why: string } {
  if (!fs.existsSync('/dev/kvm')) return { ok: false, why: '/dev/kvm does not exist' };
  try {
    fs.accessSync('/dev/kvm', fs.constants.R_OK | fs.constants.W_OK);
  } catch {
    return { ok: false, why: '/dev/kvm is not accessible' };
  }
  if (fs.existsSync('/sys/module/kvm_pvm')) return { ok: false, why: '/dev/kvm is PVM (kvm_pvm), which cannot run a normal guest' };
  if (!fs.existsSync('/sys/module/kvm_intel') && !fs.existsSync('/sys/module/kvm_amd')) {
    return { ok: false, why: 'neither kvm_intel nor kvm_amd is loaded' };
  }
  return { ok: true, why: 'kvm_intel/kvm_amd loaded' };
}

/** Resolve the spec's accelerator; HYDRAVM_ACCEL overrides `auto`. */
export function chooseAccel(requested: 'auto' | 'tcg' | 'kvm', vmName: string): Accel {
  const wanted = requested === 'auto' ? (process.env.HYDRAVM_ACCEL as 'auto' | 'tcg' | 'kvm' | undefined) ?? 'auto' : requested;
  if (wanted === 'tcg') return 'tcg';
  const kvm = kvmUsable();
  if (wanted === 'kvm') {
    if (!kvm.ok) throw new SpecError(`VM "${vmName}": accel kvm requested but KVM is not usable here: ${kvm.why}`);
    return 'kvm';
  }
  if (wanted !== 'auto') throw new SpecError(`HYDRAVM_ACCEL="${wanted}" is not one of auto, tcg, kvm`);
  return kvm.ok ? 'kvm' : 'tcg';
}
