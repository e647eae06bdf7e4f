"""The `sbx` console script. `sbx exec` takes a fast path that never imports typer or
click (see execopts.py); every other command goes to the typer app in cli.py."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "exec":
        return exec_main(args[1:])
    if args and args[0] == "batch":
        parsed = _batch_args(args[1:])
        if parsed is not None:
            from .cli_batch import batch_main
            from .errors import SbxError

            try:
                return batch_main(*parsed)
            except SbxError as e:
                print(f"sbx: error: {e}", file=sys.stderr)
                return e.exit_code
    from .cli import run_app

    return run_app(args)


_BATCH_VALUES = {"--out": "out", "-o": "out", "--jobs": "jobs", "-j": "jobs",
                 "--profile": "profile", "--keep-output": "keep_output"}


def _batch_args(args: list[str]) -> tuple | None:
    """`sbx batch` arguments as cli_batch.batch_main takes them, parsed without
    typer (whose import costs a grading pipeline on every start); None for anything
    else (--help, a mistake), which the typer app then handles and explains."""
    import os

    values: dict = {"jobs": str(os.cpu_count() or 1), "keep_output": "4096"}
    positional, quiet, verbose, pin = [], False, 0, True
    items = iter(args)
    for arg in items:
        name, eq, inline = arg.partition("=")
        if arg[:2] in ("-j", "-o") and len(arg) > 2 and not eq:
            name, eq, inline = arg[:2], "=", arg[2:]  # -j2, as typer takes it
        if name in _BATCH_VALUES:
            value = inline if eq else next(items, None)
            if value is None:
                return None
            values[_BATCH_VALUES[name]] = value
        elif arg in ("--quiet", "-q"):
            quiet = True
        elif arg == "--no-pin":
            pin = False
        elif arg in ("--verbose", "-v", "-vv"):
            verbose += len(arg) - 1 if arg.startswith("-v") else 1
        elif arg.startswith("-") and arg != "-":
            return None
        else:
            positional.append(arg)
    if len(positional) != 1 or "out" not in values:
        return None
    try:
        workers, keep = int(values["jobs"]), int(values["keep_output"])
    except ValueError:
        return None
    return (positional[0], values["out"], workers, values.get("profile"), keep, quiet,
            verbose, pin)


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """The CLI's one handler (stderr). Without -v, `logging` is imported only when
    something has to be said (see sandbox/log.py)."""
    if not verbose:
        from . import log

        log.on_first_use = lambda: install_handler(0, quiet)
        return
    install_handler(verbose, quiet)


def install_handler(verbose: int, quiet: bool) -> None:
    import logging

    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else (
        logging.INFO if verbose else logging.WARNING))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("sbx: %(levelname)s: %(message)s"))
    root = logging.getLogger("sandbox")
    root.addHandler(handler)
    root.setLevel(level)


def exec_main(args: list[str]) -> int:
    from . import execopts
    from .errors import ExecError, SandboxError, UsageError
    from .result import IE, Result

    options: dict = {}
    try:
        options, command = execopts.parse(args)
        if options.get("help"):
            print(execopts.help_text())
            return 0
        execopts.check_inherited_stdio()
        setup_logging(options.get("verbose", 0), options.get("quiet", False))
        from . import api

        result = api.run(command, **options)
    except UsageError as e:
        print(f"sbx: error: {e}", file=sys.stderr)
        return e.exit_code
    except SandboxError as e:
        result = Result(verdict=IE, error=str(e))
        result.extra_exit = e.exit_code if isinstance(e, ExecError) else None
        if options.get("json") or options.get("result"):
            result.stdout = result.stderr = b""  # the same fields as every result
        if not options.get("quiet"):
            print(f"sbx: error: {e}", file=sys.stderr)
    _emit(result, options)
    return result.sbx_exit_code


def _emit(result, options: dict) -> None:
    if options.get("json") or options.get("result"):
        import json

        text = json.dumps(result.to_dict(), indent=None, sort_keys=True)
        if options.get("json"):
            print(text, flush=True)
        if options.get("result"):
            _write_result(options["result"], text + "\n")
    if result.verdict in ("TLE", "MLE", "OLE", "SV") and not options.get("quiet"):
        what = f"{result.verdict} ({result.reason})" if result.reason else result.verdict
        if result.violation:
            what += f": syscall {result.violation['syscall']}"
        print(f"sbx: {what} after {result.wall_time_s:.2f} s", file=sys.stderr)


def _write_result(path: str, text: str) -> None:
    """Into a new file next to it, then renamed over it: a symbolic link at `path` is
    replaced, never written through."""
    import os

    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
