import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { loadSpecFile, parseSize, validateSpec, checkSpecFiles } from './spec.js';
import { chooseAccel } from './accel.js';
import { SpecError } from '../errors.js';
import { tmpDir } from '../../test/support/tmp.js';

const base = { name: 'web1', memory: '512M', kernel: '/boot/vmlinuz', cmdline: 'console=ttyS0' };

test('sizes parse with suffixes and reject nonsense', () => {
  assert.equal(parseSize('512M', 'm'), 512 * 1024 * 1024);
  assert.equal(parseSize('1G', 'm'), 1024 ** 3);
  assert.equal(parseSize('256MiB', 'm'), 256 * 1024 ** 2);
  assert.equal(parseSize(4096, 'm'), 4096);
  assert.throws(() => parseSize('lots', 'memory'), /memory: "lots" is not a size/);
});

test('a valid spec gets defaults and absolute paths', () => {
  const s = validateSpec({ ...base, initrd: 'guest:initrd.img', disks: [{ path: 'd.qcow2', size: '64M' }] }, '/srv/vms');
  assert.equal(s.vcpus, 1);
  assert.equal(s.accel, 'auto');
  assert.equal(s.memoryBytes, 512 * 1024 ** 2);
  assert.match(s.initrd!, /guest\/initrd\.img$/);
  assert.equal(s.disks[0]!.path, '/srv/vms/d.qcow2');
  assert.equal(s.disks[0]!.size, 64 * 1024 ** 2);
});

test('bad specs name the field at fault', () => {
  const cases: [unknown, RegExp][] = [
    [{ ...base, accel: 'xen' }, /accel/],
    [{ ...base, name: 'bad name!' }, /name/],
    [{ ...base, memory: '1M' }, /memory: 1M is too small/],
    [{ ...base, memory: '33M' }, /multiple of 2M/],
    [{ ...base, vcpus: 0 }, /vcpus/],
    [{ ...base, surprise: true }, /surprise|Unrecognized/i],
    [{ memory: '512M', kernel: 'k' }, /name/],
  ];
  for (const [raw, re] of cases) assert.throws(() => validateSpec(raw, '/'), (e: unknown) => e instanceof SpecError && re.test((e as Error).message), String(re));
});

test('spec files: YAML and JSON parse, syntax errors and missing files are clear', () => {
  const dir = tmpDir('spec');
  fs.writeFileSync(path.join(dir, 'a.yaml'), 'name: a\nmemory: 256M\nkernel: k\n');
  assert.equal(loadSpecFile(path.join(dir, 'a.yaml')).kernel, path.join(dir, 'k'));
  fs.writeFileSync(path.join(dir, 'b.json'), '{"name": "b", "memory": "256M"');
  assert.throws(() => loadSpecFile(path.join(dir, 'b.json')), /not valid JSON/);
  assert.throws(() => loadSpecFile(path.join(dir, 'none.yaml')), /cannot read VM spec/);
  const missing = validateSpec({ ...base, kernel: 'nope/vmlinuz' }, dir);
  assert.throws(() => checkSpecFiles(missing), /kernel .*nope\/vmlinuz does not exist/);
  fs.rmSync(dir, { recursive: true });
});

test('accel auto never picks the PVM /dev/kvm; tcg is always possible', () => {
  assert.equal(chooseAccel('tcg', 'x'), 'tcg');
  if (fs.existsSync('/sys/module/kvm_pvm')) {
    assert.equal(chooseAccel('auto', 'x'), 'tcg');
    assert.throws(() => chooseAccel('kvm', 'x'), /KVM is not usable here: .*PVM/);
  }
});
