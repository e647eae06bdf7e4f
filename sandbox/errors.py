"""Exceptions of sbx.

A verdict on the payload (OK, RE, TLE, ...) is never an exception: it is a field of
:class:`sandbox.result.Result`. Exceptions are for the two other outcomes::

    SbxError                 base; carries the exit status `sbx` ends with
    ├── UsageError           the caller asked for something wrong (bad flag, profile,
    │                        path); exit 2, nothing was started
    └── SandboxError         the host cannot do what was asked (a kernel call failed,
        │                    a required mechanism is missing); exit 125, verdict IE
        └── ExecError        the payload's command could not be executed inside the
                             sandbox; exit 126 (not executable) or 127 (not found)
"""

from __future__ import annotations

import errno
import os


class SbxError(Exception):
    exit_code = 1


class UsageError(SbxError):
    exit_code = 2


class SandboxError(SbxError):
    exit_code = 125


class ExecError(SandboxError):
    def __init__(self, command: str, err: int) -> None:
        self.command = command
        self.errno = err
        self.exit_code = 127 if err == errno.ENOENT else 126
        reason = "not found" if err == errno.ENOENT else os.strerror(err)
        super().__init__(f"cannot execute {command!r} inside the sandbox: {reason}")


def kernel_error(call: str, err: int, hint: str = "") -> SandboxError:
    """A SandboxError naming the failed kernel call, its errno and what to do."""
    name = errno.errorcode.get(err, str(err))
    message = f"{call} failed: {name} ({os.strerror(err)})"
    return SandboxError(f"{message}; {hint}" if hint else message)
