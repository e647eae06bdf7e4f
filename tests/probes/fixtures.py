"""Fixtures and helpers shared by the seccomp tests (import them into a test module).

The harness runs as the caller (root, or the unprivileged test user through
setpriv), so the filter is installed and the probe executed with that caller's
credentials, on the real kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .build import build_probe

SIGSYS = 31
MARK_BASE = 200  # see harness.mark_errnos


@pytest.fixture(scope="session")
def probe_bin() -> Path:
    """probe.c built for this session, in a directory the test user can read
    (pytest's own temporary directories are private to root)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (setup.sh installs it)")
    dest = Path(tempfile.mkdtemp(prefix="sbx-probe-"))
    yield build_probe(dest)
    shutil.rmtree(dest, ignore_errors=True)


def policy_path(caller, name: str) -> str:
    """A policy shipped in profiles/seccomp, as the caller can read it."""
    return str(caller.tree / "profiles" / "seccomp" / f"{name}.json")


def harness_command(caller, args: list[str]) -> list[str]:
    base = [sys.executable, "-m", "tests.probes.harness", *args]
    if caller.uid == os.geteuid():
        return base
    drop = ["setpriv", f"--reuid={caller.uid}", f"--regid={caller.gid}",
            "--init-groups"]
    return [*drop, "env", f"HOME={caller.home}", *base]


def run_filtered(caller, policy: str, commands: list[list[str]], mark=False,
                 timeout_s: float = 300) -> list[dict]:
    """Run each command under ``policy`` ("none" for no filter) as ``caller``."""
    args = [policy, *(["--mark"] if mark else []), "--"]
    for i, cmd in enumerate(commands):
        args += (["---"] if i else []) + cmd
    proc = subprocess.run(
        harness_command(caller, args), env=caller.env(), cwd="/", timeout=timeout_s,
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()
               if line.startswith("{")]
    assert len(results) == len(commands), proc.stdout + proc.stderr
    return results


def outcome(result: dict) -> str:
    """A short, comparable form: "exit 1", "signal 31", "violation ptrace"."""
    for key in ("violation", "signal", "exit", "timeout"):
        if key in result:
            return f"{key} {result[key]}"
    raise AssertionError(result)
