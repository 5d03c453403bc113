// Restore shells for a VM with a NIC, real QEMU and a real tap on a test bridge: the NIC is plugged into the shell at hand-off.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { labWithStore, readJson, until, pidAlive, assertFullVerify, assertGuestContinues } from './support/lab.js';
import { makeTestNet, tapMaster, linkExists, NET_PREFIX, type TestNet } from './support/net.js';
import { waitForMemcheckStep, readSerial } from '../src/vm/serial.js';
import { loadSpecFile, chooseAccel, shellConfigOf, startShell, listShells, stopAllShells, type ShellConfig } from '../src/vm/index.js';
import { connectWhenReady } from '../src/qmp/index.js';

const { lab, store } = labWithStore('shnic', { beforeStop: stopAllShells });
let net: TestNet;
const tap = `${NET_PREFIX}snic`;
before(() => { net = makeTestNet('s'); });
after(() => { net?.remove(); try { execFileSync('ip', ['link', 'del', tap], { stdio: 'ignore' }); } catch { /* gone: the normal case */ } });

const vmDir = (vm: string) => path.join(lab.home, 'vms', vm);
const vmState = (vm: string) => readJson<{ qemuPid: number; lifecycle: string; shell?: string }>(path.join(vmDir(vm), 'state.json'))!;
const protection = (vm: string) => readJson<{ committedEpoch: number; pid: number }>(path.join(vmDir(vm), 'protection.json'));
const serialOf = (vm: string) => path.join(vmDir(vm), 'serial.log');

function configOf(specFile: string): ShellConfig {
  const spec = loadSpecFile(specFile);
  const c = shellConfigOf(spec, chooseAccel(spec.accel, spec.name), []);
  assert.ok('config' in c, JSON.stringify(c));
  return c.config;
}

interface PciDevice { bus: number; slot: number; function: number; qdev_id: string; pci_bridge?: { devices?: PciDevice[] } }

/** Every PCI device QEMU presents (behind bridges too) as "bus:slot.fn id", from the VM's user QMP socket. */
async function pciLayout(vm: string): Promise<string[]> {
  const qmp = await connectWhenReady(path.join(vmDir(vm), 'qmp.sock'), { label: vm, deadlineMs: 5000 });
  try {
    const buses = await qmp.execute<{ devices: PciDevice[] }[]>('query-pci');
    const out: string[] = [];
    const walk = (devs: PciDevice[]) => {
      for (const d of devs) {
        out.push(`${d.bus}:${d.slot}.${d.function} ${d.qdev_id}`);
        walk(d.pci_bridge?.devices ?? []);
      }
    };
    for (const b of buses) walk(b.devices);
    return out.sort();
  } finally {
    qmp.close();
  }
}

/** The bridge's forwarding entries learnt on `port` (frames the port sent into the bridge). */
function learntOn(bridge: string, port: string): string[] {
  return execFileSync('bridge', ['fdb', 'show', 'br', bridge], { encoding: 'utf8' }).split('\n')
    .filter((l) => l.includes(` dev ${port} `) && !l.includes('permanent')).map((l) => l.split(' ')[0]!);
}

async function protectAndKill(vm: string): Promise<number> {
  const p = await lab.cliAsync(['protect', vm, '--store', store.address, '--interval', '1s']);
  assert.equal(p.code, 0, p.stderr);
  const from = protection(vm)!.committedEpoch;
  await until('two more epochs', () => (protection(vm)?.committedEpoch ?? 0) >= from + 2, 60_000);
  const killedAt = fs.statSync(serialOf(vm)).size;
  process.kill(vmState(vm).qemuPid, 'SIGKILL');
  await until('crash recorded', () => vmState(vm).lifecycle === 'crashed', 10_000);
  await until('checkpointer gone', () => !pidAlive(protection(vm)!.pid), 10_000);
  await until('the dead QEMU\'s tap removed', () => !linkExists(tap), 10_000);
  return killedAt;
}

const verifyContinues = (vm: string, killedAt: number) => assertGuestContinues(serialOf(vm), killedAt);

test('a VM with a NIC fails over into a warm shell (the NIC plugged in where it was, its tap on the bridge, its MAC announced from it), then cold; memcheck verifies every page', async () => {
  const vm = 'warm-nic';
  const mac = '52:54:00:9b:01:01';
  const specFile = lab.writeSpec(vm, { nics: [{ mac, bridge: net.bridge, tap }] });
  // Beside the right shell, one of the same memory without NIC ports: never the one taken.
  const plain = await startShell(configOf(lab.writeSpec('plain', {})));
  const shell = await startShell(configOf(specFile));
  assert.match(shell.key, /-nvirtio-net-pci-/);
  assert.doesNotMatch(plain.key, /-n/);

  assert.equal(lab.cli(['vm', 'start', specFile]).code, 0);
  await waitForMemcheckStep(serialOf(vm), 1, 30_000);
  const layout = await pciLayout(vm);
  assert.ok(layout.some((d) => / vnet0$/.test(d)) && layout.some((d) => / nicport0$/.test(d)), layout.join(', '));
  let killedAt = await protectAndKill(vm);

  const r = await lab.cliAsync(['restore', vm, '--store', store.address, '--mode', 'network']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, new RegExp(`VM ${vm} restored into restore shell ${shell.id} \\(${shell.key}\\): hand-off`), r.stdout);
  assert.equal(vmState(vm).qemuPid, shell.state!.qemuPid, 'the shell\'s QEMU runs the VM');
  assert.ok(listShells().some((s) => s.id === plain.id && s.idle), 'the shell without NIC ports is still idle');
  assert.equal(tapMaster(tap), net.bridge, 'the VM\'s tap is on its bridge again');
  assert.deepEqual(await pciLayout(vm), layout, 'the same devices at the same addresses as the source');
  // No guest driver is needed for this: QEMU's announce-self sends from the NIC's backend, so the
  // bridge learns the MAC on the new tap only if netdev, device and tap are wired together.
  await until(`the bridge learns ${mac} on ${tap}`, () => learntOn(net.bridge, tap).includes(mac), 10_000);
  await verifyContinues(vm, killedAt);

  // The restored VM recorded the ports layout: protected again, it fails over cold (no shell left) just as well.
  await stopAllShells();
  killedAt = await protectAndKill(vm);
  const cold = await lab.cliAsync(['restore', vm, '--store', store.address, '--mode', 'network']);
  assert.equal(cold.code, 0, cold.stderr);
  assert.match(cold.stdout, new RegExp(`VM ${vm} started cold: no idle restore shell for ${shell.key.replace(/[+]/g, '\\+')}`), cold.stdout);
  assert.equal(tapMaster(tap), net.bridge);
  assert.deepEqual(await pciLayout(vm), layout);
  await until(`the bridge learns ${mac} on ${tap} again`, () => learntOn(net.bridge, tap).includes(mac), 10_000);
  await verifyContinues(vm, killedAt);
  const st = vmState(vm);
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
  assert.ok(!pidAlive(st.qemuPid));
  assert.ok(!linkExists(tap), 'vm stop removes the tap');
});
