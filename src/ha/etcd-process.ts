import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import http from 'node:http';
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { HaError } from '../errors.js';
import { killProcess, type ProcessIdentity } from '../vm/index.js';
import { pidAlive } from '../util/pid.js';
import { sleep } from '../util/sleep.js';
import { inNetns } from './netns.js';
import { lastLines } from '../util/log-tail.js';

/**
 * A single local etcd member for the embedded mode (demo, tests, one-machine
 * clusters). Production clusters point agents and managers at their own etcd.
 *
 * Started with --heartbeat-interval 50 --election-timeout 300 so that a lease
 * asked for 1 s is granted 1 s (with the defaults etcd rounds it up to 2 s).
 */
export const ETCD_BINARY = process.env.HYDRAVM_ETCD_BINARY ?? 'etcd';

export interface EtcdOptions {
  /** Data directory (created). */
  dataDir: string;
  /** Client port; 0 or absent = pick a free one. */
  clientPort?: number;
  /** Peer port; 0 or absent = pick a free one. */
  peerPort?: number;
  /** Member name (default "default"). */
  name?: string;
  /** etcd's own log; default DATADIR/../etcd.log. */
  logFile?: string;
  /** Run detached (survives this process) instead of as a child. */
  detached?: boolean;
  /** How long to wait for /health. */
  timeoutMs?: number;
  /** Address to listen and advertise on (default 127.0.0.1). */
  listenHost?: string;
  /**
   * Members of a multi-member cluster, NAME=PEER_URL comma-separated, this
   * member included (default: this member alone).
   */
  initialCluster?: string;
  /** Raft timing (default 50 / 300 ms: one member answers at once; several need more slack, see netns-cluster.ts). */
  heartbeatMs?: number;
  electionMs?: number;
  /** Run inside this network namespace (/run/netns/NAME), through nsenter. */
  netns?: string;
  /**
   * Wait for /health (default true). A member of a new multi-member cluster
   * is healthy only once a quorum runs: start them all, then waitEtcdHealthy().
   */
  waitHealthy?: boolean;
}

export interface EtcdProcess {
  url: string;
  pid: number;
  dataDir: string;
  logFile: string;
  /** Stop etcd (SIGTERM, then SIGKILL) and wait until it is gone. */
  stop(): Promise<void>;
  /** Freeze / thaw it: a partition of every client at once (tests). */
  pause(): void;
  resume(): void;
}

/** Find the etcd binary or say how to get it. */
export function findEtcd(): string {
  try {
    execFileSync(ETCD_BINARY, ['--version'], { stdio: 'ignore' });
    return ETCD_BINARY;
  } catch {
    throw new HaError('HYDRA_ETCD_MISSING', `etcd binary "${ETCD_BINARY}" not found (run \`hydravm setup\`, or apt-get install etcd-server etcd-client, or set HYDRAVM_ETCD_BINARY)`);
  }
}

/** A TCP port nothing listens on right now. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

export function etcdHealthy(url: string, timeoutMs = 500): Promise<boolean> {
  return new Promise((resolve) => {
    const req = http.get(`${url}/health`, { timeout: timeoutMs }, (res) => {
      let body = '';
      res.on('data', (c) => (body += c));
      res.on('end', () => {
        try {
          resolve(JSON.parse(body).health === 'true');
        } catch {
          resolve(false);
        }
      });
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(false));
  });
}

/**
 * Stop an etcd (or any process) by pid: SIGTERM, then SIGKILL after graceMs.
 * A PID read from a file (`who` given) is signalled through a pidfd and only
 * while it is still that process (its command line holds `who.cmdline`):
 * after a reboot, cluster.json's PIDs may name unrelated processes.
 */
export async function stopPid(pid: number, graceMs = 3000, who?: ProcessIdentity): Promise<void> {
  if (!pidAlive(pid)) return;
  const signal = (sig: NodeJS.Signals): boolean => {
    if (who) return killProcess(pid, who, sig);
    try {
      process.kill(pid, sig);
      return true;
    } catch {
      return false;
    }
  };
  if (!signal('SIGCONT') || !signal('SIGTERM')) return;
  const deadline = Date.now() + graceMs;
  while (pidAlive(pid)) {
    if (Date.now() > deadline) {
      signal('SIGKILL');
      await sleep(50);
      if (Date.now() > deadline + 2000) break;
    }
    await sleep(25);
  }
}

/** Start one etcd member and wait until it reports healthy. */
export async function startEtcd(opts: EtcdOptions): Promise<EtcdProcess> {
  const binary = findEtcd();
  const clientPort = opts.clientPort || (await freePort());
  const peerPort = opts.peerPort || (await freePort());
  const name = opts.name ?? 'default';
  const listen = opts.listenHost ?? '127.0.0.1';
  const url = `http://${listen}:${clientPort}`;
  const peerUrl = `http://${listen}:${peerPort}`;
  fs.mkdirSync(opts.dataDir, { recursive: true, mode: 0o700 });
  fs.chmodSync(opts.dataDir, 0o700);
  const logFile = opts.logFile ?? path.join(path.dirname(path.resolve(opts.dataDir)), 'etcd.log');
  const args = [
    '--name', name,
    '--data-dir', opts.dataDir,
    '--listen-client-urls', url,
    '--advertise-client-urls', url,
    '--listen-peer-urls', peerUrl,
    '--initial-advertise-peer-urls', peerUrl,
    '--initial-cluster', opts.initialCluster ?? `${name}=${peerUrl}`,
    '--initial-cluster-state', 'new',
    '--heartbeat-interval', String(opts.heartbeatMs ?? 50),
    '--election-timeout', String(opts.electionMs ?? 300),
    // Several members: a member returning from a partition with a raised term
    // must not depose the leader (an election at every heal).
    ...(opts.initialCluster ? ['--pre-vote=true'] : []),
    '--logger', 'zap',
    '--log-outputs', 'stderr',
  ];
  const logFd = fs.openSync(logFile, 'a');
  let child: ChildProcess;
  try {
    const argv = opts.netns ? [...inNetns(opts.netns), binary, ...args] : [binary, ...args];
    child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', logFd, logFd], detached: !!opts.detached });
  } finally {
    fs.closeSync(logFd);
  }
  if (opts.detached) child.unref();
  const pid = child.pid;
  if (!pid) throw new HaError('HYDRA_ETCD_FAILED', `cannot start ${binary} (see ${logFile})`);
  let exited = false;
  child.on('exit', () => (exited = true));

  const deadline = Date.now() + (opts.timeoutMs ?? 15_000);
  for (;;) {
    if (opts.waitHealthy === false) break;
    if (await etcdHealthy(url)) break;
    if (exited) throw new HaError('HYDRA_ETCD_FAILED', `etcd exited during start (port ${clientPort} or ${peerPort} taken? see ${logFile}): ${lastLines(logFile)}`);
    if (Date.now() > deadline) {
      await stopPid(pid, 1000);
      throw new HaError('HYDRA_ETCD_FAILED', `etcd did not become healthy at ${url} within ${(opts.timeoutMs ?? 15_000) / 1000} s (see ${logFile})`);
    }
    await sleep(50);
  }
  return {
    url,
    pid,
    dataDir: opts.dataDir,
    logFile,
    stop: () => stopPid(pid),
    pause: () => process.kill(pid, 'SIGSTOP'),
    resume: () => process.kill(pid, 'SIGCONT'),
  };
}

/** Wait until every member answers /health (a quorum formed), or say which did not. */
export async function waitEtcdHealthy(members: EtcdProcess[], timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const sick: EtcdProcess[] = [];
    for (const m of members) if (!(await etcdHealthy(m.url))) sick.push(m);
    if (sick.length === 0) return;
    const dead = sick.find((m) => !pidAlive(m.pid));
    if (dead) throw new HaError('HYDRA_ETCD_FAILED', `etcd member at ${dead.url} exited during start (see ${dead.logFile}): ${lastLines(dead.logFile)}`);
    if (Date.now() > deadline) throw new HaError('HYDRA_ETCD_FAILED', `etcd members ${sick.map((m) => m.url).join(', ')} not healthy within ${timeoutMs / 1000} s (see ${sick.map((m) => m.logFile).join(', ')})`);
    await sleep(100);
  }
}
