/*
 * libhydra_shim.so: LD_PRELOADed into QEMU so that QEMU's own address space
 * owns userfaultfds HydraVM can take over with pidfd_getfd (a uffd is bound to
 * the mm that created it, so it has to be created inside QEMU).
 *
 * Behaviour (documented contract with the VM launcher and the tracker):
 *   - Acts whenever it is preloaded; HYDRAVM_SHIM=0 in the environment turns it
 *     off. LD_PRELOAD is the opt-in.
 *   - Creates HYDRAVM_SHIM_UFFDS userfaultfds (default 2, 1..8), each with
 *     O_CLOEXEC|O_NONBLOCK, and keeps them open for the life of the process.
 *     Two because a uffd accepts UFFDIO_API once: after a network-mode restore
 *     (MISSING mode, no features) the VM needs a second, fresh uffd to be
 *     write-protect tracked again.
 *   - Never fails the host process: if userfaultfd() is refused (e.g. a
 *     non-root QEMU with vm.unprivileged_userfaultfd=0), it does nothing; the
 *     tracker then reports that the process has no userfaultfd.
 *   - After fork() the child closes the inherited uffds (they stay bound to the
 *     parent's memory) and creates its own, so QEMU -daemonize also works.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define HYDRA_SHIM_MAX_UFFDS 8

static int hydra_uffds[HYDRA_SHIM_MAX_UFFDS];
static int hydra_nuffds;

static void hydra_shim_create(void) {
    const char *on = getenv("HYDRAVM_SHIM");
    if (on && strcmp(on, "0") == 0) return;
    int want = 2;
    const char *n = getenv("HYDRAVM_SHIM_UFFDS");
    if (n && *n) want = atoi(n);
    if (want < 1) want = 1;
    if (want > HYDRA_SHIM_MAX_UFFDS) want = HYDRA_SHIM_MAX_UFFDS;
    while (hydra_nuffds < want) {
        long fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
        if (fd < 0) break;
        hydra_uffds[hydra_nuffds++] = (int)fd;
    }
}

static void hydra_shim_atfork_child(void) {
    for (int i = 0; i < hydra_nuffds; i++) close(hydra_uffds[i]);
    hydra_nuffds = 0;
    hydra_shim_create();
}

__attribute__((constructor)) static void hydra_shim_init(void) {
    hydra_shim_create();
    if (hydra_nuffds > 0) pthread_atfork(NULL, NULL, hydra_shim_atfork_child);
}
