// The paper's reported numbers (Xen 3.3.2 prototype, 512 MB VM) that each of our tables sets beside its own, with why the two differ.

export interface PaperRow {
  key: string;
  what: string;
  paper: string;
  /** One sentence on why our number and the paper's differ. */
  why: string;
}

export const PAPER_SETUP = 'Xen 3.3.2, para-virtualised guest, 512 MB VM, on its 2010-era testbed';

export const PAPER: Record<string, PaperRow> = {
  pause: {
    key: 'pause', what: 'VM pause per checkpoint', paper: '~70-80 ms basic, ~5-7 ms copy-on-write',
    why: 'Xen paused a PV domain and walked its log-dirty bitmap in the hypervisor; HydraVM stops QEMU, finds dirty pages with one PAGEMAP_SCAN over all guest RAM (so the scan grows with VM size) and copies them with threads into a pre-faulted buffer, and on 2 shared cores under TCG those threads compete with the vCPU threads and with other tenants, which inflates the pause on a loaded host.',
  },
  commit: {
    key: 'commit', what: 'commit of a ~40 MB checkpoint', paper: '2.7-5 s (disk), 1.7-4.3 s (SSD)',
    why: 'the paper wrote each checkpoint synchronously into its image over a 2010 disk, while our store appends to a journal on a modern virtual disk with one fsync per checkpoint and writes back in place afterwards, and the store shares this machine with the VM (loopback, no network).',
  },
  interval: {
    key: 'interval', what: 'achieved checkpoint interval', paper: 'configured 2 s not achieved (commit took longer)',
    why: 'a checkpoint here is durable in well under a second, so the next one starts on time; the paper started the next checkpoint only after the slow commit.',
  },
  failover: {
    key: 'failover', what: 'fail-over (slim restore + start)', paper: '1.6 s',
    why: 'the paper spent over 60 % of its 1.6 s in Xen creating the domain and reconnecting virtual devices and about a third in the slim restore itself; here the local supervisor sees QEMU exit (no heartbeat timeout), a new QEMU process loads only the device state, and memory follows on demand, all on the same 2 loaded cores.',
  },
  fullRestore: {
    key: 'fullRestore', what: 'full restore of a 1 GB image', paper: '20 s',
    why: 'the paper read 1 GB from a 2010 disk; QEMU loads the saved stream here from a modern virtual disk (cold cache) or from memory (warm cache), so the gap to the slim restore is smaller than the paper saw.',
  },
  overhead: {
    key: 'overhead', what: 'workload overhead, checkpoint every 2 s', paper: '< 13 % kernel compile, < 4 % video transcode',
    why: 'memcheck writes memory without pause over 64 MB, a worst case for dirty tracking that a compile or a transcode is not, and every checkpoint copy competes with the TCG vCPU thread for the 2 host cores; the paper ran a PV guest on its own cores.',
  },
  fig2: {
    key: 'fig2', what: 'Figure 2: pause per checkpoint, kernel compile', paper: 'basic ~70-80 ms, growing with the interval (mapping the dirty pages + copying them); mapping all of RAM once at start cuts it 41-46 %; CoW ~5-7 ms, flat across intervals',
    why: 'the paper\'s pause mapped and copied dirty pages of a PV domain from Dom0; ours stops QEMU, scans the dirty set with PAGEMAP_SCAN over all guest RAM and copies into a pre-faulted buffer (basic), or only re-arms write protection (CoW), with the TCG vCPU and the copy threads sharing 2 cores.',
  },
  fig3: {
    key: 'fig3', what: 'Figure 3: workload slowdown while protected', paper: 'kernel compile < 13 %, video transcode < 4 % at every interval (2-10 s), basic and CoW; level of protection e.g. 75 checkpoints in 392 s = 0.19 per second (compile, every 2 s, disk)',
    why: 'under TCG the guest runs 10-30 times slower than on hardware, so a job dirties memory more slowly per second of wall time but every pause and every copy thread takes a larger share of the same 2 cores; the paper\'s Dom0 daemon had cores of its own.',
  },
  fig4: {
    key: 'fig4', what: 'Figure 4: fail-over time at 50 % of the job', paper: '< 1.6 s (mean of 3); slim restore about a third, over 60 % in Xen creating the domain and reconnecting devices; ~1033-1135 page-table pages (~4 MB) loaded',
    why: 'our split has no domain builder: a new QEMU process starts, loads only the device state, and the guest resumes with its memory fetched on demand; detection here is the local supervisor seeing QEMU die, not a heartbeat timeout.',
  },
  table2: {
    key: 'table2', what: 'Table II: last 50 % after a slim restore vs never failed', paper: 'on-demand fetching "does not introduce a prohibitive overhead"; ~30,000 pages (~128 MB) fetched over a kernel compile; SSD no faster than disk (the table\'s figures are not legible in our copy of the paper)',
    why: 'in network mode a pager fetches each missing page over TCP from the store on its first touch while a background prefetch fills the rest, so the slowdown lasts until memory is complete (seconds on 512 MB, not the job\'s whole second half; without prefetch every first touch waits); in file mode guest RAM is a private mapping of the image file, paged in by the kernel.',
  },
  reboot: {
    key: 'reboot', what: 'reboot of the VM instead (restart-based HA)', paper: 'not measured; restart-based HA "take[s] significantly longer than HydraVM" and loses the application state',
    why: 'a reboot runs firmware, kernel and systemd to a service again (here under TCG, where every instruction of it is emulated) and the job starts over, while a slim restore resumes the job where its last checkpoint left it.',
  },
  memory: {
    key: 'memory', what: 'memory reserved elsewhere while protected', paper: 'none beyond the image on storage (the paper\'s claim; no standby VM)',
    why: 'both keep the VM\'s memory on storage; the store process keeps only protocol buffers and the journal index in RAM, and the checkpointer on the VM\'s host its staging buffer.',
  },
};
