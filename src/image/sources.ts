// The Debian mirror this host's apt uses, as a deb822 sources file for mmdebstrap.
import fs from 'node:fs';
import path from 'node:path';
import { ImageError } from '../errors.js';

export interface DebianSources {
  /** deb822 stanzas (Types/URIs/Suites/Components/Signed-By) naming only Debian archives. */
  text: string;
  /** The archive URIs, for messages and the cache key. */
  uris: string[];
  /** The release codename, e.g. bookworm. */
  suite: string;
}

const APT_DIR = '/etc/apt';

function hostSuite(): string {
  try {
    const m = /^VERSION_CODENAME=(\S+)/m.exec(fs.readFileSync('/etc/os-release', 'utf8'));
    if (m) return m[1]!.replace(/"/g, '');
  } catch {
    // no os-release: fall through to the error below
  }
  throw new ImageError('HYDRA_IMAGE_BUILD_FAILED', 'reading the Debian release of this host failed: /etc/os-release has no VERSION_CODENAME');
}

/** A Debian archive URI: .../debian or .../debian-security (no third-party repositories in the guest). */
const isDebianArchive = (uri: string) => /^https?:\/\/[^\s]+\/debian(-security)?\/?$/.test(uri);

function deb822Stanzas(text: string): Map<string, string>[] {
  return text.split(/\n\s*\n/).map((block) => {
    const fields = new Map<string, string>();
    for (const line of block.split('\n')) {
      if (line.startsWith('#')) continue;
      const m = /^([A-Za-z-]+):\s*(.*)$/.exec(line);
      if (m) fields.set(m[1]!.toLowerCase(), m[2]!.trim());
    }
    return fields;
  }).filter((f) => f.size > 0);
}

/**
 * The Debian archives apt on this host is configured with (deb822 .sources
 * files and one-line sources.list entries), restricted to the host's release
 * and its -updates/-security suites: the guest comes from the same mirror and
 * from nothing else. Backports and third-party repositories are left out.
 * `withSource` adds the source archive (deb-src) of the same suites.
 */
export function hostDebianSources(opts: { withSource?: boolean } = {}): DebianSources {
  const suite = hostSuite();
  const wanted = new Set([suite, `${suite}-updates`, `${suite}-security`]);
  const out: string[] = [];
  const uris = new Set<string>();
  // Only `main`: the guest needs nothing from contrib or non-free.
  const add = (uri: string, suites: string[], signedBy?: string) => {
    const keep = suites.filter((s) => wanted.has(s));
    if (!isDebianArchive(uri) || keep.length === 0) return;
    uris.add(uri);
    out.push([`Types: deb${opts.withSource ? ' deb-src' : ''}`, `URIs: ${uri}`, `Suites: ${keep.join(' ')}`, `Components: main`, ...(signedBy ? [`Signed-By: ${signedBy}`] : [])].join('\n'));
  };
  const dir = path.join(APT_DIR, 'sources.list.d');
  const files = [path.join(APT_DIR, 'sources.list'), ...(fs.existsSync(dir) ? fs.readdirSync(dir).sort().map((f) => path.join(dir, f)) : [])];
  for (const file of files) {
    let text: string;
    try {
      text = fs.readFileSync(file, 'utf8');
    } catch {
      continue; // an optional file that is absent
    }
    if (file.endsWith('.sources')) {
      for (const st of deb822Stanzas(text)) {
        if (st.get('enabled') === 'no' || !(st.get('types') ?? '').split(/\s+/).includes('deb')) continue;
        for (const uri of (st.get('uris') ?? '').split(/\s+/).filter(Boolean)) {
          add(uri, (st.get('suites') ?? '').split(/\s+/), st.get('signed-by'));
        }
      }
    } else if (file.endsWith('.list')) {
      for (const line of text.split('\n')) {
        const m = /^deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)/.exec(line.trim());
        if (!m) continue;
        const signed = /signed-by=(\S+)/.exec(m[1] ?? '')?.[1];
        add(m[2]!, [m[3]!], signed);
      }
    }
  }
  if (out.length === 0) {
    throw new ImageError('HYDRA_IMAGE_BUILD_FAILED', `finding the Debian mirror failed: apt on this host has no Debian archive for ${suite} in ${APT_DIR}/sources.list or ${dir}`);
  }
  return { text: out.join('\n\n') + '\n', uris: [...uris], suite };
}
