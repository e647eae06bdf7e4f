"""The Python API: run a command in a sandbox and get a Result.

    from sandbox.api import run
    result = run(["python3", "-c", "print(1)"], profile="strict", wall=5, capture=True)
    result.verdict, result.exit_code, result.stdout

    from sandbox.api import Runner
    with Runner(profile="strict", wall=5) as runner:     # many runs, warm
        result = runner.run(["python3", "sol.py"], files={"sol.py": source},
                            stdin_data=b"1 2\n")

Keyword options are those of `sbx exec` (see `sbx exec --help`), with Python values:
wall=2.5, memory="256M" or 268435456, env=[("KEY", "value")], dir="/path", plus
stdin_data=b"..." to feed stdin, files={"name": b"..."} to place files in /box, and
capture=True to get stdout and stderr as bytes.
"""

from __future__ import annotations

import os

from . import execopts, profiles
from .errors import UsageError
from .kernel import hostinfo
from .plan import Plan, box_files, make_plan
from .result import Result

_PARSED_KEYS = {o.key: o for o in execopts.OPTIONS}


def plan_for(argv: list[str], profile: str | None = None, **options) -> Plan:
    """The plan `run` would execute: profile resolved, options checked."""
    check_argv(argv)
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


def check_argv(argv: object) -> None:
    if isinstance(argv, (str, bytes)) or not isinstance(argv, (list, tuple)):
        raise UsageError(
            f"the command must be a list of strings, such as ['python3', 'sol.py'], "
            f"not {type(argv).__name__} {argv!r:.60}"
        )
    if not argv:
        raise UsageError("no command given")
    if not all(isinstance(arg, str) and "\0" not in arg for arg in argv):
        raise UsageError("every argument of the command must be a str without NUL")


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
    if key == "stdin_data" and value is not None:
        if isinstance(value, str):
            return value.encode()
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise UsageError(f"stdin_data: expected bytes or str, not {type(value).__name__}")
        return bytes(value)
    if key == "stdin" and isinstance(value, (bytes, bytearray)):
        raise UsageError("stdin is a file to read stdin from; to feed bytes, use stdin_data")
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


class Runner:
    """Many runs from one process, each in a fresh sandbox made from a warm one
    (sandbox/warm.py): the profile is resolved and the seccomp filter compiled once
    per distinct set of options, and a run costs a fork of a small prepared process,
    not a sandbox built from scratch.

    Options given here are every run's defaults; run() may add or override any
    option. stdout and stderr are captured unless capture=False. A Runner keeps one
    warm sandbox per thread that uses it (each runs one sandbox at a time): close()
    (or the with block's end) kills them; they also die with the thread that made
    them. Plans that cannot run warm (dir=, an image rootfs) run as run() does.
    """

    def __init__(self, profile: str | None = None, **options) -> None:
        from . import warm

        self.profile = profile
        self.options = {"capture": True, **options}
        # A root caller's payloads run as one fresh host id per Runner (see
        # fresh_root_host_id), so that its runs can share warm sandboxes.
        if os.getuid() == 0 and "host_id" not in self.options:
            self.options["host_id"] = fresh_root_host_id()
        self._plans: dict = {}
        self._pool = warm.Pool()
        plan_for(["true"], profile, **self._per_plan(self.options))  # check them now

    def run(self, argv: list[str], profile: str | None = None, **options) -> Result:
        """Run argv; options as for run(), over the Runner's. Per-run values
        (stdin_data, files) cost nothing extra; other options are resolved once
        for each distinct combination."""
        from .record import replace

        check_argv(argv)
        # None means not given here, as it does for run(): the Runner's value stays
        # ("none" is what lifts a limit).
        given = {key: value for key, value in options.items() if value is not None}
        merged = {**self.options, **given}
        base = self._base_plan(profile or self.profile, self._per_plan(merged))
        stdin_data = _check_option("stdin_data", merged.get("stdin_data"))
        files = box_files(merged.get("files"), base.box_dir, base.limits)
        plan = replace(
            base,
            argv=tuple(argv),
            stdio=replace(base.stdio, stdin_data=stdin_data) if stdin_data is not None
            else base.stdio,
            files=files,
        )
        if plan.rootfs == "host":
            return self._pool.run(plan)
        from . import rootfs as images

        with images.image_in_use(plan.rootfs):
            return self._pool.run(plan)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _per_plan(options: dict) -> dict:
        return {k: v for k, v in options.items() if k not in ("stdin_data", "files")}

    def _base_plan(self, profile: str | None, options: dict) -> Plan:
        try:
            key = (profile, tuple(sorted((k, _frozen(v)) for k, v in options.items())))
            hash(key)
        except TypeError:
            return plan_for(["true"], profile, **options)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = plan_for(["true"], profile, **options)
        return plan


def _frozen(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


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
