"""`sbx batch`: run many jobs, each in a fresh sandbox, from one warm process.

A jobs file is JSON Lines, one job per line:

    {"id": "t1", "command": ["python3", "sol.py"],
     "files": {"sol.py": "print(input())", "data.txt": {"path": "inputs/1.txt"}},
     "stdin": "42\\n", "profile": "strict", "limits": {"wall": "2s", "memory": "256M"},
     "expected": "42\\n", "checker": "tokens"}

Only `id` and `command` are required. The plan of each distinct (profile, options) is
resolved once and reused with only the command, stdin and files swapped; each worker
thread runs its jobs on warm sandboxes of its own (sandbox/warm.py), so a job's
sandbox is made from one kept ready, not from scratch. With enough CPUs, each worker
thread, and so every process it starts, is pinned to CPUs no other worker uses. A
job's files are written into its fresh /box tmpfs (size --tmpfs-size), never to the
host's disk.

The results file gets one JSON line per finished job, written whole under a lock and
fsynced. A rerun skips the ids already there; a last line cut short by a crash is
dropped on start. `stop()` (Ctrl-C) takes no new job, kills the running sandboxes and
writes nothing for them, so the file only ever holds whole lines of finished jobs.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import signal
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

from . import api, checkers, warm
from . import log as logs
from .errors import SandboxError, UsageError
from .plan import Plan
from .record import factory, record, replace
from .result import IE, OK, Result

log = logs.getLogger(__name__)

WA = "WA"
DEFAULT_KEEP_OUTPUT_BYTES = 4096
# The exec options a job may set; stdio, --dir and the result file belong to batch.
JOB_OPTION_KEYS = frozenset(
    ("wall", "time", "memory", "pids", "cpus", "output_limit", "fsize", "nofile")
    + ("tmpfs_size", "env", "uid", "gid", "seccomp", "rootfs", "require_cgroup")
)
JOB_KEYS = frozenset(
    ("id", "command", "files", "stdin", "profile", "limits", "options")
    + ("expected", "checker", "tolerance")
)


@record(frozen=True)
class Job:
    """One run of a batch. `files` maps a path under /box to its bytes, or to a str:
    the host path to copy it from. `options` are exec options, frozen and sorted."""

    id: str
    command: tuple[str, ...]
    files: tuple[tuple[str, bytes | str], ...] = ()
    stdin: bytes | None = None
    profile: str | None = None
    options: tuple[tuple[str, object], ...] = ()
    expected: str | None = None
    checker: str = "exact"
    tolerance: float | None = None

    @property
    def plan_key(self) -> tuple:
        return (self.profile, self.options)


# --- reading jobs ------------------------------------------------------------------


def read_jobs(path: str, default_profile: str | None = None) -> list[Job]:
    """Parse a jobs file. Raises UsageError naming the line and the field."""
    base = os.path.dirname(os.path.abspath(path))
    jobs, seen = [], {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except OSError as e:
        raise UsageError(f"cannot read the jobs file {path!r}: {e.strerror}") from e
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not valid JSON ({e.msg})") from e
        job = parse_job(obj, where, base, default_profile)
        if job.id in seen:
            raise UsageError(
                f"{where}: id {job.id!r} is also used on line {seen[job.id]}"
            )
        seen[job.id] = number
        jobs.append(job)
    return jobs


def parse_job(
    obj: object, where: str, base_dir: str, default_profile: str | None
) -> Job:
    """One job from its decoded JSON object; relative file paths are taken from
    base_dir (the jobs file's directory)."""
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: a job must be a JSON object")
    unknown = sorted(set(obj) - JOB_KEYS)
    if unknown:
        raise UsageError(
            f"{where}: unknown field {unknown[0]!r}; fields: {_list(JOB_KEYS)}"
        )
    job_id = obj.get("id")
    if not isinstance(job_id, (str, int)) or isinstance(job_id, bool) or job_id == "":
        raise UsageError(f'{where}: every job needs an "id" (a string or an integer)')
    command = obj.get("command")
    if not (
        isinstance(command, list)
        and command
        and all(isinstance(a, str) for a in command)
    ):
        raise UsageError(f'{where}: "command" must be a non-empty list of strings')
    checker = obj.get("checker", "exact")
    if checker not in checkers.NAMES:
        raise UsageError(
            f"{where}: unknown checker {checker!r}; use {_list(checkers.NAMES)}"
        )
    expected = obj.get("expected")
    if expected is not None and not isinstance(expected, str):
        raise UsageError(f'{where}: "expected" must be a string')
    return Job(
        id=str(job_id),
        command=tuple(command),
        files=_parse_files(obj.get("files") or {}, where, base_dir),
        stdin=_parse_stdin(obj.get("stdin"), where),
        profile=obj.get("profile") or default_profile,
        options=_parse_options(obj, where),
        expected=expected,
        checker=checker,
        tolerance=_parse_tolerance(obj.get("tolerance"), where),
    )


def _parse_files(files: object, where: str, base_dir: str) -> tuple:
    if not isinstance(files, dict):
        raise UsageError(f'{where}: "files" must be an object of name -> content')
    parsed = []
    for name, content in sorted(files.items()):
        parts = name.split("/")
        if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise UsageError(
                f"{where}: file name {name!r} must be a relative path in /box"
            )
        if isinstance(content, str):
            parsed.append((name, content.encode()))
        elif isinstance(content, dict) and isinstance(content.get("path"), str):
            source = os.path.join(base_dir, content["path"])
            if not os.access(source, os.R_OK):
                raise UsageError(f"{where}: file {name!r}: cannot read {source!r}")
            parsed.append((name, source))
        else:
            raise UsageError(f'{where}: file {name!r}: use a string or {{"path": ...}}')
    return tuple(parsed)


def _parse_stdin(stdin: object, where: str) -> bytes | None:
    if stdin is None or isinstance(stdin, str):
        return None if stdin is None else stdin.encode()
    raise UsageError(f'{where}: "stdin" must be a string')


def _parse_options(obj: dict, where: str) -> tuple:
    merged = {}
    for key in ("limits", "options"):
        part = obj.get(key) or {}
        if not isinstance(part, dict):
            raise UsageError(f'{where}: "{key}" must be an object')
        merged.update(part)
    for key, value in merged.items():
        if key not in JOB_OPTION_KEYS:
            raise UsageError(
                f"{where}: option {key!r} cannot be set per job; "
                f"options: {_list(JOB_OPTION_KEYS)}"
            )
        if key == "env":
            if not isinstance(value, dict):
                raise UsageError(f'{where}: "env" must be an object of KEY -> value')
            merged[key] = tuple(sorted((str(k), str(v)) for k, v in value.items()))
        elif isinstance(value, (list, dict)):
            raise UsageError(f"{where}: option {key!r} must be a string or a number")
    return tuple(sorted(merged.items()))


def _parse_tolerance(value: object, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise UsageError(f'{where}: "tolerance" must be a number >= 0')
    return float(value)


def _list(names: Iterable[str]) -> str:
    return ", ".join(sorted(names))


# --- plans -------------------------------------------------------------------------


def base_plans(jobs: list[Job]) -> dict[tuple, Plan]:
    """One resolved plan per distinct (profile, options): profile files read, options
    parsed and checked, once. Raises UsageError before anything runs."""
    plans = {}
    for job in jobs:
        if job.plan_key not in plans:
            options = dict(job.options)
            try:
                plans[job.plan_key] = api.plan_for(
                    ["/bin/true"], job.profile, capture=True, **options
                )
            except UsageError as e:
                raise UsageError(f"job {job.id!r}: {e}") from e
    return plans


def job_plan(base: Plan, job: Job) -> Plan:
    """The base plan with this job's command, stdin and files for /box (files given by
    path are read now, as the caller). A job without stdin reads an empty pipe, never
    the terminal sbx was started from. Raises OSError for a file it cannot read."""
    files = []
    for name, content in job.files:
        if isinstance(content, str):
            with open(content, "rb") as f:
                content = f.read()
        files.append((name, content))
    return replace(
        base,
        argv=job.command,
        stdio=replace(
            base.stdio, stdin_data=job.stdin if job.stdin is not None else b""
        ),
        files=tuple(files),
    )


# --- results file ------------------------------------------------------------------


class ResultsFile:
    """The results file: read once to learn which ids are done, then appended to, one
    whole line per job, written out (flushed) under a lock as each job ends: what an
    interrupted or killed sbx has finished is in the file. Synced to the disk
    (fsync) at most SYNC_EVERY_S apart and at close: a power failure loses at most
    the lines of the last moments, which a rerun runs again (a line cut short is
    dropped on start). An fsync per job costs the disk's latency on every run."""

    SYNC_EVERY_S = 1.0

    def __init__(self, path: str) -> None:
        self.path = path
        self.done: dict[str, dict] = {}
        self._lock = threading.Lock()
        # Open for the whole batch (close() closes it), before anything runs: a file
        # sbx cannot write is refused now, not after the first job.
        try:
            self._file = open(path, "ab")  # noqa: SIM115
        except OSError as e:
            raise UsageError(
                f"cannot open the results file {path!r} for writing: {e.strerror}"
            ) from e
        try:
            # Only a regular file holds earlier results: /dev/null, a pipe or a
            # device is written to, never read (reading /dev/zero would not end).
            if stat.S_ISREG(os.fstat(self._file.fileno()).st_mode):
                self._repair_and_load()
        except BaseException:
            self._file.close()
            raise
        self._synced = time.monotonic()

    def _repair_and_load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UsageError(
                f"cannot read the results file {self.path!r}: {e.strerror}"
            ) from e
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        if tail:
            log.warning(
                "results file %s: dropping a last line cut short (%d bytes)",
                self.path,
                len(tail),
            )
            os.ftruncate(self._file.fileno(), len(data) - len(tail))
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                self.done[str(entry["id"])] = entry
            except (ValueError, KeyError, TypeError) as e:
                raise UsageError(
                    f"{self.path}:{number} is not a result line of sbx batch; "
                    "give --out a new file or the results file of this batch"
                ) from e

    def append(self, entry: dict) -> None:
        line = json.dumps(entry, sort_keys=False, separators=(",", ":")) + "\n"
        with self._lock:
            self._file.write(line.encode())
            self._file.flush()
            if time.monotonic() - self._synced >= self.SYNC_EVERY_S:
                self._sync()
                self._synced = time.monotonic()

    def close(self) -> None:
        with self._lock:
            try:
                self._file.flush()
                self._sync()
            finally:
                try:
                    self._file.close()
                except OSError:
                    pass  # its flush failed just above, and that error is raised

    def _sync(self) -> None:
        try:
            os.fsync(self._file.fileno())
        except OSError as e:
            # A results "file" that cannot be synced (/dev/null, a pipe) has no disk
            # copy to make durable; any other failure is the disk's, and said.
            if e.errno != errno.EINVAL:
                raise


# --- running -----------------------------------------------------------------------


@record
class Summary:
    total_jobs: int = 0
    skipped: int = 0  # already in the results file
    ran: int = 0
    verdicts: Counter = factory(Counter)
    slowest: list = factory(list)  # (wall_time_s, id), slowest first
    cpu_time_s: float = 0.0  # summed over the jobs run now
    job_wall_time_s: float = 0.0  # summed over the jobs run now
    elapsed_s: float = 0.0  # wall time of the whole batch
    interrupted: bool = False
    pinned: list | None = None  # each worker's CPUs (None: not pinned), if any was

    def add(self, entry: dict) -> None:
        self.ran += 1
        self.verdicts[entry["verdict"]] += 1
        wall = entry.get("wall_time_s") or 0.0
        self.job_wall_time_s += wall
        self.cpu_time_s += (entry.get("cpu_time_s") or {}).get("total", 0.0)
        self.slowest = sorted(self.slowest + [(wall, entry["id"])], reverse=True)[:5]

    @property
    def all_ok(self) -> bool:
        return set(self.verdicts) <= {OK}


class _Slot:
    """What a worker is running, so stop() can kill it: a pidfd of the sandbox's
    init (immune to pid reuse), and whether stop() killed it. Compared by identity."""

    __slots__ = ("pidfd", "killed")

    def __init__(self) -> None:
        self.pidfd: int | None = None
        self.killed = False


class Batch:
    """Run jobs on `workers` threads, appending to a ResultsFile.

    Call run() from one thread (the main thread, to get Ctrl-C handling from the
    CLI); on_result(entry, summary) is called on that thread after each job.
    """

    def __init__(
        self,
        jobs: list[Job],
        results: ResultsFile,
        workers: int,
        keep_output_bytes: int = DEFAULT_KEEP_OUTPUT_BYTES,
        pin: bool = True,
    ) -> None:
        if workers < 1:
            raise UsageError(f"--jobs {workers}: use at least 1 worker")
        self.results = results
        self.workers = workers
        self.keep_output_bytes = keep_output_bytes
        self.summary = Summary(total_jobs=len(jobs))
        self.pending = [j for j in jobs if j.id not in results.done]
        self.summary.skipped = len(jobs) - len(self.pending)
        self.plans = base_plans(self.pending)
        self.threads = min(workers, max(1, len(self.pending)))
        self.shares = cpu_shares(self.threads, os.sched_getaffinity(0)) if pin else None
        if self.shares is not None:
            self.shares = _unless_a_job_needs_more(self.shares, self.plans.values())
        self._pinned: list[list[int] | None] = [None] * self.threads  # as it went
        self._next = iter(self.pending)
        self._next_lock = threading.Lock()
        self._slots_lock = threading.Lock()
        self._live: list[_Slot] = []  # slots whose sandbox is running
        self._stopping = threading.Event()
        self._finished: queue.Queue = queue.Queue()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        """Take no new job; kill the sandboxes running now (their jobs are not
        written, so a rerun runs them). Safe to call from a signal handler."""
        self._stopping.set()

    def run(self, on_result: Callable[[dict, Summary], None] | None = None) -> Summary:
        started = time.monotonic()
        threads = [
            threading.Thread(
                target=self._worker, args=(n,), name=f"sbx-batch-{n}", daemon=True
            )
            for n in range(self.threads)
        ]
        for thread in threads:
            thread.start()
        alive = len(threads)
        killed = False
        write_error: OSError | None = None
        while alive:
            if self._stopping.is_set() and not killed:
                self._kill_running()
                killed = True
            try:
                done = self._finished.get(timeout=0.1)
            except queue.Empty:
                continue
            if done is None:
                alive -= 1
                continue
            # Checked, written and counted here, while the worker already runs its
            # next job: the sandboxes never wait for the bookkeeping.
            if write_error is not None:
                continue  # after a failed write, the file gets nothing more
            entry = self._entry(*done)
            try:
                self.results.append(entry)
            except OSError as e:
                # Nowhere to put results: stop as Ctrl-C does (the jobs not written
                # are run again by a rerun; a line cut short is dropped then), and
                # say why once the sandboxes are gone.
                write_error = e
                self.stop()
                continue
            self.summary.add(entry)
            if on_result is not None:
                on_result(entry, self.summary)
        for thread in threads:
            thread.join()
        if write_error is not None:
            raise SandboxError(
                f"cannot write the results file {self.results.path!r} "
                f"({write_error.strerror}): stopped; a rerun runs the jobs not in it"
            )
        self.summary.interrupted = self._stopping.is_set()
        if any(self._pinned):
            self.summary.pinned = list(self._pinned)
        self.summary.elapsed_s = time.monotonic() - started
        return self.summary

    def _take(self) -> Job | None:
        if self._stopping.is_set():
            return None
        with self._next_lock:
            return next(self._next, None)

    def _worker(self, n: int) -> None:
        slot = _Slot()
        cpus = self._pin(n)
        # Warm sandboxes for this worker's jobs: they die with this thread.
        pool = warm.Pool()
        try:
            while (job := self._take()) is not None:
                result = self._run_job(job, slot, pool)
                if result is not None:
                    self._finished.put((job, result, cpus))
        finally:
            pool.close()
            self._finished.put(None)

    def _pin(self, n: int) -> list[int] | None:
        """Pin this worker thread to its share of the CPUs: every process it starts
        for its jobs (warm sandbox, launcher, init, payload) inherits the affinity.
        The CPUs, or None when unpinned."""
        if self.shares is None:
            return None
        share = self.shares[n]
        try:
            os.sched_setaffinity(0, share)  # 0: this thread alone
        except OSError as e:
            log.warning("worker %d: cannot pin it to CPUs %s (%s): its jobs may run "
                        "on every CPU", n, _cpu_list(share), e.strerror)
            return None
        self._pinned[n] = sorted(share)
        return self._pinned[n]

    def _run_job(self, job: Job, slot: _Slot, pool: warm.Pool) -> Result | None:
        """Run one job; its result, or None when stop() killed it."""
        try:
            plan = job_plan(self.plans[job.plan_key], job)
            try:
                result = pool.run(plan, on_start=lambda pid, cg: self._started(slot, pid))
            except SandboxError as e:
                result = Result(verdict=IE, error=str(e))
        except OSError as e:
            result = Result(verdict=IE, error=f"cannot read a file of job {job.id!r}: {e}")
        except Exception as e:  # noqa: BLE001 - a bug must cost one job, not the batch
            log.exception("job %r: internal error", job.id)
            result = Result(verdict=IE, error=f"internal error: {type(e).__name__}: {e}")
        finally:
            killed = self._finish_slot(slot)
        # A job still running when stop() came is not written, killed or not: a
        # Ctrl-C on a terminal may also have reached it and changed its verdict.
        if killed or self._stopping.is_set():
            return None
        return result

    def _started(self, slot: _Slot, init_pid: int) -> None:
        with self._slots_lock:
            slot.pidfd = os.pidfd_open(init_pid)
            self._live.append(slot)
            if self._stopping.is_set():
                self._kill_slot(slot)

    def _finish_slot(self, slot: _Slot) -> bool:
        with self._slots_lock:
            if slot in self._live:
                self._live.remove(slot)
            if slot.pidfd is not None:
                os.close(slot.pidfd)
                slot.pidfd = None
            killed, slot.killed = slot.killed, False
            return killed

    def _kill_running(self) -> None:
        with self._slots_lock:
            for slot in self._live:
                self._kill_slot(slot)

    @staticmethod
    def _kill_slot(slot: _Slot) -> None:
        """SIGKILL to the sandbox's init ends its pid namespace, so every process of
        the run; the supervisor in the worker then reaps and removes the rest."""
        if slot.pidfd is None or slot.killed:
            return
        slot.killed = True
        try:
            signal.pidfd_send_signal(slot.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _entry(self, job: Job, result: Result, cpus: list[int] | None) -> dict:
        check = None
        if job.expected is not None and result.verdict == OK:
            check = checkers.check(
                job.checker, result.stdout or b"", job.expected, job.tolerance
            )
            if not check.passed:
                result.verdict = WA
        data = result.to_dict()
        keep = self.keep_output_bytes
        for stream in ("stdout", "stderr"):
            raw = getattr(result, stream)
            if raw is not None:
                data[stream] = raw[:keep].decode("utf-8", "backslashreplace")
                if len(raw) > keep:
                    data[f"{stream}_truncated_bytes"] = len(raw) - keep
        check_data = check.to_dict() if check else None
        return {"id": job.id, **data, "check": check_data, "cpus_pinned": cpus}


def cpu_shares(workers: int, cpus: Iterable[int]) -> list[frozenset[int]] | None:
    """Each worker's CPUs: the CPUs sbx may use, dealt out in turn (three CPUs, two
    workers: {0, 2} and {1}). None, for no pinning, with one worker (nothing to
    share) or more workers than CPUs (each worker would get less than a CPU)."""
    ordered = sorted(cpus)
    if workers < 2 or workers > len(ordered):
        return None
    return [frozenset(ordered[n::workers]) for n in range(workers)]


def _unless_a_job_needs_more(
    shares: list[frozenset[int]], plans: Iterable[Plan]
) -> list[frozenset[int]] | None:
    """No pinning when a job's CPU quota (`cpus`) is more than the smallest share:
    pinning would silently lower its limit."""
    smallest = min(len(share) for share in shares)
    wanting = [p.limits.cpus for p in plans if (p.limits.cpus or 0) > smallest]
    if wanting:
        log.info("jobs ask for %g CPUs, more than a worker's %d: not pinning workers",
                 max(wanting), smallest)
        return None
    return shares


def _cpu_list(cpus: Iterable[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


# --- the summary -------------------------------------------------------------------


def format_summary(summary: Summary) -> str:
    """The end-of-batch report as plain text lines."""
    lines = []
    state = "interrupted" if summary.interrupted else "done"
    lines.append(
        f"batch {state}: {summary.ran} run now, {summary.skipped} already in the "
        f"results file, {summary.total_jobs} jobs in all"
    )
    if summary.ran:
        lines.append("verdict  count")
        for verdict, count in summary.verdicts.most_common():
            lines.append(f"{verdict:<8} {count:>5}")
        lines.append(
            "slowest: " + ", ".join(f"{i} {w:.3f} s" for w, i in summary.slowest)
        )
        rate = summary.ran / summary.elapsed_s if summary.elapsed_s else 0.0
        lines.append(
            f"wall {summary.elapsed_s:.2f} s ({rate:.1f} runs/s); summed over jobs: "
            f"wall {summary.job_wall_time_s:.2f} s, CPU {summary.cpu_time_s:.2f} s"
        )
    if summary.pinned:
        shares = " | ".join(
            _cpu_list(share) if share else "not pinned" for share in summary.pinned
        )
        lines.append(f"CPUs, one share per worker (--no-pin to share them): {shares}")
    return "\n".join(lines)


def progress_line(entry: dict, summary: Summary) -> str:
    """A plain line per finished job (for logs and pipes)."""
    done = summary.ran + summary.skipped
    extra = ""
    if entry.get("check") and not entry["check"]["passed"]:
        extra = f" ({entry['check']['detail']})"
    elif entry.get("error"):
        extra = f" ({entry['error']})"
    return (
        f"[{done}/{summary.total_jobs}] {entry['id']} {entry['verdict']} "
        f"{entry.get('wall_time_s', 0.0):.3f} s{extra}"
    )


def progress_bar(summary: Summary, width: int = 30) -> str:
    """A one-line bar for a terminal, redrawn in place."""
    done = summary.ran + summary.skipped
    total = max(1, summary.total_jobs)
    filled = int(width * done / total)
    counts = " ".join(f"{v} {n}" for v, n in sorted(summary.verdicts.items()))
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {done}/{summary.total_jobs} {counts}"
    )
