/** Prometheus metrics of the checkpoint store. */
import client from 'prom-client';

export interface StoreMetrics {
  commits: client.Counter<'vm'>;
  commitSeconds: client.Histogram<string>;
  applySeconds: client.Histogram<string>;
  bytes: client.Counter<'vm'>;
  committedEpoch: client.Gauge<'vm'>;
}

/** The registry used when none is passed in. */
export const storeRegistry = new client.Registry();

const cache = new WeakMap<client.Registry, StoreMetrics>();

/** The store's metrics on `registry` (created once per registry). */
export function storeMetrics(registry: client.Registry = storeRegistry): StoreMetrics {
  let m = cache.get(registry);
  if (m) return m;
  m = {
    commits: new client.Counter({ name: 'hydravm_store_commits_total', help: 'Checkpoints committed (durable) by the store', labelNames: ['vm'], registers: [registry] }),
    commitSeconds: new client.Histogram({
      name: 'hydravm_store_commit_seconds',
      help: 'Time from COMMIT received to the checkpoint being durable (COMMITTED sent)',
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4],
      registers: [registry],
    }),
    applySeconds: new client.Histogram({
      name: 'hydravm_store_apply_seconds',
      help: 'Time to apply a durable journalled checkpoint to the image and advance meta.json',
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2],
      registers: [registry],
    }),
    bytes: new client.Counter({ name: 'hydravm_store_bytes_total', help: 'Page bytes committed by the store', labelNames: ['vm'], registers: [registry] }),
    committedEpoch: new client.Gauge({ name: 'hydravm_store_committed_epoch', help: 'Committed epoch of the newest generation per VM', labelNames: ['vm'], registers: [registry] }),
  };
  cache.set(registry, m);
  return m;
}
