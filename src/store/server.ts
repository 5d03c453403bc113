/**
 * The checkpoint store daemon: a TCP server speaking the HydraVM store
 * protocol (src/protocol). One connection = one peer (checkpointer or reader)
 * of one VM generation. Frames of a connection are handled strictly in order;
 * while the disk is behind, reading from the socket pauses (bounded memory).
 * Before a peer has proved the shared secret it may hold one small frame and
 * one of a bounded number of handshake slots; once authenticated, a silent
 * peer is dropped after the idle timeout, and a new checkpointer of the same
 * generation replaces the old connection (the old one may be half-open).
 */
import net from 'node:net';
import tls from 'node:tls';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { Registry } from 'prom-client';
import type { Logger } from 'pino';
import { HydraError, ProtocolError, StoreError, isHydraCode } from '../errors.js';
import { log as rootLog } from '../util/log.js';
import {
  FrameDecoder, FrameFlag, FrameMac, FrameType, MAX_FRAME_PAYLOAD, MAX_PAGES_DATA, MAX_PREAUTH_PAYLOAD, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, encodeFrameParts, frameTypeName,
  type PageRun, FEATURE_HOT, FEATURE_DATA_RUNS, MAX_DATA_RUNS_PER_FRAME, getDataRunsSchema, MAX_HOT_PER_FRAME, authSchema, batchRuns, beginSchema, commitSchema, decodeJson, decodePages, deriveSession, disksSchema, encodeHot, encodeJson, encodeRunTable,
  getDevstateSchema, getHotSchema, getMetaSchema, helloSchema, makeNonce, proofMatches, serverTlsContext,
  type Frame, type Hello, type HotRegion, type SessionKeys, type StoreTlsServerOptions,
} from '../protocol/index.js';
import { FaultInjector } from './faults.js';
import { storeMetrics } from './metrics.js';
import { Store } from './store.js';
import type { Checkpoint } from './checkpoint.js';
import type { GenerationImage } from './generation-image.js';
import type { DirLock } from './dir-lock.js';

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
  /** Delay-injection spec (`point:ms,...`, tests only); defaults to env HYDRAVM_STORE_DELAY. */
  delayInjection?: string;
  /** When COMMITTED is sent: 'journal' (default: journal durable, apply follows under the lock) or 'applied'. */
  commitAck?: 'journal' | 'applied';
  /** Handshake timeout per connection (ms), default 10 s (TLS and HELLO..WELCOME). */
  handshakeTimeoutMs?: number;
  /** Connections still in their handshake at most; a new one beyond it evicts the oldest. Default 64. */
  maxPendingHandshakes?: number;
  /** An authenticated peer silent this long (ms) is dropped; clients PING well within it. Default 20 s. */
  idleTimeoutMs?: number;
  /** Serve TLS only, with this certificate and key. */
  tls?: StoreTlsServerOptions;
  /** The directory's exclusive lock, already taken by the caller (a standby that waited for it); default: taken here. */
  lock?: DirLock;
  /**
   * Asked at every BEGIN and COMMIT: null while this store may write, else
   * why not (a cluster store whose etcd lease may be expiring). A reason
   * fences the store at once, as fence() does.
   */
  mayWrite?: () => string | null;
}

export const DEFAULT_IDLE_TIMEOUT_MS = 20_000;
export const DEFAULT_MAX_PENDING_HANDSHAKES = 64;

/** What every connection of one server shares: limits, keys and who holds which checkpointer slot. */
interface ServerContext {
  store: Store;
  secret: string;
  handshakeMs: number;
  idleMs: number;
  /** Connections not yet authenticated, oldest first. */
  pending: Set<Connection>;
  /** The authenticated checkpointer connection of each "vm generation". */
  checkpointers: Map<string, Connection>;
  log: Logger;
  /** Set once the store may no longer write (it lost its cluster lease): BEGIN and COMMIT are refused with this error. */
  fenced: StoreError | null;
  fence: (reason: string) => void;
  mayWrite: (() => string | null) | undefined;
}

export interface StoreServer {
  /** 'host:port' actually bound. */
  address: string;
  store: Store;
  /**
   * Stop writing at once: every BEGIN and COMMIT from now on is refused with
   * HYDRA_STORE_NOT_ACTIVE (`reason` in the message). close() then ends the
   * connections and releases the directory.
   */
  fence(reason: string): void;
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
  const faults = new FaultInjector(opts.faultInjection ?? process.env.HYDRAVM_STORE_CRASH_AT, opts.delayInjection ?? process.env.HYDRAVM_STORE_DELAY);
  const store = await Store.open(opts.dir, { faults, metrics: storeMetrics(opts.metricsRegistry), ...(opts.commitAck ? { commitAck: opts.commitAck } : {}), ...(opts.lock ? { lock: opts.lock } : {}) });
  liveStores.set(store.dir, store);
  const slog = rootLog.child({ component: 'store', dir: store.dir });
  if (faults.enabled) slog.warn({ spec: opts.faultInjection ?? process.env.HYDRAVM_STORE_CRASH_AT }, 'crash injection enabled');
  // Recover every generation now, so no half-applied image waits for its first visitor.
  for (const v of await store.listVms()) {
    slog.debug({ vm: v.vm, generations: v.generations.length }, 'recovered');
  }

  const secureContext = opts.tls ? serverTlsContext(opts.tls) : null;
  const maxPending = opts.maxPendingHandshakes ?? DEFAULT_MAX_PENDING_HANDSHAKES;
  const ctx: ServerContext = {
    store, secret: opts.secret, handshakeMs: opts.handshakeTimeoutMs ?? 10_000, idleMs: opts.idleTimeoutMs ?? DEFAULT_IDLE_TIMEOUT_MS,
    pending: new Set(), checkpointers: new Map(), log: slog, fenced: null, mayWrite: opts.mayWrite,
    fence(reason: string) {
      if (ctx.fenced) return;
      ctx.fenced = new StoreError('HYDRA_STORE_NOT_ACTIVE', `the store serving ${store.dir} no longer accepts checkpoints: ${reason}; find the active store and reconnect`);
      slog.warn({ reason }, 'store fenced: refusing every BEGIN and COMMIT');
    },
  };
  const conns = new Set<Connection>();
  let evicted = 0;
  const server = net.createServer((raw) => {
    if (ctx.pending.size >= maxPending) {
      // Evicting the oldest keeps the store reachable for a real client during a flood of stalled handshakes.
      const oldest = ctx.pending.values().next().value as Connection;
      ctx.pending.delete(oldest);
      oldest.destroy();
      if (evicted++ % 1000 === 0) slog.warn({ maxPending, evicted }, 'too many unauthenticated connections: evicting the oldest');
    }
    // Wrapped before any byte is read, so the TLS handshake counts against the handshake slot and timeout.
    const sock = secureContext ? new tls.TLSSocket(raw, { isServer: true, secureContext }) : raw;
    const c = new Connection(sock, raw, ctx);
    conns.add(c);
    ctx.pending.add(c);
    sock.on('close', () => {
      conns.delete(c);
      ctx.pending.delete(c);
    });
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
  slog.info({ address, tls: secureContext !== null }, 'checkpoint store listening');
  let closed = false;
  return {
    address,
    store,
    fence: ctx.fence,
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
      slog.info('checkpoint store stopped');
    },
  };
}

type Phase = 'hello' | 'auth' | 'ready' | 'closed';

class Connection {
  private phase: Phase = 'hello';
  private readonly decoder = new FrameDecoder({ maxPayload: MAX_PREAUTH_PAYLOAD });
  private chain: Promise<void> = Promise.resolve();
  private queued = 0;
  private inflight = 0;
  private paused = false;
  private hello: Hello | null = null;
  private keys: SessionKeys | null = null;
  private sendMac: FrameMac | null = null;
  private version = PROTOCOL_VERSION;
  private log: Logger;
  private gen: GenerationImage | null = null;
  private release: (() => void) | null = null;
  private slotKey: string | null = null;
  private cp: Checkpoint | null = null;
  /** A reader's pin (GET_META with pin): its reads serve this generation at this epoch, or are refused. */
  private pinned: { gen: GenerationImage; epoch: number } | null = null;
  /**
   * Page buffers of READ_PAGES replies whose bytes the kernel has taken: a
   * restore pages a whole image in 8 MiB requests, and a fresh buffer per
   * request made the store spend a fifth of its time collecting garbage.
   */
  private readonly readBufs: Buffer[] = [];
  /** Error that ended the current checkpoint early (sent unsolicited); data frames are ignored until BEGIN. */
  private cpFailed: HydraError | null = null;
  private readonly timer: NodeJS.Timeout;
  private idleTimer: NodeJS.Timeout | null = null;
  private lastRecv = Date.now();
  /** Resolves once the close was processed (checkpoint aborted, slot released). */
  readonly closed: Promise<void>;
  private markClosed!: () => void;

  constructor(private readonly sock: net.Socket, raw: net.Socket, private readonly ctx: ServerContext) {
    this.log = ctx.log.child({ peer: `${raw.remoteAddress}:${raw.remotePort}` });
    this.closed = new Promise((resolve) => (this.markClosed = resolve));
    raw.setNoDelay(true);
    this.timer = setTimeout(() => {
      if (this.phase !== 'ready') this.fail(new ProtocolError('HYDRA_PROTOCOL_TIMEOUT', `handshake not completed within ${ctx.handshakeMs} ms`));
    }, ctx.handshakeMs);
    sock.on('data', (chunk: Buffer) => this.onData(chunk));
    sock.on('error', (err: NodeJS.ErrnoException) => this.log.debug({ err: err.message, code: err.code }, sock instanceof tls.TLSSocket ? 'socket or TLS error' : 'socket error'));
    sock.on('close', () => this.onClose());
  }

  destroy(): void {
    this.sock.destroy();
  }

  idle(): Promise<void> {
    return this.chain;
  }

  /** Replaced by a newer checkpointer connection of the same generation. */
  evict(): void {
    this.log.warn('a new checkpointer of this generation authenticated: closing this connection');
    this.sock.destroy();
  }

  private onData(chunk: Buffer): void {
    if (this.phase === 'closed') return;
    this.lastRecv = Date.now();
    let frames: Frame[];
    try {
      frames = this.decoder.push(chunk);
    } catch (err) {
      this.fail(err as HydraError);
      return;
    }
    if (this.phase !== 'ready' && frames.length + this.inflight > 1) {
      // A genuine client waits for each handshake reply; anything more is a peer trying to make the store queue data.
      this.fail(new ProtocolError('HYDRA_PROTOCOL_PIPELINED', `${frames.length + this.inflight} frames sent during the handshake; one at a time is allowed before WELCOME`));
      return;
    }
    for (const f of frames) {
      this.queued += f.payload.length;
      this.inflight++;
      this.chain = this.chain.then(() => this.handle(f)).finally(() => {
        this.queued -= f.payload.length;
        this.inflight--;
        if (this.paused && this.queued < LOW_WATER && this.phase !== 'closed') {
          this.paused = false;
          this.lastRecv = Date.now();
          this.sock.resume();
        }
      });
    }
    if (!this.paused && this.queued > HIGH_WATER) {
      this.paused = true;
      this.sock.pause();
    // Dying connections give up their handshake slot, so evictions hit only live handshakes.
    this.ctx.pending.delete(this);
    }
  }

  private onClose(): void {
    const wasMid = this.decoder.midFrame;
    this.phase = 'closed';
    clearTimeout(this.timer);
    if (this.idleTimer) clearInterval(this.idleTimer);
    this.chain = this.chain.then(async () => {
      if (this.cp) {
        await this.cp.abort(`peer disconnected mid-checkpoint${wasMid ? ' (inside a frame)' : ''}`).catch((err) => this.log.warn({ err: (err as Error).message }, 'abort failed'));
        this.cp = null;
      }
      this.release?.();
      this.release = null;
      if (this.slotKey && this.ctx.checkpointers.get(this.slotKey) === this) this.ctx.checkpointers.delete(this.slotKey);
    }).finally(() => this.markClosed());
  }

  /** A list as one reply of several frames, `perFrame` items each, MORE on all but the last (an empty list is one empty frame). */
  private async sendInFrames<T>(type: FrameType, items: readonly T[], perFrame: number, encode: (part: readonly T[]) => Buffer): Promise<void> {
    for (let i = 0; ; i += perFrame) {
      const end = Math.min(items.length, i + perFrame);
      await this.send(type, encode(items.slice(i, end)), end < items.length ? FrameFlag.MORE : 0);
      if (end >= items.length) return;
    }
  }

  /** Send a frame (tagged once the peer authenticated); resolves when the socket accepted it without exceeding its buffer (drain). */
  private send(type: FrameType, payload: Buffer, flags = 0, crc?: number): Promise<void> {
    return this.sendParts(type, [payload], flags, crc);
  }

  /**
   * send() of a payload given in parts (page data goes out without being
   * copied behind its run table); `written` runs once the socket has passed
   * every byte to the kernel (not at all if the connection dies first).
   */
  private async sendParts(type: FrameType, payload: Buffer[], flags = 0, crc?: number, written?: () => void): Promise<void> {
    if (this.sock.destroyed) return;
    const parts = encodeFrameParts(type, payload, { flags, version: this.version, ...(crc !== undefined ? { crc } : {}), ...(this.sendMac ? { mac: this.sendMac } : {}) });
    this.sock.cork();
    let ok = true;
    parts.forEach((p, i) => {
      ok = i === parts.length - 1 && written ? this.sock.write(p, (err) => { if (!err) written(); }) : this.sock.write(p);
    });
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
    // Read nothing more: a flooding peer then fills its own socket buffer instead of our CPU.
    this.sock.pause();
    setTimeout(() => this.sock.destroy(), 1000).unref();
  }

  private async handle(f: Frame): Promise<void> {
    if (this.phase === 'closed') return;
    try {
      if ((this.phase === 'ready') !== f.authenticated) {
        throw new ProtocolError('HYDRA_PROTOCOL_UNAUTHENTICATED', this.phase === 'ready'
          ? `untagged ${frameTypeName(f.type)} frame after the handshake: every frame must carry the session tag`
          : `tagged ${frameTypeName(f.type)} frame during the handshake`);
      }
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
    const serverNonce = makeNonce();
    const challenge = encodeJson({ version: v, nonce: serverNonce.toString('hex') });
    this.keys = deriveSession(this.ctx.secret, Buffer.from(h.nonce, 'hex'), serverNonce, f.payload, challenge);
    this.decoder.setReceiveMac({ mac: new FrameMac(this.keys.clientToServer), peer: `${h.role} of ${h.vm} generation ${h.generation}` });
    this.phase = 'auth';
    await this.send(FrameType.CHALLENGE, challenge);
  }

  private async onAuth(f: Frame): Promise<void> {
    if (f.type !== FrameType.AUTH) throw new ProtocolError('HYDRA_PROTOCOL_UNEXPECTED', `expected AUTH, got ${frameTypeName(f.type)}`);
    const a = decodeJson(f.type, f.payload, authSchema);
    if (!proofMatches(this.keys!.clientProof, Buffer.from(a.proof, 'hex'))) {
      throw new ProtocolError('HYDRA_STORE_AUTH_FAILED', 'authentication failed: the client does not know the cluster shared secret (wrong secret?), or its AUTH belongs to another handshake');
    }
    // From here on the peer is authenticated: everything sent is tagged, bigger frames are allowed.
    this.sendMac = new FrameMac(this.keys!.serverToClient);
    this.decoder.setMaxPayload(MAX_FRAME_PAYLOAD);
    this.ctx.pending.delete(this);
    const h = this.hello!;
    const store = this.ctx.store;
    try {
      if (h.role === 'checkpointer') {
        await store.registerGeneration(h.vm, h.generation);
        await store.faults.delay('register-after-fence');
        await this.takeSlot(h.vm, h.generation);
        this.gen = await store.gen(h.vm, h.generation);
      } else {
        const g = h.generation > 0 ? h.generation : await store.latestCommittedGeneration(h.vm);
        if (g !== null) this.gen = await store.gen(h.vm, g).catch((err) => {
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
    if (this.phase === 'closed') return;
    clearTimeout(this.timer);
    this.phase = 'ready';
    this.lastRecv = Date.now();
    this.idleTimer = setInterval(() => this.checkIdle(), Math.max(50, Math.floor(this.ctx.idleMs / 4)));
    this.idleTimer.unref();
    this.log.info('peer connected');
    await this.send(FrameType.WELCOME, encodeJson({
      version: this.version,
      vm: h.vm,
      generation: this.gen?.generation ?? h.generation,
      highestGeneration: await store.highestGeneration(h.vm),
      committedEpoch: this.gen?.meta?.committedEpoch ?? null,
      proof: this.keys!.serverProof.toString('hex'),
      idleTimeoutMs: this.ctx.idleMs,
      features: [FEATURE_HOT, FEATURE_DATA_RUNS],
    }));
  }

  /**
   * The checkpointer slot of this generation. A connection already holding it
   * is closed first (the newest authenticated checkpointer wins: the old one is
   * a dead or half-open peer that has not timed out yet); its checkpoint in
   * progress is aborted before this one may begin.
   */
  private async takeSlot(vm: string, generation: number): Promise<void> {
    const key = `${vm} ${generation}`;
    for (;;) {
      const old = this.ctx.checkpointers.get(key);
      if (!old || old === this) break;
      old.evict();
      await old.closed;
      if (this.phase === 'closed') throw new StoreError('HYDRA_STORE_CONNECTION_LOST', `checkpointer of ${vm} generation ${generation} went away while taking over the slot`);
    }
    this.release = this.ctx.store.claimCheckpointer(vm, generation);
    this.slotKey = key;
    this.ctx.checkpointers.set(key, this);
  }

  private checkIdle(): void {
    if (this.phase !== 'ready' || this.paused) return;
    const silent = Date.now() - this.lastRecv;
    if (silent < this.ctx.idleMs) return;
    this.log.warn({ silentMs: silent }, 'peer silent beyond the idle timeout: closing the connection');
    // No goodbye: a peer silent this long is most likely gone, and a half-open socket would hold the write.
    this.phase = 'closed';
    this.sock.destroy();
  }

  private async onRequest(f: Frame): Promise<void> {
    const h = this.hello!;
    switch (f.type) {
      case FrameType.PING:
        return this.send(FrameType.PONG, encodeJson({}));
      case FrameType.BEGIN: {
        const b = decodeJson(f.type, f.payload, beginSchema);
        this.requireCheckpointer(f);
        this.cpFailed = null;
        try {
          this.checkMayWrite();
          if (this.ctx.fenced) throw this.ctx.fenced;
          await this.ctx.store.checkFence(h.vm, h.generation);
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
        this.checkMayWrite();
        if (this.ctx.fenced) {
          // Nothing of it reached the journal's END: discarding it leaves the last committed epoch as it was.
          await cp.abort('the store was fenced').catch((err) => this.log.warn({ err: (err as Error).message }, 'abort failed'));
          return this.replyError(this.ctx.fenced);
        }
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
          const meta = g ? await (q.applied ? g.appliedMeta(q.epoch) : g.metaAt(q.epoch)) : null;
          if (q.pin) {
            if (!g || !meta) throw new StoreError('HYDRA_STORE_NO_IMAGE', `VM ${h.vm} has no committed image to pin${q.generation ? ` in generation ${q.generation}` : ''}`);
            this.pinned = { gen: g, epoch: meta.committedEpoch };
          }
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
        return this.sendInFrames(FrameType.HOT, regions, MAX_HOT_PER_FRAME, encodeHot);
      }
      case FrameType.GET_DATA_RUNS: {
        decodeJson(f.type, f.payload, getDataRunsSchema);
        let runs: PageRun[];
        try {
          // Only for a pinned reader: the runs describe one epoch's image, which must not move under them.
          if (!this.pinned) throw new StoreError('HYDRA_STORE_NOT_PINNED', `GET_DATA_RUNS of VM ${h.vm} needs an epoch pinned first (GET_META with pin)`);
          runs = await this.pinned.gen.dataRuns(this.pinned.epoch);
        } catch (err) {
          return this.replyError(err);
        }
        return this.sendInFrames(FrameType.DATA_RUNS, runs, MAX_DATA_RUNS_PER_FRAME, encodeRunTable);
      }
      case FrameType.READ_PAGES: {
        const { runs } = decodePages(f.payload, false);
        let data: Buffer;
        const buf = this.readBuffer();
        try {
          let total = 0;
          for (const r of runs) total += r.length;
          if (total > MAX_READ_BYTES) throw new StoreError('HYDRA_STORE_READ_TOO_LARGE', `READ_PAGES of ${total} bytes exceeds ${MAX_READ_BYTES} per request`);
          const g = this.pinned?.gen ?? (await this.readerGen(undefined));
          if (!g) throw new StoreError('HYDRA_STORE_NO_IMAGE', `VM ${h.vm} has no committed image`);
          data = await g.readPages(runs, this.pinned?.epoch, total <= buf.length ? buf : undefined);
        } catch (err) {
          this.readBufs.push(buf);
          return this.replyError(err);
        }
        const batches = [...batchRuns(runs, data, MAX_PAGES_DATA)];
        if (batches.length === 0) {
          this.readBufs.push(buf);
          return this.send(FrameType.PAGES, encodeRunTable([]));
        }
        for (let i = 0; i < batches.length; i++) {
          const b = batches[i]!;
          const last = i === batches.length - 1;
          // The buffer is reused only once the socket has handed its last byte to the kernel.
          await this.sendParts(FrameType.PAGES, [encodeRunTable(b.runs), b.data!], last ? 0 : FrameFlag.MORE, undefined, last ? () => this.readBufs.push(buf) : undefined);
        }
        return;
      }
      case FrameType.GET_DEVSTATE: {
        const q = decodeJson(f.type, f.payload, getDevstateSchema);
        let buf: Buffer;
        try {
          const g = await this.readerGen(q.generation);
          if (!g) throw new StoreError('HYDRA_STORE_NO_IMAGE', `VM ${h.vm} has no committed image`);
          buf = await g.readDeviceState(q.epoch ?? (this.pinned?.gen === g ? this.pinned.epoch : undefined));
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

  /** A reply buffer of MAX_PAGES_DATA bytes (larger requests get their own); at most 4 kept per connection. */
  private readBuffer(): Buffer {
    if (this.readBufs.length > 4) this.readBufs.length = 4;
    return this.readBufs.pop() ?? Buffer.allocUnsafeSlow(MAX_PAGES_DATA);
  }

  private async readerGen(generation: number | undefined): Promise<GenerationImage | null> {
    if (generation === undefined || generation === this.gen?.generation) return this.gen;
    return this.ctx.store.gen(this.hello!.vm, generation);
  }

  /** Fence the store now if it may no longer write (checked here, not only by its owner's timer). */
  private checkMayWrite(): void {
    const why = this.ctx.mayWrite?.();
    if (why) this.ctx.fence(why);
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
