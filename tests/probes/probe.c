/*
 * probe: call one syscall with harmless, invalid arguments and exit with the errno
 * it returned (0 when it succeeded), so that an allowed call (EFAULT, EBADF, EINVAL,
 * ...) and a call refused by a seccomp filter (EPERM, ENOSYS, or death by SIGSYS)
 * can be told apart.
 *
 *   probe NAME        e.g. probe ptrace, probe clone:newuser, probe ioctl:tiocsti_hi
 *
 * Two probes leave the native ABI: "int80_socket" creates a socket through the
 * i386 socketcall entry (int 0x80) and "x32_getpid" calls getpid with the x32 bit
 * set. Nothing here can change the host: every pointer is invalid or NULL, every
 * flag set is rejected before the call does anything.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BAD ((long)1) /* an address nothing is mapped at */
#define HI32 (1UL << 32)

#define SYS(nr, ...) syscall(nr, __VA_ARGS__)
#define A6(a, b, c, d, e, f) (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), \
    (long)(f)

/* clone flags that fail with EINVAL before anything is created: CLONE_SIGHAND
 * without CLONE_VM. */
static long probe_clone(unsigned long ns_flag)
{
    return SYS(SYS_clone, A6(ns_flag | CLONE_SIGHAND, 0, 0, 0, 0, 0));
}

#if defined(__x86_64__)
/* i386 socketcall(SYS_SOCKET, {AF_UNIX, SOCK_STREAM, 0}) through int 0x80. The
 * argument block must sit below 4 GiB for the 32-bit entry to read it. */
static long probe_int80_socket(void)
{
    unsigned int *args = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
    if (args == MAP_FAILED)
        return -1;
    args[0] = 1; /* AF_UNIX */
    args[1] = 1; /* SOCK_STREAM */
    args[2] = 0;
    long ret;
    __asm__ volatile("int $0x80"
                     : "=a"(ret)
                     : "a"(102 /* i386 socketcall */), "b"(1 /* SYS_SOCKET */),
                       "c"(args)
                     : "memory");
    if (ret < 0) {
        errno = (int)-ret;
        return -1;
    }
    close((int)ret);
    return 0;
}

static long probe_x32_getpid(void)
{
    return syscall(0x40000000L | SYS_getpid);
}
#else
static long probe_int80_socket(void) { errno = ENOSYS; return -1; }
static long probe_x32_getpid(void) { errno = ENOSYS; return -1; }
#endif

static long probe(const char *name)
{
#define IS(s) (strcmp(name, s) == 0)
    /* controls: allowed under every sbx policy */
    if (IS("getpid")) return SYS(SYS_getpid, A6(0, 0, 0, 0, 0, 0)) > 0 ? 0 : -1;
    if (IS("read")) return SYS(SYS_read, A6(-1, 0, 0, 0, 0, 0));
    if (IS("ioctl:tcgets")) return SYS(SYS_ioctl, A6(-1, TCGETS, 0, 0, 0, 0));
    if (IS("clone:plain")) return probe_clone(0);
    /* namespaces */
    if (IS("unshare")) return SYS(SYS_unshare, A6(0x1, 0, 0, 0, 0, 0));
    if (IS("setns")) return SYS(SYS_setns, A6(-1, 0, 0, 0, 0, 0));
    if (IS("clone:newns")) return probe_clone(CLONE_NEWNS);
    if (IS("clone:newcgroup")) return probe_clone(CLONE_NEWCGROUP);
    if (IS("clone:newuts")) return probe_clone(CLONE_NEWUTS);
    if (IS("clone:newipc")) return probe_clone(CLONE_NEWIPC);
    if (IS("clone:newuser")) return probe_clone(CLONE_NEWUSER);
    if (IS("clone:newpid")) return probe_clone(CLONE_NEWPID);
    if (IS("clone:newnet")) return probe_clone(CLONE_NEWNET);
    if (IS("clone3")) return SYS(SYS_clone3, A6(0, 0, 0, 0, 0, 0));
    /* mounts and the root */
    if (IS("mount")) return SYS(SYS_mount, A6(BAD, BAD, BAD, 0, 0, 0));
    if (IS("umount2")) return SYS(SYS_umount2, A6(BAD, 0xff00, 0, 0, 0, 0));
    if (IS("fsopen")) return SYS(SYS_fsopen, A6(BAD, -1, 0, 0, 0, 0));
    if (IS("fsconfig")) return SYS(SYS_fsconfig, A6(-1, -1, 0, 0, 0, 0));
    if (IS("fsmount")) return SYS(SYS_fsmount, A6(-1, -1, 0, 0, 0, 0));
    if (IS("fspick")) return SYS(SYS_fspick, A6(-1, BAD, -1, 0, 0, 0));
    if (IS("open_tree")) return SYS(SYS_open_tree, A6(-1, BAD, -1, 0, 0, 0));
    if (IS("move_mount")) return SYS(SYS_move_mount, A6(-1, BAD, -1, BAD, -1, 0));
    if (IS("mount_setattr")) return SYS(SYS_mount_setattr, A6(-1, BAD, -1, 0, 0, 0));
    if (IS("pivot_root")) return SYS(SYS_pivot_root, A6(BAD, BAD, 0, 0, 0, 0));
    if (IS("chroot")) return SYS(SYS_chroot, A6(BAD, 0, 0, 0, 0, 0));
    /* other processes */
    if (IS("ptrace")) return SYS(SYS_ptrace, A6(3 /* PEEKUSER */, 0, 0, 0, 0, 0));
    if (IS("process_vm_readv"))
        return SYS(SYS_process_vm_readv, A6(0, 0, 0, 0, 0, -1));
    if (IS("process_vm_writev"))
        return SYS(SYS_process_vm_writev, A6(0, 0, 0, 0, 0, -1));
    /* keys, bpf, perf, userfaultfd, io_uring */
    if (IS("keyctl")) return SYS(SYS_keyctl, A6(-1, 0, 0, 0, 0, 0));
    if (IS("add_key")) return SYS(SYS_add_key, A6(BAD, BAD, 0, 0, 0, 0));
    if (IS("request_key")) return SYS(SYS_request_key, A6(BAD, BAD, 0, 0, 0, 0));
    if (IS("bpf")) return SYS(SYS_bpf, A6(-1, 0, 0, 0, 0, 0));
    if (IS("perf_event_open"))
        return SYS(SYS_perf_event_open, A6(BAD, 0, -1, -1, -1, 0));
    if (IS("userfaultfd")) return SYS(SYS_userfaultfd, A6(-1, 0, 0, 0, 0, 0));
    if (IS("io_uring_setup")) return SYS(SYS_io_uring_setup, A6(0, BAD, 0, 0, 0, 0));
    if (IS("io_uring_enter")) return SYS(SYS_io_uring_enter, A6(-1, 0, 0, 0, 0, 0));
    if (IS("io_uring_register"))
        return SYS(SYS_io_uring_register, A6(-1, 0, 0, 0, 0, 0));
    /* file handles */
    if (IS("open_by_handle_at"))
        return SYS(SYS_open_by_handle_at, A6(-1, BAD, 0, 0, 0, 0));
    if (IS("name_to_handle_at"))
        return SYS(SYS_name_to_handle_at, A6(-1, BAD, BAD, BAD, -1, 0));
    /* modules, kexec, reboot, swap */
    if (IS("init_module")) return SYS(SYS_init_module, A6(BAD, 0, BAD, 0, 0, 0));
    if (IS("finit_module")) return SYS(SYS_finit_module, A6(-1, BAD, -1, 0, 0, 0));
    if (IS("delete_module")) return SYS(SYS_delete_module, A6(BAD, 0, 0, 0, 0, 0));
    if (IS("kexec_load")) return SYS(SYS_kexec_load, A6(0, 0, 0, -1, 0, 0));
    if (IS("kexec_file_load"))
        return SYS(SYS_kexec_file_load, A6(-1, -1, 0, BAD, -1, 0));
    if (IS("reboot")) return SYS(SYS_reboot, A6(0, 0, 0, 0, 0, 0)); /* bad magic */
    if (IS("swapon")) return SYS(SYS_swapon, A6(BAD, -1, 0, 0, 0, 0));
    if (IS("swapoff")) return SYS(SYS_swapoff, A6(BAD, 0, 0, 0, 0, 0));
    /* time, accounting, quotas */
    if (IS("settimeofday")) return SYS(SYS_settimeofday, A6(BAD, BAD, 0, 0, 0, 0));
    if (IS("clock_settime")) return SYS(SYS_clock_settime, A6(-1, BAD, 0, 0, 0, 0));
    if (IS("clock_adjtime")) return SYS(SYS_clock_adjtime, A6(-1, BAD, 0, 0, 0, 0));
    if (IS("adjtimex")) return SYS(SYS_adjtimex, A6(BAD, 0, 0, 0, 0, 0));
    if (IS("acct")) return SYS(SYS_acct, A6(BAD, 0, 0, 0, 0, 0));
    if (IS("quotactl")) return SYS(SYS_quotactl, A6(-1, BAD, 0, BAD, 0, 0));
    if (IS("quotactl_fd")) return SYS(SYS_quotactl_fd, A6(-1, -1, 0, BAD, 0, 0));
    /* terminal injection: the kernel reads the request as 32 bits */
    if (IS("ioctl:tiocsti")) return SYS(SYS_ioctl, A6(-1, TIOCSTI, BAD, 0, 0, 0));
    if (IS("ioctl:tiocsti_hi"))
        return SYS(SYS_ioctl, A6(-1, HI32 | TIOCSTI, BAD, 0, 0, 0));
    if (IS("ioctl:tioclinux")) return SYS(SYS_ioctl, A6(-1, TIOCLINUX, BAD, 0, 0, 0));
    if (IS("ioctl:tioclinux_hi"))
        return SYS(SYS_ioctl, A6(-1, HI32 | TIOCLINUX, BAD, 0, 0, 0));
    /* foreign ABIs */
    if (IS("int80_socket")) return probe_int80_socket();
    if (IS("x32_getpid")) return probe_x32_getpid();
#undef IS
    fprintf(stderr, "probe: unknown name %s\n", name);
    exit(255);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: probe NAME\n");
        return 255;
    }
    errno = 0;
    long ret = probe(argv[1]);
    int err = ret < 0 ? errno : 0;
    fprintf(stderr, "probe %s: %s (%d)\n", argv[1], err ? strerror(err) : "ok", err);
    return err;
}
