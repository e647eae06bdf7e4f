"""The instance commands of `sbx`: create, start, run, ps, stats, logs, enter, stop, rm.

`register(app)` adds them to the typer app. They only parse, call
sandbox.instances, print and pick the exit status. `create` and `run` take the
options of `sbx exec` (one table, sandbox/execopts.py) plus their own.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

import typer

from . import execopts
from .errors import UsageError

RAW_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
STATS_INTERVAL_S = 1.0
NO_STREAM_INTERVAL_S = 0.5
FOLLOW_POLL_S = 0.2


def register(app: typer.Typer) -> None:
    """Add the instance commands to the `sbx` app."""
    app.command("create", context_settings=RAW_ARGS, add_help_option=False)(create_cmd)
    app.command("run", context_settings=RAW_ARGS, add_help_option=False)(run_cmd)
    app.command("start")(start_cmd)
    app.command("stop")(stop_cmd)
    app.command("rm")(rm_cmd)
    app.command("ps")(ps_cmd)
    app.command("stats")(stats_cmd)
    app.command("logs")(logs_cmd)
    app.command("enter", context_settings=RAW_ARGS)(enter_cmd)


# --- create and run ----------------------------------------------------------------

_OWN_FLAGS = {"--name": "NAME", "--log-max": "SIZE", "-d": "", "--detach": ""}
_TAKES_VALUE = {o.flag for o in execopts.OPTIONS if o.metavar} | {"--name", "--log-max"}


def _usage(verb: str) -> str:
    from .instances.lifecycle import NOT_FOR_INSTANCES

    detach = " [-d]" if verb == "run" else ""
    lines = [f"usage: sbx {verb} --name NAME{detach} [OPTIONS] -- COMMAND [ARG...]", ""]
    lines.append(
        "Create an instance (its own /box, kept across stop and start)"
        + (" and start it." if verb == "run" else "; `sbx start NAME` runs it.")
    )
    lines += ["", f"  {'--name NAME':<26} the instance's name (required)"]
    if verb == "run":
        what = "return once it runs (else follow its output)"
        lines.append(f"  {'-d, --detach':<26} {what}")
    lines.append(f"  {'--log-max SIZE':<26} output kept per stream (default 8M)")
    for o in execopts.OPTIONS:
        if o.key not in NOT_FOR_INSTANCES and o.key not in ("verbose", "quiet"):
            lines.append(f"  {(o.flag + ' ' + o.metavar).strip():<26} {o.help}")
    return "\n".join(lines)


def _split(args: list[str]) -> tuple[dict, list[str]]:
    """Take --name, --log-max and -d out of `create`/`run` arguments; the rest are
    `sbx exec` options and the command."""
    own: dict = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            rest += args[i:]
            break
        flag, eq, inline = arg.partition("=")
        if flag in _OWN_FLAGS:
            if not _OWN_FLAGS[flag]:
                own["detach"] = True
            elif eq:
                own[flag[2:]] = inline
            elif i + 1 < len(args):
                own[flag[2:]] = args[i + 1]
                i += 1
            else:
                raise UsageError(f"{flag} needs a value: {flag} {_OWN_FLAGS[flag]}")
        else:
            rest.append(arg)
            if flag in _TAKES_VALUE and not eq and i + 1 < len(args):
                rest.append(args[i + 1])
                i += 1
        i += 1
    return own, rest


def _create_from(verb: str, args: list[str]) -> tuple[str, dict] | None:
    from . import instances
    from .units import parse_size

    own, rest = _split(args)
    options, command = execopts.parse(rest)
    if options.get("help"):
        typer.echo(_usage(verb))
        return None
    if not own.get("name"):
        raise UsageError(f"--name is required: {_usage(verb).splitlines()[0]}")
    if own.get("log-max"):
        options["log_max"] = parse_size(own["log-max"], "--log-max")
    instances.create(own["name"], command, options)
    return own["name"], own


def create_cmd(ctx: typer.Context) -> None:
    """Create an instance: sbx create --name NAME [exec options] -- COMMAND."""
    created = _create_from("create", list(ctx.args))
    if created:
        typer.echo(created[0])


def run_cmd(ctx: typer.Context) -> None:
    """Create and start an instance: sbx run [-d] --name NAME ... -- COMMAND."""
    from . import instances

    created = _create_from("run", list(ctx.args))
    if not created:
        return
    name, own = created
    instances.start(name)
    if own.get("detach"):
        typer.echo(name)
        return
    if not _follow_logs(name):
        typer.echo(f"sbx: {name} keeps running; `sbx stop {name}` stops it", err=True)
        raise SystemExit(130)
    raise SystemExit(_exit_status(instances.get(name)))


def _exit_status(view: dict) -> int:
    end = view.get("exit") or {}
    if end.get("signal"):
        import signal

        return 128 + signal.Signals[end["signal"]].value
    if end.get("verdict") == "IE":
        return end.get("exit_code") or 125
    return end.get("exit_code") or 0


# --- start, stop, rm ---------------------------------------------------------------


def start_cmd(
    names: list[str] = typer.Argument(..., help="instances to start"),
) -> None:
    """Start created or exited instances."""
    from . import instances

    for name in names:
        instances.start(name)
        typer.echo(name)


def stop_cmd(
    names: list[str] = typer.Argument(..., help="instances to stop"),
    time_s: float = typer.Option(
        10.0, "--time", "-t", help="seconds between SIGTERM and SIGKILL"
    ),
) -> None:
    """Stop running instances: SIGTERM to the payload, SIGKILL after --time."""
    from . import instances

    for name in names:
        end = instances.stop(name, grace_s=time_s)
        if end is None:
            typer.echo(f"sbx: {name} is not running", err=True)
        typer.echo(name)


def rm_cmd(
    names: list[str] = typer.Argument(..., help="instances to remove"),
    force: bool = typer.Option(False, "--force", "-f", help="kill a running one first"),
) -> None:
    """Remove instances: state, /box, logs and any cgroup left."""
    from . import instances

    for name in names:
        instances.remove(name, force=force)
        typer.echo(name)


# --- ps ----------------------------------------------------------------------------


def ps_cmd(
    all_: bool = typer.Option(
        False, "--all", "-a", help="also created and exited ones"
    ),
    as_json: bool = typer.Option(False, "--json", help="one JSON array"),
) -> None:
    """List instances: state, why it ended, command, uptime, rootfs, limits."""
    from . import instances

    rows = [_ps_row(view) for view in instances.list_instances(include_stopped=all_)]
    if as_json:
        typer.echo(json.dumps(rows, sort_keys=True))
        return
    table = [("NAME", "STATE", "WHY", "COMMAND", "UPTIME", "ROOTFS", "LIMITS")]
    for row in rows:
        table.append(
            (
                row["name"],
                _state_text(row),
                row["why"] or "",
                _clip(shlex.join(row["command"]).replace("\n", "\\n"), 32),
                _duration(row["uptime_s"]) if row["uptime_s"] is not None else "",
                row["rootfs"],
                _limits_text(row["limits"]),
            )
        )
    _print_table(table)


def _ps_row(view: dict) -> dict:
    run = view.get("run") or {}
    end = view.get("exit") or {}
    started = run.get("started_at")
    running = view["state"] == "running"
    return {
        "name": view["name"],
        "state": view["state"],
        "exit_code": end.get("exit_code"),
        "signal": end.get("signal"),
        "verdict": end.get("verdict"),
        "reason": end.get("reason"),
        "why": end.get("why"),
        "command": view["command"],
        "created_at": view["created_at"],
        "started_at": started,
        "finished_at": end.get("finished_at"),
        "uptime_s": round(time.time() - started, 3) if running and started else None,
        "rootfs": view["rootfs"],
        "profile": view["profile"],
        "limits": view["limits"],
        "supervisor_pid": (run.get("supervisor") or {}).get("pid") if running else None,
        "init_pid": (run.get("init") or {}).get("pid") if running else None,
    }


def _state_text(row: dict) -> str:
    if row["state"] != "exited":
        return row["state"]
    if row["signal"]:
        return f"exited ({row['signal']})"
    code = row["exit_code"]
    return f"exited ({code})" if code is not None else "exited"


def _limits_text(limits: dict) -> str:
    parts = []
    if limits.get("memory_max_bytes") is not None:
        parts.append(f"mem={_size(limits['memory_max_bytes'])}")
    if limits.get("pids_max") is not None:
        parts.append(f"pids={limits['pids_max']}")
    if limits.get("cpus") is not None:
        parts.append(f"cpus={limits['cpus']:g}")
    if limits.get("cpu_time_s") is not None:
        parts.append(f"time={limits['cpu_time_s']:g}s")
    if limits.get("wall_timeout_s") is not None:
        parts.append(f"wall={limits['wall_timeout_s']:g}s")
    return " ".join(parts) or "-"


# --- stats -------------------------------------------------------------------------


def stats_cmd(
    names: list[str] = typer.Argument(
        None, help="instances (default: every running one)"
    ),
    no_stream: bool = typer.Option(False, "--no-stream", help="print once and exit"),
    as_json: bool = typer.Option(False, "--json", help="JSON (one array per refresh)"),
) -> None:
    """Live CPU %, memory use and limit, tasks and I/O of running instances."""
    previous: dict = {}
    interval_s = NO_STREAM_INTERVAL_S if no_stream else STATS_INTERVAL_S
    _take_stats(names, previous)
    try:
        while True:
            time.sleep(interval_s)
            rows = _take_stats(names, previous)
            _show_stats(rows, as_json, clear=not no_stream and sys.stdout.isatty())
            if no_stream:
                return
    except KeyboardInterrupt:
        return


def _take_stats(names: list[str] | None, previous: dict) -> list:
    from .instances import get, list_instances
    from .instances.stats import Stats, compare, sample

    views = [get(n) for n in names] if names else list_instances()
    rows = []
    for view in views:
        name = view["name"]
        if view["state"] != "running":
            rows.append(Stats(name=name, state=view["state"]))
            previous.pop(name, None)
            continue
        now = sample(view["run"])
        before = previous.get(name)
        if before is not None and before[0] == view["run"]["id"]:
            rows.append(compare(name, before[1], now))
        else:
            rows.append(compare(name, now, now))
        previous[name] = (view["run"]["id"], now)
    return rows


def _show_stats(rows: list, as_json: bool, clear: bool) -> None:
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows], sort_keys=True))
        return
    table = [
        ("NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "TASKS", "I/O READ / WRITE")
    ]
    for r in rows:
        if r.state != "running":
            table.append((r.name, "--", "--", "--", "--", r.state))
            continue
        limit = _size(r.memory_limit_bytes) if r.memory_limit_bytes else "none"
        if r.memory_limit_bytes and r.memory_limit_mechanism not in (r.source, "none"):
            limit += f" ({r.memory_limit_mechanism})"
        table.append(
            (
                r.name,
                _pct(r.cpu_percent),
                f"{_size(r.memory_bytes)} / {limit}",
                _pct(r.memory_percent),
                "--" if r.tasks is None else str(r.tasks),
                f"{_size(r.io_read_bytes)} / {_size(r.io_write_bytes)}",
            )
        )
    if clear:
        sys.stdout.write("\x1b[H\x1b[2J")
    _print_table(table)
    sys.stdout.flush()


# --- logs --------------------------------------------------------------------------


def logs_cmd(
    name: str = typer.Argument(..., help="instance"),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="keep printing new output"
    ),
) -> None:
    """The instance's output (stdout and stderr, the last part of each kept)."""
    from . import instances

    instances.get(name)  # an unknown name is an error
    if follow:
        _follow_logs(name)
        return
    for stream, out in (("stdout", sys.stdout.buffer), ("stderr", sys.stderr.buffer)):
        for part in instances.log_parts(name, stream):
            with open(part, "rb") as f:
                while chunk := f.read(65536):
                    out.write(chunk)
        out.flush()


def _follow_logs(name: str) -> bool:
    """Print the output so far, then what comes, until the instance stops (True)
    or Ctrl-C (False)."""
    from . import instances
    from .instances import store

    outputs = (("stdout", sys.stdout.buffer), ("stderr", sys.stderr.buffer))
    tails = {
        stream: _Tail(store.path_of(name, f"{stream}.log"), out)
        for stream, out in outputs
    }
    for stream, tail in tails.items():
        old = store.path_of(name, f"{stream}.log.1")
        if os.path.exists(old):
            with open(old, "rb") as f:
                tail.out.write(f.read())
    try:
        while True:
            running = instances.get(name)["state"] == "running"
            for tail in tails.values():
                tail.drain()
            if not running:
                return True
            time.sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:
        return False
    finally:
        for tail in tails.values():
            tail.close()


class _Tail:
    """One log file followed across rotation (the file is renamed to PATH.1)."""

    def __init__(self, path: str, out) -> None:
        self.path, self.out, self.f = path, out, None

    def drain(self) -> None:
        if self.f is None:
            try:
                self.f = open(self.path, "rb")
            except FileNotFoundError:
                return
        while chunk := self.f.read(65536):
            self.out.write(chunk)
        self.out.flush()
        try:
            rotated = os.stat(self.path).st_ino != os.fstat(self.f.fileno()).st_ino
        except FileNotFoundError:
            rotated = True
        if rotated:
            self.close()
            self.drain()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


# --- enter -------------------------------------------------------------------------


def enter_cmd(
    name: str = typer.Argument(..., help="a running instance"),
    command: list[str] = typer.Argument(..., help="the command and its arguments"),
) -> None:
    """Run a command inside a running instance: sbx enter NAME -- COMMAND."""
    from . import instances

    import signal

    code = instances.enter(name, list(command))
    if code == 128 + signal.SIGSYS:
        # The instance's seccomp policy, with kill actions as kill-process: nobody
        # reads a listener for an entered command, so the syscall cannot be named.
        typer.echo("sbx: SV (seccomp): the command was killed by the instance's "
                   "seccomp policy (SIGSYS)", err=True)
    # SystemExit, not typer.Exit: run_app returns its code (app() drops Exit's).
    raise SystemExit(code)


# --- formatting --------------------------------------------------------------------


def _print_table(rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [str(c).ljust(w) for c, w in zip(row, widths)]
        typer.echo("  ".join(cells).rstrip())


def _size(n: int | None) -> str:
    if n is None:
        return "--"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}GiB"


def _pct(value: float | None) -> str:
    return "--" if value is None else f"{value:.2f}%"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
