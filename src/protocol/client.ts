/**
 * StoreClient: the checkpointer's (and a network-mode restore's) end of the
 * store protocol. Requests that expect a reply are answered in order; an
 * ERROR marked `unsolicited` (a failure while PAGES were streaming) poisons the
 * current checkpoint: later sends and commit() reject with it. Sends resolve
 * once the socket accepted the bytes (awaiting 'drain'), so a slow store
 * slows the sender instead of growing its memory.
 */
import net from 'node:net';
import { crc32 } from 'node:zlib';
import { HydraError, ProtocolError, StoreError, errorFromCode } from '../errors.js';
import { authResponse } from './auth.js';
import {
  FrameDecoder, FrameFlag, FrameType, MAX_PAGES_DATA, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, encodeFrameParts, frameTypeName, type Frame,
} from './frames.js';
import {
  FEATURE_HOT, batchRuns, challengeSchema, committedSchema, decodeHot, decodeJson, decodePages, encodeJson, encodeRunTable, errorSchema, metaReplySchema, welcomeSchema,
  type CheckpointKind, type HotRegion, type PageRun, type Role, type StoreMeta, type Welcome,
} from './messages.js';

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


export class StoreClient {
  private readonly decoder = new FrameDecoder();
  private pending: Pending[] = [];
  private closedError: HydraError | null = null;
  /** An unsolicited ERROR received during the current checkpoint. */
  private checkpointError: HydraError | null = null;
  private version = PROTOCOL_VERSION;
  private closing = false;
  private readonly closed: Promise<void>;
  /** What the store said at the handshake. */
  welcome!: Welcome;

  private constructor(private readonly sock: net.Socket, private readonly opts: StoreClientOptions) {
    this.closed = new Promise((resolve) => sock.once('close', () => resolve()));
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
    const sock = net.connect({ host, port });
    sock.setNoDelay(true);
    const client = new StoreClient(sock, opts);
    const timer = setTimeout(() => {
      client.shutdown(new StoreError('HYDRA_STORE_TIMEOUT', `connecting to store ${opts.address} (vm ${opts.vm}): no answer within ${timeoutMs} ms`));
      sock.destroy();
    }, timeoutMs);
    try {
      await new Promise<void>((resolve, reject) => {
        sock.once('connect', resolve);
        sock.once('error', (err) => reject(new StoreError('HYDRA_STORE_CONNECTION_LOST', `cannot connect to store ${opts.address}: ${err.message}`, { cause: err })));
        sock.once('close', () => reject(client.closedError ?? new StoreError('HYDRA_STORE_CONNECTION_LOST', `connection to store ${opts.address} closed`)));
      });
      const [minV, maxV] = opts.versions ?? [MIN_PROTOCOL_VERSION, PROTOCOL_VERSION];
      const [ch] = await client.request(FrameType.HELLO, encodeJson({ minVersion: minV, maxVersion: maxV, vm: opts.vm, generation: opts.generation, role: opts.role }), FrameType.CHALLENGE, 'HELLO', maxV);
      const c = decodeJson(FrameType.CHALLENGE, ch!.payload, challengeSchema);
      client.version = c.version;
      client.decoder.setVersion(c.version);
      const hmac = authResponse(opts.secret, Buffer.from(c.nonce, 'hex')).toString('hex');
      const [w] = await client.request(FrameType.AUTH, encodeJson({ hmac }), FrameType.WELCOME, 'AUTH');
      client.welcome = decodeJson(FrameType.WELCOME, w!.payload, welcomeSchema);
      return client;
    } catch (err) {
      sock.destroy();
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  /** The store's committed epoch for this generation at connect time (null: none). */
  get committedEpoch(): number | null {
    return this.welcome.committedEpoch;
  }

  private onData(chunk: Buffer): void {
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
    let len = 0;
    let crc = 0;
    for (const p of parts) {
      len += p.length;
      crc = crc32(p, crc);
    }
    const [h] = encodeFrameParts(type, Buffer.alloc(0), { flags, version, crc });
    h.writeUInt32BE(len, 12);
    const flushed = new Promise<void>((resolve, reject) => {
      this.sock.cork();
      this.sock.write(h);
      parts.forEach((p, i) => {
        if (i < parts.length - 1) this.sock.write(p);
        else this.sock.write(p, (err) => (err ? reject(new StoreError('HYDRA_STORE_CONNECTION_LOST', `writing to store ${this.opts.address}: ${err.message}`, { cause: err })) : resolve()));
      });
      if (parts.length === 0) resolve();
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

  /** The committed meta of this connection's generation (or `generation`), null if none. */
  async getMeta(generation?: number): Promise<StoreMeta | null> {
    const [f] = await this.request(FrameType.GET_META, encodeJson(generation !== undefined ? { generation } : {}), FrameType.META, 'GET_META');
    return decodeJson(FrameType.META, f!.payload, metaReplySchema).meta as StoreMeta | null;
  }

  /** Read runs of the committed image; returns their bytes contiguous, in run order. */
  async readPages(runs: PageRun[]): Promise<Buffer> {
    let total = 0;
    for (const r of runs) total += r.length;
    const out = Buffer.allocUnsafe(total);
    let pos = 0;
    for (const req of batchRuns(runs, null, MAX_READ_REQUEST)) {
      const frames = await this.request(FrameType.READ_PAGES, encodeRunTable(req.runs), FrameType.PAGES, 'READ_PAGES');
      for (const f of frames) {
        const { data } = decodePages(f.payload);
        data.copy(out, pos);
        pos += data.length;
      }
    }
    if (pos !== total) throw new ProtocolError('HYDRA_PROTOCOL_SHORT_REPLY', `READ_PAGES returned ${pos} of ${total} bytes`);
    return out;
  }

  /** The committed device state (verified against meta's sha256 by the store). */
  async getDeviceState(generation?: number): Promise<Buffer> {
    const frames = await this.request(FrameType.GET_DEVSTATE, encodeJson(generation !== undefined ? { generation } : {}), FrameType.DEVSTATE, 'GET_DEVSTATE');
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

  async close(): Promise<void> {
    this.closing = true;
    this.sock.end();
    const t = setTimeout(() => this.sock.destroy(), 2000);
    await this.closed;
    clearTimeout(t);
  }
}
