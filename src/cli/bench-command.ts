import type { Command } from 'commander';
import path from 'node:path';
import { registerEvalCommands } from './bench-eval-command.js';
import { BenchError } from '../errors.js';

export function registerBenchCommand(program: Command): void {
  const bench = program.command('bench').description('benchmarks: write JSON, a Markdown table and SVG plots');
  bench.command('checkpoint')
    .description('basic and copy-on-write checkpoints side by side: pause, collect, copy, device state, bytes per checkpoint, guest slowdown')
    .option('--out <dir>', 'output directory', path.join('bench', 'results'))
    .option('--memory <sizes>', 'comma-separated guest memory sizes', '512M,4G')
    .option('--working-sets <mb>', 'comma-separated memcheck working sets in MB (rewritten unthrottled: the dirty set per checkpoint)', '64,256')
    .option('--modes <list>', 'comma-separated modes: basic, cow:<grain>', 'basic,cow:4K,cow:64K,cow:256K')
    .option('--checkpoints <n>', 'incremental checkpoints measured per configuration', '10')
    .option('--interval <s>', 'checkpoint interval in seconds', '1')
    .option('--slowdown-window <s>', 'seconds of guest progress per slowdown measurement (0: skip)', '15')
    .option('--no-disk', 'skip the run with a qcow2 disk')
    .action(async (opts: { out: string; memory: string; workingSets: string; modes: string; checkpoints: string; interval: string; slowdownWindow: string; disk: boolean }) => {
      const { runCheckpointBench } = await import('../bench/index.js');
      const r = await runCheckpointBench({
        outDir: opts.out,
        memories: opts.memory.split(','),
        workingSetsMb: opts.workingSets.split(',').map(Number),
        modes: opts.modes.split(','),
        checkpoints: Number(opts.checkpoints),
        intervalS: Number(opts.interval),
        slowdownWindowS: Number(opts.slowdownWindow),
        disk: opts.disk,
        log: (m) => process.stderr.write(`${m}\n`),
        command: ['hydravm', ...process.argv.slice(2)].join(' '),
      });
      process.stdout.write(r.markdown);
      process.stdout.write(`written: ${r.files.join(', ')}\n`);
    });

  bench.command('checkpoint-page')
    .description('write a checkpoint benchmark run (its JSON) into the generated section of docs/benchmarks.md')
    .option('--json <file>', 'the run', path.join('bench', 'results', 'checkpoint.json'))
    .option('--doc <file>', 'the page', path.join('docs', 'benchmarks.md'))
    .action(async (opts: { json: string; doc: string }) => {
      const { writeCheckpointDoc } = await import('../bench/index.js');
      writeCheckpointDoc(opts.json, opts.doc);
      process.stdout.write(`${opts.doc}: checkpoint section written from ${opts.json}\n`);
    });

  bench.command('protocol')
    .description('cost of frame tags (HMAC) in the frame codec, and checkpoint / page-read throughput through a store over TCP vs TLS')
    .option('--out <dir>', 'output directory', path.join('bench', 'results'))
    .option('--codec-mb <n>', 'MiB pushed through the frame codec per measurement', '512')
    .option('--checkpoint-mb <n>', 'size of the full checkpoint sent through the store', '256')
    .option('--repeats <n>', 'measurements per configuration; medians are reported', '5')
    .action(async (opts: { out: string; codecMb: string; checkpointMb: string; repeats: string }) => {
      const { runProtocolBench } = await import('../bench/index.js');
      const r = await runProtocolBench({
        outDir: opts.out,
        codecMb: Number(opts.codecMb),
        checkpointMb: Number(opts.checkpointMb),
        repeats: Number(opts.repeats),
        log: (m) => process.stderr.write(`${m}\n`),
      });
      process.stdout.write(r.markdown);
      process.stdout.write(`written: ${r.files.join(', ')}\n`);
    });

  bench.command('redis-watch')
    .description('a redis client that INCRs a counter and SETs sequence numbers until SIGINT/SIGTERM, recording every reply (JSONL); prints its summary')
    .requiredOption('--host <addr>', 'redis address (e.g. the VM\'s)')
    .option('--port <n>', 'redis port', '6379')
    .option('--out <file>', 'JSONL file receiving every record')
    .option('--timeout <ms>', 'deadline per command and connection attempt', '1000')
    .option('--kill-at <ms>', 'time of a kill (ms since the epoch): report the time to the first reply after it and the acknowledged writes lost')
    .action(async (opts: { host: string; port: string; out?: string; timeout: string; killAt?: string }) => {
      const { RedisWatcher, summarizeWatch, lossReport } = await import('../bench/index.js');
      const w = new RedisWatcher({ host: opts.host, port: Number(opts.port), out: opts.out, timeoutMs: Number(opts.timeout) }).start();
      process.stderr.write(`watching redis at ${opts.host}:${opts.port}${opts.out ? `, records in ${opts.out}` : ''}; stop with SIGINT or SIGTERM\n`);
      await new Promise<void>((resolve) => {
        process.once('SIGINT', resolve);
        process.once('SIGTERM', resolve);
      });
      const records = await w.stop();
      const killAt = opts.killAt === undefined ? undefined : Number(opts.killAt);
      process.stdout.write(JSON.stringify({ ...summarizeWatch(records, killAt), ...(killAt ? { loss: lossReport(records, killAt) } : {}) }) + '\n');
    });

  bench.command('failover')
    .description('fail-over time split (detection, slim restore, guest progress) vs QEMU full save/restore and reboot; network paging; slowdown after restore')
    .option('--out <dir>', 'output directory', path.join('bench', 'results'))
    .option('--repeats <n>', 'fail-overs per memory mode (file, network); medians are reported', '3')
    .option('--memory <size>', 'guest memory', '512M')
    .option('--working-set <mb>', 'memcheck working set in MB', '64')
    .option('--rate <mbps>', 'memcheck write rate in MB/s (0 = unlimited)', '32')
    .option('--interval <s>', 'checkpoint interval in seconds', '1')
    .option('--window <s>', 'seconds of memcheck progress measured before the kill and after the restore', '10')
    .option('--demand-only-seconds <s>', 'how long the pure on-demand (no prefetch) restore runs', '15')
    .option('--fencing-rounds <n>', 'agent-only failures in an embedded cluster: agent death -> old QEMU gone, -> host declared dead, -> restore start (0 = skip)', '3')
    .option('--fencing-only', 'run only the self-fencing rounds')
    .option('--paging-sizes <list>', 'network paging part: guest memory sizes, comma-separated ("none" skips it)', '512M,2G')
    .option('--paging-modes <list>', 'network paging part: stream controls to try, comma-separated: guard (the default rate control), none (unlimited), or a fixed MB/s', 'guard,none')
    .option('--paging-streams <n>', 'network paging part: background connections of the pager', '2')
    .option('--paging-only', 'run only the network paging part')
    .option('--guest <guest>', 'memcheck (the test guest, on one host) or debian (redis in the Debian image on 3 namespaced hosts, watched by a client; needs root)', 'memcheck')
    .option('--runs <n>', 'debian: fail-overs of each kind (QEMU death, host death) per checkpoint interval', '2')
    .option('--intervals <s>', 'debian: comma-separated checkpoint intervals in seconds', '1,0.5')
    .option('--netns-prefix <prefix>', 'debian: name prefix of the namespaces, bridge and veths', 'hvfo-')
    .option('--netns-subnet <cidr>', 'debian: a /24 inside 198.18.0.0/15 for the hosts and the VM', '198.18.110.0/24')
    .option('--docs <file>', 'debian: also replace the generated section of this Markdown file (e.g. docs/benchmarks.md)')
    .option('--keep', 'debian: keep the cluster directory (logs) after the run')
    .option('--no-qemu-baseline', 'skip QEMU\'s full save/restore baseline')
    .option('--shells <which>', 'fail-overs into a pre-started restore shell (warm), cold QEMU starts, or both', 'both')
    .action(async (opts: { out: string; repeats: string; memory: string; workingSet: string; rate: string; interval: string; window: string; demandOnlySeconds: string; fencingRounds: string; fencingOnly?: boolean; guest: string; runs: string; intervals: string; netnsPrefix: string; netnsSubnet: string; docs?: string; keep?: boolean; shells: string; qemuBaseline: boolean; pagingSizes: string; pagingModes: string; pagingStreams: string; pagingOnly?: boolean }) => {
      if (opts.guest === 'debian') {
        const { runDebianFailoverBench } = await import('../bench/index.js');
        const r = await runDebianFailoverBench({
          outDir: opts.out, runs: Number(opts.runs), intervalsMs: opts.intervals.split(',').map((s) => Math.round(Number(s) * 1000)),
          memory: opts.memory, windowS: Number(opts.window), prefix: opts.netnsPrefix, subnet: opts.netnsSubnet, keep: !!opts.keep, docs: opts.docs,
          log: (m) => process.stderr.write(`${m}\n`),
        });
        process.stdout.write(r.markdown);
        process.stdout.write(`written: ${r.files.join(', ')}\n`);
        return;
      }
      if (opts.guest !== 'memcheck') throw new BenchError('HYDRA_BENCH_BAD_OPTION', `bench failover --guest "${opts.guest}": use memcheck or debian`);
      if (!['both', 'warm', 'cold'].includes(opts.shells)) throw new BenchError('HYDRA_BENCH_BAD_OPTION', `bench failover --shells "${opts.shells}": use both, warm or cold`);
      const { runFailoverBench } = await import('../bench/index.js');
      const r = await runFailoverBench({
        outDir: opts.out,
        repeats: Number(opts.repeats),
        memory: opts.memory,
        workingSetMb: Number(opts.workingSet),
        rateMb: Number(opts.rate),
        intervalMs: Number(opts.interval) * 1000,
        windowS: Number(opts.window),
        noPrefetchS: Number(opts.demandOnlySeconds),
        fencingRounds: Number(opts.fencingRounds),
        fencingOnly: !!opts.fencingOnly,
        paging: {
          sizes: opts.pagingSizes === 'none' ? [] : opts.pagingSizes.split(',').map((x) => x.trim()).filter(Boolean),
          modes: opts.pagingModes.split(',').map((x) => x.trim()).filter(Boolean),
          streams: Number(opts.pagingStreams),
        },
        pagingOnly: !!opts.pagingOnly,
        shells: opts.shells as 'both' | 'warm' | 'cold',
        noQemuBaseline: !opts.qemuBaseline,
        log: (m) => process.stderr.write(`${m}\n`),
      });
      process.stdout.write(r.markdown);
      process.stdout.write(`written: ${r.files.join(', ')}\n`);
    });

  registerEvalCommands(bench);
}
