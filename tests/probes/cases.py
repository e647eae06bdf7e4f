"""What each probe (see probe.c) must give under sbx's two shipped policies.

Each entry: probe name -> (syscall the supervisor must name under strict, the errno
the default policy returns). Under strict every one of these is a violation (verdict
SV naming the syscall) except the ENOSYS ones, which libc and libuv probe and fall
back from.
"""

from __future__ import annotations

import errno

EPERM = errno.EPERM
ENOSYS = errno.ENOSYS

BLOCKED: dict[str, tuple[str | None, int]] = {
    # namespace creation and entry
    "unshare": ("unshare", EPERM),
    "setns": ("setns", EPERM),
    "clone:newns": ("clone", EPERM),
    "clone:newcgroup": ("clone", EPERM),
    "clone:newuts": ("clone", EPERM),
    "clone:newipc": ("clone", EPERM),
    "clone:newuser": ("clone", EPERM),
    "clone:newpid": ("clone", EPERM),
    "clone:newnet": ("clone", EPERM),
    "clone3": (None, ENOSYS),
    # the mount family, pivot_root, chroot
    "mount": ("mount", EPERM),
    "umount2": ("umount2", EPERM),
    "fsopen": ("fsopen", EPERM),
    "fsconfig": ("fsconfig", EPERM),
    "fsmount": ("fsmount", EPERM),
    "fspick": ("fspick", EPERM),
    "open_tree": ("open_tree", EPERM),
    "move_mount": ("move_mount", EPERM),
    "mount_setattr": ("mount_setattr", EPERM),
    "pivot_root": ("pivot_root", EPERM),
    "chroot": ("chroot", EPERM),
    # other processes
    "ptrace": ("ptrace", EPERM),
    "process_vm_readv": ("process_vm_readv", EPERM),
    "process_vm_writev": ("process_vm_writev", EPERM),
    # keys, bpf, perf, userfaultfd, io_uring
    "keyctl": ("keyctl", EPERM),
    "add_key": ("add_key", EPERM),
    "request_key": ("request_key", EPERM),
    "bpf": ("bpf", EPERM),
    "perf_event_open": ("perf_event_open", EPERM),
    "userfaultfd": ("userfaultfd", EPERM),
    "io_uring_setup": (None, EPERM),  # ENOSYS under strict, see strict.json
    "io_uring_enter": ("io_uring_enter", EPERM),
    "io_uring_register": ("io_uring_register", EPERM),
    # file handles
    "open_by_handle_at": ("open_by_handle_at", EPERM),
    "name_to_handle_at": ("name_to_handle_at", EPERM),
    # modules, kexec, reboot, swap
    "init_module": ("init_module", EPERM),
    "finit_module": ("finit_module", EPERM),
    "delete_module": ("delete_module", EPERM),
    "kexec_load": ("kexec_load", EPERM),
    "kexec_file_load": ("kexec_file_load", EPERM),
    "reboot": ("reboot", EPERM),
    "swapon": ("swapon", EPERM),
    "swapoff": ("swapoff", EPERM),
    # clock and time setting, accounting, quotas
    "settimeofday": ("settimeofday", EPERM),
    "clock_settime": ("clock_settime", EPERM),
    "clock_adjtime": ("clock_adjtime", EPERM),
    "adjtimex": ("adjtimex", EPERM),
    "acct": ("acct", EPERM),
    "quotactl": ("quotactl", EPERM),
    "quotactl_fd": ("quotactl_fd", EPERM),
    # terminal injection, with and without bit 32 of the request set
    "ioctl:tiocsti": ("ioctl", EPERM),
    "ioctl:tiocsti_hi": ("ioctl", EPERM),
    "ioctl:tioclinux": ("ioctl", EPERM),
    "ioctl:tioclinux_hi": ("ioctl", EPERM),
}

# What strict returns instead of a violation.
STRICT_ERRNO = {"clone3": ENOSYS, "io_uring_setup": ENOSYS}

# Allowed under both policies: the result must equal the unfiltered one.
CONTROLS = ("getpid", "read", "ioctl:tcgets", "clone:plain")

FOREIGN_ABI = ("int80_socket", "x32_getpid")
