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
    .action(async (opts: { dir: string; listen: string; metrics?: string; secretFile?: string; tlsCert?: string; tlsKey?: string; idleTimeout: string }) => {
      if (!opts.tlsCert !== !opts.tlsKey) throw new SpecError('--tls-cert and --tls-key go together');
      const idleTimeoutMs = parseDuration(opts.idleTimeout, '--idle-timeout');
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

function splitAddr(addr: string): [string, number] {
  const i = addr.lastIndexOf(':');
  return [i > 0 ? addr.slice(0, i) : '127.0.0.1', Number(addr.slice(i + 1))];
}
