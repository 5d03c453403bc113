import type { Command } from 'commander';
import { bytes, printJson, table } from './format.js';

export function registerVmCommands(program: Command): void {
  const vm = program.command('vm').description('start, inspect and stop VMs');

  vm.command('start')
    .description('start a VM from a spec file (YAML or JSON); it keeps running after this command exits')
    .argument('<spec>', 'VM spec file')
    .option('--json', 'print the VM status as JSON')
    .action(async (specFile: string, opts: { json?: boolean }) => {
      const { loadSpecFile } = await import('../vm/index.js');
      const { startVm, vmStatus } = await import('../vm/index.js');
      const spec = loadSpecFile(specFile);
      await startVm(spec);
      const status = await vmStatus(spec.name);
      if (opts.json) printJson(status);
      else {
        process.stdout.write(`VM ${spec.name} is ${status.runState ?? status.lifecycle} (QEMU pid ${status.qemuPid}, accel ${status.accel})\n`);
        process.stdout.write(`  serial log: ${status.serialLog}\n  QMP socket: ${status.qmpSocket}\n`);
      }
    });

  vm.command('stop')
    .description('stop a VM and wait until its QEMU is gone')
    .argument('<name>')
    .action(async (name: string) => {
      const { stopVm } = await import('../vm/index.js');
      // Loading protection registers its stop hook: a protected VM ends its protection first.
      await import('../checkpoint/index.js');
      const state = await stopVm(name);
      process.stdout.write(`VM ${name} ${state.lifecycle}${state.reason ? ` (${state.reason})` : ''}\n`);
    });

  vm.command('list')
    .description('list VMs on this host')
    .option('--json', 'machine-readable output')
    .action(async (opts: { json?: boolean }) => {
      const { listVms } = await import('../vm/index.js');
      const vms = await listVms();
      if (opts.json) return printJson(vms.map(summary));
      if (vms.length === 0) return void process.stdout.write('no VMs\n');
      process.stdout.write(table(['NAME', 'STATE', 'PID', 'ACCEL', 'MEMORY', 'SERIAL LOG'],
        vms.map((v) => [v.name, stateWord(v), v.live ? v.qemuPid : undefined, v.accel, bytes(v.memoryBytes), v.serialLog])) + '\n');
    });

  vm.command('status')
    .description('show one VM')
    .argument('<name>')
    .option('--json', 'machine-readable output')
    .action(async (name: string, opts: { json?: boolean }) => {
      const { vmStatus } = await import('../vm/index.js');
      const v = await vmStatus(name);
      if (opts.json) return printJson(summary(v));
      const rows: [string, string | number | undefined][] = [
        ['name', v.name], ['state', stateWord(v)], ['reason', v.reason], ['QEMU pid', v.live ? v.qemuPid : undefined],
        ['supervisor pid', v.live ? v.supervisorPid : undefined], ['accel', v.accel], ['memory', bytes(v.memoryBytes)],
        ['started', v.startedAt], ['ended', v.endedAt], ['QMP socket', v.qmpSocket], ['serial log', v.serialLog], ['runtime dir', v.dir],
      ];
      process.stdout.write(rows.filter(([, val]) => val !== undefined).map(([k, val]) => `${k.padEnd(15)} ${val}`).join('\n') + '\n');
    });
}

type Status = Awaited<ReturnType<typeof import('../vm/index.js')['vmStatus']>>;

function stateWord(v: Status): string {
  return v.live && v.runState ? v.runState : v.lifecycle;
}

function summary(v: Status) {
  return {
    name: v.name,
    state: stateWord(v),
    lifecycle: v.lifecycle,
    live: v.live,
    qemuPid: v.live ? v.qemuPid ?? null : null,
    supervisorPid: v.live ? v.supervisorPid : null,
    accel: v.accel,
    memoryBytes: v.memoryBytes,
    qmpSocket: v.qmpSocket,
    serialLog: v.serialLog,
    runtimeDir: v.dir,
    reason: v.reason ?? null,
    startedAt: v.startedAt ?? null,
    endedAt: v.endedAt ?? null,
  };
}
