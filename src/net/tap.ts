// Tap devices on a host bridge, made and removed with iproute2.
import { execFile, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { NetError } from '../errors.js';

export interface TapRequest {
  /** Who asks, for messages: `VM "web1" nics.0`. */
  owner: string;
  tap: string;
  bridge: string;
}

function ip(args: string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve) => {
    execFile('ip', args, { timeout: 15_000 }, (err, _stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : -1) : 0;
      resolve({ code, stderr: (stderr || (err ? err.message : '')).trim() });
    });
  });
}

/**
 * Whether a network interface of that name exists in this process's network
 * namespace. /proc/self/net follows the process's namespace; /sys/class/net
 * shows the namespace sysfs was mounted in, so a process that entered a host's
 * namespace with `nsenter --net` would see the root namespace's links there.
 */
export function linkExists(name: string): boolean {
  try {
    return fs.readFileSync('/proc/self/net/dev', 'utf8').split('\n').some((l) => l.trimStart().startsWith(`${name}:`));
  } catch {
    return fs.existsSync(`/sys/class/net/${name}`);
  }
}

/** The kind of a link in this network namespace ("bridge", "tun", "veth", ...; "" if it has none), from `ip -d link`. */
function linkKind(name: string): string {
  const r = spawnSync('ip', ['-o', '-d', 'link', 'show', 'dev', name], { encoding: 'utf8' });
  // `ip -d` prints the kind right after the link's flags line, e.g. "... \    bridge forward_delay ..." or "tun type tap".
  return /\\\s+(bridge|tun|veth|dummy|vlan|macvlan|vxlan)\b/.exec(r.stdout ?? '')?.[1] ?? '';
}

/** PIDs holding `/dev/net/tun` open on `tap` (tun's fdinfo names the interface). */
export function tapHolders(tap: string): number[] {
  const holders: number[] = [];
  let pids: string[];
  try {
    pids = fs.readdirSync('/proc').filter((p) => /^\d+$/.test(p));
  } catch {
    return holders;
  }
  for (const pid of pids) {
    let fds: string[];
    try {
      fds = fs.readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue; // gone, or not ours to read
    }
    for (const fd of fds) {
      try {
        if (fs.readlinkSync(`/proc/${pid}/fd/${fd}`) !== '/dev/net/tun') continue;
        if (fs.readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8').includes(`iff:\t${tap}\n`)) {
          holders.push(Number(pid));
          break;
        }
      } catch {
        // the fd closed while we looked: not a holder
      }
    }
  }
  return holders;
}

/** Refuse a bridge that does not exist here, naming the command that creates it. */
export function assertBridge(req: Pick<TapRequest, 'owner' | 'bridge'>): void {
  if (!linkExists(req.bridge)) {
    throw new NetError('HYDRA_NET_BRIDGE_MISSING', `${req.owner}: bridge "${req.bridge}" does not exist on this host (create it: ip link add ${req.bridge} type bridge && ip link set ${req.bridge} up)`);
  }
  if (linkKind(req.bridge) !== 'bridge') {
    throw new NetError('HYDRA_NET_BRIDGE_MISSING', `${req.owner}: "${req.bridge}" exists on this host but is not a bridge`);
  }
}

function failure(req: TapRequest, step: string, stderr: string): NetError {
  if (/Operation not permitted|Permission denied/i.test(stderr)) {
    return new NetError('HYDRA_NET_TAP_PERMISSION', `${req.owner}: ${step} failed: ${stderr} (tap devices need CAP_NET_ADMIN: run HydraVM as root)`);
  }
  if (/No such file or directory/i.test(stderr) && !fs.existsSync('/dev/net/tun')) {
    return new NetError('HYDRA_NET_TAP_PERMISSION', `${req.owner}: ${step} failed: /dev/net/tun is missing (load the tun module: modprobe tun)`);
  }
  return new NetError('HYDRA_NET_TAP_FAILED', `${req.owner}: ${step} failed: ${stderr}`);
}

/**
 * Create `tap` (persistent, so QEMU opens it by name without privileges of its
 * own), attach it to `bridge` and bring it up. A tap of that name left behind
 * by a dead VM (no process holds it) is replaced; one in use is refused.
 */
export async function createTap(req: TapRequest): Promise<void> {
  assertBridge(req);
  if (linkExists(req.tap)) {
    const holders = tapHolders(req.tap);
    if (holders.length > 0) {
      throw new NetError('HYDRA_NET_TAP_BUSY', `${req.owner}: tap "${req.tap}" is in use by process ${holders.join(', ')} (another VM?)`);
    }
    if (linkKind(req.tap) !== 'tun') {
      throw new NetError('HYDRA_NET_TAP_BUSY', `${req.owner}: "${req.tap}" exists on this host and is not a tap device`);
    }
    const del = await ip(['link', 'del', req.tap]);
    if (del.code !== 0 && linkExists(req.tap)) throw failure(req, `removing the stale tap "${req.tap}"`, del.stderr);
  }
  const add = await ip(['tuntap', 'add', 'dev', req.tap, 'mode', 'tap']);
  if (add.code !== 0) throw failure(req, `creating tap "${req.tap}" (ip tuntap add)`, add.stderr);
  for (const args of [['link', 'set', req.tap, 'master', req.bridge], ['link', 'set', req.tap, 'up']]) {
    const r = await ip(args);
    if (r.code !== 0) {
      await ip(['link', 'del', req.tap]);
      throw failure(req, `ip ${args.join(' ')}`, r.stderr);
    }
  }
}

/** Remove `tap` if it exists and no process holds it. Returns whether it is gone. */
export async function removeTap(tap: string): Promise<boolean> {
  if (!linkExists(tap)) return true;
  if (tapHolders(tap).length > 0) return false;
  await ip(['link', 'del', tap]);
  return !linkExists(tap);
}
