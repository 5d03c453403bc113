/**
 * The checkpoint store daemon: a TCP server speaking the HydraVM store
 * protocol (src/protocol). One connection = one peer (checkpointer or reader)
 * of one VM generation. Frames of a connection are handled strictly in order;
 * while the disk is behind, reading from the socket pauses (bounded memory).
 */
import net from 'node:net';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { Registry } from 'prom-client';
import type { Logger } from 'pino';
import { HydraError, ProtocolError, StoreError, isHydraCode } from '../errors.js';
import { log as rootLog } from '../util/log.js';
import {
  FrameDecoder, FrameFlag, FrameType, MAX_PAGES_DATA, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, encodeFrameParts, frameTypeName,
  FEATURE_HOT, MAX_HOT_PER_FRAME, authSchema, batchRuns, beginSchema, commitSchema, decodeJson, decodePages, disksSchema, encodeHot, encodeJson, encodeRunTable,
  getDevstateSchema, getHotSchema, getMetaSchema, helloSchema, makeNonce, verifyAuth, type Frame, type Hello, type HotRegion,
} from '../protocol/index.js';
import { FaultInjector } from './faults.js';
import { storeMetrics } from './metrics.js';
import { pidAlive } from '../util/pid.js';
import { Store } from './store.js';
import type { Checkpoint } from './checkpoint.js';
import type { GenerationImage } from './generation-image.js';

/** Largest READ_PAGES request served in one reply (the reply is read under the lock, then sent). */
export const MAX_READ_BYTES = 32 * 1024 * 1024;
/** Queued, unprocessed frame bytes per connection above which the socket is paused. */
const HIGH_WATER = 24 * 1024 * 1024;
const LOW_WATER = 8 * 1024 * 1024;

export interface StoreServerOptions {
  dir: string;
  /** 'host:port' (port 0 = any free port). */
  listen: string;
  /** The cluster shared secret. */
  secret: string;
  metricsRegistry?: Registry;
  /** Crash-injection spec (`point:n,...`); defaults to env HYDRAVM_STORE_CRASH_AT. */
  faultInjection?: string;
  /** When COMMITTED is sent: 'journal' (default: journal durable, apply follows under the lock) or 'applied'. */
  commitAck?: 'journal' | 'applied';
  /** Handshake timeout per connection (ms), default 10 s. */
  handshakeTimeoutMs?: number;
}

export interface StoreServer {
  /** 'host:port' actually bound. */
  address: string;
  store: Store;
  close(): Promise<void>;
}

/** Store instances served by this process, by directory (openVmImage uses them in-process). */
export const liveStores = new Map<string, Store>();

export function parseAddress(addr: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(addr);
  if (!m) throw new StoreError('HYDRA_STORE_BAD_ADDRESS', `bad address ${JSON.stringify(addr)}: expected host:port`);
  return { host: m[1] ?? (m[2] || '0.0.0.0'), port: Number(m[3]) };
}

export async function startStoreServer(opts: StoreServerOptions): Promise<StoreServer> {
  if (!opts.secret) throw new StoreError('HYDRA_STORE_NO_SECRET', 'the store needs the cluster shared secret');
  const faults = new FaultInjector(opts.faultInjection ?? process.env.HYDRAVM_STORE_CRASH_AT);
  const store = await Store.open(opts.dir, { faults, metrics: storeMetrics(opts.metricsRegistry), ...(opts.commitAck ? { commitAck: opts.commitAck } : {}) });
  await takeDirLock(store.dir);
  liveStores.set(store.dir, store);
  const slog = rootLog.child({ component: 'store', dir: store.dir });
  if (faults.enabled) slog.warn({ spec: opts.faultInjection ?? process.env.HYDRAVM_STORE_CRASH_AT }, 'crash injection enabled');
  // Recover every generation now, so no half-applied image waits for its first visitor.
  for (const v of await store.listVms()) {
    slog.debug({ vm: v.vm, generations: v.generations.length }, 'recovered');
  }

  const conns = new Set<Connection>();
  const server = net.createServer((sock) => {
    const c = new Connection(sock, store, opts.secret, opts.handshakeTimeoutMs ?? 10_000, slog);
    conns.add(c);
    sock.on('close', () => conns.delete(c));
  });
  const { host, port } = parseAddress(opts.listen);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const a = server.address() as net.AddressInfo;
  const address = `${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}`;
  slog.info({ address }, 'checkpoint store listening');
  let closed = false;
  return {
    address,
    store,
    async close() {
      if (closed) return;
      closed = true;
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const c of conns) c.destroy();
      });
      await Promise.all([...conns].map((c) => c.idle()));
      await store.close();
      liveStores.delete(store.dir);
      // The lock names a pid that is gone now; a leftover is taken over by the next start.
      await fs.rm(path.join(store.dir, 'store.lock'), { force: true }).catch(() => undefined);
      slog.info('checkpoint store stopped');
    },
  };
}

/** One daemon per store directory: DIR/store.lock holds "pid hostname". */
async function takeDirLock(dir: string): Promise<void> {
  const file = path.join(dir, 'store.lock');
  try {
    const [pidText, host] = (await fs.readFile(file, 'utf8')).trim().split(/\s+/);
    const pid = Number(pidText);
    if (pid !== process.pid && host === os.hostname() && pidAlive(pid)) {
      throw new StoreError('HYDRA_STORE_DIR_BUSY', `store directory ${dir} is served by process ${pid} (${file})`);
    }
  } catch (err) {
    if (err instanceof HydraError) throw err;
  }
  await fs.writeFile(file, `${process.pid} ${os.hostname()}\n`);
}

type Phase = 'hello' | 'auth' | 'ready' | 'closed';

class Connection {
  private phase: Phase = 'hello';
  private readonly decoder = new FrameDecoder();
  private chain: Promise<void> = Promise.resolve();
  private queued = 0;
  private paused = false;
  private nonce: Buffer | null = null;
  private hello: Hello | null = null;
  private version = PROTOCOL_VERSION;
  private log: Logger;
  private gen: GenerationImage | null = null;
  private release: (() => void) | null = null;
  private cp: Checkpoint | null = null;
  /** Error that ended the current checkpoint early (sent unsolicited); data frames are ignored until BEGIN. */
  private cpFailed: HydraError | null = null;
  private readonly timer: NodeJS.Timeout;

  constructor(private readonly sock: net.Socket, private readonly store: Store, private readonly secret: string, handshakeMs: number, parent: Logger) {
    this.log = parent.child({ peer: `${sock.remoteAddress}:${sock.remotePort}` });
    sock.setNoDelay(true);
    this.timer = setTimeout(() => {
      if (this.phase !== 'ready') this.fail(new ProtocolError('HYDRA_PROTOCOL_TIMEOUT', `handshake not completed within ${handshakeMs} ms`));
    }, handshakeMs);
    sock.on('data', (chunk: Buffer) => this.onData(chunk));
    sock.on('error', (err) => this.log.debug({ err: err.message }, 'socket error'));
    sock.on('close', () => this.onClose());
  }

  destroy(): void {
    this.sock.destroy();
  }

  idle(): Promise<void> {
    return this.chain;
  }

  private onData(chunk: Buffer): void {
    if (this.phase === 'closed') return;
    let frames: Frame[];
    try {
      frames = this.decoder.push(chunk);
    } catch (err) {
      this.fail(err as HydraError);
      return;
    }
    for (const f of frames) {
      this.queued += f.payload.length;
      this.chain = this.chain.then(() => this.handle(f)).finally(() => {
        this.queued -= f.payload.length;
        if (this.paused && this.queued < LOW_WATER && this.phase !== 'closed') {
          this.paused = false;
          this.sock.resume();
        }
      });
    }
    if (!this.paused && this.queued > HIGH_WATER) {
      this.paused = true;
      this.sock.pause();
    }
  }

  private onClose(): void {
    const wasMid = this.decoder.midFrame;
    this.phase = 'closed';
    clearTimeout(this.timer);
    this.chain = this.chain.then(async () => {
      if (this.cp) {
        await this.cp.abort(`peer disconnected mid-checkpoint${wasMid ? ' (inside a frame)' : ''}`).catch((err) => this.log.warn({ err: (err as Error).message }, 'abort failed'));
        this.cp = null;
      }
      this.release?.();
      this.release = null;
    });
  }

  /** Send a frame; resolves when the socket accepted it without exceeding its buffer (drain). */
  private async send(type: FrameType, payload: Buffer, flags = 0, crc?: number): Promise<void> {
    if (this.sock.destroyed) return;
    const [h, p] = encodeFrameParts(type, payload, { flags, version: this.version, ...(crc !== undefined ? { crc } : {}) });
    this.sock.cork();
    this.sock.write(h);
    const ok = this.sock.write(p);
    this.sock.uncork();
    if (!ok) await waitDrain(this.sock);
  }

  private async sendError(err: unknown, unsolicited = false): Promise<void> {
    const e = err as HydraError;
    const code = isHydraCode(e?.code) ? e.code : 'HYDRA_STORE_INTERNAL';
    await this.send(FrameType.ERROR, encodeJson({ code, message: e?.message ?? String(err), ...(unsolicited ? { unsolicited: true } : {}), committedEpoch: this.gen?.meta?.committedEpoch ?? null }));
  }

  /** Fatal: tell the peer why, then close. */
  private fail(err: HydraError): void {
    if (this.phase === 'closed') return;
    this.log.info({ code: err.code, err: err.message }, 'closing connection');
    void this.sendError(err).finally(() => this.sock.end());
    this.phase = 'closed';
    setTimeout(() => this.sock.destroy(), 1000).unref();
  }

  private async handle(f: Frame): Promise<void> {
    if (this.phase === 'closed' && f.type !== FrameType.ABORT) return;
    try {
      switch (this.phase) {
        case 'hello':
          return await this.onHello(f);
        case 'auth':
          return await this.onAuth(f);
        case 'ready':
          return await this.onRequest(f);
      }
    } catch (err) {
      if (err instanceof ProtocolError) return this.fail(err);
      this.log.error({ err: (err as Error).message, stack: (err as Error).stack }, 'unexpected error');
      return this.fail(new StoreError('HYDRA_STORE_INTERNAL', `internal store error: ${(err as Error).message}`));
    }
  }

  private async onHello(f: Frame): Promise<void> {
    if (f.type !== FrameType.HELLO) throw new ProtocolError('HYDRA_PROTOCOL_UNEXPECTED', `expected HELLO, got ${frameTypeName(f.type)}`);
    const h = decodeJson(f.type, f.payload, helloSchema);
    const v = Math.min(h.maxVersion, PROTOCOL_VERSION);
    if (v < Math.max(h.minVersion, MIN_PROTOCOL_VERSION)) {
      throw new ProtocolError('HYDRA_PROTOCOL_VERSION', `protocol version mismatch: client speaks versions ${h.minVersion}-${h.maxVersion}, store speaks versions ${MIN_PROTOCOL_VERSION}-${PROTOCOL_VERSION}`);
    }
    this.version = v;
    this.decoder.setVersion(v);
    this.hello = h;
    this.log = this.log.child({ vm: h.vm, generation: h.generation, role: h.role });
    this.nonce = makeNonce();
    this.phase = 'auth';
    await this.send(FrameType.CHALLENGE, encodeJson({ version: v, nonce: this.nonce.toString('hex') }));
  }

  private async onAuth(f: Frame): Promise<void> {
    if (f.type !== FrameType.AUTH) throw new ProtocolError('HYDRA_PROTOCOL_UNEXPECTED', `expected AUTH, got ${frameTypeName(f.type)}`);
    const a = decodeJson(f.type, f.payload, authSchema);
    if (!verifyAuth(this.secret, this.nonce!, Buffer.from(a.hmac, 'hex'))) {
      throw new ProtocolError('HYDRA_STORE_AUTH_FAILED', 'authentication failed: the client does not know the cluster shared secret (wrong secret?)');
    }
    const h = this.hello!;
    try {
      if (h.role === 'checkpointer') {
        await this.store.registerGeneration(h.vm, h.generation);
        this.release = this.store.claimCheckpointer(h.vm, h.generation);
        this.gen = await this.store.gen(h.vm, h.generation);
      } else {
        const g = h.generation > 0 ? h.generation : await this.store.latestCommittedGeneration(h.vm);
        if (g !== null) this.gen = await this.store.gen(h.vm, g).catch((err) => {
          if ((err as HydraError).code === 'HYDRA_STORE_NO_GENERATION') return null;
          throw err;
        });
      }
    } catch (err) {
      this.release?.();
      this.release = null;
      if (err instanceof HydraError) return this.fail(err);
      throw err;
    }
    clearTimeout(this.timer);
    this.phase = 'ready';
    this.log.info('peer connected');
    await this.send(FrameType.WELCOME, encodeJson({
      version: this.version,
      vm: h.vm,
      generation: this.gen?.generation ?? h.generation,
      highestGeneration: await this.store.highestGeneration(h.vm),
      committedEpoch: this.gen?.meta?.committedEpoch ?? null,
      features: [FEATURE_HOT],
    }));
  }

  private async onRequest(f: Frame): Promise<void> {
    const h = this.hello!;
    switch (f.type) {
      case FrameType.BEGIN: {
        const b = decodeJson(f.type, f.payload, beginSchema);
        this.requireCheckpointer(f);
        this.cpFailed = null;
        try {
          await this.store.checkFence(h.vm, h.generation);
          this.cp = await this.gen!.begin(b);
        } catch (err) {
          this.cp = null;
          return this.replyError(err);
        }
        return this.send(FrameType.BEGUN, encodeJson({ epoch: b.epoch }));
      }
      case FrameType.PAGES:
      case FrameType.DEVSTATE:
      case FrameType.DISKS: {
        this.requireCheckpointer(f);
        if (this.cpFailed) return; // the peer was told; drop the rest of this checkpoint
        if (!this.cp) {
          this.cpFailed = new StoreError('HYDRA_STORE_NO_CHECKPOINT', `${frameTypeName(f.type)} outside a checkpoint (no BEGIN)`);
          return this.sendError(this.cpFailed, true);
        }
        try {
          if (f.type === FrameType.PAGES) await this.cp.addPages(f.payload, f.crc);
          else if (f.type === FrameType.DEVSTATE) await this.cp.addDeviceState(f.payload, f.crc);
          else await this.cp.setDisks(decodeJson(f.type, f.payload, disksSchema).ids);
        } catch (err) {
          if (err instanceof ProtocolError) throw err;
          this.cpFailed = err instanceof HydraError ? err : new StoreError('HYDRA_STORE_INTERNAL', String(err));
          const cp = this.cp;
          this.cp = null;
          // The checkpoint already failed (logged next); the abort only discards its files.
          await cp.abort(`failed: ${(err as Error).message}`).catch(() => undefined);
          this.log.warn({ code: this.cpFailed.code, err: this.cpFailed.message }, 'checkpoint failed');
          return this.sendError(this.cpFailed, true);
        }
        return;
      }
      case FrameType.COMMIT: {
        decodeJson(f.type, f.payload, commitSchema);
        this.requireCheckpointer(f);
        if (this.cpFailed) {
          const e = this.cpFailed;
          this.cpFailed = null;
          return this.replyError(e);
        }
        if (!this.cp) return this.replyError(new StoreError('HYDRA_STORE_NO_CHECKPOINT', 'COMMIT without BEGIN'));
        const cp = this.cp;
        this.cp = null;
        try {
          const r = await cp.commit();
          return this.send(FrameType.COMMITTED, encodeJson({ epoch: r.epoch, durableAt: r.durableAt, applyMs: r.applyMs, bytes: r.bytes, pages: r.pages }));
        } catch (err) {
          this.log.warn({ epoch: cp.epoch, code: (err as HydraError).code, err: (err as Error).message }, 'commit failed');
          return this.replyError(err);
        }
      }
      case FrameType.ABORT: {
        this.requireCheckpointer(f);
        this.cpFailed = null;
        if (this.cp) await this.cp.abort('aborted by the checkpointer');
        this.cp = null;
        return;
      }
      case FrameType.GET_META: {
        const q = decodeJson(f.type, f.payload, getMetaSchema);
        try {
          const g = await this.readerGen(q.generation);
          const meta = g ? await g.committedMeta() : null;
          return this.send(FrameType.META, encodeJson({ meta }));
        } catch (err) {
          return this.replyError(err);
        }
      }
      case FrameType.GET_HOT: {
        const q = decodeJson(f.type, f.payload, getHotSchema);
        let regions: HotRegion[];
        try {
          const g = await this.readerGen(q.generation);
          regions = g ? await g.hotRegions(q.limit) : [];
        } catch (err) {
          return this.replyError(err);
        }
        for (let i = 0; ; i += MAX_HOT_PER_FRAME) {
          const end = Math.min(regions.length, i + MAX_HOT_PER_FRAME);
          await this.send(FrameType.HOT, encodeHot(regions.slice(i, end)), end < regions.length ? FrameFlag.MORE : 0);
          if (end >= regions.length) return;
        }
      }
      case FrameType.READ_PAGES: {
        const { runs } = decodePages(f.payload, false);
        let data: Buffer;
        try {
          let total = 0;
          for (const r of runs) total += r.length;
          if (total > MAX_READ_BYTES) throw new StoreError('HYDRA_STORE_READ_TOO_LARGE', `READ_PAGES of ${total} bytes exceeds ${MAX_READ_BYTES} per request`);
          const g = await this.readerGen(undefined);
          if (!g) throw new StoreError('HYDRA_STORE_NO_IMAGE', `VM ${h.vm} has no committed image`);
          data = await g.readPages(runs);
        } catch (err) {
          return this.replyError(err);
        }
        const batches = [...batchRuns(runs, data, MAX_PAGES_DATA)];
        if (batches.length === 0) return this.send(FrameType.PAGES, encodeRunTable([]));
        for (let i = 0; i < batches.length; i++) {
          const b = batches[i]!;
          await this.send(FrameType.PAGES, Buffer.concat([encodeRunTable(b.runs), b.data!]), i < batches.length - 1 ? FrameFlag.MORE : 0);
        }
        return;
      }
      case FrameType.GET_DEVSTATE: {
        const q = decodeJson(f.type, f.payload, getDevstateSchema);
        let buf: Buffer;
        try {
          const g = await this.readerGen(q.generation);
          if (!g) throw new StoreError('HYDRA_STORE_NO_IMAGE', `VM ${h.vm} has no committed image`);
          buf = await g.readDeviceState();
        } catch (err) {
          return this.replyError(err);
        }
        for (let off = 0; ; off += MAX_PAGES_DATA) {
          const end = Math.min(buf.length, off + MAX_PAGES_DATA);
          await this.send(FrameType.DEVSTATE, buf.subarray(off, end), end < buf.length ? FrameFlag.MORE : 0);
          if (end >= buf.length) return;
        }
      }
      default:
        throw new ProtocolError('HYDRA_PROTOCOL_UNEXPECTED', `unexpected ${frameTypeName(f.type)} frame from a ${h.role}`);
    }
  }

  private async readerGen(generation: number | undefined): Promise<GenerationImage | null> {
    if (generation === undefined || generation === this.gen?.generation) return this.gen;
    return this.store.gen(this.hello!.vm, generation);
  }

  private requireCheckpointer(f: Frame): void {
    if (this.hello!.role !== 'checkpointer') {
      throw new ProtocolError('HYDRA_PROTOCOL_UNEXPECTED', `${frameTypeName(f.type)} is only for a checkpointer; this connection is a reader`);
    }
  }

  private replyError(err: unknown): Promise<void> {
    return this.sendError(err, false);
  }
}

function waitDrain(sock: net.Socket): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      sock.off('drain', done);
      sock.off('close', done);
      resolve();
    };
    sock.on('drain', done);
    sock.on('close', done);
  });
}
