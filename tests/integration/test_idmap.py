"""Both ways sbx maps ids for an unprivileged caller, on the real kernel: its own id
only (`--idmap self`), and with a subordinate range through newuidmap (`subids`),
where sbx's own processes are root inside (an id of the range on the host) and the
payload is still the caller."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest

SCRIPT = (
    "import os; "
    "maps = open('/proc/self/uid_map').read().split(); "
    "init_uid = [l.split()[1] for l in open('/proc/1/status') if l.startswith('Uid:')][0]; "
    "caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0]; "
    "open('/box/made', 'w').write('x'); "
    "print(os.getuid(), os.getgid(), init_uid, caps, ' '.join(maps))"
)


def _has_range(name: str) -> bool:
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            with open(path) as f:
                if not any(line.split(":")[0] == name for line in f):
                    return False
        except OSError:
            return False
    return True


def _run(caller, idmap: str) -> tuple[dict, str]:
    box = tempfile.mkdtemp(prefix="sbx-idmap-")
    os.chown(box, caller.uid, caller.gid)
    try:
        done = caller.run(["exec", "--json", "--idmap", idmap, "--dir", box, "--",
                           "python3", "-c", SCRIPT])
        assert done.returncode == 0, done.stderr
        owner = os.stat(os.path.join(box, "made")).st_uid
        return json.loads(done.stdout), owner
    finally:
        shutil.rmtree(box)


def test_self_maps_only_the_callers_own_id(user_caller):
    result, owner = _run(user_caller, "self")
    uid, gid, init_uid, caps, maps = result["stdout"].split(maxsplit=4)
    assert (uid, gid, init_uid, caps) == ("1000", "1000", "1000", "0000000000000000")
    assert maps.split() == ["1000", str(user_caller.uid), "1"]
    assert owner == user_caller.uid


def test_subids_runs_sbx_as_a_subordinate_root_and_the_payload_as_the_caller(user_caller):
    if not (shutil.which("newuidmap") and _has_range(user_caller.name)):
        pytest.skip(f"needs newuidmap (package uidmap) and a range for {user_caller.name}")
    result, owner = _run(user_caller, "subids")
    uid, gid, init_uid, caps, maps = result["stdout"].split(maxsplit=4)
    assert (uid, gid, init_uid, caps) == ("1000", "1000", "0", "0000000000000000")
    fields = maps.split()
    assert fields[0:3] != ["0", str(user_caller.uid), "1"]  # inside root is not the caller
    assert fields[3:6] == ["1000", str(user_caller.uid), "1"]
    assert owner == user_caller.uid  # what the payload writes to --dir is the caller's


def test_subids_without_a_range_is_a_usage_error(root_caller):
    # Root maps its payload itself and has no range on a fresh host: asking for
    # subordinate ids must say why not, not silently fall back.
    if _has_range("root"):
        pytest.skip("root has a subordinate range here")
    done = root_caller.run(["exec", "--idmap", "subids", "--", "true"])
    assert done.returncode == 2
    assert "subordinate id range" in done.stderr
