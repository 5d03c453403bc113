import { test } from 'node:test';
import assert from 'node:assert/strict';
import { assertRestorableNics } from './nics.js';
import type { VmSpec } from '../vm/spec.js';

test('a recorded spec with a NIC model a restore cannot recreate is refused before anything starts', () => {
  const spec = { name: 'web1', nics: [{ mac: '52:54:00:00:00:01', bridge: 'br0', tap: 't0', model: 'virtio-net-pci' }] } as unknown as VmSpec;
  assertRestorableNics(spec);
  assertRestorableNics({ ...spec, nics: undefined });
  const bad = { ...spec, nics: [...spec.nics!, { mac: '52:54:00:00:00:02', bridge: 'br0', tap: 't1', model: 'vhost-user-net' }] } as unknown as VmSpec;
  assert.throws(() => assertRestorableNics(bad), (err: Error & { code?: string }) => {
    assert.equal(err.code, 'HYDRA_RESTORE_NIC_UNSUPPORTED');
    assert.match(err.message, /VM "web1": nics\.1 is a vhost-user-net, which a restore cannot recreate \(supported: virtio-net-pci\)/);
    return true;
  });
});
