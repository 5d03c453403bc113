/**
 * HydraVM store protocol: message payloads. Control messages are UTF-8 JSON
 * validated with zod; bulk messages are binary:
 *
 *   PAGES / READ_PAGES payload:
 *     u32 BE  run count N
 *     N x { u64 BE offset, u32 BE length }   (12 bytes each)
 *     data: the runs' bytes, contiguous, in run order (PAGES only; sum of lengths)
 *   DEVSTATE payload: raw device-state bytes; FrameFlag.MORE on all chunks but the last.
 *   DATA_RUNS payload: a READ_PAGES-style run table (no data): the runs of the
 *     pinned image that may hold non-zero bytes, ascending, each at most 1 GiB;
 *     FrameFlag.MORE on all frames but the last (at most MAX_DATA_RUNS_PER_FRAME runs each).
 *   HOT payload:
 *     u32 BE  region count N
 *     N x { u64 BE offset, f64 BE score }    (16 bytes each; hottest first)
 *     FrameFlag.MORE on all frames of a reply but the last (at most MAX_HOT_PER_FRAME regions each).
 *
 * Changing any payload layout requires a PROTOCOL_VERSION bump.
 */
import { z } from 'zod';
import { ProtocolError } from '../errors.js';
import { FrameType, frameTypeName } from './frames.js';

export type Role = 'checkpointer' | 'reader';
export type CheckpointKind = 'full' | 'incremental';

export interface PageRun {
  offset: number;
  length: number;
}

const int = z.number().int().nonnegative();
/** Generations, epochs, versions and counts are stored as u32: the wire may not carry more. */
const u32 = int.max(0xffffffff);
const hex32 = z.string().regex(/^[0-9a-f]{64}$/, '32 bytes as 64 lowercase hex digits');
const vmName = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/, 'VM name: letters, digits, . _ -, at most 64 characters');

export const helloSchema = z.object({
  minVersion: u32,
  maxVersion: u32,
  vm: vmName,
  generation: u32,
  role: z.enum(['checkpointer', 'reader']),
  /** The client's nonce (bound into both proofs and the session keys). */
  nonce: hex32,
});
export const challengeSchema = z.object({ version: u32, nonce: hex32 });
export const authSchema = z.object({ proof: hex32 });
export const welcomeSchema = z.object({
  version: u32,
  vm: z.string(),
  generation: u32,
  highestGeneration: u32,
  committedEpoch: u32.nullable(),
  /** The store's proof that it knows the shared secret (see auth.ts). */
  proof: hex32,
  /** The store drops a connection silent for this long; the client sends PING well within it. */
  idleTimeoutMs: z.number().int().positive(),
  /**
   * Optional requests this store serves beyond the base set ("hot": GET_HOT).
   * Absent from older stores; older clients ignore it.
   */
  features: z.array(z.string()).optional(),
});
export const beginSchema = z.object({
  epoch: u32.positive(),
  kind: z.enum(['full', 'incremental']),
  ramSize: z.number().int().positive(),
  pageSize: z.number().int().positive().optional(),
  config: z.unknown().optional(),
});
export const begunSchema = z.object({ epoch: u32 });
export const disksSchema = z.object({ ids: z.array(z.string().max(4096)).max(4096) });
export const commitSchema = z.object({ epoch: u32.optional() });
export const committedSchema = z.object({
  epoch: u32,
  durableAt: z.number(),
  applyMs: z.number(),
  bytes: int,
  pages: u32,
});
export const errorSchema = z.object({
  code: z.string(),
  message: z.string(),
  /** true when the error was not the reply to a request (e.g. ENOSPC while PAGES streamed). */
  unsolicited: z.boolean().optional(),
  committedEpoch: u32.nullable().optional(),
});
/**
 * GET_META: `epoch` refuses the reply (HYDRA_STORE_EPOCH_MOVED) unless the committed
 * epoch is that one; `pin` pins the connection to the generation and epoch
 * returned: every later READ_PAGES and GET_DEVSTATE on it is refused once that
 * generation's committed epoch moves, so a reader never mixes two epochs.
 */
/** GET_META: `applied` waits until the committed epoch is in the image file too (readers of the file itself). */
export const getMetaSchema = z.object({ generation: u32.optional(), epoch: u32.optional(), pin: z.boolean().optional(), applied: z.boolean().optional() });
/** GET_DEVSTATE: `epoch` refuses the reply unless the committed epoch is that one (a pinned connection implies it). */
export const getDevstateSchema = z.object({ generation: u32.optional(), epoch: u32.optional() });
export const abortSchema = z.object({});
/** GET_HOT: the heat record of this connection's generation (or `generation`), at most `limit` regions. */
export const getHotSchema = z.object({ generation: u32.optional(), limit: u32.optional() });

/** WELCOME feature name of stores that serve GET_HOT. */
export const FEATURE_HOT = 'hot';
/** GET_DATA_RUNS: for this connection's pinned generation and epoch. */
export const getDataRunsSchema = z.object({});
/** WELCOME feature name of stores that serve GET_DATA_RUNS. */
export const FEATURE_DATA_RUNS = 'data-runs';
/** Runs per DATA_RUNS frame (6 MiB of table); a longer list continues in further frames with MORE. */
export const MAX_DATA_RUNS_PER_FRAME = 512 * 1024;
/** Longest run in a DATA_RUNS table (the table's length field is 32 bits). */
export const MAX_DATA_RUN_BYTES = 1024 * 1024 * 1024;

export const epochStatSchema = z.object({
  epoch: u32,
  kind: z.enum(['full', 'incremental']),
  pages: u32,
  bytes: int,
  committedAt: z.string(),
  applyMs: z.number(),
});

/** What the store says about one VM generation's image (the meta.json body; also the META reply). */
export const storeMetaSchema = z.object({
  vm: z.string(),
  generation: u32,
  committedEpoch: u32,
  ramSize: z.number().int().positive(),
  pageSize: z.number().int().positive(),
  /** File name of the RAM image inside the generation directory (normally "memory.img"). */
  memoryFile: z.string(),
  devstate: z.object({ file: z.string(), size: int, sha256: z.string().regex(/^[0-9a-f]{64}$/) }),
  /** Disk layer ids of the committed epoch (opaque to the store). */
  disks: z.array(z.string()),
  /** The VM spec as the checkpointer sent it with the full checkpoint (opaque). */
  config: z.unknown(),
  createdAt: z.string(),
  committedAt: z.string(),
  /** Most recent checkpoints, newest last (bounded). */
  epochs: z.array(epochStatSchema),
});
export type StoreMeta = z.infer<typeof storeMetaSchema>;
export const metaReplySchema = z.object({ meta: storeMetaSchema.nullable() });

export type Hello = z.infer<typeof helloSchema>;
export type Welcome = z.infer<typeof welcomeSchema>;
export type Begin = z.infer<typeof beginSchema>;
export type Committed = z.infer<typeof committedSchema>;
export type ErrorMessage = z.infer<typeof errorSchema>;

export function encodeJson(value: unknown): Buffer {
  return Buffer.from(JSON.stringify(value), 'utf8');
}

/** Parse a JSON payload against its schema; a bad payload is a ProtocolError naming the frame type. */
export function decodeJson<T>(type: FrameType, payload: Buffer, schema: z.ZodType<T>): T {
  let raw: unknown;
  try {
    raw = JSON.parse(payload.toString('utf8'));
  } catch (err) {
    throw new ProtocolError('HYDRA_PROTOCOL_BAD_PAYLOAD', `${frameTypeName(type)} payload is not JSON`, { cause: err });
  }
  const r = schema.safeParse(raw);
  if (!r.success) {
    throw new ProtocolError('HYDRA_PROTOCOL_BAD_PAYLOAD', `${frameTypeName(type)} payload invalid: ${r.error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`).join('; ')}`);
  }
  return r.data;
}

/** A 2 MiB region of guest RAM (byte offset of its start) and how hot it is (higher: written more, more recently). */
export interface HotRegion {
  offset: number;
  score: number;
}

const HOT_ENTRY_SIZE = 16;
/** Regions per HOT frame (8 MiB of payload); a longer reply continues in further frames with MORE. */
export const MAX_HOT_PER_FRAME = 512 * 1024;

/** Encode one HOT frame payload. */
export function encodeHot(regions: readonly HotRegion[]): Buffer {
  const b = Buffer.allocUnsafe(4 + regions.length * HOT_ENTRY_SIZE);
  b.writeUInt32BE(regions.length, 0);
  let p = 4;
  for (const r of regions) {
    if (!Number.isSafeInteger(r.offset) || r.offset < 0 || !Number.isFinite(r.score)) {
      throw new ProtocolError('HYDRA_PROTOCOL_BAD_PAYLOAD', `bad hot region offset=${r.offset} score=${r.score}`);
    }
    b.writeBigUInt64BE(BigInt(r.offset), p);
    b.writeDoubleBE(r.score, p + 8);
    p += HOT_ENTRY_SIZE;
  }
  return b;
}

/** Decode one HOT frame payload. */
export function decodeHot(payload: Buffer): HotRegion[] {
  if (payload.length < 4) throw new ProtocolError('HYDRA_PROTOCOL_BAD_PAYLOAD', `HOT payload of ${payload.length} bytes is shorter than its count field`);
  const n = payload.readUInt32BE(0);
  if (payload.length !== 4 + n * HOT_ENTRY_SIZE) {
    throw new ProtocolError('HYDRA_PROTOCOL_BAD_PAYLOAD', `HOT payload of ${payload.length} bytes does not hold exactly ${n} regions`);
  }
  const out: HotRegion[] = new Array(n);
  for (let i = 0, p = 4; i < n; i++, p += HOT_ENTRY_SIZE) {
    const off = payload.readBigUInt64BE(p);
    const score = payload.readDoubleBE(p + 8);
    if (off > BigInt(Number.MAX_SAFE_INTEGER) || !Number.isFinite(score)) {
      throw new ProtocolError('HYDRA_PROTOCOL_BAD_PAYLOAD', `HOT region ${i}: offset ${off} score ${score} out of range`);
    }
    out[i] = { offset: Number(off), score };
  }
  return out;
}

const RUN_SIZE = 12;

/** Encode a run table (READ_PAGES) or a run table plus data (PAGES). Returns [table, data?] to avoid copying data. */
export function encodeRunTable(runs: readonly PageRun[]): Buffer {
  const b = Buffer.allocUnsafe(4 + runs.length * RUN_SIZE);
  b.writeUInt32BE(runs.length, 0);
  let p = 4;
  for (const r of runs) {
    if (!Number.isSafeInteger(r.offset) || r.offset < 0 || !Number.isInteger(r.length) || r.length < 0 || r.length > 0xffffffff) {
      throw new ProtocolError('HYDRA_PROTOCOL_BAD_RUN', `bad page run offset=${r.offset} length=${r.length}`);
    }
    b.writeBigUInt64BE(BigInt(r.offset), p);
    b.writeUInt32BE(r.length, p + 8);
    p += RUN_SIZE;
  }
  return b;
}

export function runsBytes(runs: readonly PageRun[]): number {
  let n = 0;
  for (const r of runs) n += r.length;
  return n;
}

/** Encode a PAGES payload: table then data (one buffer; the data is copied once). */
export function encodePages(runs: readonly PageRun[], data: Buffer): Buffer {
  const total = runsBytes(runs);
  if (total !== data.length) {
    throw new ProtocolError('HYDRA_PROTOCOL_BAD_RUN', `page runs cover ${total} bytes but ${data.length} data bytes were given`);
  }
  const table = encodeRunTable(runs);
  return Buffer.concat([table, data], table.length + data.length);
}

export interface DecodedPages {
  runs: PageRun[];
  /** The runs' bytes (a view into the payload). */
  data: Buffer;
  /** Offset of the data inside the payload. */
  dataOffset: number;
}

/** Decode a PAGES payload (or, with expectData=false, a READ_PAGES run table). */
export function decodePages(payload: Buffer, expectData = true): DecodedPages {
  if (payload.length < 4) throw new ProtocolError('HYDRA_PROTOCOL_BAD_PAYLOAD', `page-run payload of ${payload.length} bytes is shorter than its count field`);
  const n = payload.readUInt32BE(0);
  const tableEnd = 4 + n * RUN_SIZE;
  if (tableEnd > payload.length) {
    throw new ProtocolError('HYDRA_PROTOCOL_BAD_PAYLOAD', `page-run table of ${n} runs needs ${tableEnd} bytes, payload has ${payload.length}`);
  }
  const runs: PageRun[] = new Array(n);
  let total = 0;
  for (let i = 0, p = 4; i < n; i++, p += RUN_SIZE) {
    const off = payload.readBigUInt64BE(p);
    if (off > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError('HYDRA_PROTOCOL_BAD_RUN', `page run offset ${off} too large`);
    const length = payload.readUInt32BE(p + 8);
    runs[i] = { offset: Number(off), length };
    total += length;
  }
  if (expectData && total !== payload.length - tableEnd) {
    throw new ProtocolError('HYDRA_PROTOCOL_BAD_PAYLOAD', `page runs cover ${total} bytes but the frame carries ${payload.length - tableEnd} data bytes`);
  }
  if (!expectData && tableEnd !== payload.length) {
    throw new ProtocolError('HYDRA_PROTOCOL_BAD_PAYLOAD', `READ_PAGES payload has ${payload.length - tableEnd} trailing bytes`);
  }
  return { runs, data: payload.subarray(tableEnd), dataOffset: tableEnd };
}

/**
 * Split runs + contiguous data into batches of at most maxData bytes of data
 * each (a run longer than maxData is split). Data buffers are views, not copies.
 */
export function* batchRuns(runs: readonly PageRun[], data: Buffer | null, maxData: number): Generator<{ runs: PageRun[]; data: Buffer | null; bytes: number }> {
  let batch: PageRun[] = [];
  let batchStart = 0; // data offset where the batch starts
  let batchBytes = 0;
  let dataPos = 0;
  for (const r of runs) {
    let off = r.offset;
    let left = r.length;
    while (left > 0) {
      const room = maxData - batchBytes;
      const k = Math.min(room, left);
      const last = batch[batch.length - 1];
      if (last && last.offset + last.length === off) last.length += k;
      else batch.push({ offset: off, length: k });
      batchBytes += k;
      off += k;
      left -= k;
      dataPos += k;
      if (batchBytes === maxData) {
        yield { runs: batch, data: data ? data.subarray(batchStart, dataPos) : null, bytes: batchBytes };
        batch = [];
        batchStart = dataPos;
        batchBytes = 0;
      }
    }
  }
  if (batch.length > 0) yield { runs: batch, data: data ? data.subarray(batchStart, dataPos) : null, bytes: batchBytes };
}
