// `hydravm image build debian`: build (or find cached) a guest image.
import type { Command } from 'commander';
import { ImageError } from '../errors.js';
import { printJson } from './format.js';

export function registerImageCommands(program: Command): void {
  const image = program.command('image').description('guest images built from distribution packages');

  image.command('build')
    .description('build a Debian guest (qcow2 root disk, kernel, initramfs) from Debian packages with mmdebstrap; cached by packages, size and kernel')
    .argument('<distribution>', 'only "debian"')
    .option('--size <size>', 'root file system size', '4G')
    .option('--packages <list>', 'comma-separated workload packages (default: redis-server), e.g. redis-server,gcc,make,ffmpeg')
    .option('--workloads', 'add the benchmark workloads: gcc, make, ffmpeg, Lua\'s C source from Debian\'s source archive, a test video, and a runner that starts hydra.workload=compile|transcode (kernel command line) at boot and prints "hydra-workload:" progress lines on the serial console; default name debian-workloads, packages only these unless --packages adds more')
    .option('--name <name>', 'name specs refer to as image:NAME/... (default: debian, or debian-workloads with --workloads)')
    .option('--force', 'rebuild even if a cached build exists')
    .option('--json', 'print the result as JSON')
    .action(async (distribution: string, opts: { size: string; packages?: string; workloads?: boolean; name?: string; force?: boolean; json?: boolean }) => {
      if (distribution !== 'debian') throw new ImageError('HYDRA_IMAGE_BAD_ARGS', `image build: unknown distribution "${distribution}" (only "debian")`);
      const { buildDebianImage } = await import('../image/index.js');
      const img = await buildDebianImage({
        name: opts.name,
        size: opts.size,
        packages: opts.packages === undefined ? undefined : opts.packages.split(','),
        workloads: opts.workloads,
        force: opts.force,
        log: (m) => process.stderr.write(`${m}\n`),
      });
      if (opts.json) return printJson(img);
      const ref = `image:${img.name}`;
      process.stdout.write([
        `image ${img.name} ${img.built ? `built in ${img.info.buildSeconds.toFixed(1)} s` : 'already built (cached)'}: ${img.dir}`,
        `  packages: ${img.info.packages.join(', ') || '(none)'}; kernel ${img.info.kernelPackage}; root ${img.info.sizeBytes / 1024 ** 3} GiB`,
        'use it in a VM spec:',
        `  kernel: ${ref}/${img.vmlinux ? 'vmlinux' : 'vmlinuz'}`,
        `  initrd: ${ref}/initrd.img`,
        `  cmdline: "${img.cmdline} ip=ADDRESS::GATEWAY:NETMASK::eth0:off"`,
        `  root: { path: root.qcow2, size: ${img.info.sizeBytes / 1024 ** 3}G, base: ${ref}/root.qcow2 }`,
        '',
      ].join('\n'));
    });
}
