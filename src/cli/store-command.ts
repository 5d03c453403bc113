import type { Command } from 'commander';
import { SpecError } from '../errors.js';
import { parseDuration } from './duration.js';

export function registerStoreCommand(program: Command): void {
  program.command('store')
    .description('run a checkpoint store: receives checkpoints from many VMs and keeps their fail-over images')
    .requiredOption('--dir <dir>', 'directory for the images')
    .option('--listen <addr>', 'address to listen on, host:port', '127.0.0.1:7780')
    .option('--metrics <addr>', 'serve Prometheus metrics on host:port (GET /metrics)')
    .option('--secret-file <file>', 'cluster secret file (created if missing)')
    .option('--tls-cert <file>', 'serve TLS only, with this PEM certificate (chain); clients need --store-tls-ca')
    .option('--tls-key <file>', 'PEM private key of --tls-cert')
    .option('--idle-timeout <duration>', 'drop an authenticated connection silent this long (clients PING within a third of it)', '20s')
    .option('--etcd <urls>', 'cluster mode: register in etcd (under a lease) once this store holds the directory\'s lock, and fence itself when the lease is lost (etcd credentials from HYDRAVM_ETCD_*)')
    .option('--standby', 'cluster mode: when another store holds the directory, wait for its lock and take over when it frees')
    .option('--name <name>', 'cluster mode: this store\'s name (default store-HOSTNAME-PID)')
    .option('--advertise <addr>', 'cluster mode: host:port clients connect to (default: the address bound)')
    .option('--lease-ttl <seconds>', 'cluster mode: the store\'s etcd lease TTL', '3')
    .action(async (opts: { dir: string; listen: string; metrics?: string; secretFile?: string; tlsCert?: string; tlsKey?: string; idleTimeout: string; etcd?: string; standby?: boolean; name?: string; advertise?: string; leaseTtl: string }) => {
      if (!opts.tlsCert !== !opts.tlsKey) throw new SpecError('--tls-cert and --tls-key go together');
      if ((opts.standby || opts.name || opts.advertise) && !opts.etcd) throw new SpecError('--standby, --name and --advertise need --etcd (a standby finds out it is active through the directory\'s lock and tells the cluster through etcd)');
      const idleTimeoutMs = parseDuration(opts.idleTimeout, '--idle-timeout');
      const leaseTtlSec = Number(opts.leaseTtl);
      if (!Number.isInteger(leaseTtlSec) || leaseTtlSec < 1) throw new SpecError(`--lease-ttl must be a whole number of seconds >= 1, got ${JSON.stringify(opts.leaseTtl)}`);
      if (opts.advertise) (await import('../store/index.js')).parseAddress(opts.advertise);
      if (opts.etcd) return runClusterStoreCommand({ ...opts, etcd: opts.etcd, idleTimeoutMs, leaseTtlSec });
      const { startStoreServer } = await import('../store/index.js');
      const { loadSecret } = await import('../config/secret.js');
      const { Registry, collectDefaultMetrics } = await import('prom-client');
      const { log } = await import('../util/log.js');
      const registry = new Registry();
      collectDefaultMetrics({ register: registry, prefix: 'hydravm_store_process_' });
      const secret = loadSecret({ secretFile: opts.secretFile, create: true });
      const server = await startStoreServer({
        dir: opts.dir, listen: opts.listen, secret, metricsRegistry: registry, idleTimeoutMs,
        ...(opts.tlsCert && opts.tlsKey ? { tls: { certFile: opts.tlsCert, keyFile: opts.tlsKey } } : {}),
      });
      log.info({ address: server.address, dir: opts.dir }, 'checkpoint store listening');
      process.stdout.write(`checkpoint store listening on ${server.address}, images in ${opts.dir}${opts.tlsCert ? ', TLS' : ''}\n`);
      let metricsServer: { close(): Promise<unknown> } | undefined;
      if (opts.metrics) {
        const { default: Fastify } = await import('fastify');
        const app = Fastify();
        app.get('/metrics', async (_req, reply) => {
          reply.header('content-type', registry.contentType);
          return registry.metrics();
        });
        const [host, port] = splitAddr(opts.metrics);
        await app.listen({ host, port });
        metricsServer = app;
      }
      const shutdown = async () => {
        await server.close();
        await metricsServer?.close();
        process.exit(0);
      };
      process.on('SIGTERM', () => void shutdown());
      process.on('SIGINT', () => void shutdown());
    });
}

/** `hydravm store --etcd`: active or standby in a cluster; prints the same "listening on" line once it serves. */
async function runClusterStoreCommand(opts: { dir: string; listen: string; secretFile?: string; tlsCert?: string; tlsKey?: string; etcd: string; standby?: boolean; name?: string; advertise?: string; idleTimeoutMs: number; leaseTtlSec: number }): Promise<void> {
  const os = await import('node:os');
  const { ClusterStore, credentialsFrom } = await import('../ha/index.js');
  const credentials = credentialsFrom({});
  const { loadSecret } = await import('../config/secret.js');
  const secret = loadSecret({ secretFile: opts.secretFile, create: true });
  const name = opts.name ?? `store-${os.hostname()}-${process.pid}`;
  const store = new ClusterStore({
    server: { dir: opts.dir, listen: opts.listen, secret, idleTimeoutMs: opts.idleTimeoutMs, ...(opts.tlsCert && opts.tlsKey ? { tls: { certFile: opts.tlsCert, keyFile: opts.tlsKey } } : {}) },
    etcd: opts.etcd,
    ...(credentials ? { etcdOptions: { credentials } } : {}),
    name,
    standby: opts.standby ?? false,
    leaseTtlSec: opts.leaseTtlSec,
    ...(opts.advertise ? { advertise: opts.advertise } : {}),
    onActive: (address) => process.stdout.write(`checkpoint store listening on ${address}, images in ${opts.dir}${opts.tlsCert ? ', TLS' : ''} (active in the cluster as ${name})\n`),
    onFenced: (reason) => process.stdout.write(`checkpoint store ${name} fenced (${reason}); standby again\n`),
  });
  await store.start();
  if (store.state === 'standby') process.stdout.write(`standby store ${name} waiting for ${opts.dir}\n`);
  const shutdown = async () => {
    await store.stop();
    process.exit(0);
  };
  process.on('SIGTERM', () => void shutdown());
  process.on('SIGINT', () => void shutdown());
}

function splitAddr(addr: string): [string, number] {
  const i = addr.lastIndexOf(':');
  return [i > 0 ? addr.slice(0, i) : '127.0.0.1', Number(addr.slice(i + 1))];
}
