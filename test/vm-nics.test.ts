import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync, spawnSync } from 'node:child_process';
import { cliEntry } from '../src/config/paths.js';
import { makeLab, readJson } from './support/lab.js';
import { makeTestNet, tapMaster, linkExists, NET_PREFIX, type TestNet } from './support/net.js';

const lab = makeLab('nics');
let net: TestNet;
before(() => { net = makeTestNet('n'); });
after(() => { lab.cleanup(); net?.remove(); for (const t of ['ta', 'tb', 'tc', 'td']) try { execFileSync('ip', ['link', 'del', `${NET_PREFIX}${t}`], { stdio: 'ignore' }); } catch { /* gone */ } });

const tap = (t: string) => `${NET_PREFIX}${t}`;
const nic = (mac: string, t: string, more: Record<string, unknown> = {}) => ({ nics: [{ mac, bridge: net.bridge, tap: tap(t), ...more }] });

test('a VM with a NIC gets its tap on the bridge; a MAC or tap clash with a running VM is refused and creates nothing; stopping removes the tap', async () => {
  const a = lab.cli(['vm', 'start', lab.writeSpec('nic-a', nic('52:54:00:9a:01:01', 'ta'))]);
  assert.equal(a.code, 0, a.stderr);
  assert.equal(tapMaster(tap('ta')), net.bridge, 'tap joined the bridge');
  const launch = readJson<{ spec: { nics: { mac: string; tap: string }[] } }>(path.join(lab.home, 'vms', 'nic-a', 'spec.json'))!;
  assert.deepEqual(launch.spec.nics.map((n) => [n.mac, n.tap]), [['52:54:00:9a:01:01', tap('ta')]]);

  const diskB = path.join(lab.home, 'nic-b.qcow2');
  const b = lab.cli(['vm', 'start', lab.writeSpec('nic-b', { ...nic('52:54:00:9a:01:01', 'tb'), disks: [{ path: diskB, size: '16M' }] })]);
  assert.equal(b.code, 1);
  assert.match(b.stderr, /VM "nic-b": nics\.0: MAC 52:54:00:9a:01:01 is already used by running VM "nic-a" on this host/);
  assert.ok(!linkExists(tap('tb')), 'no tap for the refused VM');
  assert.ok(!fs.existsSync(diskB), 'no disk for the refused VM');

  const c = lab.cli(['vm', 'start', lab.writeSpec('nic-c', nic('52:54:00:9a:01:03', 'ta'))]);
  assert.equal(c.code, 1);
  assert.match(c.stderr, /tap "[^"]+ta" is already used by running VM "nic-a"/);
  assert.equal(tapMaster(tap('ta')), net.bridge, 'the running VM keeps its tap');

  assert.equal(lab.cli(['vm', 'stop', 'nic-a']).code, 0);
  assert.ok(!linkExists(tap('ta')), 'tap removed when the VM stopped');
  // The MAC is free again.
  const b2 = lab.cli(['vm', 'start', lab.writeSpec('nic-b', nic('52:54:00:9a:01:01', 'tb'))]);
  assert.equal(b2.code, 0, b2.stderr);
  // SIGKILL of QEMU: the supervisor still removes the tap.
  const st = readJson<{ qemuPid: number }>(path.join(lab.home, 'vms', 'nic-b', 'state.json'))!;
  process.kill(st.qemuPid, 'SIGKILL');
  const deadline = Date.now() + 15_000;
  while (linkExists(tap('tb')) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  assert.ok(!linkExists(tap('tb')), 'tap removed after QEMU died');
});

test('a tap left behind by a dead VM is replaced; a missing bridge is named with the command that creates it', () => {
  execFileSync('ip', ['tuntap', 'add', 'dev', tap('td'), 'mode', 'tap']);
  const d = lab.cli(['vm', 'start', lab.writeSpec('nic-d', nic('52:54:00:9a:01:04', 'td'))]);
  assert.equal(d.code, 0, d.stderr);
  assert.equal(tapMaster(tap('td')), net.bridge);
  assert.equal(lab.cli(['vm', 'stop', 'nic-d']).code, 0);

  const spec = lab.writeSpec('nic-e', { nics: [{ mac: '52:54:00:9a:01:05', bridge: `${NET_PREFIX}nobr`, tap: tap('tc') }] });
  const e = lab.cli(['vm', 'start', spec]);
  assert.equal(e.code, 1);
  assert.match(e.stderr, new RegExp(`VM "nic-e" nics\\.0: bridge "${NET_PREFIX}nobr" does not exist on this host \\(create it: ip link add ${NET_PREFIX}nobr type bridge`));
  assert.ok(!linkExists(tap('tc')));
  assert.ok(!fs.existsSync(path.join(lab.home, 'vms', 'nic-e', 'state.json')), 'nothing started');
});

test('bad MACs and NIC models are refused at start, naming the spec file and the field', () => {
  const mac = lab.cli(['vm', 'start', lab.writeSpec('nic-f', nic('52:54:00:9a:01', 'tc'))]);
  assert.equal(mac.code, 1);
  assert.match(mac.stderr, /nic-f\.json: nics\.0\.mac: "52:54:00:9a:01" is not a MAC address/);
  const model = lab.cli(['vm', 'start', lab.writeSpec('nic-g', nic('52:54:00:9a:01:07', 'tc', { model: 'rtl8139' }))]);
  assert.equal(model.code, 1);
  assert.match(model.stderr, /nic-g\.json: nics\.0\.model: "rtl8139" is not a NIC model HydraVM can checkpoint and restore/);
  assert.ok(!linkExists(tap('tc')));
});

test('without CAP_NET_ADMIN the tap cannot be made: the error says so, and nothing is left behind', () => {
  const spec = lab.writeSpec('nic-p', nic('52:54:00:9a:01:08', 'tc'));
  // The same CLI, with CAP_NET_ADMIN dropped from its capability bounding set (root keeps its uid, not that capability).
  const r = spawnSync('setpriv', ['--bounding-set=-net_admin', process.execPath, cliEntry, 'vm', 'start', spec], { env: lab.env, encoding: 'utf8', timeout: 60_000 });
  assert.equal(r.status, 1, r.stderr);
  assert.match(r.stderr, /VM "nic-p" nics\.0: creating tap "[^"]+tc" \(ip tuntap add\) failed: .*Operation not permitted \(tap devices need CAP_NET_ADMIN: run HydraVM as root\)/);
  assert.ok(!linkExists(tap('tc')));
  assert.ok(!fs.existsSync(path.join(lab.home, 'vms', 'nic-p', 'state.json')), 'nothing started');
});
