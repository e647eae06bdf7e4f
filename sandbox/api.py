"""The Python API: run a command in a sandbox and get a Result.

    from sandbox.api import run
    result = run(["python3", "-c", "print(1)"], profile="strict", wall=5, capture=True)
    result.verdict, result.exit_code, result.stdout

Keyword options are those of `sbx exec` (see `sbx exec --help`), with Python values:
wall=2.5, memory="256M" or 268435456, env=[("KEY", "value")], dir="/path", plus
stdin_data=b"..." to feed stdin and capture=True to get stdout and stderr as bytes.
"""

from __future__ import annotations

import os

from . import execopts, profiles
from .errors import UsageError
from .kernel import hostinfo
from .plan import Plan, make_plan
from .result import Result

_PARSED_KEYS = {o.key: o for o in execopts.OPTIONS}


def plan_for(argv: list[str], profile: str | None = None, **options) -> Plan:
    """The plan `run` would execute: profile resolved, options checked."""
    if not argv:
        raise UsageError("no command given")
    parsed = {}
    for key, value in options.items():
        parsed[key] = _check_option(key, value)
    execopts.check_paths(parsed)
    resolved = profiles.resolve(profile or "default")
    caller = (os.getuid(), os.getgid())
    subids = _subids(caller, parsed.get("idmap") or "auto")
    if caller[0] == 0 and subids is None and parsed.get("host_id") is None:
        parsed["host_id"] = fresh_root_host_id()
    lowerdirs = None
    rootfs = parsed.get("rootfs") or resolved.get("rootfs", "host")
    if rootfs != "host":
        from . import rootfs as images

        lowerdirs = images.image_lowerdirs(rootfs)
    layout = hostinfo.host_layout()
    return make_plan(resolved, parsed, argv, caller, layout, subids, lowerdirs)


# Options of the API that `sbx exec` has no flag for.
_API_ONLY = ("stdin_data", "capture", "host_id", "files")


def _check_option(key: str, value):
    """Parse and check one keyword option as `sbx exec` would its flag. A misspelled
    option is an error, never a limit silently not set."""
    opt = _PARSED_KEYS.get(key)
    if opt is None and key not in _API_ONLY:
        from difflib import get_close_matches

        known = [*_PARSED_KEYS, *_API_ONLY]
        guess = get_close_matches(key, known, n=1)
        hint = f"did you mean {guess[0]!r}? " if guess else ""
        raise UsageError(f"unknown option {key!r}; {hint}known: {', '.join(known)}")
    if opt is None or value is None or opt.parse is None:
        return value
    flag = f"--{key.replace('_', '-')}"
    if opt.repeat:
        if key == "env" and isinstance(value, dict):
            value = list(value.items())
        return [opt.parse(f"{k}={v}", flag) for k, v in value]
    if isinstance(value, bool):
        raise UsageError(f"{flag}: expected a value, not {value!r}")
    return opt.parse(value if isinstance(value, str) else str(value), flag)


# Host ids for root callers' payloads when root has no subordinate range: one fresh
# id per run, from a block no distribution gives to users or to subordinate ranges
# (those stop at 600100000 by default), so no other process on the host owns the run's
# user namespace. A shared id such as nobody would give every process running as
# nobody full control of every such sandbox.
ROOT_HOST_ID_BASE = 1_000_000_000
ROOT_HOST_ID_SPAN = 1 << 24


def fresh_root_host_id() -> int:
    return ROOT_HOST_ID_BASE + int.from_bytes(os.urandom(3), "little") % ROOT_HOST_ID_SPAN


def _subids(caller: tuple[int, int], idmap: str) -> tuple | None:
    if idmap not in ("auto", "self", "subids"):
        raise UsageError(f"bad --idmap {idmap!r}: use auto, self or subids")
    if idmap == "self":
        return None
    subids = hostinfo.subordinate_ids(*caller)
    if subids is None and idmap == "subids":
        raise UsageError(
            "--idmap subids: you have no subordinate id range in /etc/subuid and "
            "/etc/subgid, or newuidmap/newgidmap are not installed (package uidmap)"
        )
    return subids


def run(argv: list[str], profile: str | None = None, **options) -> Result:
    """Run argv in a fresh sandbox. A verdict is a Result; bad options raise
    UsageError and a host that cannot run the sandbox raises SandboxError."""
    from . import supervisor

    plan = plan_for(argv, profile, **options)
    if plan.rootfs == "host":
        return supervisor.run(plan)
    from . import rootfs as images

    # Hold the image's layers for the run: `sbx rootfs rm` meanwhile removes the
    # image from the list but keeps its files until the run is over.
    with images.image_in_use(plan.rootfs):
        return supervisor.run(plan)
