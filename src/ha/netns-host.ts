// A whole namespaced host dying at once (every process in its namespace, its link) and coming back.
import fs from 'node:fs';
import path from 'node:path';
import { HaError } from '../errors.js';
import { pidAlive } from '../util/pid.js';
import { sleep } from '../util/sleep.js';
import { startEtcd } from './etcd-process.js';
import { readClusterInfo, restartDaemon, type EmbeddedClusterInfo } from './embedded.js';
import { ETCD_CLIENT_PORT, ETCD_PEER_PORT, MEMBER_ELECTION_MS, MEMBER_HEARTBEAT_MS } from './netns-cluster.js';
import { netnsPids, setHostLink } from './netns.js';

function hostOf(info: EmbeddedClusterInfo, host: string) {
  const h = info.hosts.find((x) => x.host === host);
  if (!info.netns || !h?.netns) throw new HaError('HYDRA_HA_NO_HOST', `no namespaced host "${host}" in the cluster of ${info.dir}`);
  return { h, layout: info.netns };
}

/**
 * Host death: the host's link goes down and every process in its namespace
 * (agent, supervisors, QEMU, checkpointers, etcd member, a store if it has
 * one) is SIGKILLed in the same instant, as when the machine loses power.
 * Returns the pids killed; resolves once they are gone.
 */
export async function killNetnsHost(dir: string, host: string): Promise<number[]> {
  const info = readClusterInfo(dir);
  if (!info) throw new HaError('HYDRA_HA_SPAWN', `no cluster in ${dir}`);
  const { h, layout } = hostOf(info, host);
  setHostLink(layout, host, false);
  const pids = netnsPids(h.netns!);
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // exited between the listing and the kill: as dead as we want it
    }
  }
  const deadline = Date.now() + 10_000;
  while (pids.some(pidAlive)) {
    if (Date.now() > deadline) throw new HaError('HYDRA_HA_TIMEOUT', `host ${host}: processes ${pids.filter(pidAlive).join(', ')} survived SIGKILL for 10 s`);
    await sleep(10);
  }
  return pids;
}

/**
 * The host comes back: its link up, its etcd member restarted on its data
 * directory (it rejoins the cluster it was a member of) and its agent
 * restarted with its recorded arguments (it fences whatever its home still
 * records as running there).
 */
export async function reviveNetnsHost(dir: string, host: string, env: NodeJS.ProcessEnv = {}): Promise<void> {
  const info = readClusterInfo(dir);
  if (!info) throw new HaError('HYDRA_HA_SPAWN', `no cluster in ${dir}`);
  const { h, layout } = hostOf(info, host);
  setHostLink(layout, host, true);
  const member = info.etcdMembers?.find((m) => m.netns === h.netns);
  if (member && !pidAlive(member.pid)) {
    const initialCluster = layout.hosts.map((x) => `${x.host}=http://${x.address}:${ETCD_PEER_PORT}`).join(',');
    const m = await startEtcd({
      name: host, dataDir: path.join(info.dir, 'etcd', host), logFile: member.log,
      listenHost: h.address, clientPort: ETCD_CLIENT_PORT, peerPort: ETCD_PEER_PORT, initialCluster, netns: h.netns, detached: true, waitHealthy: false,
      heartbeatMs: MEMBER_HEARTBEAT_MS, electionMs: MEMBER_ELECTION_MS,
    });
    member.pid = m.pid;
    fs.writeFileSync(member.pidFile, `${m.pid}\n`);
    fs.writeFileSync(path.join(info.dir, 'cluster.json'), JSON.stringify(info, null, 2) + '\n');
  }
  if (!pidAlive(h.pid)) restartDaemon(dir, h.name, env);
}
