// A restore refuses a hostile image meta (spec name, disk layers, sizes) before it creates anything.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { StoreClient } from '../protocol/index.js';
import { startStoreServer, type StoreServer } from '../store/index.js';
import { restoreVm } from './restore.js';
import { validateImage } from './validate.js';

const SECRET = 'validate-test-secret';
const MB = 1024 * 1024;
const home = fs.mkdtempSync(path.join(os.tmpdir(), 'hv-val-'));
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'hv-valw-'));
let server: StoreServer;

before(async () => {
  process.env.HYDRAVM_HOME = home;
  server = await startStoreServer({ dir: path.join(work, 'store'), listen: '127.0.0.1:0', secret: SECRET });
});
after(async () => {
  await server?.close();
  fs.rmSync(home, { recursive: true, force: true });
  fs.rmSync(work, { recursive: true, force: true });
});

function spec(name: string, memoryBytes: number, disks: { path: string }[] = []) {
  return { name, memoryBytes, vcpus: 1, accel: 'tcg', kernel: process.execPath, cmdline: 'console=ttyS0', disks };
}

/** Commit a one-page full checkpoint whose meta carries `config` and `disks`, as a hostile writer could. */
async function plant(vm: string, ramSize: number, config: unknown, disks: string[] = []): Promise<void> {
  const c = await StoreClient.connect({ address: server.address, secret: SECRET, vm, generation: 1, role: 'checkpointer' });
  await c.begin(1, 'full', { ramSize, config });
  await c.sendPages([{ offset: 0, length: 4096 }], Buffer.alloc(4096, 1));
  await c.sendDeviceState(Buffer.from('device state'));
  if (disks.length) await c.sendDisks(disks);
  await c.commit();
  await c.close();
}

async function refused(vm: string, field: RegExp): Promise<void> {
  await assert.rejects(restoreVm({ vm, store: server.address, secret: SECRET, mode: 'network' }), (e: unknown) => {
    assert.equal((e as { code?: string }).code, 'HYDRA_RESTORE_BAD_IMAGE', (e as Error).message);
    assert.match((e as Error).message, new RegExp(`VM "${vm}"`));
    assert.match((e as Error).message, field);
    return true;
  });
  assert.equal(fs.existsSync(path.join(home, 'vms', vm)), false, `nothing created for ${vm} under HYDRAVM_HOME`);
}

test('a spec named ../../etc is refused, and nothing is created', async () => {
  await plant('victim1', 32 * MB, { spec: spec('../../etc', 32 * MB), launch: {}, qemuBinary: 'qemu-system-x86_64' });
  await refused('victim1', /spec: name/);
  assert.equal(fs.existsSync(path.join(home, 'vms', '..', '..', 'etc')), false);
});

test('a spec of another VM is refused', async () => {
  await plant('victim2', 32 * MB, { spec: spec('other', 32 * MB), launch: {}, qemuBinary: 'qemu-system-x86_64' });
  await refused('victim2', /spec\.name/);
});

test('a RAM size that does not match the spec is refused', async () => {
  await plant('victim3', 32 * MB, { spec: spec('victim3', 64 * MB), launch: {}, qemuBinary: 'qemu-system-x86_64' });
  await refused('victim3', /spec\.memory/);
});

test('a disk layer outside the VM\'s layer directory is refused, and no overlay directory is created', async () => {
  const disk = path.join(work, 'disk0.qcow2');
  fs.writeFileSync(disk, '');
  const outside = path.join(work, 'outside');
  await plant('victim4', 32 * MB, { spec: spec('victim4', 32 * MB, [{ path: disk }]), launch: { layerDir: path.join(work, 'layers') }, qemuBinary: 'qemu-system-x86_64' }, [`disk0=${path.join(outside, 'evil.qcow2')}`]);
  await refused('victim4', /meta\.disks\.0/);
  assert.equal(fs.existsSync(outside), false, 'no overlay directory created outside');
  // Escaping through .. inside an otherwise well-placed path is refused as well.
  await plant('victim5', 32 * MB, { spec: spec('victim5', 32 * MB, [{ path: disk }]), launch: {}, qemuBinary: 'qemu-system-x86_64' }, [`disk0=${path.join(work, 'layers')}/victim5/../../../etc/victim5/x.qcow2`]);
  await refused('victim5', /meta\.disks\.0/);
});

test('a spec whose disk path is relative is refused (a restore never creates disks)', async () => {
  await plant('victim6', 32 * MB, { spec: spec('victim6', 32 * MB, [{ path: 'rel/disk.qcow2' }]), launch: {}, qemuBinary: 'qemu-system-x86_64' });
  await refused('victim6', /disks\.0/);
});

test('the same checks accept a sound image meta (the refusals above are not blanket)', () => {
  const layers = path.join(work, 'layers', 'good');
  const meta = {
    vm: 'good', generation: 1, committedEpoch: 3, ramSize: 32 * MB, pageSize: 4096, memoryFile: 'memory.img',
    devstate: { file: 'devstate-3.bin', size: 100, sha256: '0'.repeat(64) },
    disks: [`disk0=${path.join(layers, 'd0-3.qcow2')}`],
    config: { spec: spec('good', 32 * MB, [{ path: path.join(work, 'disk0.qcow2') }]), launch: { layerDir: path.join(work, 'layers') }, qemuBinary: 'q' },
    createdAt: '', committedAt: '', epochs: [],
  };
  const v = validateImage(meta, { vm: 'good', newGeneration: 2 });
  assert.equal(v.spec.name, 'good');
  assert.equal(v.vmLayers, layers);
  assert.throws(() => validateImage({ ...meta, committedEpoch: 2 ** 32 }, { vm: 'good', newGeneration: 2 }), /committedEpoch/);
  assert.throws(() => validateImage({ ...meta, devstate: { ...meta.devstate, size: 2 ** 40 } }, { vm: 'good', newGeneration: 2 }), /devstate\.size/);
  assert.throws(() => validateImage(meta, { vm: 'good', newGeneration: 1 }), /meta\.generation/);
});
