/**
 * Cost of the store protocol's security: frame tags (HMAC-SHA256) against the
 * CRC alone in the frame codec, and checkpoint / page-read throughput through
 * a real store process over plain TCP and over TLS (tags on in both).
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import { BenchError } from '../errors.js';
import {
  FrameDecoder, FrameMac, FrameType, MAX_PAGES_DATA, StoreClient, encodeFrameParts, encodeRunTable, type StoreTlsClientOptions,
} from '../protocol/index.js';
import { spawnStore } from '../store/index.js';
import { makeTlsFiles } from '../util/openssl-certs.js';
import { fmt, summary, writeResults, type Summary } from './harness.js';

export interface ProtocolBenchOptions {
  outDir: string;
  /** MiB pushed through the codec per measurement. */
  codecMb: number;
  /** MiB of the full checkpoint pushed through the store per repeat. */
  checkpointMb: number;
  repeats: number;
  log: (msg: string) => void;
}

const MB = 1024 * 1024;
/** Socket-sized slices: the decoder sees a large frame in pieces, as from a socket. */
const SLICE = 64 * 1024;

interface CodecResult {
  crc32MBs: Summary;
  hmacMBs: Summary;
  encodeMBs: { crcOnly: Summary; tagged: Summary };
  decodeMBs: { crcOnly: Summary; tagged: Summary };
  roundTripMBs: { crcOnly: Summary; tagged: Summary };
}

interface TransportResult {
  transport: 'tcp' | 'tls';
  /** Wall-clock throughput (depends on the machine's load). */
  checkpointMBs: Summary;
  readMBs: Summary;
  /** CPU ms per MiB moved, client and store process together (load-independent). */
  checkpointCpuMsPerMiB: Summary;
  readCpuMsPerMiB: Summary;
}

function rate(bytes: number, ms: number): number {
  return bytes / MB / (ms / 1000);
}

/**
 * CPU time (user + system, ms) that fn took. The codec runs on one thread, so
 * unloaded this equals the wall time; on a shared, loaded machine it is the
 * number that does not depend on what else runs.
 */
function timeIt(fn: () => void): number {
  const c0 = process.cpuUsage();
  fn();
  const c = process.cpuUsage(c0);
  return (c.user + c.system) / 1000;
}

/** CPU time (user + system, ms) another process has used so far, from /proc/<pid>/stat. */
function processCpuMs(pid: number): number {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // fields[11], fields[12]: utime, stime in clock ticks (USER_HZ = 100 on Linux)
  return (Number(fields[11]) + Number(fields[12])) * 10;
}

function selfCpuMs(): number {
  const c = process.cpuUsage();
  return (c.user + c.system) / 1000;
}

/** Encode and decode 8 MiB PAGES frames in memory, with and without the tag. */
function codecBench(totalMb: number, repeats: number): CodecResult {
  const data = crypto.randomBytes(MAX_PAGES_DATA);
  const table = encodeRunTable([{ offset: 0, length: data.length }]);
  const frames = Math.max(1, Math.round((totalMb * MB) / data.length));
  const bytes = frames * data.length;
  const key = crypto.randomBytes(32);
  const out = { crc: [] as number[], hmac: [] as number[], enc: { crcOnly: [] as number[], tagged: [] as number[] }, dec: { crcOnly: [] as number[], tagged: [] as number[] }, rt: { crcOnly: [] as number[], tagged: [] as number[] } };
  for (let r = 0; r < repeats; r++) {
    out.crc.push(rate(bytes, timeIt(() => { for (let i = 0; i < frames; i++) crc32(data); })));
    out.hmac.push(rate(bytes, timeIt(() => { for (let i = 0; i < frames; i++) crypto.createHmac('sha256', key).update(data).digest(); })));
    for (const tagged of [false, true] as const) {
      const k = tagged ? 'tagged' : 'crcOnly';
      const tx = tagged ? new FrameMac(key) : undefined;
      let encoded: Buffer[] = [];
      const encMs = timeIt(() => {
        for (let i = 0; i < frames; i++) encoded = encodeFrameParts(FrameType.PAGES, [table, data], tx ? { mac: tx } : {});
      });
      const wire = Buffer.concat(encoded);
      const decoder = new FrameDecoder();
      if (tagged) decoder.setReceiveMac({ mac: new FrameMac(key), peer: 'bench' });
      // Every iteration decodes the same bytes, so re-sign them with the next sequence number first (outside the timing).
      const wires: Buffer[] = [];
      const tx2 = tagged ? new FrameMac(key) : undefined;
      for (let i = 0; i < frames; i++) wires.push(tagged ? Buffer.concat(encodeFrameParts(FrameType.PAGES, [table, data], { mac: tx2! })) : wire);
      let got = 0;
      const decMs = timeIt(() => {
        for (const w of wires) for (let off = 0; off < w.length; off += SLICE) got += decoder.push(w.subarray(off, off + SLICE)).length;
      });
      if (got !== frames) throw new BenchError('HYDRA_BENCH_WRONG_RESULT', `codec bench decoded ${got} of ${frames} frames`);
      out.enc[k].push(rate(bytes, encMs));
      out.dec[k].push(rate(bytes, decMs));
      out.rt[k].push(rate(bytes, encMs + decMs));
    }
  }
  return {
    crc32MBs: summary(out.crc),
    hmacMBs: summary(out.hmac),
    encodeMBs: { crcOnly: summary(out.enc.crcOnly), tagged: summary(out.enc.tagged) },
    decodeMBs: { crcOnly: summary(out.dec.crcOnly), tagged: summary(out.dec.tagged) },
    roundTripMBs: { crcOnly: summary(out.rt.crcOnly), tagged: summary(out.rt.tagged) },
  };
}

/** Full checkpoints and whole-image reads through a `hydravm store` process. */
async function transportBench(home: string, transport: 'tcp' | 'tls', sizeMb: number, repeats: number, log: (m: string) => void): Promise<TransportResult> {
  const secret = 'bench-secret-0123456789abcdef';
  const dir = path.join(home, `store-${transport}`);
  let tls: StoreTlsClientOptions | null = null;
  const extraArgs: string[] = [];
  if (transport === 'tls') {
    const files = makeTlsFiles(path.join(home, 'tls'));
    tls = { ca: files.ca };
    extraArgs.push('--tls-cert', files.cert, '--tls-key', files.key);
  }
  const store = await spawnStore({ dir, extraArgs, logFile: path.join(home, `store-${transport}.log`), env: { ...process.env, HYDRAVM_SECRET: secret, HYDRAVM_HOME: home } });
  const ram = sizeMb * MB;
  const img = crypto.randomBytes(ram);
  const ckpt: number[] = [];
  const read: number[] = [];
  const ckptCpu: number[] = [];
  const readCpu: number[] = [];
  const pid = store.proc.pid!;
  const cpu = () => selfCpuMs() + processCpuMs(pid);
  try {
    const c = await StoreClient.connect({ address: store.address, secret, vm: 'bench', generation: 1, role: 'checkpointer', tls });
    const r = await StoreClient.connect({ address: store.address, secret, vm: 'bench', generation: 1, role: 'reader', tls });
    for (let i = 1; i <= repeats + 1; i++) {
      const u0 = cpu();
      const t0 = performance.now();
      await c.begin(i, 'full', { ramSize: ram });
      await c.sendPages([{ offset: 0, length: ram }], img);
      await c.sendDeviceState(Buffer.alloc(1000));
      await c.commit();
      const t1 = performance.now();
      const u1 = cpu();
      const back = await r.readPages([{ offset: 0, length: ram }]);
      const t2 = performance.now();
      const u2 = cpu();
      if (!back.equals(img)) throw new BenchError('HYDRA_BENCH_WRONG_RESULT', `${transport}: image read back differs`);
      if (i === 1) continue; // warm-up: first image file creation
      ckpt.push(rate(ram, t1 - t0));
      read.push(rate(ram, t2 - t1));
      ckptCpu.push((u1 - u0) / sizeMb);
      readCpu.push((u2 - u1) / sizeMb);
      log(`  ${transport}: checkpoint ${fmt(ckpt.at(-1))} MB/s (${fmt(ckptCpu.at(-1), 2)} CPU ms/MiB), read ${fmt(read.at(-1))} MB/s (${fmt(readCpu.at(-1), 2)} CPU ms/MiB)`);
    }
    await r.close();
    await c.close();
  } finally {
    await store.stop();
  }
  return { transport, checkpointMBs: summary(ckpt), readMBs: summary(read), checkpointCpuMsPerMiB: summary(ckptCpu), readCpuMsPerMiB: summary(readCpu) };
}

export async function runProtocolBench(opts: ProtocolBenchOptions) {
  const home = fs.mkdtempSync(path.join('/tmp', 'hv-bench-proto-'));
  const load = () => os.loadavg().map((v) => Math.round(v * 100) / 100);
  const loadBefore = load();
  try {
    opts.log(`frame codec: ${opts.codecMb} MiB of 8 MiB PAGES frames, ${opts.repeats} repeats`);
    const codec = codecBench(opts.codecMb, opts.repeats);
    const transports: TransportResult[] = [];
    for (const t of ['tcp', 'tls'] as const) {
      opts.log(`store over ${t}: full checkpoints of ${opts.checkpointMb} MiB`);
      transports.push(await transportBench(home, t, opts.checkpointMb, opts.repeats, opts.log));
    }
    const loadAfter = load();
    const m = (s: Summary) => fmt(s.median, 0);
    const c2 = (s: Summary) => fmt(s.median, 2);
    const tcp = transports[0]!;
    const tlsR = transports[1]!;
    const markdown = [
      `### Frame codec (${opts.codecMb} MiB of 8 MiB PAGES frames, median of ${opts.repeats}, MB per CPU-second)`,
      '',
      '| | CRC only | CRC + tag | tag cost |',
      '|---|---|---|---|',
      `| encode (sender) | ${m(codec.encodeMBs.crcOnly)} | ${m(codec.encodeMBs.tagged)} | ${pct(codec.encodeMBs.crcOnly, codec.encodeMBs.tagged)} |`,
      `| decode (receiver, 64 KiB slices) | ${m(codec.decodeMBs.crcOnly)} | ${m(codec.decodeMBs.tagged)} | ${pct(codec.decodeMBs.crcOnly, codec.decodeMBs.tagged)} |`,
      `| encode + decode | ${m(codec.roundTripMBs.crcOnly)} | ${m(codec.roundTripMBs.tagged)} | ${pct(codec.roundTripMBs.crcOnly, codec.roundTripMBs.tagged)} |`,
      '',
      `Primitives alone: crc32 ${m(codec.crc32MBs)} MB/s, HMAC-SHA256 ${m(codec.hmacMBs)} MB/s.`,
      '',
      `### Through a store process (${opts.checkpointMb} MiB full checkpoint, begin to COMMITTED, and a whole-image READ_PAGES; median of ${opts.repeats})`,
      '',
      '| | TCP MB/s | TLS MB/s | TCP CPU ms/MiB | TLS CPU ms/MiB | TLS extra CPU |',
      '|---|---|---|---|---|---|',
      `| checkpoint | ${m(tcp.checkpointMBs)} | ${m(tlsR.checkpointMBs)} | ${c2(tcp.checkpointCpuMsPerMiB)} | ${c2(tlsR.checkpointCpuMsPerMiB)} | ${more(tcp.checkpointCpuMsPerMiB, tlsR.checkpointCpuMsPerMiB)} |`,
      `| page read | ${m(tcp.readMBs)} | ${m(tlsR.readMBs)} | ${c2(tcp.readCpuMsPerMiB)} | ${c2(tlsR.readCpuMsPerMiB)} | ${more(tcp.readCpuMsPerMiB, tlsR.readCpuMsPerMiB)} |`,
      '',
      'CPU: client and store process together (user + system). MB/s is wall-clock and depends on the load.',
      '',
      `Host: ${os.cpus().length} CPUs; load average before ${loadBefore.join(' ')}, after ${loadAfter.join(' ')}.`,
      '',
    ].join('\n');
    const files = writeResults(opts.outDir, 'protocol', { codec, transports, options: { codecMb: opts.codecMb, checkpointMb: opts.checkpointMb, repeats: opts.repeats }, host: { cpus: os.cpus().length, kernel: os.release(), loadBefore, loadAfter } }, markdown, {});
    return { codec, transports, markdown, files };
  } finally {
    fs.rmSync(home, { recursive: true, force: true });
  }
}

function more(base: Summary, other: Summary): string {
  if (!base.median || !other.median) return '-';
  return `+${(((other.median - base.median) / base.median) * 100).toFixed(0)} %`;
}

function pct(base: Summary, other: Summary): string {
  if (!base.median || !other.median) return '-';
  return `${(((base.median - other.median) / base.median) * 100).toFixed(0)} % slower`;
}
