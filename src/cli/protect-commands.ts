import type { Command } from 'commander';
import { bytes, ms, printJson, table } from './format.js';
import { parseDuration } from './duration.js';
import { SpecError } from '../errors.js';
import { cowOption } from './cow-option.js';

export function registerProtectCommands(program: Command): void {
  program.command('protect')
    .description('protect a running VM: a full checkpoint, then incremental checkpoints into the store')
    .argument('<name>', 'VM name')
    .requiredOption('--store <addr>', 'checkpoint store address host:port')
    .option('--interval <duration>', 'checkpoint interval', '2s')
    .option('--generation <n>', 'image generation (default: one above what the store holds)')
    .option('--secret-file <file>', 'cluster secret file (default $HYDRAVM_HOME/cluster.secret or $HYDRAVM_SECRET)')
    .option('--layer-dir <dir>', 'shared directory for frozen disk layers (default: .hydravm-layers beside the first disk)')
    .option('--cow', 'copy-on-write checkpoints: the pause only re-arms write protection; pages are copied after the VM resumes')
    .option('--basic', 'basic checkpoints (pages copied inside the pause), whatever the VM spec says')
    .option('--grain <size>', 'copy-on-write grain, a power of two from 4K to 2M (default 64K, or the spec\'s protection.grain)')
    .action(async (name: string, opts: { store: string; interval: string; generation?: string; secretFile?: string; layerDir?: string; cow?: boolean; basic?: boolean; grain?: string }) => {
      const { protectVm, assertProtectable } = await import('../checkpoint/index.js');
      const { nextGeneration } = await import('../checkpoint/index.js');
      const intervalMs = parseDuration(opts.interval, '--interval');
      if (opts.cow && opts.basic) throw new SpecError('--cow and --basic: choose one checkpoint mode');
      const cow = opts.basic ? false as const : cowOption(opts).cow;
      assertProtectable(name);
      let generation: number;
      if (opts.generation !== undefined) {
        generation = Number(opts.generation);
        if (!Number.isInteger(generation) || generation < 1) throw new SpecError(`--generation: "${opts.generation}" is not a positive integer`);
      } else {
        generation = await nextGeneration(name, opts.store, opts.secretFile);
      }
      const tty = process.stderr.isTTY;
      const status = await protectVm({ vm: name, store: opts.store, intervalMs, generation, secretFile: opts.secretFile, layerDir: opts.layerDir, ...(cow !== undefined ? { cow } : {}) }, (s) => {
        if (s.state === 'initial-copy' && s.initialCopy) {
          const pct = s.initialCopy.bytesTotal ? Math.floor((100 * s.initialCopy.bytesSent) / s.initialCopy.bytesTotal) : 100;
          const line = `initial checkpoint of ${name}: ${bytes(s.initialCopy.bytesSent)} / ${bytes(s.initialCopy.bytesTotal)} (${pct}%)`;
          process.stderr.write(tty ? `\r${line}` : `${line}\n`);
        }
      });
      if (tty) process.stderr.write('\n');
      process.stdout.write(`VM ${name} protected: generation ${status.generation}, epoch ${status.committedEpoch} committed to ${status.store}, every ${ms(intervalMs)}${status.mode === 'cow' ? ', copy-on-write' : ''}\n`);
      if (status.cowRefused) process.stdout.write(`VM ${name}: basic checkpoints, copy-on-write refused: ${status.cowRefused}\n`);
    });

  program.command('unprotect')
    .description('stop checkpointing a VM (the VM keeps running; the image stays in the store)')
    .argument('<name>')
    .action(async (name: string) => {
      const { unprotectVm } = await import('../checkpoint/index.js');
      const s = await unprotectVm(name);
      process.stdout.write(s ? `VM ${name} unprotected at epoch ${s.committedEpoch}\n` : `VM ${name} was not protected\n`);
    });

  program.command('status')
    .description('protected VMs: epoch, age of the newest checkpoint, interval, pause time, bytes per checkpoint')
    .option('--json', 'machine-readable output')
    .option('--prometheus', 'Prometheus text format')
    .action(async (opts: { json?: boolean; prometheus?: boolean }) => {
      const { collectStatus, renderPrometheus } = await import('../checkpoint/index.js');
      const rows = collectStatus();
      if (opts.prometheus) return void process.stdout.write(await renderPrometheus(rows));
      if (opts.json) return printJson(rows);
      if (rows.length === 0) return void process.stdout.write('no VMs\n');
      process.stdout.write(table(
        ['VM', 'STATE', 'PROTECTION', 'GEN', 'EPOCH', 'AGE', 'INTERVAL', 'PAUSE', 'PAUSE p50', 'BYTES/CKPT', 'DISK CHAIN'],
        rows.map((r) => [r.vm, r.vmState, r.protection ?? 'unprotected', r.generation ?? undefined, r.epoch ?? undefined, r.ageMs === null ? undefined : ms(r.ageMs),
          r.achievedIntervalMs === null ? undefined : ms(r.achievedIntervalMs), r.lastPauseMs === null ? undefined : ms(r.lastPauseMs),
          r.medianPauseMs === null ? undefined : ms(r.medianPauseMs), r.bytesPerCheckpoint === null ? undefined : bytes(r.bytesPerCheckpoint), r.diskChainLength || undefined]),
      ) + '\n');
    });

  program.command('internal-checkpoint', { hidden: true })
    .argument('<name>')
    .action(async (name: string) => {
      const { runCheckpointerProcess } = await import('../checkpoint/index.js');
      // In a cluster the checkpointer looks the active store up in etcd on every reconnection.
      const { storeResolver } = await import('../ha/index.js');
      await runCheckpointerProcess(name, (d) => storeResolver(d));
    });
}
