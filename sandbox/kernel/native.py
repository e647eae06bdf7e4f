"""The C launcher of warm sandboxes (launcher.c), compiled on first use.

A warm run's per-run work is three forks, an unshare, four mounts and the payload's
hygiene: in Python each fork of an interpreter and each step after it costs more than
the kernel work itself. launcher.c does the same steps in the same order; everything
it applies is decided in Python (warm.py makes its spec).

The binary is built with the system's C compiler into the caller's cache directory
(~/.cache/sbx/launcher, mode 0700), named after a digest of the source, the machine
and the compiler, and replaced atomically: one build per user and version. Without a
compiler (or with SBX_PYTHON_LAUNCHER=1) warm sandboxes run their launches in Python,
with the same guarantees and more time per run.
"""

from __future__ import annotations

import os
import threading

from .. import log as logs

log = logs.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher.c")
_lock = threading.Lock()
_built: dict[str, int | None] = {}


def launcher_fd() -> int | None:
    """A descriptor of the compiled launcher, built now if needed, checked once and
    kept open for the life of this process (zygotes exec it by descriptor, so what
    was checked is what runs); None to use the Python launcher."""
    if os.environ.get("SBX_PYTHON_LAUNCHER"):
        return None
    with _lock:
        if SOURCE not in _built:
            _built[SOURCE] = _open_checked(_build())
        return _built[SOURCE]


def _open_checked(path: str | None) -> int | None:
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        log.warning("cannot open the C launcher %s (%s): launching runs in Python",
                    path, e.strerror)
        return None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        log.warning("%s is not the caller's own: launching runs in Python", path)
        return None
    return fd


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return os.path.join(base, "sbx", "launcher")


def _which(name: str) -> str | None:
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(directory or ".", name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def _build() -> str | None:
    compiler = _which("cc") or _which("gcc")
    if compiler is None:
        log.info("no C compiler: warm sandboxes launch runs in Python (slower)")
        return None
    try:
        with open(SOURCE, "rb") as f:
            source = f.read()
        # The compiler itself, by file identity: asking for its version would be a
        # process start on every start of sbx.
        binary = os.path.realpath(compiler)
        st = os.stat(binary)
    except OSError as e:
        log.info("cannot use the C launcher (%s): launching runs in Python", e)
        return None
    try:
        from _sha256 import sha256  # hashlib costs more to import than sbx's start
    except ImportError:
        from hashlib import sha256

    compiler_id = f"{binary} {st.st_size} {st.st_mtime_ns}".encode()
    facts = b"\0".join([source, os.uname().machine.encode(), compiler_id])
    directory = _cache_dir()
    path = os.path.join(directory, f"launcher-{sha256(facts).hexdigest()[:24]}")
    if os.path.isdir(directory) and not _private(directory):
        log.warning("%s is not private to this user (owner and mode 0700 expected): "
                    "warm sandboxes launch runs in Python", directory)
        return None
    if os.access(path, os.X_OK):
        if _private(path, 0o022):
            return path
        os.unlink(path)  # in our own private directory: rebuilt below
    import subprocess
    import tempfile

    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".build-")
        os.close(fd)
        done = subprocess.run(
            [compiler, "-O2", "-o", temporary, SOURCE], capture_output=True, text=True
        )
        if done.returncode != 0:
            os.unlink(temporary)
            log.warning("the C launcher did not build; launching runs in Python: %s",
                        done.stderr.strip()[-500:])
            return None
        os.chmod(temporary, 0o755)
        os.replace(temporary, path)
        _remove_other_builds(directory, os.path.basename(path))
    except OSError as e:
        log.info("cannot build the C launcher in %s (%s): launching runs in Python",
                 directory, e.strerror)
        return None
    return path


def _private(path: str, forbidden: int = 0o077) -> bool:
    """Owned by this user, no symbolic link, and none of the forbidden mode bits: a
    binary that sbx runs with the run's descriptors must be the caller's own."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    import stat

    return (
        st.st_uid == os.geteuid()
        and not stat.S_ISLNK(st.st_mode)
        and not st.st_mode & forbidden
    )


def _remove_other_builds(directory: str, keep: str) -> None:
    """Builds of other sbx versions or compilers; one still in use by a running
    zygote stays usable (it holds the file open), and the next build is this one."""
    for name in os.listdir(directory):
        if name.startswith("launcher-") and name != keep:
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass
