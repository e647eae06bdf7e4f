"""The `sbx batch` command, added to the typer app by `register(app)`.

Everything batch needs is imported inside the command, so `sbx exec` and the other
commands never pay for it.
"""

from __future__ import annotations

import os

EXIT_ALL_OK, EXIT_SOME_NOT_OK, EXIT_INTERRUPTED = 0, 1, 130


def register(app) -> None:
    """Add `batch` to the typer app (a typer.Typer)."""
    import typer

    @app.command("batch")
    def batch_command(
        jobs_file: str = typer.Argument(
            ..., metavar="JOBS.jsonl", help="one job per line"
        ),
        out: str = typer.Option(
            ...,
            "--out",
            "-o",
            metavar="RESULTS.jsonl",
            help="results, one line per job; ids already there are skipped",
        ),
        jobs: int = typer.Option(
            os.cpu_count() or 1, "--jobs", "-j", metavar="N", help="sandboxes at once"
        ),
        profile: str | None = typer.Option(
            None,
            "--profile",
            metavar="NAME|PATH",
            help="profile of jobs that name none",
        ),
        keep_output: int = typer.Option(
            4096,
            "--keep-output",
            metavar="BYTES",
            help="bytes of each job's stdout and stderr kept in the results",
        ),
        quiet: bool = typer.Option(
            False, "--quiet", "-q", help="no progress, only the summary"
        ),
        verbose: int = typer.Option(
            0, "--verbose", "-v", count=True, help="log each run"
        ),
        no_pin: bool = typer.Option(
            False,
            "--no-pin",
            help="let every job use every CPU (by default, with at least as many "
            "CPUs as workers, each worker's jobs run on CPUs of their own)",
        ),
    ) -> None:
        """Run every job of JOBS.jsonl in its own sandbox, N at a time, from one warm
        process. Exit 0 when every job is OK, 1 otherwise, 130 when interrupted."""
        code = batch_main(
            jobs_file, out, jobs, profile, keep_output, quiet, verbose, not no_pin
        )
        raise typer.Exit(code)


def batch_main(
    jobs_file: str,
    out: str,
    workers: int,
    profile: str | None,
    keep_output_bytes: int,
    quiet: bool,
    verbose: int,
    pin: bool = True,
) -> int:
    import signal
    import sys
    import threading

    from . import batch
    from . import log as logs
    from .entry import install_handler
    from .errors import SandboxError, UsageError

    def configure_logging() -> None:
        install_handler(verbose, False)
        _log_each_warning_once()

    # `logging` is imported when something is first said (most batches say nothing),
    # or now for -v.
    if verbose:
        configure_logging()
    else:
        logs.on_first_use = configure_logging
    _sandboxes_in_own_process_groups()
    if workers < 1:
        raise UsageError(f"--jobs {workers}: use at least 1 worker")
    jobs = batch.read_jobs(jobs_file, profile)
    results = batch.ResultsFile(out)
    try:
        runner = batch.Batch(jobs, results, workers, keep_output_bytes, pin)
        show = _Progress(sys.stderr, quiet)

        def on_signal(sig: int, frame: object) -> None:
            first = not runner.stopping
            runner.stop()
            if first:
                show.message(
                    f"{signal.Signals(sig).name}: stopping; the running jobs are "
                    "killed and left for the next run"
                )

        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            summary = runner.run(show.update)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        show.close()
    finally:
        try:
            results.close()
        except OSError as e:
            # Raised from here, this replaces an error already on its way: the
            # results file is the one thing the caller cannot do without.
            raise SandboxError(
                f"cannot write the results file {out!r} ({e.strerror}): the last "
                "results may be lost; a rerun runs the jobs not in it"
            ) from e
    print(batch.format_summary(summary), flush=True)
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return (
        EXIT_ALL_OK
        if summary.all_ok and _previous_all_ok(results)
        else EXIT_SOME_NOT_OK
    )


def _sandboxes_in_own_process_groups() -> None:
    """Each sandbox starts in a process group of its own, so that a Ctrl-C typed at
    the terminal reaches only sbx, which then stops the batch in order. The hook
    runs in every child forked by Python code in this process and its descendants;
    it acts only in the direct children (each sandbox's stage 1), and the sandbox's
    later stages inherit the group."""
    batch_pid = os.getpid()

    def new_group() -> None:
        if os.getppid() == batch_pid:
            os.setpgid(0, 0)

    os.register_at_fork(after_in_child=new_group)


def _previous_all_ok(results) -> bool:
    return all(entry.get("verdict") == "OK" for entry in results.done.values())


class _Progress:
    """A bar redrawn in place on a terminal; one plain line per job otherwise."""

    def __init__(self, stream, quiet: bool) -> None:
        self.stream = stream
        self.quiet = quiet
        self.bar = stream.isatty()
        self.drawn = False
        self.last_draw = 0.0

    def update(self, entry: dict, summary) -> None:
        import time

        from . import batch

        if self.quiet:
            return
        if not self.bar:
            print(batch.progress_line(entry, summary), file=self.stream, flush=True)
            return
        now = time.monotonic()
        if (
            now - self.last_draw >= 0.1
            or summary.ran + summary.skipped == summary.total_jobs
        ):
            self.stream.write("\r" + batch.progress_bar(summary) + "\x1b[K")
            self.stream.flush()
            self.drawn = True
            self.last_draw = now

    def message(self, text: str) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.drawn = False
        print(f"sbx: {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def _log_each_warning_once() -> None:
    """A weakened limit is the same on every run of a batch: say it once."""
    import logging

    seen: set = set()

    def first_time(record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        key = record.getMessage()
        if key in seen:
            return False
        seen.add(key)
        return True

    for handler in logging.getLogger("sandbox").handlers:
        handler.addFilter(first_time)
