// Hosts as network namespaces: one namespace per host, veth pairs on one bridge in the root namespace.
import fs from 'node:fs';
import { execFileSync, spawnSync } from 'node:child_process';
import { NetnsError } from '../errors.js';

/**
 * Layout of a namespaced cluster on subnet A.B.C.0/24:
 *
 *   bridge PREFIXbr in the root namespace, address A.B.C.1 (the CLI reaches every host through it)
 *   namespace PREFIXHOST per host, loopback up, bridge br0 = A.B.C.(10+i) (i = 1..N) with eth0 on it
 *   veth PREFIXvI in the root namespace (on the bridge) <-> eth0 in the host's namespace
 *
 * br0 is the host's bridge for VM NICs, as on a hypervisor host: a spec's
 * `nics: [{bridge: br0}]` puts the VM's tap on it, on the same segment as
 * every host, so the VM keeps its address on whichever host it is restored.
 *
 * Every name starts with the prefix, so leftovers of a crashed run can be
 * told from anything else on the machine. The layout is recorded in the
 * cluster directory before anything is created, and `cluster down` removes
 * exactly the recorded names.
 */
export interface NetnsHost {
  host: string;
  netns: string;
  address: string;
  /** The root-namespace end of the host's veth pair (on the bridge). */
  veth: string;
}

export interface NetnsLayout {
  prefix: string;
  subnet: string;
  bridge: string;
  bridgeAddress: string;
  /** The bridge inside every host's namespace that holds the host's address and its VMs' taps (absent in older records). */
  hostBridge?: string;
  hosts: NetnsHost[];
}

/** Name of the VM bridge inside each host namespace (names there do not clash with the root namespace). */
export const HOST_BRIDGE = 'br0';

export const IP_BINARY = process.env.HYDRAVM_IP_BINARY ?? 'ip';
/** Linux interface names are at most 15 bytes. */
const IFNAMSIZ = 15;

/** Is `addr` inside 198.18.0.0/15 (the benchmarking range, RFC 2544)? */
function inBenchRange(a: number[]): boolean {
  return a[0] === 198 && (a[1] === 18 || a[1] === 19);
}

export function planNetns(prefix: string, hosts: string[], subnet = '198.18.100.0/24'): NetnsLayout {
  const m = /^(\d+)\.(\d+)\.(\d+)\.0\/24$/.exec(subnet);
  const octets = m ? [Number(m[1]), Number(m[2]), Number(m[3])] : [];
  if (!m || octets.some((o) => o > 255) || !inBenchRange(octets)) {
    throw new NetnsError('HYDRA_NETNS_FAILED', `namespace subnet "${subnet}": give a /24 inside 198.18.0.0/15, e.g. 198.18.100.0/24`);
  }
  if (!/^[a-z0-9][a-z0-9-]{0,9}$/.test(prefix)) {
    throw new NetnsError('HYDRA_NETNS_FAILED', `namespace prefix "${prefix}": 1-10 characters of a-z, 0-9 and "-"`);
  }
  if (hosts.length > 200) throw new NetnsError('HYDRA_NETNS_FAILED', `${hosts.length} hosts do not fit in ${subnet}`);
  const base = octets.join('.');
  const layout: NetnsLayout = {
    prefix,
    subnet,
    bridge: `${prefix}br`,
    bridgeAddress: `${base}.1`,
    hostBridge: HOST_BRIDGE,
    hosts: hosts.map((host, i) => ({ host, netns: `${prefix}${host}`, address: `${base}.${11 + i}`, veth: `${prefix}v${i + 1}` })),
  };
  for (const name of [layout.bridge, ...layout.hosts.map((h) => h.veth)]) {
    if (name.length > IFNAMSIZ) throw new NetnsError('HYDRA_NETNS_FAILED', `interface name "${name}" is longer than ${IFNAMSIZ} characters: use a shorter prefix`);
  }
  for (const h of layout.hosts) {
    if (!/^[A-Za-z0-9_.-]+$/.test(h.netns)) throw new NetnsError('HYDRA_NETNS_FAILED', `host name "${h.host}" cannot name a network namespace`);
  }
  return layout;
}

/** `ip` present and we are allowed to create namespaces, or a clear error. */
export function checkNetnsTools(): void {
  const r = spawnSync(IP_BINARY, ['-V'], { encoding: 'utf8' });
  if (r.error) throw new NetnsError('HYDRA_NETNS_IP_MISSING', `"${IP_BINARY}" not found: namespaced hosts need iproute2 (apt-get install iproute2)`);
  if (process.getuid?.() !== 0) {
    throw new NetnsError('HYDRA_NETNS_NOT_ROOT', 'creating network namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN): run `cluster up --netns` as root, or without --netns');
  }
}

function ip(args: string[]): string {
  const r = spawnSync(IP_BINARY, args, { encoding: 'utf8' });
  if (r.error) throw new NetnsError('HYDRA_NETNS_IP_MISSING', `"${IP_BINARY}" not found: ${r.error.message}`);
  if (r.status !== 0) {
    const out = `${r.stderr}${r.stdout}`.trim();
    if (/Operation not permitted|Permission denied/i.test(out)) {
      throw new NetnsError('HYDRA_NETNS_NOT_ROOT', `\`ip ${args.join(' ')}\` was refused (needs root / CAP_NET_ADMIN): ${out}`);
    }
    if (/File exists|Address already assigned/i.test(out)) {
      throw new NetnsError('HYDRA_NETNS_ADDRESS_IN_USE', `\`ip ${args.join(' ')}\`: ${out}`);
    }
    throw new NetnsError('HYDRA_NETNS_FAILED', `\`ip ${args.join(' ')}\` failed (exit ${r.status}): ${out}`);
  }
  return r.stdout;
}

export function listNetns(): string[] {
  return ip(['netns', 'list']).split('\n').map((l) => l.trim().split(/\s+/)[0]!).filter(Boolean);
}

export function listLinks(): string[] {
  return ip(['-o', 'link', 'show']).split('\n').map((l) => /^\d+:\s+([^:@\s]+)/.exec(l)?.[1]).filter((n): n is string => !!n);
}

/** Namespaces and root-namespace links whose name starts with `prefix`. */
export function existingWithPrefix(prefix: string): { netns: string[]; links: string[] } {
  return { netns: listNetns().filter((n) => n.startsWith(prefix)), links: listLinks().filter((n) => n.startsWith(prefix)) };
}

/** The commands that remove these names (what a refusal tells the user to run). */
export function cleanupCommands(found: { netns: string[]; links: string[] }): string {
  return [...found.netns.map((n) => `ip netns del ${n}`), ...found.links.map((l) => `ip link del ${l}`)].join(' && ');
}

/** Root-namespace interfaces already holding an address of the layout's subnet. */
function addressesInUse(layout: NetnsLayout): string[] {
  const base = layout.bridgeAddress.replace(/\.1$/, '.');
  return ip(['-o', '-4', 'addr', 'show']).split('\n')
    .map((l) => /^\d+:\s+(\S+)\s+inet\s+(\d+\.\d+\.\d+\.\d+)/.exec(l))
    .filter((m): m is RegExpExecArray => !!m && m[2]!.startsWith(base))
    .map((m) => `${m[2]} on ${m[1]}`);
}

/**
 * Create the bridge, the namespaces and the veth pairs, after checking that
 * the subnet is free and no name with the prefix exists. The caller records
 * the layout first, so a failure half-way is cleaned by removeNetns().
 */
export function createNetns(layout: NetnsLayout): void {
  checkNetnsTools();
  const taken = addressesInUse(layout);
  if (taken.length) {
    throw new NetnsError('HYDRA_NETNS_ADDRESS_IN_USE', `subnet ${layout.subnet} is already in use on this machine (${taken.join(', ')}): pick another with --netns-subnet`);
  }
  const found = existingWithPrefix(layout.prefix);
  if (found.netns.length || found.links.length) {
    throw new NetnsError('HYDRA_NETNS_LEFTOVER', `namespaces or links with prefix "${layout.prefix}" already exist (${[...found.netns, ...found.links].join(', ')}), not recorded by this cluster directory; if nothing uses them, remove them with: ${cleanupCommands(found)}`);
  }
  const len = layout.subnet.split('/')[1];
  ip(['link', 'add', layout.bridge, 'type', 'bridge']);
  ip(['addr', 'add', `${layout.bridgeAddress}/${len}`, 'dev', layout.bridge]);
  ip(['link', 'set', layout.bridge, 'up']);
  for (const h of layout.hosts) {
    ip(['netns', 'add', h.netns]);
    ip(['-n', h.netns, 'link', 'set', 'lo', 'up']);
    ip(['link', 'add', h.veth, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', h.netns]);
    ip(['link', 'set', h.veth, 'master', layout.bridge]);
    ip(['link', 'set', h.veth, 'up']);
    // The host's address lives on its bridge (a bridge port's own address would never see
    // the frames the bridge takes), and the bridge keeps eth0's MAC: without a fixed MAC a
    // bridge takes the lowest of its ports', so a VM's tap joining it would change the
    // host's MAC under its peers' ARP caches.
    const br = layout.hostBridge ?? HOST_BRIDGE;
    const mac = /link\/ether\s+([0-9a-f:]{17})/.exec(ip(['-n', h.netns, '-o', 'link', 'show', 'eth0']))?.[1];
    if (!mac) throw new NetnsError('HYDRA_NETNS_FAILED', `cannot read the MAC of eth0 in ${h.netns}`);
    ip(['-n', h.netns, 'link', 'add', br, 'type', 'bridge']);
    ip(['-n', h.netns, 'link', 'set', br, 'address', mac]);
    ip(['-n', h.netns, 'link', 'set', 'eth0', 'master', br]);
    ip(['-n', h.netns, 'addr', 'add', `${h.address}/${len}`, 'dev', br]);
    ip(['-n', h.netns, 'link', 'set', 'eth0', 'up']);
    ip(['-n', h.netns, 'link', 'set', br, 'up']);
  }
}

/** Pids of the processes inside a namespace (none if it does not exist). */
export function netnsPids(netns: string): number[] {
  try {
    return execFileSync(IP_BINARY, ['netns', 'pids', netns], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] })
      .split('\n').map(Number).filter((n) => Number.isInteger(n) && n > 0);
  } catch {
    return []; // no such namespace: nothing runs in it
  }
}

/**
 * Remove what the layout names and still exists: namespaces (their processes
 * are SIGKILLed first, their veth ends go with them), veths, the bridge.
 * Names the layout does not list are never touched.
 */
export function removeNetns(layout: NetnsLayout): string[] {
  const removed: string[] = [];
  const present = new Set(listNetns());
  for (const h of layout.hosts) {
    if (!present.has(h.netns)) continue;
    for (const pid of netnsPids(h.netns)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* already gone */
      }
    }
    ip(['netns', 'del', h.netns]);
    removed.push(h.netns);
  }
  // The kernel tears a deleted namespace down in the background: its veth
  // ends (and their root-namespace peers) vanish a moment later.
  const veths = layout.hosts.map((h) => h.veth);
  const deadline = Date.now() + 3000;
  while (Date.now() < deadline && listLinks().some((l) => veths.includes(l))) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 20);
  for (const name of [...veths, layout.bridge]) {
    if (!listLinks().includes(name)) continue;
    try {
      ip(['link', 'del', name]);
    } catch (err) {
      if (!/Cannot find device/.test((err as Error).message)) throw err;
      // gone between the listing and the delete: the namespace teardown took it
    }
    removed.push(name);
  }
  return removed;
}

/** Take a host's link down or up (a partition of the host from all others). */
export function setHostLink(layout: NetnsLayout, host: string, up: boolean): void {
  const h = layout.hosts.find((x) => x.host === host);
  if (!h) throw new NetnsError('HYDRA_NETNS_FAILED', `no host "${host}" in the namespaced cluster (hosts: ${layout.hosts.map((x) => x.host).join(', ')})`);
  ip(['link', 'set', h.veth, up ? 'up' : 'down']);
}

/** The argv prefix that runs a command inside a host's namespace (network only; same files, same pids). */
export function inNetns(netns: string): string[] {
  return ['nsenter', `--net=/run/netns/${netns}`, '--'];
}

/** The namespace of a running process is `netns`? (tests, status). */
export function processInNetns(pid: number, netns: string): boolean {
  try {
    const a = fs.statSync(`/proc/${pid}/ns/net`);
    const b = fs.statSync(`/run/netns/${netns}`);
    return a.ino === b.ino && a.dev === b.dev;
  } catch {
    return false;
  }
}
