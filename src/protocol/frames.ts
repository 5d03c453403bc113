/**
 * HydraVM store protocol: the frame layer. This module owns the byte layout;
 * changing it requires a PROTOCOL_VERSION bump.
 *
 *   offset size  field
 *   0      4     magic 'HVMP' (0x48 0x56 0x4d 0x50)
 *   4      2     version        u16 big-endian (PROTOCOL_VERSION)
 *   6      2     type           u16 big-endian (FrameType)
 *   8      4     flags          u32 big-endian (FrameFlag bits)
 *   12     4     payload length u32 big-endian (<= the decoder's maxPayload)
 *   16     4     crc32 (zlib/IEEE) of the payload, u32 big-endian
 *   20     n     payload
 *   20+n   16    tag, only when flags has FrameFlag.MAC:
 *                HMAC-SHA256(direction key, u64 BE sequence || bytes 0..20 || payload), first 16 bytes
 *
 * Every frame after the handshake carries a tag (src/protocol/auth.ts derives
 * the per-direction keys); the sequence number counts the tagged frames of one
 * direction from 0, so a replayed, dropped, reordered or altered frame fails.
 * The length is checked against the maximum before anything is allocated; the
 * CRC and the tag are checked before a frame is handed on. A decoding error is
 * fatal to the connection: the stream cannot be resynchronised.
 */
import { createHmac, timingSafeEqual, type Hmac } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { ProtocolError } from '../errors.js';

export const FRAME_MAGIC = Buffer.from('HVMP', 'latin1');
export const FRAME_HEADER_SIZE = 20;
/** The protocol version this build speaks (2: mutual authentication and frame tags). */
export const PROTOCOL_VERSION = 2;
/**
 * Oldest version this build still speaks (HELLO negotiates inside [MIN, PROTOCOL_VERSION]).
 * Version 1 (one-way authentication, no frame tags) is refused: accepting it would let a
 * peer downgrade every connection to it.
 */
export const MIN_PROTOCOL_VERSION = 2;
/** Size of the tag after the payload of a FrameFlag.MAC frame. */
export const FRAME_TAG_SIZE = 16;
/** Largest payload accepted before the peer has authenticated (HELLO, CHALLENGE, AUTH are far smaller). */
export const MAX_PREAUTH_PAYLOAD = 4096;
/** Default largest accepted payload: 16 MiB (a PAGES frame carries at most MAX_PAGES_DATA of page data). */
export const MAX_FRAME_PAYLOAD = 16 * 1024 * 1024;
/** Page data per PAGES frame the client and server produce: 8 MiB. */
export const MAX_PAGES_DATA = 8 * 1024 * 1024;

export enum FrameType {
  HELLO = 1,
  CHALLENGE = 2,
  AUTH = 3,
  WELCOME = 4,
  BEGIN = 5,
  BEGUN = 6,
  PAGES = 7,
  DEVSTATE = 8,
  DISKS = 9,
  COMMIT = 10,
  COMMITTED = 11,
  ERROR = 12,
  GET_META = 13,
  META = 14,
  READ_PAGES = 15,
  GET_DEVSTATE = 16,
  ABORT = 17,
  /** Reader request for the heat record (only sent to a store whose WELCOME lists the "hot" feature). */
  GET_HOT = 18,
  HOT = 19,
  /** Keepalive from the client; the store answers PONG. Both are tagged like any frame after the handshake. */
  PING = 20,
  PONG = 21,
  /** Reader request for the runs of the pinned image that hold data (only to a store whose WELCOME lists "data-runs"). */
  GET_DATA_RUNS = 22,
  DATA_RUNS = 23,
}

export enum FrameFlag {
  /** More frames of the same message follow (DEVSTATE chunks, PAGES replies). */
  MORE = 1,
  /** A FRAME_TAG_SIZE tag follows the payload. */
  MAC = 2,
}

/**
 * The tag state of one direction of one connection: the key and the sequence
 * number of the next tagged frame. The sender and the receiver each hold one.
 */
export class FrameMac {
  private seq = 0n;
  constructor(private readonly key: Buffer) {}

  /** Tag of the next frame (header already complete, payload in parts); advances the sequence. */
  next(header: Buffer, parts: readonly Buffer[]): Buffer {
    const seq = Buffer.allocUnsafe(8);
    seq.writeBigUInt64BE(this.seq++);
    const h = createHmac('sha256', this.key).update(seq).update(header);
    for (const p of parts) h.update(p);
    return h.digest().subarray(0, FRAME_TAG_SIZE);
  }

  /** Start the tag of the next frame over its header (the payload follows in pieces through update()); advances the sequence. */
  begin(header: Buffer): Hmac {
    const seq = Buffer.allocUnsafe(8);
    seq.writeBigUInt64BE(this.seq++);
    return createHmac('sha256', this.key).update(seq).update(header);
  }

  /** Whether a tag started with begin() and fed the whole payload matches the received one. */
  static matches(h: Hmac, tag: Buffer): boolean {
    const expected = h.digest().subarray(0, FRAME_TAG_SIZE);
    return tag.length === expected.length && timingSafeEqual(tag, expected);
  }

  /** Check a received frame's tag against the next sequence number; advances it. */
  verify(header: Buffer, payload: Buffer, tag: Buffer): boolean {
    const expected = this.next(header, [payload]);
    return tag.length === expected.length && timingSafeEqual(tag, expected);
  }

  /** Sequence number of the next frame (reported in errors). */
  get sequence(): bigint {
    return this.seq;
  }
}

export interface Frame {
  version: number;
  type: FrameType;
  flags: number;
  payload: Buffer;
  /** The payload CRC as carried by the frame (verified). */
  crc: number;
  /** True when the frame carried a tag and the tag was verified with the receive key. */
  authenticated: boolean;
}

export function frameTypeName(type: number): string {
  return FrameType[type] ?? `type#${type}`;
}

export interface EncodeOptions {
  flags?: number;
  version?: number;
  /** CRC of the payload parts when already known. */
  crc?: number;
  /** Tag the frame with the sender's state (sets FrameFlag.MAC and appends the tag). */
  mac?: FrameMac;
}

/**
 * Encode one frame whose payload is given in parts. Returns [header, ...parts, tag?]
 * so large payloads are not copied; write them all in order (socket.cork/uncork).
 */
export function encodeFrameParts(type: FrameType, parts: readonly Buffer[], opts: EncodeOptions = {}): Buffer[] {
  let length = 0;
  let crc = 0;
  for (const p of parts) {
    length += p.length;
    if (opts.crc === undefined) crc = crc32(p, crc);
  }
  const header = Buffer.allocUnsafe(FRAME_HEADER_SIZE);
  FRAME_MAGIC.copy(header, 0);
  header.writeUInt16BE(opts.version ?? PROTOCOL_VERSION, 4);
  header.writeUInt16BE(type, 6);
  header.writeUInt32BE(((opts.flags ?? 0) | (opts.mac ? FrameFlag.MAC : 0)) >>> 0, 8);
  header.writeUInt32BE(length, 12);
  header.writeUInt32BE(opts.crc ?? crc, 16);
  const out = [header, ...parts];
  if (opts.mac) out.push(opts.mac.next(header, parts));
  return out;
}

/** Encode one frame into a single buffer (small frames, tests). */
export function encodeFrame(type: FrameType, payload: Buffer, opts: EncodeOptions = {}): Buffer {
  return Buffer.concat(encodeFrameParts(type, [payload], opts));
}

export interface FrameDecoderOptions {
  /** Largest payload accepted; a bigger length is an error, never an allocation. */
  maxPayload?: number;
  /**
   * Version accepted in frame headers. HELLO and ERROR frames are accepted at any
   * version (their payloads never change: HELLO negotiates the version, ERROR
   * must be readable to report a mismatch); after negotiation call setVersion().
   */
  acceptVersion?: number;
}

/** Payloads from POOL_MIN to POOL_BUFFER bytes (page replies) are assembled in recyclable buffers; POOL_KEEP kept spare. */
const POOL_MIN = 1024 * 1024;
const POOL_BUFFER = MAX_PAGES_DATA + 64 * 1024;
const POOL_KEEP = 8;

/** Tag checking of received frames (set once the session keys are known). */
export interface ReceiveMac {
  mac: FrameMac;
  /** What a bad tag means, for the error message (e.g. "store 10.0.0.1:7780"). */
  peer: string;
}

/**
 * Incremental frame decoder: push() socket chunks, get whole frames back.
 * Each frame's payload is assembled in its own buffer as the bytes arrive,
 * and its CRC and tag are computed piece by piece on the way, while each
 * piece is still in the cache: the payload is touched once, and no socket
 * chunk is kept after push() returns. Holds at most one partial frame
 * (bounded by maxPayload + header + tag).
 */
export class FrameDecoder {
  private readonly headBuf = Buffer.allocUnsafe(FRAME_HEADER_SIZE);
  private headFill = 0;
  private header: { version: number; type: number; flags: number; length: number; crc: number; raw: Buffer } | null = null;
  private body: Buffer | null = null;
  private bodyFill = 0;
  private bodyCrc = 0;
  private bodyMac: Hmac | null = null;
  private readonly tagBuf = Buffer.allocUnsafe(FRAME_TAG_SIZE);
  private tagFill = 0;
  private maxPayload: number;
  private version: number;
  private failed = false;
  private recv: ReceiveMac | null = null;
  /** Payload buffers handed back by the consumer (recycle()), for the next large frames. */
  private readonly spare: ArrayBuffer[] = [];
  private readonly pooled = new WeakSet<ArrayBuffer>();

  constructor(opts: FrameDecoderOptions = {}) {
    this.maxPayload = opts.maxPayload ?? MAX_FRAME_PAYLOAD;
    this.version = opts.acceptVersion ?? PROTOCOL_VERSION;
  }

  /**
   * Hand back the memory of a received payload (or a view into it) that the
   * consumer is done with: the next large frame is assembled in it instead of
   * a new allocation. Only for payloads nothing refers to any more.
   */
  recycle(view: Uint8Array): void {
    const ab = view.buffer as ArrayBuffer;
    if (this.pooled.has(ab) && this.spare.length < POOL_KEEP && !this.spare.includes(ab)) this.spare.push(ab);
  }

  private payloadBuffer(length: number): Buffer {
    if (length === 0) return Buffer.alloc(0);
    if (length < POOL_MIN || length > POOL_BUFFER) return Buffer.allocUnsafe(length);
    let ab = this.spare.pop();
    if (!ab) {
      ab = new ArrayBuffer(POOL_BUFFER);
      this.pooled.add(ab);
    }
    return Buffer.from(ab, 0, length);
  }

  setVersion(v: number): void {
    this.version = v;
  }

  /** Change the largest accepted payload (raised once the peer has authenticated). */
  setMaxPayload(n: number): void {
    this.maxPayload = n;
  }

  /** Verify tags of received frames from now on with this state. */
  setReceiveMac(r: ReceiveMac): void {
    this.recv = r;
  }

  /** Bytes held waiting for the rest of a frame. */
  get pendingBytes(): number {
    return this.headFill + this.bodyFill + this.tagFill + (this.header ? FRAME_HEADER_SIZE : 0);
  }

  /** True while a frame was started but not completed (a torn frame if the stream ends now). */
  get midFrame(): boolean {
    return this.headFill > 0 || this.header !== null;
  }

  /** Feed bytes; returns the complete frames they finish. Throws ProtocolError on bad input. */
  push(chunk: Buffer): Frame[] {
    if (this.failed) throw new ProtocolError('HYDRA_PROTOCOL_DECODER_FAILED', 'frame decoder already failed; the connection must be closed');
    const out: Frame[] = [];
    let pos = 0;
    try {
      while (pos < chunk.length || (this.header !== null && this.frameDone())) {
        if (this.header === null) {
          const k = Math.min(FRAME_HEADER_SIZE - this.headFill, chunk.length - pos);
          chunk.copy(this.headBuf, this.headFill, pos, pos + k);
          this.headFill += k;
          pos += k;
          if (this.headFill < FRAME_HEADER_SIZE) break;
          this.headFill = 0;
          this.startFrame(parseHeader(this.headBuf, this.maxPayload, this.version));
          continue;
        }
        const h = this.header;
        if (this.bodyFill < h.length) {
          const k = Math.min(h.length - this.bodyFill, chunk.length - pos);
          const piece = chunk.subarray(pos, pos + k);
          piece.copy(this.body!, this.bodyFill);
          this.bodyCrc = crc32(piece, this.bodyCrc);
          this.bodyMac?.update(piece);
          this.bodyFill += k;
          pos += k;
        }
        const tagged = (h.flags & FrameFlag.MAC) !== 0;
        if (this.bodyFill === h.length && tagged && this.tagFill < FRAME_TAG_SIZE) {
          const k = Math.min(FRAME_TAG_SIZE - this.tagFill, chunk.length - pos);
          chunk.copy(this.tagBuf, this.tagFill, pos, pos + k);
          this.tagFill += k;
          pos += k;
        }
        if (!this.frameDone()) break;
        out.push(this.finishFrame());
      }
    } catch (err) {
      this.failed = true;
      this.header = null;
      this.body = null;
      this.bodyMac = null;
      throw err;
    }
    return out;
  }

  private frameDone(): boolean {
    const h = this.header!;
    return this.bodyFill === h.length && ((h.flags & FrameFlag.MAC) === 0 || this.tagFill === FRAME_TAG_SIZE);
  }

  private startFrame(h: NonNullable<FrameDecoder['header']>): void {
    this.header = h;
    this.body = this.payloadBuffer(h.length);
    this.bodyFill = 0;
    this.bodyCrc = 0;
    this.tagFill = 0;
    // The tag's sequence number is taken when the frame starts: frames of a connection arrive whole and in order.
    this.bodyMac = (h.flags & FrameFlag.MAC) !== 0 && this.recv ? this.recv.mac.begin(h.raw) : null;
  }

  private finishFrame(): Frame {
    const h = this.header!;
    const payload = this.body!;
    const crc = h.length === 0 ? crc32(payload) : this.bodyCrc;
    const name = frameTypeName(h.type);
    if (crc !== h.crc) {
      throw new ProtocolError('HYDRA_PROTOCOL_BAD_CRC', `${name} frame payload crc32 ${hex(crc)} != header crc32 ${hex(h.crc)} (${h.length} bytes)`);
    }
    let authenticated = false;
    if ((h.flags & FrameFlag.MAC) !== 0) {
      if (!this.recv || !this.bodyMac) throw new ProtocolError('HYDRA_PROTOCOL_UNEXPECTED', `${name} frame carries a tag before the session keys exist (during the handshake)`);
      const seq = this.recv.mac.sequence - 1n;
      if (!FrameMac.matches(this.bodyMac, this.tagBuf)) {
        throw new ProtocolError('HYDRA_PROTOCOL_BAD_MAC', `${name} frame #${seq} from ${this.recv.peer} fails its tag check (altered, replayed, reordered, or not from the session's peer)`);
      }
      authenticated = true;
    }
    this.header = null;
    this.body = null;
    this.bodyMac = null;
    return { version: h.version, type: h.type as FrameType, flags: h.flags, payload, crc, authenticated };
  }
}

function parseHeader(h: Buffer, maxPayload: number, acceptVersion: number) {
  if (!h.subarray(0, 4).equals(FRAME_MAGIC)) {
    throw new ProtocolError('HYDRA_PROTOCOL_BAD_MAGIC', `bad frame magic ${h.subarray(0, 4).toString('hex')} (expected ${FRAME_MAGIC.toString('hex')} "HVMP"): not a HydraVM store peer?`);
  }
  const version = h.readUInt16BE(4);
  const type = h.readUInt16BE(6);
  const flags = h.readUInt32BE(8);
  const length = h.readUInt32BE(12);
  const crc = h.readUInt32BE(16);
  if (type !== FrameType.HELLO && type !== FrameType.ERROR && version !== acceptVersion) {
    throw new ProtocolError('HYDRA_PROTOCOL_VERSION', `protocol version mismatch: peer sent version ${version}, this side speaks version ${acceptVersion}`);
  }
  if (FrameType[type] === undefined) {
    throw new ProtocolError('HYDRA_PROTOCOL_BAD_TYPE', `unknown frame type ${type}`);
  }
  if (length > maxPayload) {
    throw new ProtocolError('HYDRA_PROTOCOL_FRAME_TOO_LARGE', `${frameTypeName(type)} frame payload length ${length} exceeds the maximum ${maxPayload}`);
  }
  return { version, type, flags, length, crc, raw: Buffer.from(h) };
}

function hex(n: number): string {
  return '0x' + n.toString(16).padStart(8, '0');
}
