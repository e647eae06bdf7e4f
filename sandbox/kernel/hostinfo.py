"""Facts about the host that the pure plan layer needs, gathered with a few lstat()s."""

from __future__ import annotations

import os
import pwd
from functools import lru_cache

from ..plan import ETC_BINDS, USR_FAMILY, HostLayout


@lru_cache(maxsize=1)
def host_layout() -> HostLayout:
    symlinks, dirs = {}, set()
    for name in USR_FAMILY:
        path = f"/{name}"
        if os.path.islink(path):
            symlinks[name] = os.readlink(path)
        elif os.path.isdir(path):
            dirs.add(name)
    etc = frozenset(name for name in ETC_BINDS if os.path.exists(f"/etc/{name}"))
    return HostLayout(symlinks=symlinks, dirs=frozenset(dirs), etc=etc)


def _range_for(path: str, names: set[str]) -> tuple[int, int] | None:
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] in names and int(parts[2]) > 0:
                    return int(parts[1]), int(parts[2])
    except (OSError, ValueError):
        pass
    return None


def _on_path(tool: str) -> bool:
    for directory in os.environ.get("PATH", "/usr/bin:/bin").split(":"):
        if os.access(os.path.join(directory or ".", tool), os.X_OK):
            return True
    return False


def subordinate_ids(uid: int, gid: int) -> tuple | None:
    """((subuid start, count), (subgid start, count)) for the caller when it has
    ranges in /etc/subuid and /etc/subgid and the setuid helpers that apply them
    (root needs no helper). None means single-id maps."""
    if uid != 0 and not all(_on_path(tool) for tool in ("newuidmap", "newgidmap")):
        return None
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    subuid = _range_for("/etc/subuid", {name, str(uid)})
    subgid = _range_for("/etc/subgid", {name, str(uid)})
    return (subuid, subgid) if subuid and subgid else None
