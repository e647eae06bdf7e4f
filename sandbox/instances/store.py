"""Where instances live on disk, the lock around each state change, and liveness.

Layout, under `$XDG_STATE_HOME/sbx/instances` (default ~/.local/state), mode 0700:

    NAME.lock         flock(2)ed around every state change of NAME
    NAME/state.json   the instance (see `new_state`), replaced atomically
    NAME/box/         bound read-write at /box: what is written there persists
    NAME/stdout.log   the payload's output (and .1, the previous part: a size cap)
    NAME/stderr.log
    NAME/supervisor.log   the instance supervisor's own messages

The lock file sits beside the directory, not in it, so `rm` can remove the
directory while holding the lock. `rm` also unlinks the lock file while holding it;
a waiter that then gets the lock on the unlinked file notices (its inode is no longer
the one at the path) and tries again.

An instance recorded as running is shown running only while its supervisor lives:
the state holds the supervisor's pid, its start time (field 22 of /proc/PID/stat,
in clock ticks since boot) and the boot id, so a dead supervisor, a reused pid or a
reboot all read as exited.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import time

from ..errors import SbxError, UsageError
from ..kernel import procstat

log = logging.getLogger(__name__)

STATE_VERSION = 1
LOCK_TIMEOUT_S = 30.0
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


class InstanceError(SbxError):
    """An instance is not in the state the command needs (unknown, running,
    stopped, already exists). Exit status 1, as docker and podman use."""

    exit_code = 1


# --- paths -------------------------------------------------------------------------


def state_root() -> str:
    """$XDG_STATE_HOME/sbx/instances; XDG says a relative value is to be ignored."""
    base = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "sbx", "instances")


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise UsageError(
            f"bad instance name {name!r}: use 1 to 63 letters, digits, '_', '.' or "
            "'-', starting with a letter or digit"
        )
    return name


def instance_dir(name: str) -> str:
    return os.path.join(state_root(), check_name(name))


def path_of(name: str, leaf: str) -> str:
    """A file of the instance: 'state.json', 'box', 'stdout.log', ..."""
    return os.path.join(instance_dir(name), leaf)


def _lock_path(name: str) -> str:
    return os.path.join(state_root(), check_name(name) + ".lock")


def ensure_root() -> str:
    root = state_root()
    os.makedirs(root, mode=0o700, exist_ok=True)
    return root


def list_names() -> list[str]:
    try:
        entries = os.listdir(state_root())
    except FileNotFoundError:
        return []
    names = []
    for entry in entries:
        if NAME_RE.fullmatch(entry) and os.path.isfile(path_of(entry, "state.json")):
            names.append(entry)
    return sorted(names)


# --- the lock ----------------------------------------------------------------------


@contextlib.contextmanager
def locked(name: str, must_exist: bool = True):
    """Hold NAME's lock. With must_exist, an unknown name is an InstanceError (and
    leaves no lock file behind)."""
    ensure_root()
    path = _lock_path(name)
    fd = _acquire(path, name)
    try:
        if must_exist and not os.path.isfile(path_of(name, "state.json")):
            _unlink_quietly(path)
            raise InstanceError(
                f"no instance named {name!r} (see `sbx ps -a`; state is in "
                f"{state_root()})"
            )
        yield
    finally:
        os.close(fd)


def _acquire(path: str, name: str) -> int:
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not _flock_until(fd, deadline):
            os.close(fd)
            raise InstanceError(
                f"instance {name!r} is locked by another sbx command for more than "
                f"{LOCK_TIMEOUT_S:.0f} s ({path}); try again when it has finished"
            )
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # removed (by `rm`) while we waited: lock the new file


def _flock_until(fd: int, deadline: float) -> bool:
    delay_s = 0.005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.1)


def remove_lock(name: str) -> None:
    """Unlink NAME's lock file; call it holding the lock, as the last step of rm."""
    _unlink_quietly(_lock_path(name))


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# --- state.json --------------------------------------------------------------------


def new_state(name: str, command: list[str], options: dict, summary: dict) -> dict:
    """The state of a created instance. `options` are the `sbx exec` options it
    runs with (parsed, paths absolute), enough for `start` to rebuild its plan."""
    return {
        "version": STATE_VERSION,
        "name": name,
        "state": "created",
        "command": list(command),
        "options": options,
        "created_at": time.time(),
        "rootfs": summary["rootfs"],
        "profile": summary["profile"],
        "limits": summary["limits"],
        "box_dir": summary["box_dir"],
        "own_box": summary["own_box"],
        "run": None,
        "exit": None,
    }


def load(name: str) -> dict:
    path = path_of(name, "state.json")
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise InstanceError(f"no instance named {name!r} (see `sbx ps -a`)") from None
    except (OSError, ValueError) as e:
        raise InstanceError(
            f"the state of instance {name!r} cannot be read ({path}: {e}); remove it "
            f"with `sbx rm -f {name}`"
        ) from e
    if state.get("version") != STATE_VERSION:
        raise InstanceError(
            f"instance {name!r} was made by another version of sbx (state version "
            f"{state.get('version')}, this sbx reads {STATE_VERSION})"
        )
    return state


def save(name: str, state: dict) -> None:
    """Replace state.json atomically: a reader sees the old or the new one, whole."""
    path = path_of(name, "state.json")
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    log.debug("saved %s: %s", path, state["state"])


# --- liveness ----------------------------------------------------------------------


def boot_id() -> str:
    with open(BOOT_ID_PATH) as f:
        return f.read().strip()


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks after boot), or None
    when the process is gone or a zombie."""
    fields = procstat.stat_fields(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])  # fields[0] is field 3 of proc(5)


def parent_of(pid: int) -> int | None:
    fields = procstat.stat_fields(pid)
    return None if fields is None else int(fields[1])


def identity(pid: int) -> dict:
    """What names one process across time: pid, start time and boot."""
    return {"pid": pid, "start_ticks": process_start_ticks(pid), "boot_id": boot_id()}


def is_alive(ident: dict | None) -> bool:
    if not ident or ident.get("boot_id") != boot_id():
        return False
    ticks = process_start_ticks(ident["pid"])
    return ticks is not None and ticks == ident.get("start_ticks")


def observe(state: dict) -> dict:
    """The state as it really is: 'running' only while the supervisor lives. A run
    whose supervisor vanished without a word reads as exited, with the reason."""
    if state["state"] != "running":
        return state
    run = state["run"] or {}
    if is_alive(run.get("supervisor")):
        return state
    view = dict(state)
    view["state"] = "exited"
    rebooted = (run.get("supervisor") or {}).get("boot_id") != boot_id()
    view["exit"] = {
        "finished_at": None,
        "verdict": "IE",
        "reason": "reboot" if rebooted else "supervisor-died",
        "exit_code": None,
        "signal": None,
        "why": (
            "the host rebooted while it ran"
            if rebooted
            else "its supervisor died (killed); the instance's processes died with it"
        ),
    }
    return view


# --- removal -----------------------------------------------------------------------


def remove_tree(path: str) -> None:
    """rm -r, first making writable any directory the payload made read-only."""
    if not os.path.lexists(path):
        return
    for dirpath, dirnames, _ in os.walk(path):
        for entry in dirnames:
            child = os.path.join(dirpath, entry)
            if not os.path.islink(child):
                with contextlib.suppress(OSError):
                    os.chmod(child, stat.S_IRWXU)
    shutil.rmtree(path)
