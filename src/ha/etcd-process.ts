import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import http from 'node:http';
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { HaError } from '../errors.js';
import { killProcess, type ProcessIdentity } from '../vm/index.js';
import { pidAlive } from '../util/pid.js';
import { sleep } from '../util/sleep.js';

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
  const url = `http://127.0.0.1:${clientPort}`;
  const peerUrl = `http://127.0.0.1:${peerPort}`;
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
    '--initial-cluster', `${name}=${peerUrl}`,
    '--initial-cluster-state', 'new',
    '--heartbeat-interval', '50',
    '--election-timeout', '300',
    '--logger', 'zap',
    '--log-outputs', 'stderr',
  ];
  const logFd = fs.openSync(logFile, 'a');
  let child: ChildProcess;
  try {
    child = spawn(binary, args, { stdio: ['ignore', logFd, logFd], detached: !!opts.detached });
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

function lastLines(file: string, n = 3): string {
  try {
    return fs.readFileSync(file, 'utf8').trim().split('\n').slice(-n).join(' | ');
  } catch {
    return '(no log)';
  }
}
