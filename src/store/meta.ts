/**
 * `gen-<g>/meta.json`: which VM, generation and committed epoch the image
 * holds, and everything a restore needs besides the RAM and device-state
 * files. `vms/<vm>/fence.json`: the highest generation ever registered for the
 * VM (the fencing record). Both are written atomically (temp, fsync, rename,
 * fsync dir) and wrapped in an envelope with a format name, a version and the
 * sha256 of the body; changing the body's shape requires a version bump.
 *
 *   { "format": "hydravm-image-meta", "formatVersion": 1, "sha256": "<hex>", "meta": { ...StoreMeta } }
 *   { "format": "hydravm-fence", "formatVersion": 1, "sha256": "<hex>", "fence": { "vm", "highestGeneration", "updatedAt" } }
 *
 * sha256 is taken over JSON.stringify(body). A file that fails to parse, names
 * another format or version, or fails the checksum is refused with
 * HYDRA_STORE_META_CORRUPT: never silently reset.
 */
import fs from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { z } from 'zod';
import { StoreError } from '../errors.js';
import { storeMetaSchema, type StoreMeta } from '../protocol/index.js';
import type { FaultInjector } from './faults.js';
import { writeFileAtomic } from './fsutil.js';

export const META_FORMAT = 'hydravm-image-meta';
export const META_VERSION = 1;
export const FENCE_FORMAT = 'hydravm-fence';
export const FENCE_VERSION = 1;

export const fenceSchema = z.object({ vm: z.string(), highestGeneration: z.number().int().nonnegative(), updatedAt: z.string() });
export type Fence = z.infer<typeof fenceSchema>;

function sha256(s: string): string {
  return createHash('sha256').update(s).digest('hex');
}

function envelope(format: string, version: number, key: string, body: unknown): Buffer {
  const text = JSON.stringify(body);
  return Buffer.from(`{"format":${JSON.stringify(format)},"formatVersion":${version},"sha256":"${sha256(text)}",${JSON.stringify(key)}:${text}}\n`, 'utf8');
}

async function readEnvelope<T>(file: string, format: string, version: number, key: string, schema: z.ZodType<T>, what: string): Promise<T | null> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new StoreError('HYDRA_STORE_META_UNREADABLE', `read ${what} ${file}: ${(err as Error).message}`, { cause: err });
  }
  const corrupt = (why: string) => new StoreError('HYDRA_STORE_META_CORRUPT', `${what} ${file} is corrupt (${why}); refusing to use it. Inspect or restore it by hand; it is never reset automatically`);
  let raw: Record<string, unknown>;
  try {
    raw = JSON.parse(text) as Record<string, unknown>;
  } catch {
    throw corrupt('not JSON');
  }
  if (raw === null || typeof raw !== 'object' || raw.format !== format) throw corrupt(`format is ${JSON.stringify(raw?.format)}, expected ${format}`);
  if (raw.formatVersion !== version) {
    throw new StoreError('HYDRA_STORE_META_VERSION', `${what} ${file} has format version ${String(raw.formatVersion)}, this build reads version ${version}`);
  }
  const body = raw[key];
  if (typeof raw.sha256 !== 'string' || sha256(JSON.stringify(body)) !== raw.sha256) throw corrupt('checksum mismatch');
  const r = schema.safeParse(body);
  if (!r.success) throw corrupt(`invalid fields: ${r.error.issues.map((i) => i.path.join('.')).join(', ')}`);
  return r.data;
}

export function encodeMeta(meta: StoreMeta): Buffer {
  return envelope(META_FORMAT, META_VERSION, 'meta', meta);
}

export async function readMeta(file: string): Promise<StoreMeta | null> {
  return readEnvelope(file, META_FORMAT, META_VERSION, 'meta', storeMetaSchema as z.ZodType<StoreMeta>, 'image meta');
}

export async function writeMeta(file: string, meta: StoreMeta, faults?: FaultInjector): Promise<void> {
  await writeFileAtomic(file, encodeMeta(meta), faults);
}

export async function readFence(file: string): Promise<Fence | null> {
  return readEnvelope(file, FENCE_FORMAT, FENCE_VERSION, 'fence', fenceSchema, 'fence record');
}

export async function writeFence(file: string, fence: Fence): Promise<void> {
  await writeFileAtomic(file, envelope(FENCE_FORMAT, FENCE_VERSION, 'fence', fence));
}
