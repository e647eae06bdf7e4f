"""Build the sandbox's root filesystem from the plan's mounts, then pivot into it.

Runs in the sandbox's init, inside the new user, mount and pid namespaces. The new root
is a small tmpfs staged on /tmp of the private mount namespace (the host's /tmp is
hidden by it, for this namespace only); host paths that live under /tmp are reached
through file descriptors opened before, as /proc/self/fd/N.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from ..errors import SandboxError
from ..plan import Mount
from . import libc

log = logging.getLogger(__name__)

STAGING = "/tmp"
_COMMON = libc.MS_NOSUID | libc.MS_NODEV

# statvfs flag -> mount flag. A bind mount in a user namespace keeps the flags that
# were locked on its source (mount_namespaces(7), "restrictions on mount namespaces"):
# a remount that omits one of them fails with EPERM, so they are carried over.
_LOCKED_FLAGS = (
    (os.ST_RDONLY, libc.MS_RDONLY),
    (os.ST_NOSUID, libc.MS_NOSUID),
    (os.ST_NODEV, libc.MS_NODEV),
    (os.ST_NOEXEC, libc.MS_NOEXEC),
    (os.ST_NOATIME, libc.MS_NOATIME),
    (os.ST_RELATIME, libc.MS_RELATIME),
)


def build_root(mounts: Sequence[Mount], fd_sources: dict[str, int]) -> None:
    """Stage every mount under STAGING. fd_sources maps a bind source to an O_PATH
    descriptor opened by the supervisor (for --dir and other caller paths)."""
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE, None)
    libc.mount("sbx-root", STAGING, "tmpfs", _COMMON, "mode=0755,size=1m,nr_inodes=4096")
    for m in mounts:
        try:
            _apply(m, STAGING + m.target, fd_sources)
        except OSError as e:
            raise SandboxError(f"cannot set up {m.target} ({m.kind}): {e}") from e
    libc.mount(None, STAGING, None, libc.MS_REMOUNT | libc.MS_RDONLY | _COMMON, None)


def _apply(m: Mount, path: str, fd_sources: dict[str, int]) -> None:
    log.debug("mount %s %s -> %s", m.kind, m.source, m.target)
    if m.kind == "dir":
        os.makedirs(path, m.mode, exist_ok=True)
    elif m.kind == "symlink":
        os.symlink(m.source, path)
    elif m.kind == "file":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, m.data.encode())
        os.close(fd)
    elif m.kind == "tmpfs":
        os.makedirs(path, exist_ok=True)
        libc.mount("tmpfs", path, "tmpfs", _COMMON, tmpfs_options(m))
    elif m.kind == "proc":
        os.makedirs(path, exist_ok=True)
        libc.mount("proc", path, "proc", _COMMON | libc.MS_NOEXEC, None)
    elif m.kind == "bind":
        _bind(m, path, fd_sources)
    else:
        raise SandboxError(f"unknown mount kind {m.kind!r} for {m.target}")


def tmpfs_options(m: Mount) -> str:
    options = [f"mode={m.mode:o}"]
    if m.size_bytes:
        options.append(f"size={m.size_bytes}")
    if m.inodes:
        options.append(f"nr_inodes={m.inodes}")
    if m.owner:
        options += [f"uid={m.owner[0]}", f"gid={m.owner[1]}"]
    return ",".join(options)


def _bind(m: Mount, path: str, fd_sources: dict[str, int]) -> None:
    source = m.source
    if source in fd_sources:
        source = f"/proc/self/fd/{fd_sources[source]}"
    if os.path.isdir(source):
        os.makedirs(path, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
    libc.mount(source, path, None, libc.MS_BIND, None)
    flags = libc.MS_BIND | libc.MS_REMOUNT | libc.MS_NOSUID
    flags |= 0 if m.devices else libc.MS_NODEV
    flags |= libc.MS_RDONLY if m.readonly else 0
    locked = os.statvfs(path).f_flag
    for st_flag, ms_flag in _LOCKED_FLAGS:
        if locked & st_flag and not (ms_flag == libc.MS_RDONLY and not m.readonly):
            flags |= ms_flag
    libc.mount(None, path, None, flags, None)


def enter_root() -> None:
    """pivot_root into the staged root and detach the old one: pivot_root(".", ".")
    stacks the old root on top of the new one, and a lazy unmount of "." removes it."""
    os.chdir(STAGING)
    libc.pivot_root(".", ".")
    libc.umount2(".", libc.MNT_DETACH)
    os.chdir("/")
