/** Hostile peers for the protocol security tests: a fake store, a raw client and a frame-rewriting relay. */
import net from 'node:net';
import fs from 'node:fs';
import { crc32 } from 'node:zlib';
import {
  FRAME_HEADER_SIZE, FRAME_TAG_SIZE, FrameDecoder, FrameFlag, FrameMac, FrameType, MAX_FRAME_PAYLOAD, PROTOCOL_VERSION,
  challengeSchema, decodeJson, deriveSession, encodeFrame, encodeJson, errorSchema, helloSchema, makeNonce, type Frame,
} from '../../src/protocol/index.js';

export function hostPort(address: string): { host: string; port: number } {
  const i = address.lastIndexOf(':');
  return { host: address.slice(0, i), port: Number(address.slice(i + 1)) };
}

/** A socket that hands out decoded frames one by one. */
export class RawPeer {
  readonly decoder = new FrameDecoder({ maxPayload: MAX_FRAME_PAYLOAD });
  private frames: Frame[] = [];
  private waiters: (() => void)[] = [];
  closed = false;
  error: Error | null = null;
  sendMac: FrameMac | null = null;

  constructor(readonly sock: net.Socket) {
    sock.on('data', (b: Buffer) => {
      try {
        this.frames.push(...this.decoder.push(b));
      } catch (err) {
        this.error = err as Error;
        sock.destroy();
      }
      this.wake();
    });
    sock.on('error', () => undefined); // the peer under test hanging up is an expected outcome, read through `closed`
    sock.on('close', () => {
      this.closed = true;
      this.wake();
    });
  }

  static connect(address: string): Promise<RawPeer> {
    return new Promise((resolve, reject) => {
      const s = net.connect(hostPort(address));
      s.once('connect', () => resolve(new RawPeer(s)));
      s.once('error', reject);
    });
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /** The next frame, or null once the peer closed without sending one. */
  async next(timeoutMs = 10_000): Promise<Frame | null> {
    const deadline = Date.now() + timeoutMs;
    while (this.frames.length === 0 && !this.closed) {
      if (Date.now() > deadline) throw new Error('no frame within the timeout');
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 200);
      });
    }
    return this.frames.shift() ?? null;
  }

  /** Put a frame back to be read again by next(). */
  unread(f: Frame): void {
    this.frames.unshift(f);
  }

  send(type: FrameType, payload: Buffer): void {
    this.sock.write(encodeFrame(type, payload, this.sendMac ? { mac: this.sendMac } : {}));
  }

  /** Wait for the close; returns the ERROR code the peer sent before it, if any. */
  async closedWith(timeoutMs = 10_000): Promise<string | null> {
    let code: string | null = null;
    for (;;) {
      const f = await this.next(timeoutMs);
      if (!f) return code;
      if (f.type === FrameType.ERROR) code = decodeJson(f.type, f.payload, errorSchema).code;
    }
  }
}

/**
 * Client side of the handshake by hand. `secret` null: the peer does not know
 * it and sends a random proof. Returns the peer, authenticated or not.
 */
export async function rawHandshake(address: string, opts: { secret: string | null; vm: string; generation: number; role?: 'checkpointer' | 'reader' }): Promise<{ peer: RawPeer; welcome: Frame | null }> {
  const peer = await RawPeer.connect(address);
  const nonce = makeNonce();
  const hello = encodeJson({ minVersion: PROTOCOL_VERSION, maxVersion: PROTOCOL_VERSION, vm: opts.vm, generation: opts.generation, role: opts.role ?? 'checkpointer', nonce: nonce.toString('hex') });
  peer.send(FrameType.HELLO, hello);
  const ch = await peer.next();
  if (!ch || ch.type !== FrameType.CHALLENGE) {
    if (ch) peer.unread(ch);
    return { peer, welcome: null };
  }
  const c = decodeJson(ch.type, ch.payload, challengeSchema);
  const proof = opts.secret === null ? makeNonce() : deriveSession(opts.secret, nonce, Buffer.from(c.nonce, 'hex'), hello, ch.payload).clientProof;
  if (opts.secret !== null) {
    const keys = deriveSession(opts.secret, nonce, Buffer.from(c.nonce, 'hex'), hello, ch.payload);
    peer.decoder.setReceiveMac({ mac: new FrameMac(keys.serverToClient), peer: 'store' });
  }
  peer.send(FrameType.AUTH, encodeJson({ proof: proof.toString('hex') }));
  const w = await peer.next();
  if (!w || w.type !== FrameType.WELCOME) {
    if (w) peer.unread(w);
    return { peer, welcome: null };
  }
  if (opts.secret !== null) peer.sendMac = new FrameMac(deriveSession(opts.secret, nonce, Buffer.from(c.nonce, 'hex'), hello, ch.payload).clientToServer);
  return { peer, welcome: w };
}

export interface FakeStoreBehaviour {
  /** Secret the fake store uses for its proofs and tags; null: it does not know one. */
  secret: string | null;
  /** Tag WELCOME (with keys from `secret`, or random keys when it has none). */
  tagWelcome: boolean;
  /** Check the client's AUTH proof (a fake store with the secret may skip it to test the client's own check). */
  checkClientProof?: boolean;
}

/** A store impostor: answers HELLO and AUTH the way `b` says. Records what the client sent. */
export async function fakeStore(b: FakeStoreBehaviour): Promise<{ address: string; received: FrameType[]; close(): Promise<void> }> {
  const received: FrameType[] = [];
  const socks = new Set<net.Socket>();
  const server = net.createServer((sock) => {
    socks.add(sock);
    sock.on('close', () => socks.delete(sock));
    sock.on('error', () => undefined); // the client hanging up on the impostor is the expected outcome
    const peer = new RawPeer(sock);
    void (async () => {
      const h = await peer.next();
      if (!h) return;
      received.push(h.type);
      const hello = decodeJson(h.type, h.payload, helloSchema);
      const serverNonce = makeNonce();
      const challenge = encodeJson({ version: PROTOCOL_VERSION, nonce: serverNonce.toString('hex') });
      const keys = deriveSession(b.secret ?? makeNonce().toString('hex'), Buffer.from(hello.nonce, 'hex'), serverNonce, h.payload, challenge);
      peer.send(FrameType.CHALLENGE, challenge);
      const a = await peer.next();
      if (!a) return;
      received.push(a.type);
      const proof = Buffer.from((JSON.parse(a.payload.toString()) as { proof: string }).proof, 'hex');
      if (b.checkClientProof && !proof.equals(keys.clientProof)) {
        peer.send(FrameType.ERROR, encodeJson({ code: 'HYDRA_STORE_AUTH_FAILED', message: 'fake store: bad proof' }));
        sock.end();
        return;
      }
      peer.decoder.setReceiveMac({ mac: new FrameMac(keys.clientToServer), peer: 'client' });
      if (b.tagWelcome) peer.sendMac = new FrameMac(keys.serverToClient);
      peer.send(FrameType.WELCOME, encodeJson({
        version: PROTOCOL_VERSION, vm: hello.vm, generation: hello.generation, highestGeneration: hello.generation, committedEpoch: null,
        proof: keys.serverProof.toString('hex'), idleTimeoutMs: 20_000, features: [],
      }));
      for (;;) {
        const f = await peer.next(60_000);
        if (!f) return;
        received.push(f.type);
      }
    })().catch(() => sock.destroy());
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const a = server.address() as net.AddressInfo;
  return {
    address: `127.0.0.1:${a.port}`,
    received,
    close: () => new Promise<void>((r) => {
      for (const s of socks) s.destroy();
      server.close(() => r());
    }),
  };
}

/** One frame as it crossed the relay: whole bytes (header, payload, tag) and its index in its direction. */
export interface RelayedFrame {
  bytes: Buffer;
  type: FrameType;
  index: number;
}

/** What a relay does with a frame: forward it (possibly changed), drop it (null), or send several. */
export type FrameRewrite = (f: RelayedFrame) => Buffer | Buffer[] | null;

/**
 * A man in the middle that parses frames in both directions and lets the test
 * rewrite them. Every byte of both directions is also recorded.
 */
export async function frameRelay(target: string, rw: { c2s?: FrameRewrite; s2c?: FrameRewrite } = {}): Promise<{ address: string; recorded: { c2s: Buffer[]; s2c: Buffer[] }; close(): Promise<void> }> {
  const recorded = { c2s: [] as Buffer[], s2c: [] as Buffer[] };
  const socks = new Set<net.Socket>();
  const pipe = (from: net.Socket, to: net.Socket, rewrite: FrameRewrite | undefined, log: Buffer[]) => {
    let buf = Buffer.alloc(0);
    let index = 0;
    from.on('data', (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      for (;;) {
        if (buf.length < FRAME_HEADER_SIZE) return;
        const len = buf.readUInt32BE(12) + (buf.readUInt32BE(8) & FrameFlag.MAC ? FRAME_TAG_SIZE : 0);
        if (buf.length < FRAME_HEADER_SIZE + len) return;
        const bytes = buf.subarray(0, FRAME_HEADER_SIZE + len);
        buf = buf.subarray(FRAME_HEADER_SIZE + len);
        log.push(Buffer.from(bytes));
        const out = rewrite ? rewrite({ bytes: Buffer.from(bytes), type: bytes.readUInt16BE(6), index: index++ }) : bytes;
        if (out === null) continue;
        for (const b of Array.isArray(out) ? out : [out]) if (!to.destroyed) to.write(b);
      }
    });
    from.on('close', () => to.destroy());
    from.on('error', () => to.destroy());
  };
  const server = net.createServer((c) => {
    const s = net.connect(hostPort(target));
    socks.add(c);
    socks.add(s);
    pipe(c, s, rw.c2s, recorded.c2s);
    pipe(s, c, rw.s2c, recorded.s2c);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const a = server.address() as net.AddressInfo;
  return {
    address: `127.0.0.1:${a.port}`,
    recorded,
    close: () => new Promise<void>((r) => {
      for (const s of socks) s.destroy();
      server.close(() => r());
    }),
  };
}

/** Flip one bit of a frame's payload at `at` (relative to the payload) and fix the CRC up, so only the tag can catch it. */
export function flipPayloadBit(bytes: Buffer, at: number, fixCrc: boolean): Buffer {
  const b = Buffer.from(bytes);
  const len = b.readUInt32BE(12);
  b[FRAME_HEADER_SIZE + at]! ^= 0x01;
  if (fixCrc) b.writeUInt32BE(crc32(b.subarray(FRAME_HEADER_SIZE, FRAME_HEADER_SIZE + len)), 16);
  return b;
}

export { makeTlsFiles } from '../../src/util/openssl-certs.js';

/** Resident set size of a process in bytes, from /proc/<pid>/status. */
export function rssBytes(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(m[1]) * 1024;
}
