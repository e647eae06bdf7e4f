"""ctypes bindings for the kernel calls Python 3.11's `os` module lacks.

The standard library is used wherever it has the call (fork, setsid, setresuid,
prctl-free rlimits via `resource`, sethostname via `socket`). unshare, setns, mount,
umount2, pivot_root, prctl and capset are in no Python's `os` module, or only from
3.12 on; binding them with ctypes keeps sbx free of a C compiler at install time.
Each wrapper raises OSError with the errno; callers turn it into a SandboxError that
names the call and says what to do.
"""

from __future__ import annotations

import ctypes
import errno
import os

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

_SYSCALLS = {
    "x86_64": {"pivot_root": 155, "capget": 125, "capset": 126, "setns": 308,
               "pidfd_open": 434, "keyctl": 250},
    "aarch64": {"pivot_root": 41, "capget": 90, "capset": 91, "setns": 268,
                "pidfd_open": 434, "keyctl": 219},
}[os.uname().machine]

_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
_libc.syscall.restype = ctypes.c_long


def _check(result: int, call: str, *args: object) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{call}({', '.join(map(repr, args))}): {os.strerror(err)}")
    return result


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare", hex(flags))


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.syscall(_SYSCALLS["setns"], fd, nstype), "setns", fd, hex(nstype))


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    result = _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data))
    _check(result, "mount", source, target, fstype, hex(flags), data)


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(_b(target), flags), "umount2", target, flags)


def pivot_root(new_root: str, put_old: str) -> None:
    result = _libc.syscall(_SYSCALLS["pivot_root"], _b(new_root), _b(put_old))
    _check(result, "pivot_root", new_root, put_old)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), "prctl", option, arg2)


def pidfd_open(pid: int) -> int:
    return _check(_libc.syscall(_SYSCALLS["pidfd_open"], pid, 0), "pidfd_open", pid)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def drop_all_capabilities() -> None:
    """Empty the bounding and ambient sets, then effective, permitted, inheritable."""
    drop_bounding_set()
    clear_capabilities()


def drop_bounding_set() -> None:
    """Empty the bounding and ambient sets (needs CAP_SETPCAP: do it before giving up
    root, which clears the effective set)."""
    for cap in range(last_cap() + 1):
        prctl(PR_CAPBSET_DROP, cap)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def clear_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets (always allowed)."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    result = _libc.syscall(_SYSCALLS["capset"], ctypes.byref(header), ctypes.byref(data))
    _check(result, "capset")


def keep_capabilities_across_exec() -> None:
    """Make every permitted capability inheritable and ambient, so that a program this
    process execs keeps them though its uid is not 0 (capabilities(7), "Transformation
    of capabilities during execve()"). Used only to exec sbx's own launcher."""
    header = _CapHeader(0x20080522, 0)
    data = (_CapData * 2)()
    _check(_libc.syscall(_SYSCALLS["capget"], ctypes.byref(header), ctypes.byref(data)),
           "capget")
    for half in data:
        half.inheritable = half.permitted
    _check(_libc.syscall(_SYSCALLS["capset"], ctypes.byref(header), ctypes.byref(data)),
           "capset")
    for cap in range(64):
        if data[cap // 32].permitted & (1 << cap % 32):
            prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)



KEYCTL_JOIN_SESSION_KEYRING = 1


def join_new_session_keyring() -> None:
    """A new anonymous session keyring for the calling process, instead of the one it
    inherited (the caller's). A kernel without keys has nothing to replace."""
    result = _libc.syscall(_SYSCALLS["keyctl"], KEYCTL_JOIN_SESSION_KEYRING, None)
    if result < 0 and ctypes.get_errno() != errno.ENOSYS:
        _check(result, "keyctl(KEYCTL_JOIN_SESSION_KEYRING)")
