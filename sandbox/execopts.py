"""`sbx exec` options: one table, parsed without importing click or typer.

`sbx exec` is paid for on every graded run, so its command line is parsed here by a
small parser over the table below (importing typer alone costs several times a bare
Python start). The typer app's `exec` command hands its arguments to the same parser,
so `sbx exec --help` and the behaviour come from this one table.
"""

from __future__ import annotations

import os

from .errors import UsageError
from .record import record
from .units import parse_count, parse_seconds, parse_size


@record(frozen=True)
class Opt:
    flag: str
    key: str
    metavar: str  # "" for a switch
    help: str
    parse: object = None
    repeat: bool = False


def _cpus(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 1024:
        raise UsageError(f"bad {what} {text!r}: use a number of CPUs such as 0.5 or 2")
    return value


def _id(text: str, what: str) -> int:
    value = parse_count(text, what)
    if value >= 65534:
        raise UsageError(f"bad {what} {text!r}: use an id between 1 and 65533")
    return value


def _env(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or "\0" in text:
        raise UsageError(f"bad {what} {text!r}: use KEY=VALUE")
    return key, value


def _or_none(parse):
    """A limit that may also be "none", to lift the profile's value."""

    def parse_limit(text: str, what: str):
        if text.strip().lower() in ("none", "unlimited"):
            from .plan import UNLIMITED

            return UNLIMITED
        return parse(text, what)

    return parse_limit


OPTIONS = (
    Opt("--profile", "profile", "NAME|PATH", "profile to start from (default: default)"),
    Opt("--seccomp", "seccomp", "FILE", "OCI/Docker seccomp JSON policy instead of the profile's"),
    Opt("--rootfs", "rootfs", "NAME", "root filesystem: host (default) or an imported image"),
    Opt("--dir", "dir", "HOSTDIR", "bind HOSTDIR read-write at /box (default: an empty tmpfs)"),
    Opt("--idmap", "idmap", "auto|self|subids", "subordinate ids for sbx's own "
        "processes when newuidmap and a range exist (auto), never (self), or required",
        None),
    Opt("--uid", "uid", "N", "uid of the payload inside (default 1000)", _id),
    Opt("--gid", "gid", "N", "gid of the payload inside (default 1000)", _id),
    Opt("--env", "env", "KEY=VALUE", "add to the payload's clean environment", _env, True),
    Opt("--wall", "wall", "SECONDS", "wall-clock limit (none: lift the profile's)",
        _or_none(parse_seconds)),
    Opt("--time", "time", "SECONDS", "CPU-time limit, summed over the whole run",
        _or_none(parse_seconds)),
    Opt("--memory", "memory", "SIZE", "memory limit, swap off (e.g. 256M)", _or_none(parse_size)),
    Opt("--pids", "pids", "N", "most tasks (processes and threads) at once",
        _or_none(parse_count)),
    Opt("--cpus", "cpus", "FLOAT", "CPU bandwidth quota, in CPUs", _or_none(_cpus)),
    Opt("--output-limit", "output_limit", "SIZE", "most bytes on stdout and on stderr each",
        _or_none(parse_size)),
    Opt("--fsize", "fsize", "SIZE", "largest file the payload may write",
        _or_none(parse_size)),
    Opt("--nofile", "nofile", "N", "most open files per process",
        _or_none(parse_count)),
    Opt("--tmpfs-size", "tmpfs_size", "SIZE", "size of /tmp, /box and /dev/shm each", parse_size),
    Opt("--stdin", "stdin", "FILE", "read the payload's stdin from FILE"),
    Opt("--stdout", "stdout", "FILE", "write the payload's stdout to FILE"),
    Opt("--stderr", "stderr", "FILE", "write the payload's stderr to FILE"),
    Opt("--json", "json", "", "print the result as one JSON object (output captured in it)"),
    Opt("--result", "result", "FILE", "write the JSON result (output captured in it) to FILE"),
    Opt("--require-cgroup", "require_cgroup", "", "refuse to run without a cgroup mechanism"),
    Opt("--verbose", "verbose", "", "log each step of the run on stderr (twice: debug)"),
    Opt("--quiet", "quiet", "", "log nothing but errors"),
)
_BY_FLAG = {o.flag: o for o in OPTIONS} | {"-v": OPTIONS[-2], "-q": OPTIONS[-1]}

USAGE = "usage: sbx exec [OPTIONS] -- COMMAND [ARG...]"


def help_text() -> str:
    lines = [USAGE, "", "Run COMMAND in a fresh sandbox and report what happened.", ""]
    for o in OPTIONS:
        left = f"{o.flag} {o.metavar}".strip()
        lines.append(f"  {left:<26} {o.help}")
    lines += ["  --help                     show this and exit", ""]
    lines.append("Exit status: the payload's, 128+signal, 124 time limit, 125 sbx failed,")
    lines.append("126 command not executable, 127 command not found, 2 bad usage.")
    return "\n".join(lines)


def parse(args: list[str]) -> tuple[dict, list[str]]:
    """Split `sbx exec` arguments into options and the command. Raises UsageError."""
    options: dict = {"env": []}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return options, _command(args[i + 1 :])
        if not arg.startswith("-") or arg == "-":
            return options, _command(args[i:])
        if arg in ("-h", "--help"):
            options["help"] = True
            return options, []
        flag, eq, inline = arg.partition("=")
        opt = _BY_FLAG.get(flag)
        if opt is None:
            raise UsageError(f"unknown option {flag!r} for sbx exec; see `sbx exec --help`")
        if not opt.metavar:
            if eq:
                raise UsageError(f"{flag} takes no value")
            options[opt.key] = options.get(opt.key, 0) + 1 if opt.key == "verbose" else True
            i += 1
            continue
        if eq:
            value = inline
        elif i + 1 < len(args):
            value = args[i + 1]
            i += 1
        else:
            raise UsageError(f"{flag} needs a value: {flag} {opt.metavar}")
        parsed = opt.parse(value, flag) if opt.parse else value
        if opt.repeat:
            options[opt.key].append(parsed)
        else:
            options[opt.key] = parsed
        i += 1
    return options, _command([])


def _command(rest: list[str]) -> list[str]:
    if not rest:
        raise UsageError(f"no command given; {USAGE}")
    return rest


def check_paths(options: dict) -> None:
    """Fail early, before anything starts, on host paths the caller cannot use, or
    that would let the payload reach outside its sandbox."""
    box = options.get("dir")
    if box is not None:
        if os.path.islink(box):
            # A link there may have been planted by an earlier run's payload.
            raise UsageError(f"--dir {box!r} is a symbolic link: give the directory itself")
        if not os.path.isdir(box):
            raise UsageError(f"--dir {box!r} is not a directory")
        if not os.access(box, os.R_OK | os.X_OK):
            raise UsageError(f"--dir {box!r} is not readable by you (uid {os.getuid()})")
    stdin = options.get("stdin")
    if stdin is not None:
        if not os.access(stdin, os.R_OK):
            raise UsageError(f"--stdin {stdin!r} cannot be read")
        if os.path.isdir(stdin):
            # A directory as fd 0 would be a handle on the host's tree inside.
            raise UsageError(f"--stdin {stdin!r} is a directory: give a file")
    inside = os.path.realpath(box) + os.sep if box is not None else None
    for key in ("stdout", "stderr", "result"):
        path = options.get(key)
        if path is None:
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"--{key} {path!r}: cannot write in {parent!r}")
        if inside and (os.path.realpath(parent) + os.sep).startswith(inside):
            # The payload could plant a link there that sbx would then write through.
            raise UsageError(
                f"--{key} {path!r} is inside --dir, which the payload can change: "
                "write it somewhere else"
            )


def check_inherited_stdio() -> None:
    """Refuse an inherited stdin, stdout or stderr that is a directory: the payload
    would get a handle on the host's tree."""
    import stat

    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        if stat.S_ISDIR(mode):
            raise UsageError(f"{name} (fd {fd}) is a directory: give a file, pipe or terminal")
