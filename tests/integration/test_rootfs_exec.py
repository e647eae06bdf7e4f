"""`sbx exec --rootfs NAME` on imported images, through the CLI, as root and as the
unprivileged user: the run sees the image, writes land in a throwaway layer, the
stored image never changes, and many runs leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture
def store(caller):
    """A private image store (XDG_DATA_HOME) for this test and caller, with the busybox
    recipe's image imported as `bb` through the CLI."""
    top = Path(tempfile.mkdtemp(prefix="sbx-rootfs-exec-"))
    top.chmod(0o755)
    data = top / "data"
    data.mkdir()
    os.chown(data, caller.uid, caller.gid)
    tarball = top / "bb.tar.gz"
    subprocess.run([str(REPO / "rootfs" / "busybox.sh"), str(tarball)], check=True,
                   capture_output=True)
    tarball.chmod(0o644)
    env = {"XDG_DATA_HOME": str(data)}
    done = caller.run(["rootfs", "import", str(tarball), "--name", "bb"], extra_env=env)
    assert done.returncode == 0, done.stderr
    yield env, data
    subprocess.run(["chmod", "-R", "u+rwx", str(top)], capture_output=True)
    shutil.rmtree(top, ignore_errors=True)


def _tree_digest(top: Path) -> list:
    """Every entry of the store with its mode, size and content, but the lock files a
    run takes on the layers it uses (empty, one per layer, kept)."""
    entries = []
    for path in sorted(top.rglob("*")):
        if "locks" in path.relative_to(top).parts:
            continue
        st = path.lstat()
        content = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        entries.append((str(path.relative_to(top)), st.st_mode, st.st_size, content))
    return entries


def _sbx_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if "sbx-" in line]


def test_a_run_sees_the_image_and_its_writes_vanish(caller, store):
    env, data = store
    before = _tree_digest(data)
    done = caller.run(
        ["exec", "--json", "--rootfs", "bb", "--", "/bin/sh", "-c",
         "cat /etc/issue; echo written > /etc/issue; echo new > /new; cat /etc/issue /new;"
         " ls /usr/bin/python3 2>&1; true"],
        extra_env=env,
    )
    res = json.loads(done.stdout)
    assert res["rootfs"] == {"name": "bb", "mode": "overlay"}
    lines = res["stdout"].splitlines()
    assert "No such file" in lines[-1]  # the host's /usr is not there: the image is
    if caller.uid == 0:
        # An image root imported belongs to host root, which is not mapped in a root
        # caller's sandbox: its files can be read, not changed (README, Limitations).
        assert "can't create /etc/issue: Permission denied" in res["stderr"]
        assert "new" in lines
    else:
        assert res["verdict"] == "OK", res
        assert lines[-3:-1] == ["written", "new"]
    assert _tree_digest(data) == before  # the store is byte for byte unchanged


def test_fifty_runs_leave_no_mounts_directories_or_layers(caller, store):
    env, data = store
    mounts_before = _sbx_mounts()
    tmp_before = set(os.listdir("/tmp"))
    store_before = _tree_digest(data)
    for n in range(50):
        done = caller.run(
            ["exec", "--rootfs", "bb", "--", "/bin/sh", "-c", f"echo {n} > /run-{n}"],
            extra_env=env,
        )
        assert done.returncode == 0, done.stderr
    assert _sbx_mounts() == mounts_before
    # sbx makes no temporary files on the host; what other tests (or another run of
    # the suite) make meanwhile is not this test's business.
    fixtures = ("sbx-rootfs-", "sbx-attack-", "sbx-out-", "sbx-idmap-", "tmp", "pytest")
    new = {n for n in set(os.listdir("/tmp")) - tmp_before if not n.startswith(fixtures)}
    assert new == set()
    assert _tree_digest(data) == store_before
    assert len(list(data.rglob("locks/*"))) <= 1  # one layer, one lock file


def test_an_unknown_image_is_a_usage_error(caller, store):
    env, _ = store
    done = caller.run(["exec", "--rootfs", "nope", "--", "true"], extra_env=env)
    assert done.returncode == 2
    assert "no image named 'nope'" in done.stderr
