import { cowOption } from './cow-option.js';
import path from 'node:path';
import type { Command } from 'commander';
import { credentialsFrom, type ClusterOptions } from '../ha/index.js';
import { bytes, ms, printJson, table } from './format.js';
import { parseDuration } from './duration.js';
import { SpecError } from '../errors.js';

/** etcd endpoint: --etcd, else HYDRAVM_ETCD, else the embedded cluster's (--dir or the default dir). */
async function resolveEtcd(opts: { etcd?: string; dir?: string }): Promise<string> {
  if (opts.etcd) return opts.etcd;
  if (process.env.HYDRAVM_ETCD) return process.env.HYDRAVM_ETCD;
  const { readClusterInfo, defaultClusterDir } = await import('../ha/index.js');
  const info = readClusterInfo(opts.dir ?? defaultClusterDir());
  if (info) return info.etcdUrl;
  throw new SpecError('no etcd endpoint: give --etcd URL, set HYDRAVM_ETCD, or start an embedded cluster with `hydravm cluster up`');
}

interface EtcdFlags { etcd?: string; dir?: string; etcdCa?: string; etcdCert?: string; etcdKey?: string; etcdUser?: string; etcdPassword?: string }

/** The etcd TLS and auth flags every command that talks to etcd takes (HYDRAVM_ETCD_* when absent). */
function etcdSecurityFlags(cmd: Command): Command {
  return cmd
    .option('--etcd-ca <file>', 'CA certificate (PEM) to verify etcd\'s TLS certificate (default $HYDRAVM_ETCD_CA)')
    .option('--etcd-cert <file>', 'client certificate (PEM) for etcd\'s client-cert-auth (default $HYDRAVM_ETCD_CERT)')
    .option('--etcd-key <file>', 'client key (PEM) of --etcd-cert (default $HYDRAVM_ETCD_KEY)')
    .option('--etcd-user <name>', 'etcd user, with auth enabled in etcd (default $HYDRAVM_ETCD_USER)')
    .option('--etcd-password <password>', 'that user\'s password (default $HYDRAVM_ETCD_PASSWORD; prefer the variable: flags show in ps)');
}

function etcdOptions(opts: EtcdFlags): ClusterOptions {
  const credentials = credentialsFrom(opts);
  return credentials ? { credentials } : {};
}

function positiveInt(v: string, what: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new SpecError(`${what}: "${v}" is not a positive integer`);
  return n;
}

/** Run until SIGTERM/SIGINT, then stop cleanly. */
function untilSignal(stop: () => Promise<void>): Promise<void> {
  return new Promise((resolve) => {
    let stopping = false;
    const handler = () => {
      if (stopping) return;
      stopping = true;
      void stop().finally(resolve);
    };
    process.on('SIGTERM', handler);
    process.on('SIGINT', handler);
  });
}

export function registerHaCommands(program: Command): void {
  etcdSecurityFlags(program.command('agent'))
    .description('run the host agent in the foreground: lease, VM death reports, restores, fencing')
    .requiredOption('--host <name>', 'this host\'s name in the cluster')
    .option('--etcd <urls>', 'etcd endpoint(s), comma-separated (default $HYDRAVM_ETCD)')
    .option('--home <dir>', 'this host\'s HYDRAVM_HOME (default $HYDRAVM_HOME)')
    .option('--memory <size>', 'memory this host offers to VMs, e.g. 4G (default: all)')
    .option('--address <addr>', 'address announced for this host')
    .option('--lease-ttl <seconds>', 'lease TTL', '1')
    .option('--secret-file <file>', 'cluster secret for restores (default $HYDRAVM_HOME/cluster.secret or $HYDRAVM_SECRET)')
    .option('--watchdog-margin <ms>', 'VM supervisors kill QEMU this long before the lease could expire', '250')
    .option('--hw-watchdog <device>', 'opt-in: also feed this Linux watchdog device (e.g. /dev/watchdog) on lease proof; the host resets when it starves')
    .option('--hw-watchdog-timeout <seconds>', 'the device\'s configured timeout (softdog: soft_margin); must be < 2/3 of --lease-ttl', '')
    .action(async (opts: EtcdFlags & { host: string; home?: string; memory?: string; address?: string; leaseTtl: string; secretFile?: string; watchdogMargin: string; hwWatchdog?: string; hwWatchdogTimeout: string }) => {
      // Restore and protection act on HYDRAVM_HOME: this process is the host.
      if (opts.home) process.env.HYDRAVM_HOME = path.resolve(opts.home);
      const { parseSize } = await import('../vm/index.js');
      const { HostAgent } = await import('../ha/index.js');
      const etcd = await resolveEtcd(opts);
      const agent = new HostAgent({
        host: opts.host,
        etcd,
        home: opts.home,
        address: opts.address,
        memoryBytes: opts.memory ? parseSize(opts.memory, '--memory') : undefined,
        leaseTtlSec: positiveInt(opts.leaseTtl, '--lease-ttl'),
        secretFile: opts.secretFile,
        etcdOptions: etcdOptions(opts),
        watchdogMarginMs: positiveInt(opts.watchdogMargin, '--watchdog-margin'),
        ...(opts.hwWatchdog ? { hwWatchdog: { device: opts.hwWatchdog, timeoutSec: positiveInt(opts.hwWatchdogTimeout, '--hw-watchdog-timeout') } } : {}),
      });
      await agent.start();
      await untilSignal(() => agent.stop());
    });

  etcdSecurityFlags(program.command('manager'))
    .description('run a fail-over manager in the foreground (several may run: one is elected)')
    .option('--etcd <urls>', 'etcd endpoint(s), comma-separated (default $HYDRAVM_ETCD)')
    .option('--id <id>', 'name announced in the election (default HOSTNAME:PID)')
    .option('--leader-ttl <seconds>', 'election lease TTL', '2')
    .option('--restore-timeout <duration>', 'a restore taking longer is retried elsewhere', '120s')
    .option('--fence-margin <ms>', 'after a host is declared dead (or its lease expiry is seen), wait this long before restoring its VMs elsewhere', '500')
    .action(async (opts: EtcdFlags & { id?: string; leaderTtl: string; restoreTimeout: string; fenceMargin: string }) => {
      const { FailoverManager } = await import('../ha/index.js');
      const m = new FailoverManager({
        etcd: await resolveEtcd(opts),
        id: opts.id,
        leaderTtlSec: positiveInt(opts.leaderTtl, '--leader-ttl'),
        restoreTimeoutMs: parseDuration(opts.restoreTimeout, '--restore-timeout'),
        fenceMarginMs: opts.fenceMargin === '0' ? 0 : positiveInt(opts.fenceMargin, '--fence-margin'),
        etcdOptions: etcdOptions(opts),
      });
      await m.start();
      await untilSignal(() => m.stop());
    });

  const cluster = program.command('cluster').description('the HA cluster: embedded etcd + manager + agents, status, protection');

  cluster.command('up')
    .description('start an embedded cluster on this machine: etcd, a manager and N agents (each a "host" with its own HYDRAVM_HOME), detached')
    .option('--dir <dir>', 'cluster directory (pid files in run/, logs in logs/, hosts in hosts/)', undefined)
    .option('--hosts <n|names>', 'number of hosts, or comma-separated names', '2')
    .option('--host-memory <size>', 'memory each host offers to VMs, e.g. 2G')
    .option('--etcd-port <port>', 'etcd client port (default: a free one)')
    .option('--lease-ttl <seconds>', 'host lease TTL (default 1; 5 with --netns)')
    .option('--secret-file <file>', 'cluster secret (default DIR/cluster.secret, created)')
    .option('--netns', 'each host in its own network namespace on one bridge, with its own etcd member (a 3-member etcd for 3 hosts) and its own checkpoint store (needs root)')
    .option('--no-stores', 'start no checkpoint stores (default: one per host on DIR/shared/store, the first active, the others standbys)')
    .option('--netns-prefix <prefix>', 'name prefix of the namespaces, bridge and veths', 'hvm-')
    .option('--netns-subnet <cidr>', 'the hosts\' /24 inside 198.18.0.0/15 (bridge .1, hosts .11, .12, ...)', '198.18.100.0/24')
    .option('--json', 'print the cluster description as JSON')
    .action(async (opts: { dir?: string; hosts: string; hostMemory?: string; etcdPort?: string; leaseTtl?: string; secretFile?: string; json?: boolean; netns?: boolean; netnsPrefix: string; netnsSubnet: string; stores: boolean }) => {
      if (opts.netns && !opts.stores) throw new SpecError('--no-stores: a namespaced cluster always runs a store per host');
      const { startEmbeddedCluster, startNetnsCluster } = await import('../ha/index.js');
      const { parseSize } = await import('../vm/index.js');
      const hosts = /^\d+$/.test(opts.hosts) ? positiveInt(opts.hosts, '--hosts') : opts.hosts.split(',').map((s) => s.trim()).filter(Boolean);
      if (opts.netns && opts.etcdPort) throw new SpecError('--etcd-port: namespaced hosts run their etcd members on port 2379 of their own address');
      const c = opts.netns ? await startNetnsCluster({
        dir: opts.dir,
        hosts,
        prefix: opts.netnsPrefix,
        subnet: opts.netnsSubnet,
        hostMemoryBytes: opts.hostMemory ? parseSize(opts.hostMemory, '--host-memory') : undefined,
        leaseTtlSec: opts.leaseTtl === undefined ? undefined : positiveInt(opts.leaseTtl, '--lease-ttl'),
        secretFile: opts.secretFile,
      }) : await startEmbeddedCluster({
        dir: opts.dir,
        hosts,
        hostMemoryBytes: opts.hostMemory ? parseSize(opts.hostMemory, '--host-memory') : undefined,
        etcdPort: opts.etcdPort ? positiveInt(opts.etcdPort, '--etcd-port') : undefined,
        leaseTtlSec: positiveInt(opts.leaseTtl ?? '1', '--lease-ttl'),
        secretFile: opts.secretFile,
        stores: opts.stores,
      });
      c.cluster.close();
      const { cluster: _c, stop: _s, ...info } = c;
      if (opts.json) return printJson(info);
      process.stdout.write(`cluster up in ${c.dir}\n  etcd     ${c.etcdUrl} (pid ${(c.etcdMembers ?? [c.etcd]).map((m) => m.pid).join(', ')})\n  manager  pid ${c.manager?.pid}\n`);
      if (c.store) process.stdout.write(`  store    ${c.store.name} ${c.store.address} (pid ${c.store.pid}) active, directory ${c.store.dir}; protect VMs with --store cluster to follow the active store\n`);
      for (const s of (c.stores ?? []).slice(1)) process.stdout.write(`  store    ${s.name} (pid ${s.pid}) standby\n`);
      if (c.netns) process.stdout.write(`  bridge   ${c.netns.bridge} ${c.netns.bridgeAddress}\n`);
      for (const h of c.hosts) process.stdout.write(`  ${h.host.padEnd(8)} pid ${h.pid}, HYDRAVM_HOME=${h.home}${h.netns ? `, netns ${h.netns} ${h.address}` : ''}\n`);
      process.stdout.write(`  logs     ${path.join(c.dir, 'logs')}\n  export HYDRAVM_ETCD=${c.etcdUrl}\n`);
    });

  cluster.command('down')
    .description('stop the embedded cluster: manager, agents (they kill their HA VMs), etcd')
    .option('--dir <dir>', 'cluster directory')
    .action(async (opts: { dir?: string }) => {
      const { stopEmbeddedCluster, defaultClusterDir } = await import('../ha/index.js');
      const dir = opts.dir ?? defaultClusterDir();
      process.stdout.write((await stopEmbeddedCluster(dir)) ? `cluster in ${dir} stopped\n` : `no cluster in ${dir}\n`);
    });

  cluster.command('partition')
    .description('namespaced cluster: cut HOST off from every other host, etcd member and store (its veth goes down)')
    .argument('<host>')
    .option('--dir <dir>', 'cluster directory')
    .action(async (host: string, opts: { dir?: string }) => {
      const { readClusterInfo, defaultClusterDir, setHostLink } = await import('../ha/index.js');
      const dir = opts.dir ?? defaultClusterDir();
      const info = readClusterInfo(dir);
      if (!info?.netns) throw new SpecError(`no namespaced cluster in ${dir} (\`hydravm cluster up --netns\`)`);
      setHostLink(info.netns, host, false);
      process.stdout.write(`${host} partitioned (link ${info.netns.hosts.find((h) => h.host === host)!.veth} down); \`hydravm cluster heal\` reconnects it\n`);
    });

  cluster.command('heal')
    .description('namespaced cluster: bring every host\'s link back up')
    .option('--dir <dir>', 'cluster directory')
    .action(async (opts: { dir?: string }) => {
      const { readClusterInfo, defaultClusterDir, setHostLink } = await import('../ha/index.js');
      const dir = opts.dir ?? defaultClusterDir();
      const info = readClusterInfo(dir);
      if (!info?.netns) throw new SpecError(`no namespaced cluster in ${dir} (\`hydravm cluster up --netns\`)`);
      for (const h of info.netns.hosts) setHostLink(info.netns, h.host, true);
      process.stdout.write('every host link is up\n');
    });

  etcdSecurityFlags(cluster.command('status'))
    .description('hosts (liveness, free memory), VMs (host, generation, state), the active manager, recent events')
    .option('--etcd <urls>', 'etcd endpoint(s)')
    .option('--dir <dir>', 'embedded cluster directory (for its etcd URL)')
    .option('--events <n>', 'recent events to show', '10')
    .option('--json', 'machine-readable output')
    .action(async (opts: EtcdFlags & { events: string; json?: boolean }) => {
      const { Cluster } = await import('../ha/index.js');
      const { clusterStatus } = await import('../ha/index.js');
      const c = new Cluster(await resolveEtcd(opts), etcdOptions(opts));
      try {
        const s = await clusterStatus(c, { events: Number(opts.events) || 0 });
        if (opts.json) return printJson(s);
        process.stdout.write(`manager: ${s.leader ?? 'NONE ELECTED'}\n`);
        const st = s.stores;
        if (st.active || st.standbys.length) {
          process.stdout.write(table(['STORE', 'ROLE', 'ADDRESS', 'PID', 'SINCE', 'DIRECTORY'], [
            ...(st.active ? [st.active] : []), ...st.standbys,
          ].map((r) => [r.name, r.role, r.address || '-', r.pid, new Date(r.since).toISOString(), r.dir])) + '\n');
          if (!st.active) process.stdout.write('no active checkpoint store: checkpoints stall until a standby takes over\n');
        } else process.stdout.write('checkpoint stores: none registered in etcd\n');
        process.stdout.write('\n');
        process.stdout.write(table(['HOST', 'ALIVE', 'FREE', 'TOTAL', 'VMS', 'SHELLS', 'HOME'], s.hosts.map((h) => h.alive
          ? [h.name, 'yes', bytes(h.freeMemoryBytes), bytes(h.totalMemoryBytes), h.vms.join(',') || '-', (h.shells ?? []).map((x) => `${x.idle}x ${x.key}`).join(', ') || '-', h.home]
          : [h.name, 'NO', undefined, undefined, undefined, undefined, h.home])) + '\n\n');
        if (s.vms.length === 0) process.stdout.write('no VMs under HA\n');
        else process.stdout.write(table(['VM', 'HOST', 'GEN', 'IMAGE', 'STATE', 'STORE', 'MODE', 'REASON'], s.vms.map((v) => [
          v.name, v.hostAlive ? v.host : `${v.host} (dead)`, v.generation, v.imageGeneration, v.state, v.store, v.mode, v.reason,
        ])) + '\n');
        if (s.events.length) {
          process.stdout.write('\nrecent events:\n');
          for (const e of s.events) process.stdout.write(`  ${new Date(e.at).toISOString()}  ${e.kind.padEnd(15)} ${e.message}\n`);
        }
      } finally {
        c.close();
      }
    });

  etcdSecurityFlags(cluster.command('protect'))
    .description('put a running VM under HA: its host\'s agent protects it (new generation) and the manager fails it over')
    .argument('<vm>', 'VM name')
    .requiredOption('--host <name>', 'host (agent) the VM runs on')
    .option('--store <addr>', 'checkpoint store address host:port, or "cluster": the active store registered in etcd, followed across store fail-overs', 'cluster')
    .option('--store-dir <dir>', 'the store\'s directory, for file-mode restores on this machine')
    .option('--mode <mode>', 'restore mode: network (pages from the store) | file (maps the image; needs --store-dir)', 'network')
    .option('--interval <duration>', 'checkpoint interval', '2s')
    .option('--cow', 'copy-on-write checkpoints: the pause only re-arms write protection; pages are copied after the VM resumes')
    .option('--grain <size>', 'copy-on-write grain, a power of two from 4K to 2M (default 64K)')
    .option('--etcd <urls>', 'etcd endpoint(s)')
    .option('--dir <dir>', 'embedded cluster directory (for its etcd URL)')
    .option('--no-wait', 'return once registered, without waiting for the first checkpoint')
    .action(async (vm: string, opts: EtcdFlags & { host: string; store: string; storeDir?: string; mode: string; interval: string; cow?: boolean; grain?: string; wait: boolean }) => {
      if (opts.mode !== 'file' && opts.mode !== 'network') throw new SpecError(`--mode: "${opts.mode}" is not file or network`);
      if (opts.mode === 'file' && !opts.storeDir) throw new SpecError('--mode file restores map the image file: give the store directory as the hosts see it (--store-dir)');
      const { Cluster } = await import('../ha/index.js');
      const { protectInCluster } = await import('../ha/index.js');
      const c = new Cluster(await resolveEtcd(opts), etcdOptions(opts));
      try {
        const r = await protectInCluster(c, { vm, host: opts.host, store: opts.store, storeDir: opts.storeDir ? path.resolve(opts.storeDir) : undefined, mode: opts.mode, intervalMs: parseDuration(opts.interval, '--interval'), ...cowOption(opts) }, { wait: opts.wait });
        process.stdout.write(`VM ${vm} on ${r.host}: ${r.state}${r.state === 'protected' ? ` at generation ${r.generation}` : ''}\n`);
        if (opts.cow && opts.mode === 'file') {
          const { COW_PRIVATE_RAM_REASON } = await import('../checkpoint/index.js');
          process.stdout.write(`VM ${vm}: after a fail-over it is checkpointed in basic mode, copy-on-write needs network-mode restores: ${COW_PRIVATE_RAM_REASON}\n`);
        }
      } finally {
        c.close();
      }
    });

  etcdSecurityFlags(cluster.command('forget'))
    .description('take a VM out of HA (it keeps running, no longer guarded)')
    .argument('<vm>')
    .option('--etcd <urls>', 'etcd endpoint(s)')
    .option('--dir <dir>', 'embedded cluster directory (for its etcd URL)')
    .action(async (vm: string, opts: EtcdFlags) => {
      const { Cluster } = await import('../ha/index.js');
      const { forgetVm } = await import('../ha/index.js');
      const c = new Cluster(await resolveEtcd(opts), etcdOptions(opts));
      try {
        process.stdout.write((await forgetVm(c, vm)) ? `VM ${vm} removed from the cluster\n` : `VM ${vm} was not in the cluster\n`);
      } finally {
        c.close();
      }
    });

  etcdSecurityFlags(cluster.command('timings'))
    .description('fail-over timings recorded by the manager and agents (detection, restore, total)')
    .argument('[vm]')
    .option('--etcd <urls>', 'etcd endpoint(s)')
    .option('--dir <dir>', 'embedded cluster directory (for its etcd URL)')
    .option('--json', 'machine-readable output')
    .action(async (vm: string | undefined, opts: EtcdFlags & { json?: boolean }) => {
      const { Cluster } = await import('../ha/index.js');
      const c = new Cluster(await resolveEtcd(opts), etcdOptions(opts));
      try {
        const ts = await c.timings(vm);
        if (opts.json) return printJson(ts);
        if (ts.length === 0) return void process.stdout.write('no fail-overs recorded\n');
        process.stdout.write(table(['VM', 'GEN', 'CAUSE', 'FROM', 'TO', 'DETECT', 'ASSIGN', 'RESTORE', 'SPAWN→RUN', 'TOTAL', 'ERROR'], ts.map((t) => [
          t.vm, t.generation, t.cause, t.fromHost, t.toHost, ms(t.detectionMs), ms(t.assignedAt - t.detectedAt), ms(t.restoreMs), ms(t.spawnToRunningMs), ms(t.totalMs), t.error,
        ])) + '\n');
      } finally {
        c.close();
      }
    });
}
