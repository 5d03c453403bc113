// One namespaced 3-host cluster per long test file: started before its tests, torn down after them (links up first, logs kept with HA_TEST_KEEP=DIR).
import fs from 'node:fs';
import path from 'node:path';
import { before, after } from 'node:test';
import { makeLab, type Lab } from './lab.js';
import { startNetnsCluster, setHostLink, type EmbeddedCluster } from '../../src/ha/index.js';

export interface NetnsRig {
  lab: Lab;
  /** Namespace prefix and /24 in use (HYDRAVM_TEST_NETNS_PREFIX / _SUBNET, else the file's defaults). */
  prefix: string;
  subnet: string;
  /** The running cluster (valid inside tests). */
  cluster(): EmbeddedCluster;
  hostOf(host: string): EmbeddedCluster['hosts'][number];
  /** The serial log of `vm` under `host`'s home. */
  serialOn(host: string, vm: string): string;
  /** Run `fn` with HYDRAVM_HOME set to `host`'s home (the CLI helpers read it). */
  withHome<T>(host: string, fn: () => T): T;
}

export function netnsRig(labName: string, defaults: { prefix: string; subnet: string }): NetnsRig {
  const lab = makeLab(labName);
  const prefix = process.env.HYDRAVM_TEST_NETNS_PREFIX ?? defaults.prefix;
  const subnet = process.env.HYDRAVM_TEST_NETNS_SUBNET ?? defaults.subnet;
  let cluster: EmbeddedCluster | undefined;
  before(async () => {
    cluster = await startNetnsCluster({ dir: path.join(lab.home, 'cluster'), hosts: 3, prefix, subnet, env: { HYDRAVM_SECRET: lab.env.HYDRAVM_SECRET } });
  });
  after(async () => {
    // A test that failed mid-partition leaves a link down: bring it up so the stop reaches every daemon.
    if (cluster?.netns) for (const h of cluster.netns.hosts) try { setHostLink(cluster.netns, h.host, true); } catch { /* the cluster may be gone already */ }
    await cluster?.stop();
    if (process.env.HA_TEST_KEEP && cluster) fs.cpSync(path.join(cluster.dir, 'logs'), process.env.HA_TEST_KEEP, { recursive: true });
    lab.cleanup();
  });
  const hostOf = (host: string) => cluster!.hosts.find((h) => h.host === host)!;
  return {
    lab, prefix, subnet,
    cluster: () => cluster!,
    hostOf,
    serialOn: (host, vm) => path.join(hostOf(host).home, 'vms', vm, 'serial.log'),
    withHome<T>(host: string, fn: () => T): T {
      const saved = process.env.HYDRAVM_HOME;
      process.env.HYDRAVM_HOME = hostOf(host).home;
      try {
        return fn();
      } finally {
        process.env.HYDRAVM_HOME = saved;
      }
    },
  };
}
