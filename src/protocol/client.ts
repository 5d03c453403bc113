/**
 * StoreClient: the checkpointer's (and a network-mode restore's) end of the
 * store protocol. Requests that expect a reply are answered in order; an
 * ERROR marked `unsolicited` (a failure while PAGES were streaming) poisons the
 * current checkpoint: later sends and commit() reject with it. Sends resolve
 * once the socket accepted the bytes (awaiting 'drain'), so a slow store
 * slows the sender instead of growing its memory. The store must prove the
 * shared secret (WELCOME) before anything is sent after the handshake, and every
 * frame after it is tagged in both directions (auth.ts, frames.ts).
 */
import net from 'node:net';
import tls from 'node:tls';
import { HydraError, ProtocolError, StoreError, errorFromCode } from '../errors.js';
import { deriveSession, makeNonce, proofMatches } from './auth.js';
import {
  FrameDecoder, FrameFlag, FrameMac, FrameType, MAX_FRAME_PAYLOAD, MAX_PAGES_DATA, MAX_PREAUTH_PAYLOAD, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, encodeFrameParts, frameTypeName, type Frame,
} from './frames.js';
import {
  FEATURE_HOT, FEATURE_DATA_RUNS, batchRuns, challengeSchema, committedSchema, decodeHot, decodeJson, decodePages, encodeJson, encodeRunTable, errorSchema, metaReplySchema, welcomeSchema,
  type CheckpointKind, type DecodedPages, type HotRegion, type PageRun, type Role, type StoreMeta, type Welcome,
} from './messages.js';
import { TLS_CA_ENV, clientTlsFromEnv, loadCa, tlsFailure, type StoreTlsClientOptions } from './tls.js';

export interface StoreClientOptions {
  /** 'host:port' of the store. */
  address: string;
  /** The cluster shared secret. */
  secret: string;
  vm: string;
  /** The VM's incarnation. A reader may pass 0 for "newest committed generation". */
  generation: number;
  role: Role;
  /** Connect + handshake timeout (ms), default 10 s. */
  timeoutMs?: number;
  /** Test hook: versions announced in HELLO (default [MIN_PROTOCOL_VERSION, PROTOCOL_VERSION]). */
  versions?: [number, number];
  /** TLS to the store: null for plain TCP; default from HYDRAVM_STORE_TLS_CA (tls.ts). */
  tls?: StoreTlsClientOptions | null;
}

export interface CommitResult {
  epoch: number;
  /** Store wall-clock time (ms since 1970) when the checkpoint became durable. */
  durableAt: number;
  /** Store-side ms from COMMIT to durable. */
  applyMs: number;
}

interface Pending {
  what: string;
  expect: FrameType;
  resolve: (f: Frame[]) => void;
  reject: (e: Error) => void;
  frames: Frame[];
}

const MAX_READ_REQUEST = 32 * 1024 * 1024;
/** Socket read buffer of a plain TCP connection. */
const READ_BUFFER = 256 * 1024;
/** Longest gap between frames the client sends once connected (PING fills it); also capped at a third of the store's idle timeout. */
const KEEPALIVE_MS = 5000;


export class StoreClient {
  private readonly decoder = new FrameDecoder({ maxPayload: MAX_PREAUTH_PAYLOAD });
  private pending: Pending[] = [];
  /** Tag state of frames to the store, set once AUTH is sent. */
  private sendMac: FrameMac | null = null;
  /** True once the store proved the secret: from then on every received frame must be tagged. */
  private authenticated = false;
  private lastWrite = Date.now();
  /** Bytes received from the store (0: it never answered). */
  private received = 0;
  private keepalive: NodeJS.Timeout | null = null;
  private closedError: HydraError | null = null;
  /** An unsolicited ERROR received during the current checkpoint. */
  private checkpointError: HydraError | null = null;
  private version = PROTOCOL_VERSION;
  private closing = false;
  private readonly closed: Promise<void>;
  /** What the store said at the handshake. */
  welcome!: Welcome;

  private constructor(private readonly sock: net.Socket, private readonly opts: StoreClientOptions) {
    this.closed = new Promise((resolve) => sock.once('close', () => {
      if (this.keepalive) clearInterval(this.keepalive);
      resolve();
    }));
    sock.on('data', (chunk: Buffer) => this.onData(chunk));
    sock.on('error', (err) => this.shutdown(new StoreError('HYDRA_STORE_CONNECTION_LOST', `connection to store ${opts.address} failed: ${err.message}`, { cause: err })));
    sock.on('close', () => this.shutdown(new StoreError('HYDRA_STORE_CONNECTION_LOST', `connection to store ${opts.address} closed${this.closing ? '' : ' by the store'}`)));
  }

  static async connect(opts: StoreClientOptions): Promise<StoreClient> {
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(opts.address);
    if (!m) throw new StoreError('HYDRA_STORE_BAD_ADDRESS', `bad store address ${JSON.stringify(opts.address)}: expected host:port`);
    const host = m[1] ?? m[2]!;
    const port = Number(m[3]);
    const tlsOpts = opts.tls === undefined ? clientTlsFromEnv() : opts.tls;
    // Plain TCP reads into one reused buffer (the frame decoder copies what it keeps): no allocation per socket read.
    const reader: { client?: StoreClient } = {};
    const sock = tlsOpts
      ? tls.connect({ host, port, ca: loadCa(tlsOpts.ca), ...(tlsOpts.servername ? { servername: tlsOpts.servername } : net.isIP(host) ? {} : { servername: host }) })
      : net.connect({ host, port, onread: { buffer: Buffer.allocUnsafeSlow(READ_BUFFER), callback: (n: number, buf: Uint8Array) => { reader.client?.onData(Buffer.from(buf.buffer, buf.byteOffset, n)); return true; } } });
    sock.setNoDelay(true);
    // The kernel notices a vanished store host even while no request is outstanding.
    sock.setKeepAlive(true, KEEPALIVE_MS);
    const client = new StoreClient(sock, opts);
    reader.client = client;
    const timer = setTimeout(() => {
      client.shutdown(new StoreError('HYDRA_STORE_TIMEOUT', `connecting to store ${opts.address} (vm ${opts.vm}): no answer within ${timeoutMs} ms`));
      sock.destroy();
    }, timeoutMs);
    try {
      await new Promise<void>((resolve, reject) => {
        sock.once(tlsOpts ? 'secureConnect' : 'connect', resolve);
        sock.once('error', (err: NodeJS.ErrnoException) => reject(tlsOpts && err.code !== 'ECONNREFUSED'
          ? tlsFailure(opts.address, tlsOpts.ca, err)
          : new StoreError('HYDRA_STORE_CONNECTION_LOST', `cannot connect to store ${opts.address}: ${err.message}`, { cause: err })));
        sock.once('close', () => reject(client.closedError ?? new StoreError('HYDRA_STORE_CONNECTION_LOST', `connection to store ${opts.address} closed`)));
      });
      await client.handshake(tlsOpts !== null);
      return client;
    } catch (err) {
      sock.destroy();
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  /** HELLO/CHALLENGE/AUTH/WELCOME (auth.ts): both sides prove the secret over the whole handshake. */
  private async handshake(overTls: boolean): Promise<void> {
    const opts = this.opts;
    const [minV, maxV] = opts.versions ?? [MIN_PROTOCOL_VERSION, PROTOCOL_VERSION];
    const clientNonce = makeNonce();
    const hello = encodeJson({ minVersion: minV, maxVersion: maxV, vm: opts.vm, generation: opts.generation, role: opts.role, nonce: clientNonce.toString('hex') });
    let ch: Frame;
    try {
      [ch] = (await this.request(FrameType.HELLO, hello, FrameType.CHALLENGE, 'HELLO', maxV)) as [Frame];
    } catch (err) {
      // A TLS store hangs up on plain bytes (or answers with an alert): say what to check instead of "closed" or "bad magic".
      const e = err as HydraError;
      const tlsAlert = e.code === 'HYDRA_PROTOCOL_BAD_MAGIC' && /magic 1[56]03/.test(e.message);
      if (!overTls && (tlsAlert || (e.code === 'HYDRA_STORE_CONNECTION_LOST' && this.received === 0))) {
        const msg = `store ${opts.address} hung up on HELLO without an answer (${e.message}): if it runs with --tls-cert, give this side its CA with --store-tls-ca or ${TLS_CA_ENV}; otherwise it is not a HydraVM store, or it dropped this handshake under load`;
        throw tlsAlert ? new StoreError('HYDRA_STORE_TLS_REQUIRED', msg, { cause: err }) : errorFromCode(e.code, msg, { cause: err });
      }
      throw err;
    }
    const c = decodeJson(FrameType.CHALLENGE, ch.payload, challengeSchema);
    if (c.version < minV || c.version > maxV) {
      throw new ProtocolError('HYDRA_PROTOCOL_VERSION', `store ${opts.address} chose protocol version ${c.version}, outside the offered ${minV}-${maxV}`);
    }
    this.version = c.version;
    this.decoder.setVersion(c.version);
    const keys = deriveSession(opts.secret, clientNonce, Buffer.from(c.nonce, 'hex'), hello, ch.payload);
    this.decoder.setReceiveMac({ mac: new FrameMac(keys.serverToClient), peer: `store ${opts.address}` });
    const auth = encodeJson({ proof: keys.clientProof.toString('hex') });
    const [w] = (await this.request(FrameType.AUTH, auth, FrameType.WELCOME, 'AUTH')) as [Frame];
    if (!w.authenticated) {
      throw new ProtocolError('HYDRA_PROTOCOL_UNAUTHENTICATED', `store ${opts.address} sent WELCOME without a tag: it did not prove the cluster secret (not the genuine store, or a relay)`);
    }
    const welcome = decodeJson(FrameType.WELCOME, w.payload, welcomeSchema);
    if (!proofMatches(keys.serverProof, Buffer.from(welcome.proof, 'hex'))) {
      throw new ProtocolError('HYDRA_PROTOCOL_UNAUTHENTICATED', `store ${opts.address} failed to prove the cluster secret in WELCOME (not the genuine store, or a relay)`);
    }
    if (welcome.vm !== opts.vm || (opts.generation > 0 && welcome.generation !== opts.generation)) {
      throw new ProtocolError('HYDRA_PROTOCOL_UNEXPECTED', `store ${opts.address} welcomed vm ${welcome.vm} generation ${welcome.generation}, but this side asked for vm ${opts.vm} generation ${opts.generation}`);
    }
    this.welcome = welcome;
    this.authenticated = true;
    this.sendMac = new FrameMac(keys.clientToServer);
    this.decoder.setMaxPayload(MAX_FRAME_PAYLOAD);
    const every = Math.max(100, Math.min(KEEPALIVE_MS, Math.floor(welcome.idleTimeoutMs / 3)));
    this.keepalive = setInterval(() => this.ping(every), every / 2);
    this.keepalive.unref();
  }

  /**
   * Keep a quiet connection alive so the store does not take it for a dead
   * peer. Skipped while the socket is backed up: the store paused reading by
   * choice and does not count that time as silence.
   */
  private ping(every: number): void {
    if (this.closedError || this.sock.writableLength > 0 || Date.now() - this.lastWrite < every) return;
    this.write(FrameType.PING, [encodeJson({})]).catch(() => undefined); // a failed write surfaces via 'close' -> shutdown
  }

  /** The store's committed epoch for this generation at connect time (null: none). */
  get committedEpoch(): number | null {
    return this.welcome.committedEpoch;
  }

  private onData(chunk: Buffer): void {
    this.received += chunk.length;
    let frames: Frame[];
    try {
      frames = this.decoder.push(chunk);
    } catch (err) {
      this.shutdown(err as HydraError);
      this.sock.destroy();
      return;
    }
    for (const f of frames) this.onFrame(f);
  }

  private onFrame(f: Frame): void {
    if (this.authenticated && !f.authenticated) {
      this.shutdown(new ProtocolError('HYDRA_PROTOCOL_UNAUTHENTICATED', `store ${this.opts.address} sent an untagged ${frameTypeName(f.type)} frame after the handshake (not from the authenticated store)`));
      this.sock.destroy();
      return;
    }
    if (f.type === FrameType.PONG) return;
    if (f.type === FrameType.ERROR) {
      let e: HydraError;
      let unsolicited = false;
      try {
        const m = decodeJson(f.type, f.payload, errorSchema);
        e = errorFromCode(m.code, m.message);
        unsolicited = m.unsolicited === true;
      } catch (err) {
        e = err as HydraError;
      }
      if (unsolicited) {
        this.checkpointError ??= e;
        return;
      }
      const p = this.pending.shift();
      if (p) p.reject(e);
      else this.shutdown(e); // an error nobody asked about, outside a checkpoint: fatal (the store closes next)
      return;
    }
    const p = this.pending[0];
    if (!p || p.expect !== f.type) {
      const e = new ProtocolError('HYDRA_PROTOCOL_UNEXPECTED', `store sent ${frameTypeName(f.type)}${p ? ` while waiting for ${frameTypeName(p.expect)} (${p.what})` : ' unasked'}`);
      this.shutdown(e);
      this.sock.destroy();
      return;
    }
    p.frames.push(f);
    if (f.flags & FrameFlag.MORE) return;
    this.pending.shift();
    p.resolve(p.frames);
  }

  private shutdown(err: HydraError): void {
    if (!this.closedError) this.closedError = err;
    const pending = this.pending;
    this.pending = [];
    for (const p of pending) p.reject(errorFromCode(err.code, `${p.what}: ${err.message}`, { cause: err }));
  }

  private alive(what: string): void {
    if (this.closedError) throw errorFromCode(this.closedError.code, `${what}: ${this.closedError.message}`, { cause: this.closedError });
  }

  /**
   * Write one frame (header + payload parts, without copying). Resolves once
   * the kernel has taken every byte: callers reuse their buffers (the
   * checkpointer's bounce buffer) as soon as this returns, and a socket write
   * that is merely queued still reads from them.
   */
  private async write(type: FrameType, parts: Buffer[], flags = 0, version = this.version): Promise<void> {
    this.alive(frameTypeName(type));
    const out = encodeFrameParts(type, parts, { flags, version, ...(this.sendMac ? { mac: this.sendMac } : {}) });
    this.lastWrite = Date.now();
    const flushed = new Promise<void>((resolve, reject) => {
      this.sock.cork();
      out.forEach((p, i) => {
        if (i < out.length - 1) this.sock.write(p);
        else this.sock.write(p, (err) => (err ? reject(new StoreError('HYDRA_STORE_CONNECTION_LOST', `writing to store ${this.opts.address}: ${err.message}`, { cause: err })) : resolve()));
      });
      this.sock.uncork();
    });
    await flushed;
  }

  private request(type: FrameType, payload: Buffer, expect: FrameType, what: string, version?: number): Promise<Frame[]> {
    this.alive(what);
    const p = new Promise<Frame[]>((resolve, reject) => this.pending.push({ what, expect, resolve, reject, frames: [] }));
    this.write(type, [payload], 0, version).catch(() => undefined); // a failed write surfaces via 'close' -> shutdown
    return p;
  }

  private poisoned(what: string): void {
    if (this.checkpointError) {
      const e = this.checkpointError;
      throw errorFromCode(e.code, `${what}: checkpoint failed in the store: ${e.message}`);
    }
  }

  /** Start checkpoint `epoch`. Resolves when the store accepted it. */
  async begin(epoch: number, kind: CheckpointKind, info: { ramSize: number; config?: unknown; pageSize?: number }): Promise<void> {
    this.checkpointError = null;
    await this.request(FrameType.BEGIN, encodeJson({ epoch, kind, ramSize: info.ramSize, ...(info.pageSize ? { pageSize: info.pageSize } : {}), ...(info.config !== undefined ? { config: info.config } : {}) }), FrameType.BEGUN, `BEGIN epoch ${epoch}`);
  }

  /** Send page runs (their bytes contiguous in `data`), in frames of at most MAX_PAGES_DATA. */
  async sendPages(runs: { offset: number; length: number }[], data: Buffer): Promise<void> {
    let total = 0;
    for (const r of runs) total += r.length;
    if (total !== data.length) throw new ProtocolError('HYDRA_PROTOCOL_BAD_RUN', `sendPages: runs cover ${total} bytes but ${data.length} data bytes were given`);
    for (const b of batchRuns(runs, data, MAX_PAGES_DATA)) {
      this.poisoned('sendPages');
      await this.write(FrameType.PAGES, [encodeRunTable(b.runs), b.data!]);
    }
  }

  async sendDeviceState(buf: Buffer): Promise<void> {
    for (let off = 0; ; off += MAX_PAGES_DATA) {
      this.poisoned('sendDeviceState');
      const end = Math.min(buf.length, off + MAX_PAGES_DATA);
      await this.write(FrameType.DEVSTATE, [buf.subarray(off, end)], end < buf.length ? FrameFlag.MORE : 0);
      if (end >= buf.length) return;
    }
  }

  async sendDisks(ids: string[]): Promise<void> {
    this.poisoned('sendDisks');
    await this.write(FrameType.DISKS, [encodeJson({ ids })]);
  }

  /** Resolves when the store has made the checkpoint durable and visible (COMMITTED). */
  async commit(): Promise<CommitResult> {
    this.poisoned('commit');
    const [f] = await this.request(FrameType.COMMIT, encodeJson({}), FrameType.COMMITTED, 'COMMIT');
    const c = decodeJson(FrameType.COMMITTED, f!.payload, committedSchema);
    return { epoch: c.epoch, durableAt: c.durableAt, applyMs: c.applyMs };
  }

  /** Drop the checkpoint in progress (no reply; the committed epoch stays). */
  async abort(): Promise<void> {
    this.checkpointError = null;
    await this.write(FrameType.ABORT, [encodeJson({})]);
  }

  /**
   * The committed meta of this connection's generation (or `generation`), null if none.
   * `epoch`: refused (HYDRA_STORE_EPOCH_MOVED) unless that epoch is still the committed one.
   * `pin`: the connection's later reads serve this generation and epoch only, or are refused.
   */
  async getMeta(generation?: number, opts: { epoch?: number; pin?: boolean; applied?: boolean } = {}): Promise<StoreMeta | null> {
    const q = { ...(generation !== undefined ? { generation } : {}), ...(opts.epoch !== undefined ? { epoch: opts.epoch } : {}), ...(opts.pin ? { pin: true } : {}), ...(opts.applied ? { applied: true } : {}) };
    const [f] = await this.request(FrameType.GET_META, encodeJson(q), FrameType.META, 'GET_META');
    return decodeJson(FrameType.META, f!.payload, metaReplySchema).meta as StoreMeta | null;
  }

  /** Read runs of the committed image; returns their bytes contiguous, in run order. */
  async readPages(runs: PageRun[]): Promise<Buffer> {
    const pieces = await this.readPageFrames(runs);
    return pieces.length === 1 ? pieces[0]!.data : Buffer.concat(pieces.map((p) => p.data));
  }

  /**
   * Read runs of the committed image without copying: the reply frames' run
   * tables and data, as views into the buffers the frames were received in,
   * in request order. The runs must cover exactly what was asked (checked).
   * Requests beyond MAX_READ_REQUEST are split and sent back to back.
   */
  async readPageFrames(runs: readonly PageRun[]): Promise<DecodedPages[]> {
    let total = 0;
    for (const r of runs) total += r.length;
    const replies = [...batchRuns(runs, null, MAX_READ_REQUEST)].map((req) => this.request(FrameType.READ_PAGES, encodeRunTable(req.runs), FrameType.PAGES, 'READ_PAGES'));
    const out: DecodedPages[] = [];
    let got = 0;
    for (const frames of await Promise.all(replies)) {
      for (const f of frames) {
        const d = decodePages(f.payload);
        got += d.data.length;
        out.push(d);
      }
    }
    if (got !== total) throw new ProtocolError('HYDRA_PROTOCOL_SHORT_REPLY', `READ_PAGES to store ${this.opts.address} returned ${got} of ${total} bytes`);
    return out;
  }

  /** Give the buffers of replies from readPageFrames() back once their pages are placed: the next replies reuse them. */
  recycle(pages: readonly DecodedPages[]): void {
    for (const p of pages) this.decoder.recycle(p.data);
  }

  /** The store this client talks to ('host:port'). */
  get address(): string {
    return this.opts.address;
  }

  /** The committed device state (verified against meta's sha256 by the store); with `epoch`, of that epoch or refused. */
  async getDeviceState(generation?: number, epoch?: number): Promise<Buffer> {
    const q = { ...(generation !== undefined ? { generation } : {}), ...(epoch !== undefined ? { epoch } : {}) };
    const frames = await this.request(FrameType.GET_DEVSTATE, encodeJson(q), FrameType.DEVSTATE, 'GET_DEVSTATE');
    return Buffer.concat(frames.map((f) => f.payload));
  }

  /**
   * The 2 MiB regions the VM wrote most in the last epochs of this connection's
   * generation (or `generation`), hottest first, at most `limit`. Empty when the
   * store has no (usable) heat record. Rejects with HYDRA_STORE_UNSUPPORTED, without
   * sending anything, when the store predates GET_HOT (its WELCOME lacks the feature).
   */
  async getHotRegions(generation?: number, limit?: number): Promise<HotRegion[]> {
    if (!this.welcome.features?.includes(FEATURE_HOT)) {
      throw new StoreError('HYDRA_STORE_UNSUPPORTED', `store ${this.opts.address} does not serve GET_HOT (an older store): no heat record available`);
    }
    const q = { ...(generation !== undefined ? { generation } : {}), ...(limit !== undefined ? { limit } : {}) };
    const frames = await this.request(FrameType.GET_HOT, encodeJson(q), FrameType.HOT, 'GET_HOT');
    return frames.flatMap((f) => decodeHot(f.payload));
  }

  /**
   * The runs of the pinned image that may hold non-zero bytes (every other
   * page of it reads as zeros), ascending. A reader must have pinned an epoch
   * (getMeta with pin). Rejects with HYDRA_STORE_UNSUPPORTED, without sending
   * anything, when the store's WELCOME lacks the "data-runs" feature.
   */
  async getDataRuns(): Promise<PageRun[]> {
    if (!this.welcome.features?.includes(FEATURE_DATA_RUNS)) {
      throw new StoreError('HYDRA_STORE_UNSUPPORTED', `store ${this.opts.address} does not serve GET_DATA_RUNS (an older store): every page is streamed`);
    }
    const frames = await this.request(FrameType.GET_DATA_RUNS, encodeJson({}), FrameType.DATA_RUNS, 'GET_DATA_RUNS');
    return frames.flatMap((f) => decodePages(f.payload, false).runs);
  }

  async close(): Promise<void> {
    this.closing = true;
    if (this.keepalive) clearInterval(this.keepalive);
    this.sock.end();
    const t = setTimeout(() => this.sock.destroy(), 2000);
    await this.closed;
    clearTimeout(t);
  }
}
