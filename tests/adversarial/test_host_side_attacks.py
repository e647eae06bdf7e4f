"""Attacks on what sbx does on the host side of a run, found by attacking it: files sbx
writes for the caller, what the payload leaves in --dir, who owns a root caller's
sandbox, descriptors handed in, and verdicts that must not read as success."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


@pytest.fixture
def box(caller):
    """A --dir both the caller and a root caller's payload can write."""
    top = Path(tempfile.mkdtemp(prefix="sbx-attack-"))
    top.chmod(0o777)
    os.chown(top, caller.uid, caller.gid)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def test_result_file_is_never_written_through_a_planted_link(caller, box, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.chown(tmp_path, caller.uid, caller.gid)
    os.chown(victim, caller.uid, caller.gid)
    # The payload plants a link where a later run's result will go.
    plant = caller.run(["exec", "--dir", str(box), "--", "ln", "-s", str(victim),
                        "/box/result.json"])
    assert plant.returncode == 0, plant.stderr
    # Inside --dir, the result path is refused outright...
    refused = caller.run(["exec", "--dir", str(box), "--result", str(box / "result.json"),
                          "--", "true"])
    assert refused.returncode == 2 and "inside --dir" in refused.stderr
    # ...and outside it, the link is replaced, not followed.
    done = caller.run(["exec", "--result", str(box / "result.json"), "--", "true"])
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "precious"
    assert not (box / "result.json").is_symlink()
    # --stdout never opens through a link either.
    (box / "out").symlink_to(victim)
    done = caller.run(["exec", "--stdout", str(box / "out"), "--", "echo", "x"])
    assert done.returncode == 2 and "symbolic link" in done.stderr
    assert victim.read_text() == "precious"


def test_setuid_files_left_in_dir_are_defused(caller, box):
    done = caller.run(["exec", "--dir", str(box), "--", "sh", "-c",
                       "cp /usr/bin/id /box/x && chmod 6755 /box/x && mkdir /box/d "
                       "&& chmod 2777 /box/d"])
    assert done.returncode == 0, done.stderr
    for path in (box / "x", box / "d"):
        assert not path.lstat().st_mode & (stat.S_ISUID | stat.S_ISGID), path
    assert "cleared the setuid/setgid bits" in done.stderr


def test_a_root_callers_runs_each_get_their_own_unused_host_id(root_caller):
    ids = set()
    for _ in range(3):
        done = root_caller.run(["exec", "--", "cat", "/proc/self/uid_map"])
        inside, outside, count = done.stdout.split()
        ids.add(int(outside))
    assert len(ids) == 3
    assert all(i >= 1_000_000_000 for i in ids)  # nobody's and users' ids are lower


def test_stdin_that_is_a_directory_is_refused(caller):
    done = caller.run(["exec", "--stdin", "/", "--", "ls", "/proc/self/fd/0"])
    assert done.returncode == 2 and "is a directory" in done.stderr
    # Inherited: Python itself refuses to start on a directory as stdin; sbx checks
    # fds 0-2 too, for callers that start it otherwise. Either way nothing runs.
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        done = caller.run(["exec", "--", "ls", "/proc/self/fd/0/"], stdin=fd)
    finally:
        os.close(fd)
    assert done.returncode != 0 and "is a directory" in done.stderr
    assert "usr" not in done.stdout.split()


def test_vsock_is_refused_under_default(caller):
    done = caller.run(["exec", "--", "python3", "-c",
                       "import socket\ntry:\n socket.socket(40, socket.SOCK_STREAM)\n"
                       " print('open')\nexcept OSError as e:\n print(e.errno)"])
    assert done.stdout.strip() == "97"  # EAFNOSUPPORT from the filter


def test_a_limit_verdict_never_exits_zero(caller):
    done = caller.run(["exec", "--json", "--output-limit", "100", "--", "sh", "-c",
                       "head -c 1000 /dev/zero; exit 0"])
    res = json.loads(done.stdout)
    assert res["verdict"] == "OLE" and done.returncode != 0


def test_output_limit_applies_to_stdout_files(caller, box):
    out = Path(tempfile.mkdtemp(prefix="sbx-out-"))
    os.chown(out, caller.uid, caller.gid)
    try:
        done = caller.run(["exec", "--json", "--output-limit", "1K", "--stdout",
                           str(out / "o"), "--", "head", "-c", "10000000", "/dev/zero"])
        res = json.loads(done.stdout)
        assert res["verdict"] == "OLE"
        assert (out / "o").stat().st_size <= 1024
    finally:
        shutil.rmtree(out)


def test_capture_without_a_limit_is_bounded(caller):
    started = time.monotonic()
    done = caller.run(["exec", "--json", "--wall", "2", "--", "yes"], timeout=120)
    res = json.loads(done.stdout)
    assert res["verdict"] == "TLE"
    assert len(res["stdout"]) <= 64 << 20
    assert time.monotonic() - started < 60


def test_a_slow_reader_does_not_suspend_the_wall_clock(caller):
    command = caller.command(["exec", "--output-limit", "10M", "--wall", "2", "--",
                              "sh", "-c", "head -c 300000 /dev/zero; while :; do :; done"])
    started = time.monotonic()
    sbx = subprocess.Popen(command, env=caller.env(), cwd="/", stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    time.sleep(5)  # read nothing meanwhile
    out, err = sbx.communicate(timeout=60)
    assert sbx.returncode == 124
    # The payload was stopped at its limit; only the delivery of its output waited.
    assert b"TLE (wall) after 2." in err, err


def test_binary_output_is_exact_in_json(caller):
    done = caller.run(["exec", "--json", "--", "sh", "-c", r"printf 'A\377B'"])
    res = json.loads(done.stdout)
    assert res["stdout"] is None
    import base64

    assert base64.b64decode(res["stdout_base64"]) == b"A\xffB"
