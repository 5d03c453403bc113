import { test } from 'node:test';
import assert from 'node:assert/strict';
import { validateSpec, defaultTapName } from './spec.js';
import { buildQemuArgs, nicDevices } from './qemu-args.js';
import { shellConfigOf, shellKey } from './shell.js';
import { imagesDir } from '../config/paths.js';

const base = { name: 'web1', memory: '512M', kernel: 'image:debian/vmlinux', cmdline: 'console=ttyS0 root=/dev/vda' };
const paths = { qmpSocket: '/r/q', supervisorQmpSocket: '/r/s', hydraQmpSocket: '/r/h', serialLog: '/r/serial.log' };

test('a root disk on a built image is the first disk, before the spec\'s other disks', () => {
  const s = validateSpec({ ...base, root: { path: 'root.qcow2', size: '4G', base: 'image:debian/root.qcow2' }, disks: [{ path: 'data.qcow2', size: '1G' }] }, '/srv/vms');
  assert.equal(s.hasRoot, true);
  assert.deepEqual(s.disks.map((d) => d.path), ['/srv/vms/root.qcow2', '/srv/vms/data.qcow2']);
  assert.equal(s.disks[0]!.base, `${imagesDir()}/debian/root.qcow2`);
  assert.equal(s.disks[0]!.size, 4 * 1024 ** 3);
  assert.equal(s.kernel, `${imagesDir()}/debian/vmlinux`);
  const args = buildQemuArgs(s, paths, { accel: 'tcg' }).join(' ');
  assert.ok(args.indexOf('filename=/srv/vms/root.qcow2') < args.indexOf('filename=/srv/vms/data.qcow2'), 'root is vblk0');
  assert.throws(() => validateSpec({ ...base, root: { path: 'a.qcow2' }, disks: [{ path: 'a.qcow2' }] }, '/x'), /disks\.0: \/x\/a\.qcow2 is also root/);
});

test('NICs: MACs normalised, default tap names fit IFNAMSIZ, QEMU gets a vhost-less virtio-net on the tap', () => {
  const s = validateSpec({ ...base, nics: [{ mac: '52-54-00-AB-CD-EF', bridge: 'br0' }, { mac: '52:54:00:00:00:02', bridge: 'br1', tap: 'web1-b' }] }, '/x');
  assert.deepEqual(s.nics!.map((n) => [n.mac, n.bridge, n.tap, n.model]), [
    ['52:54:00:ab:cd:ef', 'br0', defaultTapName('web1', 0), 'virtio-net-pci'],
    ['52:54:00:00:00:02', 'br1', 'web1-b', 'virtio-net-pci'],
  ]);
  assert.ok(defaultTapName('a-vm-name-of-thirty-two-chars-xx', 7).length <= 15);
  assert.notEqual(defaultTapName('a', 0), defaultTapName('b', 0));
  const args = buildQemuArgs(s, paths, { accel: 'tcg' });
  assert.ok(args.includes(`tap,id=net0,ifname=${defaultTapName('web1', 0)},script=no,downscript=no,vhost=off`));
  assert.ok(args.includes('virtio-net-pci,netdev=net1,mac=52:54:00:00:00:02,id=vnet1,romfile='));
});

test('bad NICs are refused naming the field and the problem', () => {
  const bad = (nic: Record<string, unknown>, re: RegExp, more: Record<string, unknown>[] = []) =>
    assert.throws(() => validateSpec({ ...base, nics: [...more, nic] }, '/x', 'web1.yaml'), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'HYDRA_SPEC_INVALID');
      assert.match(err.message, re);
      return true;
    });
  bad({ mac: '52:54:00:12:34', bridge: 'br0' }, /web1\.yaml: nics\.0\.mac: "52:54:00:12:34" is not a MAC address/);
  bad({ mac: 'zz:54:00:12:34:56', bridge: 'br0' }, /nics\.0\.mac: .* is not a MAC address/);
  bad({ mac: '01:00:5e:00:00:01', bridge: 'br0' }, /nics\.0\.mac: .* is a multicast address/);
  bad({ mac: '00:00:00:00:00:00', bridge: 'br0' }, /all-zero/);
  bad({ mac: '52:54:00:12:34:56', bridge: 'br0', model: 'e1000' }, /nics\.0\.model: "e1000" is not a NIC model HydraVM can checkpoint and restore \(use one of: virtio-net-pci\)/);
  bad({ mac: '52:54:00:12:34:56', bridge: 'a-bridge-name-too-long' }, /nics\.0\.bridge: .*\(1-15 characters\)/);
  bad({ mac: '52:54:00:12:34:56', bridge: 'br0', tap: 'bad/name' }, /nics\.0\.tap: .*\(letters, digits/);
  bad({ mac: '52:54:00:12:34:56', bridge: 'br0', tap: 'br0' }, /the bridge's own name/);
  bad({ mac: '52:54:00:12:34:56', bridge: 'br0', vhost: true }, /nics\.0: Unrecognized key/);
  bad({ mac: '52:54:00:12:34:56', bridge: 'br0' }, /nics\.1\.mac: 52:54:00:12:34:56 is also the MAC of nics\.0/, [{ mac: '52:54:00:12:34:56', bridge: 'br1', tap: 'other' }]);
});

test('NIC ports: each NIC behind its own root port, a shell holds the same empty ports; NICs on the root bus stay as recorded', () => {
  const s = validateSpec({ ...base, disks: [{ path: 'd.qcow2' }], nics: [{ mac: '52:54:00:00:00:01', bridge: 'br0', tap: 'web1-a' }, { mac: '52:54:00:00:00:02', bridge: 'br0', tap: 'web1-b' }] }, '/x');
  const cold = buildQemuArgs(s, paths, { accel: 'tcg', nicPorts: true });
  const devices = cold.filter((_, i) => cold[i - 1] === '-device');
  assert.deepEqual(devices, [
    'virtio-blk-pci,drive=disk0,id=vblk0',
    'pcie-root-port,id=nicport0,chassis=1,slot=1',
    'virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,id=vnet0,romfile=,bus=nicport0,addr=0',
    'pcie-root-port,id=nicport1,chassis=2,slot=2',
    'virtio-net-pci,netdev=net1,mac=52:54:00:00:00:02,id=vnet1,romfile=,bus=nicport1,addr=0',
  ]);
  // The shell: same disk devices and ports in the same order (so the same slots), no NIC until hand-off.
  const shellSpec = { ...s, name: 'shell-x', disks: [], nics: [] };
  const shell = buildQemuArgs(shellSpec, paths, { accel: 'tcg', placeholderDisks: [1 << 30], placeholderNics: 2, incomingDefer: true });
  const shellDevices = shell.filter((_, i) => shell[i - 1] === '-device');
  assert.deepEqual(shellDevices, devices.filter((d) => !d.startsWith('virtio-net')));
  assert.ok(!shell.includes('-netdev'));
  // What the hand-off plugs in is what the cold start got.
  const plugged = nicDevices(s.nics![1]!, 1, true);
  assert.deepEqual(plugged.device, { driver: 'virtio-net-pci', netdev: 'net1', mac: '52:54:00:00:00:02', id: 'vnet1', romfile: '', bus: 'nicport1', addr: '0' });
  assert.deepEqual(plugged.netdev, { type: 'tap', id: 'net1', ifname: 'web1-b', script: 'no', downscript: 'no', vhost: false });
  // Recorded before NIC ports: the NIC stays on the root bus, as that image's device state expects.
  const old = buildQemuArgs(s, paths, { accel: 'tcg' });
  assert.ok(!old.some((a) => a.startsWith('pcie-root-port')));
  assert.ok(old.includes('virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,id=vnet0,romfile='));
});

test('restore shell keys: NIC models and count count, MACs, taps and bridges do not; NICs on the root bus get no shell', () => {
  const s = validateSpec({ ...base, nics: [{ mac: '52:54:00:00:00:01', bridge: 'br0' }] }, '/x');
  const other = validateSpec({ ...base, name: 'web2', nics: [{ mac: '52:54:00:00:00:09', bridge: 'br1', tap: 'x9' }] }, '/x');
  const none = validateSpec(base, '/x');
  const key = (spec: typeof s, ports = true) => {
    const c = shellConfigOf(spec, 'tcg', [], ports);
    return 'config' in c ? shellKey(c.config) : c.reason;
  };
  assert.match(key(s), /-nvirtio-net-pci-fw/);
  assert.equal(key(s), key(other));
  assert.notEqual(key(s), key(none));
  assert.doesNotMatch(key(none), /-n/);
  assert.match(key(s, false), /VM "web1" was started with its NICs on the root PCIe bus, where a restore shell cannot plug them in/);
  assert.equal(key(none, false), key(none), 'without NICs the layout does not matter');
});
