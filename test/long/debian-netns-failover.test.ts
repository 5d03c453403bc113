// The Debian VM (redis, qcow2 root, NIC on the cluster's bridge) protected on a 3-host namespaced cluster: QEMU death, then host death.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync, spawnSync } from 'node:child_process';
import { makeLab, pidAlive, until } from '../support/lab.js';
import { DebianNetnsRig, type FailoverObservation } from '../../src/bench/debian-netns.js';
import { redisOnce } from '../../src/bench/resp.js';
import { processInNetns, Cluster } from '../../src/ha/index.js';
import { netnsPids } from '../../src/ha/netns.js';
import type { BuiltImage } from '../../src/image/index.js';

/**
 * host1 runs the store and the client (a redis watcher INCRing and SETting
 * back to back), host2 and host3 the VM. The VM starts on host2; its QEMU is
 * SIGKILLed and the cluster restores it on host3; then host3 dies whole (link
 * down, and its agent, QEMU, checkpointer, etcd member SIGKILLed at once) and
 * the VM comes back on host2. After each restore:
 * - the restored QEMU runs in its new host's namespace, its tap on that host's br0;
 * - the client, which only knows the VM's address, gets replies again;
 * - redis is the same process (same run_id, uptime went on: restored, not rebooted),
 *   answers PING, and its counter holds everything acknowledged before the
 *   restored checkpoint's pause, and goes on counting;
 * - the disk the VM resumed from (the frozen chain below its restore overlay)
 *   is what a crash-recovering system accepts: `e2fsck -p` (journal replay,
 *   orphans) needs no manual repair, and `fsck -n -f` afterwards finds nothing.
 * The outage and the acknowledged writes lost are printed.
 */
const PREFIX = process.env.HYDRAVM_TEST_NETNS_PREFIX ?? 'hvdn-';
const SUBNET = process.env.HYDRAVM_TEST_NETNS_SUBNET ?? '198.18.101.0/24';
const lab = makeLab('debns');
let rig: DebianNetnsRig | undefined;
const note = (msg: string) => process.stdout.write(`${msg}\n`);
const seen: FailoverObservation[] = [];

before(async () => {
  const img = await lab.cliAsync(['image', 'build', 'debian', '--json'], { timeoutMs: 40 * 60_000 });
  assert.equal(img.code, 0, img.stderr);
  const image = JSON.parse(img.stdout) as BuiltImage;
  rig = await DebianNetnsRig.start({
    dir: path.join(lab.home, 'cluster'), prefix: PREFIX, subnet: SUBNET, image, intervalMs: 1000,
    env: { HYDRAVM_SECRET: lab.env.HYDRAVM_SECRET }, log: note,
  });
});

after(async () => {
  await rig?.stop();
  lab.cleanup();
});

async function redisInfo(r: DebianNetnsRig): Promise<{ runId: string; uptimeS: number }> {
  const text = String(await redisOnce(r.vmAddress, 6379, ['INFO', 'server'], 10_000));
  const runId = /run_id:(\w+)/.exec(text)?.[1];
  const uptime = /uptime_in_seconds:(\d+)/.exec(text)?.[1];
  assert.ok(runId && uptime, `INFO server: ${text.slice(0, 200)}`);
  return { runId, uptimeS: Number(uptime) };
}

/** The disk the restored VM resumed from: crash-consistent, with nothing for fsck to find after recovery. */
function checkRestoredDisk(r: DebianNetnsRig, host: string): string {
  const spec = JSON.parse(fs.readFileSync(r.vmFile(host, 'spec.json'), 'utf8')) as { launch: { diskFiles?: string[] } };
  const overlay = spec.launch.diskFiles?.[0];
  assert.ok(overlay, `the restored VM on ${host} runs on a restore overlay`);
  const chain = JSON.parse(execFileSync('qemu-img', ['info', '-U', '--backing-chain', '--output=json', overlay]).toString()) as { filename: string }[];
  assert.ok(chain.length >= 3, `overlay over a frozen layer over the root disk: ${chain.map((c) => c.filename).join(' -> ')}`);
  assert.ok(chain.some((c) => c.filename === r.rootDisk), 'the root disk is in the chain');
  const frozen = chain[1]!.filename;
  for (const layer of chain.slice(1, -1)) execFileSync('qemu-img', ['check', '-U', layer.filename]);
  const raw = path.join(lab.home, 'restored-root.raw');
  execFileSync('qemu-img', ['convert', '-U', '-O', 'raw', frozen, raw]);
  try {
    const preen = spawnSync('e2fsck', ['-p', raw], { encoding: 'utf8' });
    assert.ok(preen.status === 0 || preen.status === 1, `e2fsck -p of the disk the VM resumed from needs manual repair (exit ${preen.status}): ${preen.stdout}${preen.stderr}`);
    const check = spawnSync('fsck.ext4', ['-n', '-f', raw], { encoding: 'utf8' });
    assert.equal(check.status, 0, `fsck -n -f after recovery: ${check.stdout}${check.stderr}`);
    return `${preen.stdout.trim().split('\n').at(-1)} / ${check.stdout.trim().split('\n').at(-1)}`;
  } finally {
    fs.rmSync(raw, { force: true });
  }
}

/** The MACs of the VM's NICs as recorded on `host` (the restore recreates them from the image's spec). */
function macsOn(r: DebianNetnsRig, host: string): string[] {
  const spec = JSON.parse(fs.readFileSync(r.vmFile(host, 'spec.json'), 'utf8')) as { spec: { nics?: { mac: string }[] } };
  return (spec.spec.nics ?? []).map((n) => n.mac);
}

async function checkRestored(r: DebianNetnsRig, o: FailoverObservation, before: { runId: string; uptimeS: number; macs: string[] }, killed: string): Promise<void> {
  assert.notEqual(o.toHost, killed, 'restored on another host');
  assert.deepEqual(macsOn(r, o.toHost), before.macs, 'the restored NIC keeps its MAC, so the address the client knows reaches it');
  assert.notEqual(o.toHost, 'host1', 'never on the host without room for it');
  const st = r.vmState(o.toHost);
  assert.ok(st?.qemuPid && pidAlive(st.qemuPid), `QEMU runs on ${o.toHost}`);
  assert.ok(processInNetns(st.qemuPid, r.host(o.toHost).netns!), `the restored QEMU runs in ${o.toHost}'s namespace`);
  const master = spawnSync('ip', ['-n', r.host(o.toHost).netns!, '-o', 'link', 'show', 'debvm0'], { encoding: 'utf8' }).stdout;
  assert.match(master, /master br0/, `the VM's tap on ${o.toHost} is on its br0`);
  // The client: replies again, at the one address it knows.
  const recs = r.records();
  assert.ok(recs.some((x) => x.ok && x.op === 'connect' && x.t > o.killAt), 'the client reconnected');
  assert.ok(o.found >= 0, 'the client read the counter after the restore');
  assert.ok(o.ackedAtCheckpoint >= 0, `the restored checkpoint (epoch ${o.restoredEpoch}) or an earlier one of its generation is in the old host's history`);
  // What the client saw is recorded: the outage, and the acknowledged writes the restore lost (without output commit, those after the restored checkpoint's pause).
  assert.ok(o.longestGapMs > 0 && o.firstReplyAfterKillMs > 0 && o.connectedAfterKillMs > 0, `outage recorded: gap ${o.longestGapMs} ms, first reply ${o.firstReplyAfterKillMs} ms, connected ${o.connectedAfterKillMs} ms`);
  assert.equal(o.lostAcked, Math.max(0, o.ackedBeforeKill - o.found), `lost acknowledged writes recorded: acknowledged ${o.ackedBeforeKill}, found ${o.found}, lost ${o.lostAcked}`);
  assert.ok(o.found >= o.ackedAtCheckpoint, `counter after restore ${o.found} >= ${o.ackedAtCheckpoint} acknowledged before the pause of epoch ${o.checkpointEpoch} (restored: ${o.restoredEpoch})`);
  const later = recs.filter((x) => x.ok && x.op === 'incr' && x.t > o.killAt).map((x) => x.value!);
  assert.ok(later.length > 1 && later[0]! > o.found && later.at(-1)! > later[0]!, `the counter goes on from the value found (${o.found} -> ${later[0]} ... ${later.at(-1)})`);
  // redis: the same process, restored with its memory (not restarted), answering.
  assert.equal(await redisOnce(r.vmAddress, 6379, ['PING'], 10_000), 'PONG');
  const now = await redisInfo(r);
  assert.equal(now.runId, before.runId, 'the same redis process (a reboot or restart would change run_id)');
  assert.ok(now.uptimeS >= before.uptimeS, `redis uptime went on: ${before.uptimeS} s -> ${now.uptimeS} s`);
  const fsck = checkRestoredDisk(r, o.toHost);
  note(`${o.kind} death: restored on ${o.toHost}; disk it resumed from: ${fsck}; redis run_id unchanged, uptime ${now.uptimeS} s`);
}

test('Debian VM with redis on a 3-host namespaced cluster: QEMU death and host death, the client on another host reconnects, redis and the disk are consistent', { timeout: 50 * 60_000 }, async () => {
  const r = rig!;
  const st = r.vmState('host2')!;
  assert.ok(processInNetns(st.qemuPid!, r.host('host2').netns!), 'the VM runs in host2\'s namespace');
  const backing = JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', r.rootDisk]).toString()) as { 'backing-filename'?: string };
  assert.ok(backing['backing-filename'], 'the root disk is an overlay on the built image');
  const members = await r.cluster.cluster.etcd.cluster.memberList({ linearizable: true });
  assert.equal(members.members.length, 3);

  await r.protect();
  const macs = macsOn(r, 'host2');
  assert.equal(macs.length, 1, 'one NIC');
  const info0 = { ...(await redisInfo(r)), macs };

  // 1. QEMU dies.
  const q = await r.failover('qemu');
  assert.equal(q.fromHost, 'host2');
  seen.push(q);
  await checkRestored(r, q, info0, 'host2');

  // 2. The whole host dies: its link, agent, supervisor, QEMU, checkpointer and etcd member at once.
  const info1 = { ...(await redisInfo(r)), macs };
  const victim = q.toHost;
  const inVictim = netnsPids(r.host(victim).netns!);
  const member = r.cluster.etcdMembers!.find((m) => m.netns === r.host(victim).netns)!;
  assert.ok(inVictim.includes(r.host(victim).pid) && inVictim.includes(member.pid) && inVictim.includes(r.vmState(victim)!.qemuPid!), 'agent, etcd member and QEMU all run in the host\'s namespace');
  const h = await r.failover('host');
  assert.equal(h.fromHost, victim);
  for (const pid of inVictim) assert.ok(!pidAlive(pid), `pid ${pid} of ${victim} is dead`);
  seen.push(h);
  await checkRestored(r, h, info1, victim);

  // The dead host comes back: its etcd member rejoins (each member answers for the whole cluster) and its agent registers.
  await r.revive(victim);
  const back = new Cluster(r.cluster.etcdMembers!.find((m) => m.netns === r.host(victim).netns)!.url);
  try {
    await until(`${victim}'s own member answering with the three hosts`, async () => (await back.hosts().catch(() => new Map())).size === 3, 120_000);
  } finally {
    back.close();
  }
  assert.equal((await r.cluster.cluster.vm('debvm'))?.value.host, h.toHost, 'the revived host does not take the VM back');

  // `cluster down` leaves no namespace, link or process behind.
  const pids = [...r.cluster.hosts.map((x) => x.pid), ...r.cluster.etcdMembers!.map((m) => m.pid), r.vmState(h.toHost)!.qemuPid!];
  rig = undefined;
  await r.stop();
  assert.deepEqual(spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout.split('\n').filter((l) => l.startsWith(PREFIX)), []);
  assert.deepEqual(spawnSync('ip', ['-o', 'link', 'show'], { encoding: 'utf8' }).stdout.split('\n').filter((l) => new RegExp(`^\\d+:\\s+${PREFIX}`).test(l)), []);
  for (const pid of pids) assert.ok(!pidAlive(pid), `pid ${pid} is gone after cluster down`);

  for (const o of seen) {
    note(`RESULT ${o.kind} death (${o.fromHost} -> ${o.toHost}, checkpoints every ${o.intervalMs} ms): client outage ${o.longestGapMs.toFixed(0)} ms longest gap, `
      + `${o.firstReplyAfterKillMs.toFixed(0)} ms kill to first reply (guest running at ${o.runningAfterKillMs ?? '?'} ms, client connected at ${o.connectedAfterKillMs.toFixed(0)} ms); `
      + `acknowledged increments lost ${o.lostAcked} (acknowledged ${o.ackedBeforeKill}, found ${o.found})`);
  }
});
