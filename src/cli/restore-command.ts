import type { Command } from 'commander';
import { ms } from './format.js';
import { parseDuration } from './duration.js';
import { SpecError } from '../errors.js';
import type { PagingOptions } from '../restore/index.js';

export function registerRestoreCommand(program: Command): void {
  program.command('restore')
    .description('slim restore of a VM from its newest committed checkpoint on this host; memory follows on demand')
    .argument('<name>', 'VM name')
    .requiredOption('--store <addr>', 'checkpoint store address host:port')
    .option('--mode <mode>', 'file: map the image file (needs --store-dir); network: fetch pages from the store', 'network')
    .option('--store-dir <dir>', 'file mode: the store directory as this host sees it')
    .option('--generation <n>', 'image generation to restore (default: newest)')
    .option('--no-prefetch', 'network mode: only fetch pages the guest faults on; file mode: do not read the image into the page cache in the background')
    .option('--standby-store <addr>', 'network mode: another store serving the same image, asked when the store fails while memory is paged in (repeatable; the VM is stopped when none answers within 30 s)', (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option('--page-rate <MBps>', 'network mode: upper bound of the background page stream in MB/s (default: none; faults are never limited)')
    .option('--page-streams <n>', 'network mode: connections streaming the image in the background', '2')
    .option('--page-guard <pct>', 'network mode: slow the background stream while the guest\'s vCPUs wait for a CPU more than this % of the time (0 = off)', '5')
    .option('--paused', 'leave the guest paused after loading its device state (drills, verification); memory is still fetched')
    .option('--protect', 'protect the restored VM again, as a new generation')
    .option('--interval <duration>', 'checkpoint interval when protecting again', '2s')
    .option('--secret-file <file>', 'cluster secret file')
    .option('--no-shell', 'start QEMU cold even if a pre-started restore shell of the VM\'s configuration is idle on this host')
    .action(async (name: string, opts: { store: string; mode: string; storeDir?: string; generation?: string; prefetch: boolean; standbyStore: string[]; pageRate?: string; pageStreams: string; pageGuard: string; paused?: boolean; protect?: boolean; interval: string; secretFile?: string; shell: boolean }) => {
      if (opts.mode !== 'file' && opts.mode !== 'network') throw new SpecError(`--mode: "${opts.mode}" is not file or network`);
      const { restoreVm } = await import('../restore/index.js');
      const { loadSecret } = await import('../config/secret.js');
      const { nextGeneration } = await import('../checkpoint/index.js');
      const generation = opts.generation === undefined ? undefined : Number(opts.generation);
      const secret = loadSecret({ secretFile: opts.secretFile });
      // The restored VM is a new incarnation: its generation fences the old one at the store.
      const newGeneration = await nextGeneration(name, opts.store, opts.secretFile);
      const r = await restoreVm({
        vm: name, store: opts.store, secret, mode: opts.mode, storeDir: opts.storeDir, generation, newGeneration,
        prefetch: opts.prefetch,
        paging: pagingOptions(opts),
        paused: opts.paused,
        shell: opts.shell ? 'auto' : 'never',
        onProgress: (m) => process.stderr.write(`${m}\n`),
      });
      process.stdout.write(`VM ${name} restored from generation ${r.generation} epoch ${r.epoch} (${r.mode} mode): running ${ms(r.timings.spawnToRunningMs)} after QEMU was spawned (${ms(r.timings.launchToRunningMs)} with the supervisor's start; device load ${ms(r.timings.deviceLoadMs)})\n`);
      process.stdout.write(r.shell.used
        ? `VM ${name} restored into restore shell ${r.shell.id} (${r.shell.key}): hand-off ${ms(r.timings.shellHandoffMs ?? 0)}, device load ${ms(r.timings.deviceLoadMs)}, cont ${ms(r.timings.contMs)}\n`
        : `VM ${name} started cold: ${r.shell.reason}\n`);
      if (r.announced) process.stdout.write(`VM ${name} announced itself on its network (QMP announce-self)\n`);
      if (r.pager) {
        // Keep serving memory until it is complete; the VM needs this process until then.
        const stats = await r.pager.done;
        process.stdout.write(`memory complete after ${ms(stats.completeMs ?? 0)}: ${stats.faults} faults served, ${stats.pagesPrefetched} pages prefetched, ${stats.zeroPagesFilled} of them zeros the image holds no data for (not fetched)\n`);
      }
      if (r.warmer) {
        // The warming lives in this process: wait for it (the VM itself does not need it).
        const stats = await r.warmer.done;
        if (stats.completeMs !== null) process.stdout.write(`image file cached after ${ms(stats.completeMs)}: ${(stats.bytesWarmed / 2 ** 20).toFixed(0)} MB (guest memory faults are minor from here)
`);
      }
      if (opts.protect) {
        const { protectVm } = await import('../checkpoint/index.js');
        const s = await protectVm({ vm: name, store: opts.store, intervalMs: parseDuration(opts.interval, '--interval'), generation: newGeneration, secretFile: opts.secretFile });
        process.stdout.write(`VM ${name} protected again as generation ${s.generation}\n`);
      }
    });
}

function pagingOptions(opts: { standbyStore: string[]; pageRate?: string; pageStreams: string; pageGuard: string }): PagingOptions {
  const guard = Number(opts.pageGuard);
  if (!(guard >= 0 && guard < 100)) throw new SpecError(`--page-guard: "${opts.pageGuard}" is not a percentage from 0 to 99`);
  const streams = Number(opts.pageStreams);
  if (!Number.isInteger(streams) || streams < 1 || streams > 16) throw new SpecError(`--page-streams: "${opts.pageStreams}" is not a whole number from 1 to 16`);
  const rate = opts.pageRate === undefined ? undefined : Number(opts.pageRate);
  if (rate !== undefined && !(rate > 0)) throw new SpecError(`--page-rate: "${opts.pageRate}" is not a positive number of MB/s`);
  return { streams, ...(opts.standbyStore.length > 0 ? { alternates: opts.standbyStore } : {}), guestDelay: guard / 100, ...(rate !== undefined ? { maxBytesPerS: rate * 1e6 } : {}) };
}
