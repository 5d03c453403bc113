/**
 * The checkpoint journal of one VM generation (`gen-<g>/journal`). It holds at
 * most one checkpoint: the one being committed. Layout (all integers big-endian);
 * changing it requires a JOURNAL_VERSION bump:
 *
 *   file header (16 bytes)
 *     0  4  magic 'HVMJ'
 *     4  2  version (JOURNAL_VERSION)
 *     6  2  reserved (0)
 *     8  4  generation
 *     12 4  crc32 of bytes 0..11
 *   records, each:
 *     0  2  type (RecordType)
 *     2  2  flags (0)
 *     4  4  epoch
 *     8  4  seq (BEGIN is 0, then 1, 2, ...)
 *     12 4  body length
 *     16 4  crc32 of the body
 *     20 4  crc32 of header bytes 0..19
 *     24 n  body
 *
 *   BEGIN    body: JSON { vm, generation, epoch, kind, ramSize, pageSize, config?, startedAt }
 *   PAGES    body: the PAGES wire payload (u32 n, n x {u64 offset, u32 length}, data)
 *   DEVSTATE body: a chunk of device state (chunks concatenate in order)
 *   DISKS    body: JSON { ids }
 *   END      body: JSON { records, pages, bytes, devstateSize, devstateSha256, checksum }
 *            checksum = crc32 over the sequence of body crc32s (u32 BE each) of records 0..END-1
 *
 * A checkpoint is complete when BEGIN..END are all present with valid CRCs,
 * consecutive seq numbers, the same epoch, and END's counts and checksum agree.
 * Anything after an invalid record is a torn tail and is discarded; anything
 * after END is stale (an earlier, longer checkpoint whose truncation was lost).
 */
import fs from 'node:fs/promises';
import { crc32 } from 'node:zlib';
import { StoreError } from '../errors.js';
import type { FaultInjector } from './faults.js';
import { fsyncDir, openPrivate, pwriteAll, preadAll, step } from './fsutil.js';
import path from 'node:path';

export const JOURNAL_MAGIC = Buffer.from('HVMJ', 'latin1');
export const JOURNAL_VERSION = 1;
export const JOURNAL_HEADER_SIZE = 16;
export const RECORD_HEADER_SIZE = 24;
/** Largest record body accepted when scanning (a PAGES frame payload is at most 16 MiB). */
export const MAX_RECORD_BODY = 17 * 1024 * 1024;
/** Start a background fdatasync of the journal every this many appended bytes. */
const BACKGROUND_SYNC_BYTES = 8 * 1024 * 1024;

export enum RecordType {
  BEGIN = 1,
  PAGES = 2,
  DEVSTATE = 3,
  DISKS = 4,
  END = 5,
}

export interface JournalRecordRef {
  type: RecordType;
  seq: number;
  /** File offset of the body. */
  bodyPos: number;
  bodyLen: number;
  bodyCrc: number;
}

export interface BeginBody {
  vm: string;
  generation: number;
  epoch: number;
  kind: 'full' | 'incremental';
  ramSize: number;
  pageSize: number;
  config?: unknown;
  startedAt: string;
}

export interface EndBody {
  records: number;
  pages: number;
  bytes: number;
  devstateSize: number;
  devstateSha256: string;
  checksum: number;
}

/** A complete checkpoint found in (or written to) the journal: what replay needs. */
export interface JournalCheckpoint {
  begin: BeginBody;
  end: EndBody;
  records: JournalRecordRef[];
  disks: string[] | null;
}

export function encodeJournalHeader(generation: number): Buffer {
  const h = Buffer.alloc(JOURNAL_HEADER_SIZE);
  JOURNAL_MAGIC.copy(h, 0);
  h.writeUInt16BE(JOURNAL_VERSION, 4);
  h.writeUInt32BE(generation, 8);
  h.writeUInt32BE(crc32(h.subarray(0, 12)), 12);
  return h;
}

export function encodeRecordHeader(type: RecordType, epoch: number, seq: number, bodyLen: number, bodyCrc: number): Buffer {
  const h = Buffer.alloc(RECORD_HEADER_SIZE);
  h.writeUInt16BE(type, 0);
  h.writeUInt16BE(0, 2);
  h.writeUInt32BE(epoch, 4);
  h.writeUInt32BE(seq, 8);
  h.writeUInt32BE(bodyLen, 12);
  h.writeUInt32BE(bodyCrc >>> 0, 16);
  h.writeUInt32BE(crc32(h.subarray(0, 20)), 20);
  return h;
}

/** Running whole-checkpoint checksum: crc32 over the body crcs in record order. */
export function chainChecksum(prev: number, bodyCrc: number): number {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(bodyCrc >>> 0, 0);
  return crc32(b, prev);
}

/**
 * Appends one checkpoint's records. Not safe for concurrent use: the caller
 * serialises appends (the server handles one connection's frames in order).
 */
export class JournalWriter {
  private pos = JOURNAL_HEADER_SIZE;
  private seq = 0;
  private epoch = 0;
  private checksum = 0;
  private refs: JournalRecordRef[] = [];
  /** Background fdatasync started while records stream in, so END's sync has little left to do. */
  private bgSync: Promise<void> | null = null;
  private unsynced = 0;

  private constructor(
    private readonly fh: fs.FileHandle,
    readonly file: string,
    private readonly generation: number,
    private readonly faults?: FaultInjector,
  ) {}

  /** Open (creating if needed) the journal of a generation. Does not read or reset it. */
  static async open(file: string, generation: number, faults?: FaultInjector): Promise<JournalWriter> {
    const fh = await step('open', file, async () => {
      try {
        return await fs.open(file, 'r+');
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
        const h = await openPrivate(file, 'w+');
        await h.write(encodeJournalHeader(generation), 0, JOURNAL_HEADER_SIZE, 0);
        await h.sync();
        await fsyncDir(path.dirname(file));
        return h;
      }
    });
    return new JournalWriter(fh, file, generation, faults);
  }

  /** Empty the journal (keep the header). The truncation need not be durable: stale records are recognised by epoch/seq. */
  async reset(): Promise<void> {
    this.faults?.hit('journal-reset');
    if (this.bgSync) await this.bgSync;
    this.unsynced = 0;
    await step('truncate', this.file, async () => {
      await this.fh.truncate(JOURNAL_HEADER_SIZE);
      const h = encodeJournalHeader(this.generation);
      await this.fh.write(h, 0, h.length, 0);
    });
    this.pos = JOURNAL_HEADER_SIZE;
    this.refs = [];
    this.seq = 0;
    this.checksum = 0;
  }

  /** Start a checkpoint: the journal must have been reset. */
  async begin(body: BeginBody): Promise<void> {
    this.pos = JOURNAL_HEADER_SIZE;
    this.refs = [];
    this.seq = 0;
    this.checksum = 0;
    this.epoch = body.epoch;
    const b = Buffer.from(JSON.stringify(body), 'utf8');
    await this.append(RecordType.BEGIN, b);
  }

  /** Append a record; `bodyCrc` may be given when known (a verified frame CRC). */
  async append(type: RecordType, body: Buffer, bodyCrc?: number): Promise<JournalRecordRef> {
    const crc = bodyCrc ?? crc32(body);
    const header = encodeRecordHeader(type, this.epoch, this.seq, body.length, crc);
    const at = this.pos;
    await this.faults?.hitWrite('journal-append', async () => {
      await this.fh.write(header, 0, header.length, at);
      await this.fh.write(body, 0, body.length >> 1, at + header.length);
    });
    await step('append to journal', this.file, async () => {
      const { bytesWritten } = await this.fh.writev([header, body], at);
      if (bytesWritten !== header.length + body.length) {
        // Rare short writev: finish the remainder with plain writes.
        const all = Buffer.concat([header, body]);
        await pwriteAll(this.fh, all.subarray(bytesWritten), at + bytesWritten, this.file);
      }
    });
    const ref: JournalRecordRef = { type, seq: this.seq, bodyPos: at + RECORD_HEADER_SIZE, bodyLen: body.length, bodyCrc: crc };
    this.refs.push(ref);
    this.pos = at + RECORD_HEADER_SIZE + body.length;
    this.seq++;
    this.checksum = chainChecksum(this.checksum, crc);
    this.unsynced += RECORD_HEADER_SIZE + body.length;
    if (this.unsynced >= BACKGROUND_SYNC_BYTES && !this.bgSync) {
      this.unsynced = 0;
      // Early writeback only; durability is decided by END's own fdatasync, whose error counts.
      this.bgSync = this.fh.datasync().catch(() => undefined).finally(() => { this.bgSync = null; });
    }
    return ref;
  }

  /** Append END (counts + whole-checkpoint checksum) and make the journal durable. */
  async end(fields: Omit<EndBody, 'records' | 'checksum'>): Promise<EndBody> {
    const end: EndBody = { ...fields, records: this.seq, checksum: this.checksum };
    await this.append(RecordType.END, Buffer.from(JSON.stringify(end), 'utf8'));
    this.faults?.hit('journal-fsync');
    if (this.bgSync) await this.bgSync;
    await step('fdatasync', this.file, () => this.fh.datasync());
    this.unsynced = 0;
    return end;
  }

  get records(): readonly JournalRecordRef[] {
    return this.refs;
  }

  get size(): number {
    return this.pos;
  }

  async close(): Promise<void> {
    if (this.bgSync) await this.bgSync;
    // Closing after END's fdatasync or a discard: nothing depends on the close.
    await this.fh.close().catch(() => undefined);
  }
}

export interface ScanResult {
  /** The complete checkpoint, if the journal holds one. */
  checkpoint: JournalCheckpoint | null;
  /** Why scanning stopped early (torn tail / corrupt record), null if the journal was clean. */
  torn: string | null;
  /** Bytes of valid records + header. */
  validBytes: number;
  fileSize: number;
}

/**
 * Read the journal and find a complete checkpoint. Reads each record once;
 * PAGES bodies are checked against their CRC but not kept in memory.
 */
export async function scanJournal(file: string, expectGeneration: number): Promise<ScanResult> {
  let fh: fs.FileHandle;
  try {
    fh = await fs.open(file, 'r');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { checkpoint: null, torn: null, validBytes: 0, fileSize: 0 };
    throw new StoreError('HYDRA_STORE_JOURNAL_UNREADABLE', `open journal ${file}: ${(err as Error).message}`, { cause: err });
  }
  try {
    const { size } = await fh.stat();
    if (size < JOURNAL_HEADER_SIZE) {
      return { checkpoint: null, torn: size === 0 ? null : `journal header torn (${size} bytes)`, validBytes: 0, fileSize: size };
    }
    const h = Buffer.alloc(JOURNAL_HEADER_SIZE);
    await preadAll(fh, h, 0, file);
    if (!h.subarray(0, 4).equals(JOURNAL_MAGIC) || h.readUInt32BE(12) !== crc32(h.subarray(0, 12))) {
      return { checkpoint: null, torn: 'journal header corrupt (bad magic or crc)', validBytes: 0, fileSize: size };
    }
    const version = h.readUInt16BE(4);
    if (version !== JOURNAL_VERSION) {
      throw new StoreError('HYDRA_STORE_JOURNAL_VERSION', `journal ${file} has format version ${version}, this build reads version ${JOURNAL_VERSION}`);
    }
    if (h.readUInt32BE(8) !== expectGeneration) {
      return { checkpoint: null, torn: `journal header names generation ${h.readUInt32BE(8)}, expected ${expectGeneration}`, validBytes: 0, fileSize: size };
    }
    let pos = JOURNAL_HEADER_SIZE;
    let epoch = -1;
    let checksum = 0;
    let begin: BeginBody | null = null;
    let disks: string[] | null = null;
    const records: JournalRecordRef[] = [];
    const rh = Buffer.alloc(RECORD_HEADER_SIZE);
    let body = Buffer.alloc(0);
    const torn = (why: string): ScanResult => ({ checkpoint: null, torn: why, validBytes: pos, fileSize: size });
    for (;;) {
      if (pos === size) return begin ? torn(`checkpoint epoch ${epoch} has no END record (${records.length} records)`) : { checkpoint: null, torn: null, validBytes: pos, fileSize: size };
      if (pos + RECORD_HEADER_SIZE > size) return torn(`torn record header at offset ${pos}`);
      await preadAll(fh, rh, pos, file);
      if (rh.readUInt32BE(20) !== crc32(rh.subarray(0, 20))) return torn(`bad record header crc at offset ${pos}`);
      const type = rh.readUInt16BE(0) as RecordType;
      const recEpoch = rh.readUInt32BE(4);
      const seq = rh.readUInt32BE(8);
      const len = rh.readUInt32BE(12);
      const bodyCrc = rh.readUInt32BE(16);
      if (seq !== records.length) return torn(`record seq ${seq} at offset ${pos}, expected ${records.length}`);
      if (seq === 0 && type !== RecordType.BEGIN) return torn(`first record at offset ${pos} is not BEGIN`);
      if (seq > 0 && recEpoch !== epoch) return torn(`record of epoch ${recEpoch} inside checkpoint ${epoch} at offset ${pos}`);
      if (len > MAX_RECORD_BODY) return torn(`record length ${len} at offset ${pos} exceeds ${MAX_RECORD_BODY}`);
      if (pos + RECORD_HEADER_SIZE + len > size) return torn(`torn record body at offset ${pos} (${len} bytes, file ends at ${size})`);
      if (body.length < len) body = Buffer.allocUnsafe(Math.max(len, Math.min(body.length * 2, MAX_RECORD_BODY)));
      const b = body.subarray(0, len);
      await preadAll(fh, b, pos + RECORD_HEADER_SIZE, file);
      if (crc32(b) !== bodyCrc) return torn(`bad record body crc at offset ${pos}`);
      const ref: JournalRecordRef = { type, seq, bodyPos: pos + RECORD_HEADER_SIZE, bodyLen: len, bodyCrc };
      try {
        if (type === RecordType.BEGIN) {
          begin = JSON.parse(b.toString('utf8')) as BeginBody;
          epoch = recEpoch;
          if (begin.epoch !== epoch || begin.generation !== expectGeneration) return torn(`BEGIN record names epoch ${begin.epoch} generation ${begin.generation}`);
        } else if (type === RecordType.DISKS) {
          disks = (JSON.parse(b.toString('utf8')) as { ids: string[] }).ids;
        } else if (type === RecordType.END) {
          const end = JSON.parse(b.toString('utf8')) as EndBody;
          if (end.records !== records.length || end.checksum !== checksum) {
            return torn(`END record of epoch ${epoch} disagrees: ${end.records} records / checksum ${end.checksum}, found ${records.length} / ${checksum}`);
          }
          records.push(ref);
          return { checkpoint: { begin: begin!, end, records, disks }, torn: null, validBytes: pos + RECORD_HEADER_SIZE + len, fileSize: size };
        } else if (type !== RecordType.PAGES && type !== RecordType.DEVSTATE) {
          return torn(`unknown record type ${type} at offset ${pos}`);
        }
      } catch (err) {
        return torn(`unparseable ${RecordType[type]} record at offset ${pos}: ${(err as Error).message}`);
      }
      records.push(ref);
      checksum = chainChecksum(checksum, bodyCrc);
      pos += RECORD_HEADER_SIZE + len;
    }
  } finally {
    await fh.close();
  }
}
