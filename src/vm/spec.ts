import fs from 'node:fs';
import { createHash } from 'node:crypto';
import path from 'node:path';
import { z } from 'zod';
import YAML from 'yaml';
import { SpecError } from '../errors.js';
import { guestArtifactsDir, imagesDir } from '../config/paths.js';
import { NIC_MODELS, normalizeMac, checkIfName, type NicModel } from '../net/index.js';

/**
 * A VM spec file (YAML or JSON):
 *
 *   name: demo
 *   memory: 512M          # bytes, or with K/M/G suffix
 *   vcpus: 1
 *   accel: auto           # auto | tcg | kvm
 *   kernel: guest:vmlinuz # "guest:" = from the built guest artifacts, "image:NAME/" = from a built
 *                         # guest image (hydravm image build); else a path relative to the spec
 *   initrd: guest:initrd.img
 *   cmdline: "console=ttyS0 hydra.run=memcheck memcheck.mb=64"
 *   root: { path: root.qcow2, size: 4G, base: image:debian/root.qcow2 }
 *                         # the first disk (/dev/vda); created when missing as a qcow2 whose
 *                         # backing file is `base`, so many VMs share one base image
 *   disks: [{ path: disk0.qcow2, size: 256M }]   # qcow2; created at start when missing and size is given
 *   protection: { cow: true, grain: 64K }        # how `protect` checkpoints it (default: basic mode)
 *   nics: [{ mac: "52:54:00:12:34:56", bridge: br0, tap: vm1-0, model: virtio-net-pci }]
 *                         # a tap device HydraVM creates on the host's bridge; tap defaults to a name
 *                         # derived from the VM's name
 */

const sizeRe = /^(\d+)\s*([KMGT]i?B?|B)?$/i;

export function parseSize(value: string | number, what: string): number {
  if (typeof value === 'number') {
    if (!Number.isInteger(value) || value <= 0) throw new SpecError(`${what}: ${value} is not a positive integer size`);
    return value;
  }
  const m = sizeRe.exec(value.trim());
  if (!m) throw new SpecError(`${what}: "${value}" is not a size (use e.g. 512M, 1G, or bytes)`);
  const n = Number(m[1]);
  const unit = (m[2] ?? 'B').toUpperCase()[0];
  const mult = unit === 'K' ? 1024 : unit === 'M' ? 1024 ** 2 : unit === 'G' ? 1024 ** 3 : unit === 'T' ? 1024 ** 4 : 1;
  return n * mult;
}

export const nameSchema = z.string().regex(/^[a-z0-9][a-z0-9_-]{0,31}$/i, 'must be 1-32 letters, digits, "-" or "_", starting with a letter or digit');
const sizeSchema = z.union([z.string(), z.number()]);

const diskSchema = z.object({
  path: z.string().min(1),
  size: sizeSchema.optional(),
}).strict();

const rootSchema = z.object({
  path: z.string().min(1),
  size: sizeSchema.optional(),
  base: z.string().min(1).optional(),
}).strict();

const nicSchema = z.object({
  mac: z.string(),
  bridge: z.string(),
  tap: z.string().optional(),
  model: z.string().default('virtio-net-pci'),
}).strict();

const specSchema = z.object({
  name: nameSchema,
  memory: sizeSchema,
  vcpus: z.number().int().min(1).max(64).default(1),
  accel: z.enum(['auto', 'tcg', 'kvm']).default('auto'),
  kernel: z.string().min(1),
  initrd: z.string().min(1).optional(),
  cmdline: z.string().default('console=ttyS0'),
  root: rootSchema.optional(),
  disks: z.array(diskSchema).default([]),
  protection: z.object({
    cow: z.boolean().default(false),
    grain: sizeSchema.optional(),
  }).strict().optional(),
  nics: z.array(nicSchema).max(8).default([]),
}).strict();

export interface DiskSpec {
  /** Absolute path of the qcow2 file. */
  path: string;
  /** Size in bytes for creating it when missing. */
  size?: number;
  /** Backing file the disk is created on when missing (a root disk on a built image). */
  base?: string;
}

export interface NicSpec {
  /** Lower-case, colon-separated unicast MAC. */
  mac: string;
  /** The host bridge the tap joins. */
  bridge: string;
  /** The tap device's name on the host (at most 15 characters). */
  tap: string;
  model: NicModel;
}

/** A validated spec with every path absolute and every size in bytes. */
export interface VmSpec {
  name: string;
  memoryBytes: number;
  vcpus: number;
  accel: 'auto' | 'tcg' | 'kvm';
  kernel: string;
  initrd?: string;
  cmdline: string;
  /** In device order; with a `root` in the spec it is disks[0] (/dev/vda). */
  disks: DiskSpec[];
  /** Checkpoint mode when protected: copy-on-write (with its grain in bytes) or basic. */
  protection?: { cow: boolean; grainBytes?: number };
  /** Whether disks[0] is the spec's root disk. */
  hasRoot?: boolean;
  /** Absent in specs recorded before NICs existed: none. */
  nics?: NicSpec[];
}

/** The default tap name of a VM's NIC: short enough for IFNAMSIZ, stable across hosts. */
export function defaultTapName(vm: string, index: number): string {
  const h = createHash('sha256').update(vm).digest('hex').slice(0, 8);
  return `hv${h}n${index}`;
}

function resolveArtifact(ref: string, baseDir: string): string {
  if (ref.startsWith('guest:')) return path.join(guestArtifactsDir(), ref.slice('guest:'.length));
  if (ref.startsWith('image:')) return path.join(imagesDir(), ref.slice('image:'.length));
  return path.resolve(baseDir, ref);
}

/** Validate a parsed spec object. `baseDir` anchors relative paths. Throws SpecError naming the field. */
export function validateSpec(raw: unknown, baseDir: string, source = 'spec'): VmSpec {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new SpecError(`${source}: a VM spec is a mapping of fields (name, memory, kernel, ...), not ${Array.isArray(raw) ? 'a list' : raw === null ? 'empty' : `a ${typeof raw}`}`);
  }
  const parsed = specSchema.safeParse(raw);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    const where = issue.path.length ? issue.path.join('.') : '(top level)';
    throw new SpecError(`${source}: ${where}: ${issue.message}`);
  }
  const s = parsed.data;
  const memoryBytes = parseSize(s.memory, `${source}: memory`);
  if (memoryBytes < 32 * 1024 ** 2) throw new SpecError(`${source}: memory: ${s.memory} is too small (at least 32M)`);
  if (memoryBytes % (2 * 1024 ** 2) !== 0) throw new SpecError(`${source}: memory: ${s.memory} must be a multiple of 2M`);
  const grainBytes = s.protection?.grain === undefined ? undefined : parseGrain(s.protection.grain, `${source}: protection.grain`);
  const disks: DiskSpec[] = s.disks.map((d, i) => ({
    path: path.resolve(baseDir, d.path),
    size: d.size === undefined ? undefined : parseSize(d.size, `${source}: disks.${i}.size`),
  }));
  if (s.root) {
    disks.unshift({
      path: path.resolve(baseDir, s.root.path),
      size: s.root.size === undefined ? undefined : parseSize(s.root.size, `${source}: root.size`),
      base: s.root.base ? resolveArtifact(s.root.base, baseDir) : undefined,
    });
  }
  const seen = new Map<string, string>();
  for (const [i, d] of disks.entries()) {
    const other = seen.get(d.path);
    if (other) throw new SpecError(`${source}: ${diskField(i, !!s.root)}: ${d.path} is also ${other}`);
    seen.set(d.path, diskField(i, !!s.root));
  }
  return {
    name: s.name,
    memoryBytes,
    vcpus: s.vcpus,
    accel: s.accel,
    kernel: resolveArtifact(s.kernel, baseDir),
    initrd: s.initrd ? resolveArtifact(s.initrd, baseDir) : undefined,
    cmdline: s.cmdline,
    disks,
    ...(s.root ? { hasRoot: true } : {}),
    nics: validateNics(s.nics, s.name, source),
    ...(s.protection ? { protection: { cow: s.protection.cow, ...(grainBytes ? { grainBytes } : {}) } } : {}),
  };
}

/** A copy-on-write grain: a power of two from 4K to 2M. */
export function parseGrain(value: string | number, what: string): number {
  const g = parseSize(value, what);
  if (g < 4096 || g > 2 * 1024 ** 2 || (g & (g - 1)) !== 0) throw new SpecError(`${what}: ${value} is not a power of two from 4K to 2M`);
  return g;
}

function diskField(i: number, hasRoot: boolean): string {
  if (!hasRoot) return `disks.${i}`;
  return i === 0 ? 'root' : `disks.${i - 1}`;
}

function validateNics(nics: z.infer<typeof nicSchema>[], vm: string, source: string): NicSpec[] {
  const out: NicSpec[] = [];
  nics.forEach((n, i) => {
    const where = `${source}: nics.${i}`;
    const mac = normalizeMac(n.mac);
    if (!mac.ok) throw new SpecError(`${where}.mac: "${n.mac}" ${mac.problem}`);
    if (!(NIC_MODELS as readonly string[]).includes(n.model)) {
      throw new SpecError(`${where}.model: "${n.model}" is not a NIC model HydraVM can checkpoint and restore (use one of: ${NIC_MODELS.join(', ')})`);
    }
    const bridgeProblem = checkIfName(n.bridge);
    if (bridgeProblem) throw new SpecError(`${where}.bridge: "${n.bridge}" ${bridgeProblem}`);
    const tap = n.tap ?? defaultTapName(vm, i);
    const tapProblem = checkIfName(tap);
    if (tapProblem) throw new SpecError(`${where}.tap: "${tap}" ${tapProblem}`);
    if (tap === n.bridge) throw new SpecError(`${where}.tap: "${tap}" is the bridge's own name`);
    for (const [j, o] of out.entries()) {
      if (o.mac === mac.mac) throw new SpecError(`${where}.mac: ${mac.mac} is also the MAC of nics.${j}`);
      if (o.tap === tap) throw new SpecError(`${where}.tap: "${tap}" is also the tap of nics.${j}`);
    }
    out.push({ mac: mac.mac, bridge: n.bridge, tap, model: n.model as NicModel });
  });
  return out;
}

/** Read, parse and validate a spec file. */
export function loadSpecFile(file: string): VmSpec {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new SpecError(`cannot read VM spec ${file}: ${(err as Error).message}`, { cause: err });
  }
  let raw: unknown;
  try {
    raw = file.endsWith('.json') ? JSON.parse(text) : YAML.parse(text);
  } catch (err) {
    throw new SpecError(`VM spec ${file} is not valid ${file.endsWith('.json') ? 'JSON' : 'YAML'}: ${(err as Error).message}`, { cause: err });
  }
  return validateSpec(raw, path.dirname(path.resolve(file)), file);
}

/** Check the files the spec points to exist, before anything is started. */
export function checkSpecFiles(spec: VmSpec): void {
  const need: [string, string][] = [['kernel', spec.kernel]];
  if (spec.initrd) need.push(['initrd', spec.initrd]);
  for (const [what, file] of need) {
    if (!fs.existsSync(file)) {
      const hint = file.startsWith(guestArtifactsDir()) ? ' (run `hydravm setup` to build the guest artifacts)'
        : file.startsWith(imagesDir()) ? ' (build the image with `hydravm image build debian`)' : '';
      throw new SpecError(`VM "${spec.name}": ${what} ${file} does not exist${hint}`);
    }
  }
  spec.disks.forEach((d, i) => {
    const field = diskField(i, !!spec.hasRoot);
    if (fs.existsSync(d.path)) return;
    if (d.base !== undefined) {
      if (!fs.existsSync(d.base)) {
        const hint = d.base.startsWith(imagesDir()) ? ' (build it with `hydravm image build debian`)' : '';
        throw new SpecError(`VM "${spec.name}": ${field}: base image ${d.base} does not exist${hint}`);
      }
      return;
    }
    if (d.size === undefined) {
      throw new SpecError(`VM "${spec.name}": ${field}: ${d.path} does not exist and no size is given to create it`);
    }
  });
}
