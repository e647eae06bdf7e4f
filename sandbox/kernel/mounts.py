"""Build the sandbox's root filesystem from the plan's mounts, then pivot into it.

Two steps, in two places:

1. `prepare_transfers` (stage 1, right after the mount namespace is made): a private
   tmpfs is mounted on /tmp of the new mount namespace (hiding the host's /tmp, for this
   namespace only) and every host directory the caller named (--dir, an image's layers)
   is bound under /tmp/xfer/N while this process can still reach it by name. A root
   caller does this before it drops to the sandbox's unprivileged host id (which could
   not traverse /root, say); bind mounts keep working after the drop.
2. `build_root` (stage 2, the sandbox's init): the new root is made at /tmp/root (a
   small tmpfs, or an overlay of an image) and every plan step applied under it; then
   `enter_root` pivots into it and detaches the old root.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .. import log as logs
from ..errors import SandboxError
from ..plan import Mount
from . import libc

log = logs.getLogger(__name__)

STAGING = "/tmp"
ROOT = STAGING + "/root"
OVERFLOW_ID = 65534  # /proc/sys/kernel/overflowuid: how an unmapped owner shows
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


def prepare_transfers(caller_paths: Sequence[str]) -> dict[str, str]:
    """Mount the staging tmpfs and bind each caller path into it; returns each
    path's place there. Needs CAP_SYS_ADMIN over the current mount namespace."""
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE, None)
    # Open the caller's paths before the staging tmpfs hides those under /tmp.
    fds = [os.open(path, os.O_PATH | os.O_DIRECTORY) for path in caller_paths]
    libc.mount("sbx-staging", STAGING, "tmpfs", _COMMON, "mode=0755,size=64k,nr_inodes=256")
    os.mkdir(ROOT, 0o755)
    places = {}
    for n, (path, fd) in enumerate(zip(caller_paths, fds)):
        place = f"{STAGING}/xfer{n}"
        os.mkdir(place, 0o755)
        libc.mount(f"/proc/self/fd/{fd}", place, None, libc.MS_BIND | libc.MS_REC, None)
        os.close(fd)
        places[path] = place
    return places


def build_root(mounts: Sequence[Mount], places: dict[str, str]) -> str:
    """Stage every mount under ROOT; the first one is the root itself. Returns how the
    root was made: "tmpfs", "overlay", or "readonly" (an image bound read-only where
    overlayfs cannot be mounted in a user namespace)."""
    root, rest = mounts[0], mounts[1:]
    mode = _mount_root(root, places)
    top = new_root(mode)
    apply_mounts(rest, top, places)
    # Read-only tmpfs mounts (/dev) are filled first, then frozen.
    for m in rest:
        if m.kind == "tmpfs" and m.readonly:
            _remount_readonly(top + m.target)
    if mode == "tmpfs":
        _remount_readonly(top)
    return mode


def apply_mounts(steps: Sequence[Mount], top: str, places: dict[str, str]) -> None:
    """Apply mount steps under top ("" for the current root)."""
    for m in steps:
        try:
            _apply(m, top + m.target, places)
        except OSError as e:
            raise SandboxError(f"cannot set up {m.target} ({m.kind}): {e}") from e


def _remount_readonly(path: str) -> None:
    libc.mount(None, path, None, libc.MS_REMOUNT | libc.MS_RDONLY | _COMMON, None)


def place_files(directory: str, files: Sequence[tuple[str, bytes]], owner: tuple) -> None:
    """Write the run's files under directory (its fresh /box), owned by the payload.
    Paths were checked to stay below it (plan.check_box_files); nothing there can be
    a symbolic link yet, as the payload has not run."""
    for name, data in files:
        path = f"{directory}/{name}"
        parent = os.path.dirname(path)
        if parent != directory and not os.path.isdir(parent):
            os.makedirs(parent, 0o755)
            for sub in _dirs_between(directory, parent):
                os.chown(sub, *owner)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchown(fd, *owner)
        finally:
            os.close(fd)


def _dirs_between(top: str, below: str) -> list[str]:
    parts = below[len(top) + 1 :].split("/")
    return [f"{top}/{'/'.join(parts[: n + 1])}" for n in range(len(parts))]


def new_root(mode: str) -> str:
    return ROOT if mode == "tmpfs" else ROOT + "/root"


def _mount_root(root: Mount, places: dict[str, str]) -> str:
    if root.kind == "root-tmpfs":
        libc.mount("sbx-root", ROOT, "tmpfs", _COMMON, tmpfs_options(root))
        return "tmpfs"
    if root.kind != "root-overlay":
        raise SandboxError(f"the first mount must make the root, not {root.kind!r}")
    # A size-limited tmpfs holds the overlay's upper and work directories: whatever
    # the run writes to its root lives there and dies with the run.
    libc.mount("sbx-upper", ROOT, "tmpfs", _COMMON, tmpfs_options(root))
    for name in ("upper", "work", "root"):
        os.mkdir(f"{ROOT}/{name}", 0o755)
    # Mount points made in the upper layer: the image's own directories may belong to
    # an id that is not mapped here, where mkdir through the overlay would fail.
    for point in ("proc", "dev", "tmp", "box"):
        os.mkdir(f"{ROOT}/upper/{point}", 0o755)
    lowers = [places.get(d, d) for d in root.source.split(":")]
    # overlayfs shows the upper layer's root directory as the merged root: give it the
    # image's own owner and mode, or / would belong to sbx instead of the image. (An
    # owner not mapped here, such as host root's for an image root imported, shows as
    # the overflow id and cannot be given: / then stays sbx's, which is writable.)
    top = os.stat(lowers[0])
    if top.st_uid != OVERFLOW_ID:
        os.chown(f"{ROOT}/upper", top.st_uid, top.st_gid)
    os.chmod(f"{ROOT}/upper", top.st_mode & 0o7777)
    options = f"lowerdir={':'.join(lowers)},upperdir={ROOT}/upper,workdir={ROOT}/work"
    try:
        libc.mount("sbx-overlay", f"{ROOT}/root", "overlay", libc.MS_NOSUID, options)
        return "overlay"
    except OSError as e:
        log.warning(
            "overlayfs cannot be mounted here (%s); the image's root is read-only "
            "for this run, with writable /tmp and /box",
            e.strerror,
        )
    libc.mount(lowers[0], f"{ROOT}/root", None, libc.MS_BIND | libc.MS_REC, None)
    flags = libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY | _COMMON
    libc.mount(None, f"{ROOT}/root", None, flags, None)
    return "readonly"


def _apply(m: Mount, path: str, places: dict[str, str]) -> None:
    log.debug("mount %s %s -> %s", m.kind, m.source, m.target)
    if m.kind == "dir":
        os.makedirs(path, m.mode, exist_ok=True)
    elif m.kind == "symlink":
        os.symlink(m.source, path)
    elif m.kind == "file":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, m.data.encode())
        os.close(fd)
    elif m.kind in ("tmpfs", "proc"):
        os.makedirs(path, exist_ok=True)
        source, fstype, flags, data = filesystem_mount(m)
        libc.mount(source, path, fstype, flags, data or None)
    elif m.kind == "bind":
        _bind(m, path, places)
    else:
        raise SandboxError(f"unknown mount kind {m.kind!r} for {m.target}")


def filesystem_mount(m: Mount) -> tuple[str, str, int, str]:
    """mount(2)'s source, type, flags and data for a "tmpfs" or "proc" step."""
    if m.kind == "proc":
        return "proc", "proc", _COMMON | libc.MS_NOEXEC, ""
    return "tmpfs", "tmpfs", _COMMON, tmpfs_options(m)


def tmpfs_options(m: Mount) -> str:
    options = [f"mode={m.mode:o}"]
    if m.size_bytes:
        options.append(f"size={m.size_bytes}")
    if m.inodes:
        options.append(f"nr_inodes={m.inodes}")
    if m.owner:
        options += [f"uid={m.owner[0]}", f"gid={m.owner[1]}"]
    return ",".join(options)


def _bind(m: Mount, path: str, places: dict[str, str]) -> None:
    source = places.get(m.source, m.source)
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


def enter_root(mode: str) -> None:
    """pivot_root into the staged root and detach the old one: pivot_root(".", ".")
    stacks the old root on top of the new one, and a lazy unmount of "." removes it."""
    os.chdir(new_root(mode))
    libc.pivot_root(".", ".")
    libc.umount2(".", libc.MNT_DETACH)
    os.chdir("/")
