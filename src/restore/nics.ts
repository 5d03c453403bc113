// The restored VM's NICs: only models a restore can recreate, and a self-announcement once it runs.
import { RestoreError } from '../errors.js';
import { NIC_MODELS } from '../net/index.js';
import type { QmpClient } from '../qmp/index.js';
import type { VmSpec } from '../vm/index.js';
import { vmLog } from '../util/log.js';

/**
 * A recorded spec whose NIC this host cannot recreate identically (a model
 * HydraVM does not start, e.g. from a newer version, or vhost) would fail in
 * the middle of the device-state load: refuse it before anything starts.
 */
export function assertRestorableNics(spec: VmSpec): void {
  (spec.nics ?? []).forEach((nic, i) => {
    if (!(NIC_MODELS as readonly string[]).includes(nic.model)) {
      throw new RestoreError('HYDRA_RESTORE_NIC_UNSUPPORTED', `VM "${spec.name}": nics.${i} is a ${nic.model}, which a restore cannot recreate (supported: ${NIC_MODELS.join(', ')})`);
    }
  });
}

/** QEMU's own defaults for a post-migration announcement: 5 rounds, 50 ms then +100 ms each. */
const ANNOUNCE = { initial: 50, max: 550, rounds: 5, step: 100 };

/**
 * Ask QEMU to announce the VM's MACs (RARP from every NIC, and a guest
 * announcement where virtio-net negotiated it), so the bridge and peers learn
 * the VM's new port at once instead of when it next sends. QEMU's
 * `qemu_announce_self_iter` trace event is switched on first, so qemu.log
 * records each round with the MAC it announced.
 */
export async function announceSelf(qmp: QmpClient, spec: VmSpec): Promise<boolean> {
  if ((spec.nics ?? []).length === 0) return false;
  await qmp.execute('trace-event-set-state', { name: 'qemu_announce_self_iter', enable: true }).catch((err: unknown) => {
    // Only the record in qemu.log is lost (a QEMU built without that trace event); the announcement still goes out.
    vmLog(spec.name).warn({ err }, 'cannot enable the announce trace event');
  });
  await qmp.execute('announce-self', ANNOUNCE);
  return true;
}
