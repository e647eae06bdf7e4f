"""The result of one run: a value, never an exception. Printable as JSON with stable
field names (see DESIGN.md, "Results")."""

from __future__ import annotations

import signal as _signal

from . import __version__
from .record import asdict, factory, record

OK, RE, TLE, MLE, OLE, SV, IE = "OK", "RE", "TLE", "MLE", "OLE", "SV", "IE"
TIME_LIMIT_EXIT = 124
INTERNAL_ERROR_EXIT = 125


@record
class LimitReport:
    value: float | int | None
    mechanism: str  # cgroup2 | cgroup1 | rlimit | supervisor | none


@record
class Result:
    verdict: str
    exit_code: int | None = None  # the payload's own exit code, if it exited
    signal: str | None = None  # the fatal signal's name, if it was killed by one
    reason: str | None = None  # TLE: "cpu" or "wall"; OLE: "output" or "fsize"; ...
    cpu_time_s: dict = factory(lambda: {"user": 0.0, "system": 0.0, "total": 0.0})
    wall_time_s: float = 0.0
    peak_memory_bytes: int | None = None
    oom_killed: bool = False
    limits: dict = factory(dict)
    violation: dict | None = None  # SV: {"syscall": name}
    rootfs: dict | None = None  # {"name": "host" or an image, "mode": how it was made}
    error: str | None = None  # IE: what sbx could not do
    warnings: list = factory(list)
    stdout: bytes | None = None
    stderr: bytes | None = None
    sbx_version: str = __version__

    @property
    def sbx_exit_code(self) -> int:
        """The exit status of `sbx exec` for this result (DESIGN.md conventions)."""
        if self.verdict == TLE:
            return TIME_LIMIT_EXIT
        if self.verdict == IE:
            return self.extra_exit or INTERNAL_ERROR_EXIT
        if self.signal is not None:
            code = 128 + _signal.Signals[self.signal].value
        else:
            code = self.exit_code or 0
        if code == 0 and self.verdict != OK:
            # A limit sbx imposed (MLE, OLE, SV) on a payload that still exited 0, or
            # a checker's WA: never let the exit status read as success.
            return 128 + _signal.SIGKILL
        return code

    extra_exit: int | None = None  # IE: 126 or 127 for a command that cannot run

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("extra_exit")
        for stream in ("stdout", "stderr"):
            raw = data[stream]
            if raw is None:
                data.pop(stream)
                continue
            try:
                data[stream] = raw.decode("utf-8")
            except UnicodeDecodeError:
                # Not text: exact bytes in base64, never an escaped look-alike.
                import base64

                data[stream] = None
                data[f"{stream}_base64"] = base64.b64encode(raw).decode("ascii")
        return data


def signal_name(number: int) -> str:
    try:
        return _signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def decide(
    status: int | None,
    tripped: tuple[str, str] | None,
    oom_killed: bool,
    violation: str | None,
) -> tuple[str, str | None]:
    """The verdict and its reason, from how the payload ended and what sbx saw.

    Precedence: a seccomp violation, then an OOM kill in the run's cgroup (MLE
    whatever signal the payload died of), then the limit the supervisor tripped
    first, then how the payload itself ended.
    """
    if violation is not None:
        return SV, "seccomp"
    if status is not None and _died_of(status, _signal.SIGSYS) and tripped is None:
        return SV, "seccomp"
    if oom_killed:
        return MLE, "memory"
    if tripped is not None:
        return tripped
    if status is not None and _died_of(status, _signal.SIGXCPU):
        return TLE, "cpu"
    if status is not None and _died_of(status, _signal.SIGXFSZ):
        return OLE, "fsize"
    if status is not None and (os_exited(status) and exit_of(status) == 0):
        return OK, None
    return RE, None


def os_exited(status: int) -> bool:
    return (status & 0x7F) == 0


def exit_of(status: int) -> int:
    return (status >> 8) & 0xFF


def signal_of(status: int) -> int | None:
    sig = status & 0x7F
    return None if sig in (0, 0x7F) else sig


def _died_of(status: int, sig: int) -> bool:
    return signal_of(status) == sig
