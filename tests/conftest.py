"""Shared fixtures. Every sandbox test runs twice when the suite runs as root: once as
root and once as the unprivileged account `sbxtest` (through setpriv), because rootless
is the point of sbx. Run as an ordinary user, the root half is skipped with a reason."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_USER = "sbxtest"


def host_pids_with(mark: str, argv0: str | None = None, anywhere: bool = False) -> list[int]:
    """Host pids whose command line carries mark as one argument (or, with anywhere,
    anywhere in it); argv0 keeps only those whose command starts with it. Run as root,
    the suite sees every process; sbx's own carry the payload's argv too."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            continue  # gone meanwhile
        argv = raw.split(b"\0")
        if not (mark.encode() in raw if anywhere else mark.encode() in argv):
            continue
        if argv0 is None or argv[0] == argv0.encode():
            found.append(int(name))
    return found


@contextlib.contextmanager
def shared_tmpdir(prefix: str, mode: int = 0o755):
    """A temporary directory other callers can reach (pytest's own are private to
    root): 0755 to read, 0777 for a root caller's payload to write. Removed after."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, mode)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def compile_c(directory: Path, name: str, source: str, *flags: str) -> Path:
    """Build source with the host's gcc into directory/name, runnable by every caller;
    skips the test on a host without gcc."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("the host has no gcc")
    (directory / f"{name}.c").write_text(source)
    binary = directory / name
    subprocess.run([gcc, "-O0", *flags, "-o", str(binary), str(binary) + ".c"], check=True)
    os.chmod(binary, 0o755)
    return binary


def _user_can_read(user: str, path: Path) -> bool:
    probe = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
    probe += [sys.executable, "-c", f"import os; open({str(path)!r}).read()"]
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def sbx_tree(tmp_path_factory) -> Path:
    """A copy of the package every caller can read: the checkout itself when the test
    user can read it, else a world-readable copy (CI may clone under /root)."""
    if os.geteuid() != 0 or _user_can_read(TEST_USER, REPO / "sandbox" / "__init__.py"):
        yield REPO
        return
    tree = Path(tempfile.mkdtemp(prefix="sbx-tree-"))
    for name in ("sandbox", "profiles", "tests"):
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    os.chmod(tree, 0o755)
    subprocess.run(["chmod", "-R", "a+rX", str(tree)], check=True)
    yield tree
    shutil.rmtree(tree, ignore_errors=True)


@dataclass
class Caller:
    """Someone who runs `sbx`: root, or the unprivileged test user."""

    name: str
    uid: int
    gid: int
    home: Path
    tree: Path

    def command(self, args: list[str]) -> list[str]:
        base = [sys.executable, "-m", "sandbox", *args]
        if self.uid == os.geteuid():
            return base
        drop = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups"]
        return [*drop, "env", f"HOME={self.home}", f"USER={self.name}", *base]

    def env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.tree)
        env["SBX_PROFILES_DIR"] = str(self.tree / "profiles")
        env.pop("XDG_CACHE_HOME", None)
        env.pop("XDG_STATE_HOME", None)
        env.pop("XDG_DATA_HOME", None)
        return env

    def run(
        self, args: list[str], timeout: float = 60, extra_env: dict | None = None, **kw
    ) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        env = self.env() | (extra_env or {})
        return subprocess.run(self.command(args), env=env, timeout=timeout, cwd="/", **kw)

    def popen(self, args: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(args), env=self.env(), cwd="/", **kw)


def _test_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", TEST_USER], check=True)
        return pwd.getpwnam(TEST_USER)


def _unprivileged(tree: Path) -> Caller:
    """The suite's own user when it runs unprivileged, else the test account."""
    me = os.geteuid()
    if me != 0:
        entry = pwd.getpwuid(me)
        return Caller(entry.pw_name, me, os.getegid(), Path(entry.pw_dir), tree)
    entry = _test_user()
    return Caller(TEST_USER, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir), tree)


@pytest.fixture(params=["root", "user"])
def caller(request, sbx_tree) -> Caller:
    """Each test using this runs as root and as an unprivileged user."""
    if request.param == "root":
        if os.geteuid() != 0:
            pytest.skip("the root half needs the suite to run as root")
        return Caller("root", 0, 0, Path("/root"), sbx_tree)
    return _unprivileged(sbx_tree)


@pytest.fixture
def user_caller(sbx_tree) -> Caller:
    """Only the unprivileged caller (for checks that are about rootless runs)."""
    return _unprivileged(sbx_tree)


@pytest.fixture
def root_caller(sbx_tree) -> Caller:
    if os.geteuid() != 0:
        pytest.skip("needs the suite to run as root")
    return Caller("root", 0, 0, Path("/root"), sbx_tree)
