// Assignments read from etcd are input: validated like CLI input before an agent acts on one.
import path from 'node:path';
import { z } from 'zod';
import { HaError } from '../errors.js';
import { nameSchema } from '../vm/index.js';
import type { Assignment } from './cluster.js';

const u32 = z.number().int().min(0).max(0xffff_ffff);
const hostName = z.string().regex(/^[a-z0-9][a-z0-9_.-]{0,62}$/i, 'is not a valid host name');
/** host:port, [v6]:port; no scheme, no path. */
/** host:port, or `cluster` (the active store etcd names). */
const HOST_PORT = /^(\[[0-9a-f:.]+\]|[a-z0-9][a-z0-9_.-]*):\d{1,5}$/i;
const storeAddress = z.string().max(300).refine((s) => s === 'cluster' || HOST_PORT.test(s), 'is not a store address host:port (or "cluster")');

const assignmentSchema = z.object({
  kind: z.enum(['protect', 'restore']),
  vm: nameSchema,
  host: hostName,
  generation: u32,
  imageGeneration: u32.optional(),
  store: storeAddress,
  storeDir: z.string().max(4096).refine((d) => path.isAbsolute(d) && path.normalize(d) === d && !d.includes('\0'), 'must be an absolute, normalised path').optional(),
  mode: z.enum(['file', 'network']),
  intervalMs: z.number().int().min(10).max(86_400_000),
  /** Copy-on-write checkpoints, with the grain in bytes (a power of two from 4 KiB to 2 MiB). */
  cow: z.object({
    grain: z.number().int().min(4096).max(2 * 1024 * 1024).refine((g) => (g & (g - 1)) === 0, 'must be a power of two').optional(),
  }).strict().optional(),
  createdAt: z.number().finite(),
  by: z.string().max(200),
}).strict().superRefine((a, ctx) => {
  if (a.kind === 'restore' && a.generation < 1) ctx.addIssue({ code: 'custom', path: ['generation'], message: 'a restore needs a generation of at least 1' });
  if (a.kind === 'restore' && a.imageGeneration === undefined) ctx.addIssue({ code: 'custom', path: ['imageGeneration'], message: 'a restore needs the image generation to load' });
  if (a.mode === 'file' && !a.storeDir) ctx.addIssue({ code: 'custom', path: ['storeDir'], message: 'a file-mode assignment needs the store directory' });
});

/**
 * Parse the assignment stored at /hydravm/assignments/HOST/VM. It must name
 * that host and VM, with every field in range; anything else throws
 * HYDRA_HA_BAD_ASSIGNMENT naming the key and the field, and is never run.
 */
export function parseAssignment(raw: string, host: string, keyVm: string): Assignment {
  const where = `assignment /hydravm/assignments/${host}/${keyVm}`;
  let json: unknown;
  try {
    json = JSON.parse(raw);
  } catch (err) {
    throw new HaError('HYDRA_HA_BAD_ASSIGNMENT', `${where} is not JSON: ${(err as Error).message}`, { cause: err });
  }
  const r = assignmentSchema.safeParse(json);
  if (!r.success) {
    const issue = r.error.issues[0]!;
    throw new HaError('HYDRA_HA_BAD_ASSIGNMENT', `${where}: ${issue.path.join('.') || '(value)'} ${issue.message}`);
  }
  if (r.data.host !== host) throw new HaError('HYDRA_HA_BAD_ASSIGNMENT', `${where} names host "${r.data.host}", not this host`);
  if (r.data.vm !== keyVm) throw new HaError('HYDRA_HA_BAD_ASSIGNMENT', `${where} names VM "${r.data.vm}", not the VM of its key`);
  return r.data as Assignment;
}
