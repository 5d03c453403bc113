// Test networks: a bridge (and optionally a client namespace on it) with names and addresses tests may use.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';

/**
 * Interface and namespace names start with HYDRAVM_TEST_NET_PREFIX (default
 * "hvt-"); addresses come from HYDRAVM_TEST_SUBNET (default 198.18.90, a
 * /24 of the benchmarking range 198.18.0.0/15). Everything made is removed by
 * `remove()`, also after a failed test.
 */
export const NET_PREFIX = process.env.HYDRAVM_TEST_NET_PREFIX ?? 'hvt-';
export const SUBNET = process.env.HYDRAVM_TEST_SUBNET ?? '198.18.90';

const ip = (...args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'pipe', 'pipe'] }).toString();
const tryIp = (...args: string[]) => { try { ip(...args); } catch { /* already gone */ } };

export interface TestNet {
  bridge: string;
  /** Client namespace on the bridge (with clientAddr), if asked for. */
  ns?: string;
  clientAddr?: string;
  /** Run a command inside the client namespace (argv of `ip netns exec NS ...`). */
  inNs(cmd: string[]): string[];
  remove(): void;
}

export function makeTestNet(tag: string, opts: { clientHost?: number } = {}): TestNet {
  const bridge = `${NET_PREFIX}${tag}br`;
  const ns = opts.clientHost ? `${NET_PREFIX}${tag}ns` : undefined;
  const veth = `${NET_PREFIX}${tag}v`;
  const made: (() => void)[] = [];
  const net: TestNet = {
    bridge,
    inNs: (cmd) => ['ip', 'netns', 'exec', ns!, ...cmd],
    remove() { for (const undo of made.reverse()) undo(); made.length = 0; },
  };
  // Leftovers of a crashed earlier run of this test go first.
  if (ns) tryIp('netns', 'del', ns);
  tryIp('link', 'del', veth);
  tryIp('link', 'del', bridge);
  try {
    ip('link', 'add', bridge, 'type', 'bridge');
    made.push(() => tryIp('link', 'del', bridge));
    ip('link', 'set', bridge, 'up');
    if (ns && opts.clientHost) {
      ip('netns', 'add', ns);
      made.push(() => tryIp('netns', 'del', ns));
      ip('link', 'add', veth, 'type', 'veth', 'peer', 'name', `${veth}p`);
      made.push(() => tryIp('link', 'del', veth));
      ip('link', 'set', `${veth}p`, 'netns', ns);
      ip('link', 'set', veth, 'master', bridge);
      ip('link', 'set', veth, 'up');
      net.clientAddr = `${SUBNET}.${opts.clientHost}`;
      ip('-n', ns, 'addr', 'add', `${net.clientAddr}/24`, 'dev', `${veth}p`);
      ip('-n', ns, 'link', 'set', `${veth}p`, 'up');
      ip('-n', ns, 'link', 'set', 'lo', 'up');
      net.ns = ns;
    }
  } catch (err) {
    net.remove();
    throw err;
  }
  return net;
}

export function tapMaster(tap: string): string | undefined {
  try {
    return fs.readlinkSync(`/sys/class/net/${tap}/master`).split('/').pop();
  } catch {
    return undefined;
  }
}

export const linkExists = (name: string) => fs.existsSync(`/sys/class/net/${name}`);
