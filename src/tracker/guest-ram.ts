/**
 * Finding a QEMU process's guest RAM mapping from /proc/PID/maps.
 *
 * QEMU's `memory-backend-memfd` shows as `/memfd:memory-backend-memfd (deleted)`
 * (QEMU 10 names every such memfd after the backend type, not its id), a
 * `memory-backend-file` as its mem-path; both must be shared (`rw-s`). QEMU
 * may split one RAM block into several adjacent VMAs (madvise), so adjacent
 * lines of the same file with contiguous offsets are merged into one mapping.
 *
 * Selection, first match wins:
 *   ramStart  the block's host address (QMP `human-monitor-command
 *             "info ramblock"` gives it per backend id, column HVA)
 *   ramPath   the exact path shown in maps (memory-backend-file)
 *   ramId     a memfd named `/memfd:<ramId>`; if no memfd carries that name
 *             (QEMU's case), the only shared memfd mapping (ambiguous -> error)
 *   default   the largest shared memfd mapping (ramSize filters candidates);
 *             if there is none, the largest private writable file mapping
 *             (`rw-p`) of exactly ramSize bytes, or, without ramSize, one
 *             that maps a whole file from offset 0 (a file-mode restore:
 *             `memory-backend-file,mem-path=IMAGE,share=off`)
 *
 * Each selector also matches private file mappings (shared ones first), and
 * the result's `kind` says which: 'shared' (a Buffer can view RAM through the
 * file) or 'private-file' (the process's copy-on-write pages exist only in its
 * address space: read them with process_vm_readv).
 */
import { readFileSync, statSync } from 'node:fs';
import { TrackerError } from '../errors.js';

export interface MapsEntry {
  start: number;
  end: number;
  perms: string;
  offset: number;
  dev: string;
  inode: number;
  path: string;
}

export type GuestRamKind = 'shared' | 'private-file';

export interface GuestRamMapping {
  pid: number;
  /** 'shared': MAP_SHARED memfd/file; 'private-file': MAP_PRIVATE mapping of a regular file (file-mode restore). */
  kind: GuestRamKind;
  /** Host virtual address of the first byte of guest RAM in the QEMU process. */
  start: number;
  end: number;
  size: number;
  /** Path as shown in maps, e.g. "/memfd:memory-backend-memfd (deleted)". */
  path: string;
  /** Offset of `start` in the backing file. */
  fileOffset: number;
  dev: string;
  inode: number;
  /** VMAs the mapping is made of (1 normally). */
  vmas: Array<{ start: number; end: number }>;
  /** /proc/PID/map_files entry of the first VMA: opening it opens the RAM file. */
  mapFilesPath: string;
}

export interface GuestRamSelector {
  ramId?: string;
  ramPath?: string;
  ramStart?: number;
  ramSize?: number;
}

const MAPS_LINE = /^([0-9a-f]+)-([0-9a-f]+)\s+(\S{4})\s+([0-9a-f]+)\s+(\S+)\s+(\d+)\s*(.*)$/;

export function parseMaps(text: string): MapsEntry[] {
  const out: MapsEntry[] = [];
  for (const line of text.split('\n')) {
    const m = MAPS_LINE.exec(line);
    if (!m) continue;
    out.push({
      start: parseInt(m[1]!, 16),
      end: parseInt(m[2]!, 16),
      perms: m[3]!,
      offset: parseInt(m[4]!, 16),
      dev: m[5]!,
      inode: Number(m[6]),
      path: m[7]!,
    });
  }
  return out;
}

/** Shared file mappings merged across adjacent VMAs of the same file. */
export function sharedFileMappings(pid: number, entries: MapsEntry[]): GuestRamMapping[] {
  return fileMappings(pid, entries, 'shared');
}

/** Private writable (`rw-p`) file mappings merged across adjacent VMAs of the same file. */
export function privateFileMappings(pid: number, entries: MapsEntry[]): GuestRamMapping[] {
  return fileMappings(pid, entries, 'private-file');
}

function fileMappings(pid: number, entries: MapsEntry[], kind: GuestRamKind): GuestRamMapping[] {
  const out: GuestRamMapping[] = [];
  for (const e of entries) {
    if (e.inode === 0 || !e.path) continue;
    if (kind === 'shared' ? e.perms[3] !== 's' : e.perms !== 'rw-p' || !e.path.startsWith('/')) continue;
    const last = out[out.length - 1];
    if (last && last.inode === e.inode && last.dev === e.dev && last.end === e.start && last.fileOffset + last.size === e.offset) {
      last.end = e.end;
      last.size = last.end - last.start;
      last.vmas.push({ start: e.start, end: e.end });
      continue;
    }
    out.push({
      pid,
      kind,
      start: e.start,
      end: e.end,
      size: e.end - e.start,
      path: e.path,
      fileOffset: e.offset,
      dev: e.dev,
      inode: e.inode,
      vmas: [{ start: e.start, end: e.end }],
      mapFilesPath: `/proc/${pid}/map_files/${e.start.toString(16)}-${e.end.toString(16)}`,
    });
  }
  return out;
}

function processGone(pid: number, what: string, err?: unknown): TrackerError {
  return new TrackerError('HYDRA_TRACKER_PROCESS_GONE', `process ${pid} is gone (${what})`, { cause: err });
}

export function readMaps(pid: number): MapsEntry[] {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/maps`, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ESRCH') throw processGone(pid, `reading /proc/${pid}/maps: ${code}`, err);
    throw new TrackerError('HYDRA_TRACKER_PROC_FAILED', `reading /proc/${pid}/maps: ${(err as Error).message}`, { cause: err });
  }
  // A zombie (or a kernel thread) has an empty maps file.
  if (text.length === 0) throw processGone(pid, `/proc/${pid}/maps is empty: exited, not yet reaped`);
  return parseMaps(text);
}

const isMemfd = (m: GuestRamMapping) => m.path.startsWith('/memfd:');

/** Size of the file behind a mapping (stat through map_files), or undefined. */
function mappedFileSize(m: GuestRamMapping): number | undefined {
  try {
    return statSync(m.mapFilesPath).size;
  } catch {
    return undefined;
  }
}

export function findGuestRam(pid: number, sel: GuestRamSelector = {}): GuestRamMapping {
  const entries = readMaps(pid);
  const all = sharedFileMappings(pid, entries);
  const priv = privateFileMappings(pid, entries);
  const describe = () => all.filter(isMemfd).map((m) => `${m.path} @0x${m.start.toString(16)} ${m.size} B`).join('; ') || 'none';
  const noRam = (why: string) =>
    new TrackerError('HYDRA_TRACKER_NO_RAM', `no guest RAM mapping in process ${pid}: ${why} (shared memfd mappings: ${describe()}); QEMU must run with a shared memory backend (memory-backend-memfd, or memory-backend-file share=on) or a private mapping of a RAM image file (memory-backend-file share=off)`);
  let found: GuestRamMapping | undefined;
  if (sel.ramStart !== undefined) {
    found = all.find((m) => m.start === sel.ramStart) ?? priv.find((m) => m.start === sel.ramStart);
    if (!found) throw noRam(`no file mapping at 0x${sel.ramStart.toString(16)}`);
  } else if (sel.ramPath !== undefined) {
    const named = (m: GuestRamMapping) => m.path === sel.ramPath || m.path === `${sel.ramPath} (deleted)`;
    const sized = (m: GuestRamMapping) => sel.ramSize === undefined || m.size === sel.ramSize;
    found = all.find((m) => named(m) && sized(m)) ?? priv.filter((m) => named(m) && sized(m)).sort((a, b) => b.size - a.size)[0];
    if (!found) throw noRam(`no mapping of ${sel.ramPath}${sel.ramSize !== undefined ? ` of ${sel.ramSize} bytes` : ''}`);
  } else {
    let cands = all.filter(isMemfd);
    if (sel.ramSize !== undefined) cands = cands.filter((m) => m.size === sel.ramSize);
    if (sel.ramId !== undefined) {
      const named = cands.filter((m) => m.path === `/memfd:${sel.ramId} (deleted)` || m.path === `/memfd:${sel.ramId}`);
      if (named.length > 0) cands = named;
      else if (cands.length > 1) throw noRam(`${cands.length} shared memfd mappings and none named after "${sel.ramId}"; pass ramStart (QMP "info ramblock", column HVA)`);
    }
    found = cands.sort((a, b) => b.size - a.size)[0];
    if (!found) {
      // A file-mode restore: guest RAM is a private mapping of the image file.
      const privCands = sel.ramSize !== undefined
        ? priv.filter((m) => m.size === sel.ramSize)
        : priv.filter((m) => m.fileOffset === 0 && m.size === mappedFileSize(m));
      found = privCands.sort((a, b) => b.size - a.size)[0];
    }
    if (!found) {
      throw noRam(sel.ramSize !== undefined
        ? `no shared memfd mapping and no private file mapping of ${sel.ramSize} bytes`
        : 'no shared memfd mapping and no private file mapping of a whole file');
    }
  }
  return found;
}

/** Process start time (clock ticks since boot), to tell a process from a later one reusing its pid. */
export function processStartTime(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // comm may contain spaces and parentheses: fields after the last ')'.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const state = fields[0];
    if (state === 'Z' || state === 'X') return undefined;
    return Number(fields[19]);
  } catch {
    return undefined;
  }
}

/** Cheap check (one stat) that the mapping's first VMA still maps the same file. */
export function mappingStillThere(m: GuestRamMapping, ino: number): boolean {
  try {
    return statSync(m.mapFilesPath).ino === ino;
  } catch {
    return false;
  }
}
