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
 *
 * The length is checked against the maximum before anything is allocated, and
 * the CRC is checked before a frame is handed on. A decoding error is fatal to
 * the connection: the stream cannot be resynchronised.
 */
import { crc32 } from 'node:zlib';
import { ProtocolError } from '../errors.js';

export const FRAME_MAGIC = Buffer.from('HVMP', 'latin1');
export const FRAME_HEADER_SIZE = 20;
/** The protocol version this build speaks. */
export const PROTOCOL_VERSION = 1;
/** Oldest version this build still speaks (HELLO negotiates inside [MIN, PROTOCOL_VERSION]). */
export const MIN_PROTOCOL_VERSION = 1;
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
}

export enum FrameFlag {
  /** More frames of the same message follow (DEVSTATE chunks, PAGES replies). */
  MORE = 1,
}

export interface Frame {
  version: number;
  type: FrameType;
  flags: number;
  payload: Buffer;
  /** The payload CRC as carried by the frame (verified). */
  crc: number;
}

export function frameTypeName(type: number): string {
  return FrameType[type] ?? `type#${type}`;
}

/**
 * Encode one frame. Returns [header, payload] so large payloads are not copied;
 * write both (socket.cork/uncork or writev). `crc` may be passed when known.
 */
export function encodeFrameParts(type: FrameType, payload: Buffer, opts: { flags?: number; version?: number; crc?: number } = {}): [Buffer, Buffer] {
  const header = Buffer.allocUnsafe(FRAME_HEADER_SIZE);
  FRAME_MAGIC.copy(header, 0);
  header.writeUInt16BE(opts.version ?? PROTOCOL_VERSION, 4);
  header.writeUInt16BE(type, 6);
  header.writeUInt32BE((opts.flags ?? 0) >>> 0, 8);
  header.writeUInt32BE(payload.length, 12);
  header.writeUInt32BE(opts.crc ?? crc32(payload), 16);
  return [header, payload];
}

/** Encode one frame into a single buffer (small frames, tests). */
export function encodeFrame(type: FrameType, payload: Buffer, opts: { flags?: number; version?: number } = {}): Buffer {
  return Buffer.concat(encodeFrameParts(type, payload, opts));
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

/**
 * Incremental frame decoder: push() socket chunks, get whole frames back.
 * Holds at most one partial frame (bounded by maxPayload + header).
 */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private header: { version: number; type: number; flags: number; length: number; crc: number } | null = null;
  private readonly maxPayload: number;
  private version: number;
  private failed = false;

  constructor(opts: FrameDecoderOptions = {}) {
    this.maxPayload = opts.maxPayload ?? MAX_FRAME_PAYLOAD;
    this.version = opts.acceptVersion ?? PROTOCOL_VERSION;
  }

  setVersion(v: number): void {
    this.version = v;
  }

  /** Bytes held waiting for the rest of a frame. */
  get pendingBytes(): number {
    return this.buffered;
  }

  /** True while a frame was started but not completed (a torn frame if the stream ends now). */
  get midFrame(): boolean {
    return this.buffered > 0 || this.header !== null;
  }

  /** Feed bytes; returns the complete frames they finish. Throws ProtocolError on bad input. */
  push(chunk: Buffer): Frame[] {
    if (this.failed) throw new ProtocolError('HYDRA_PROTOCOL_DECODER_FAILED', 'frame decoder already failed; the connection must be closed');
    if (chunk.length > 0) {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
    }
    const out: Frame[] = [];
    try {
      for (;;) {
        if (this.header === null) {
          if (this.buffered < FRAME_HEADER_SIZE) break;
          const h = this.take(FRAME_HEADER_SIZE);
          this.header = parseHeader(h, this.maxPayload, this.version);
        }
        if (this.buffered < this.header.length) break;
        const payload = this.take(this.header.length);
        const crc = crc32(payload);
        if (crc !== this.header.crc) {
          throw new ProtocolError('HYDRA_PROTOCOL_BAD_CRC', `${frameTypeName(this.header.type)} frame payload crc32 ${hex(crc)} != header crc32 ${hex(this.header.crc)} (${this.header.length} bytes)`);
        }
        out.push({ version: this.header.version, type: this.header.type as FrameType, flags: this.header.flags, payload, crc });
        this.header = null;
      }
    } catch (err) {
      this.failed = true;
      this.chunks = [];
      this.buffered = 0;
      throw err;
    }
    return out;
  }

  private take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    if (first.length >= n) {
      const out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      this.buffered -= n;
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let off = 0;
    while (off < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - off);
      c.copy(out, off, 0, k);
      off += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.buffered -= n;
    return out;
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
  return { version, type, flags, length, crc };
}

function hex(n: number): string {
  return '0x' + n.toString(16).padStart(8, '0');
}
