import { validateSpec } from '../vm/spec.js';
import { startVm, stopVm, vmStatus } from '../vm/manager.js';
import { waitForMemcheckStep, lastMemcheckProgress, countViolations } from '../vm/serial.js';
import { checkSetup, runSetup } from '../setup/index.js';

export interface DemoOptions {
  memory: string;
  workingSetMb: number;
  keep: boolean;
}

const say = (msg: string) => process.stdout.write(`${msg}\n`);

/** The embedded default VM: the test guest with memcheck, nothing to download or write. */
export function demoSpec(opts: { name?: string; memory: string; workingSetMb: number }) {
  return validateSpec({
    name: opts.name ?? 'demo',
    memory: opts.memory,
    vcpus: 1,
    accel: 'auto',
    kernel: 'guest:vmlinux',
    initrd: 'guest:initrd.img',
    cmdline: `console=ttyS0 quiet hydra.run=memcheck memcheck.mb=${opts.workingSetMb}`,
  }, process.cwd(), 'embedded demo spec');
}

export async function runDemo(opts: DemoOptions): Promise<void> {
  if (!(await checkSetup()).ok) {
    say('== setting up (first run only): QEMU, native parts, guest images');
    await runSetup({ log: (m: string) => say(`   ${m}`) });
  }
  const spec = demoSpec(opts);
  try {
    await stopVm(spec.name);
  } catch {
    /* no earlier demo VM */
  }
  say(`== starting VM "${spec.name}" (${opts.memory}, memcheck over ${opts.workingSetMb} MB)`);
  const t0 = Date.now();
  const state = await startVm(spec);
  const status = await vmStatus(spec.name);
  say(`   QEMU pid ${state.qemuPid}, accel ${state.accel}, serial log ${status.serialLog}`);
  const first = await waitForMemcheckStep(status.serialLog, 1, 60_000);
  say(`   memcheck running after ${((Date.now() - t0) / 1000).toFixed(1)} s (step ${first.step})`);
  await new Promise((r) => setTimeout(r, 3000));
  const later = lastMemcheckProgress(status.serialLog);
  say(`   3 s later: step ${later?.step}, violations ${countViolations(status.serialLog)}`);
  if (opts.keep) {
    say(`== VM left running; stop it with: hydravm vm stop ${spec.name}`);
    return;
  }
  const end = await stopVm(spec.name);
  say(`== VM ${spec.name} ${end.lifecycle}`);
}
