"""Named loggers for the `sbx exec` path that import `logging` only when it is used.

Every module still has its own logger (`log = log.getLogger(__name__)`) with the usual
methods. Importing `logging` costs about as much as the rest of sbx's start, and most
runs log nothing: a DEBUG or INFO message can only be shown once something has
imported and configured `logging` (the CLI with -v, or an application using the API),
so until then it is dropped without importing it. A WARNING or ERROR always goes
through `logging`: it imports it, lets the CLI install its handler (`on_first_use`),
and is shown by the application's handlers (a NullHandler on the "sandbox" logger
keeps the library itself quiet otherwise: warnings are also in each Result).
"""

from __future__ import annotations

import _thread
import os
import sys

# Set by the CLI: called once when `logging` is first needed, to install its handler.
on_first_use = None
_first_use_lock = _thread.allocate_lock()  # sbx batch logs from several threads


def _new_lock_in_child() -> None:
    # A fork while another thread held the lock would leave it held for good in the
    # child (a zygote logs before it execs).
    global _first_use_lock
    _first_use_lock = _thread.allocate_lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


class Logger:
    __slots__ = ("name", "_logger")

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger = None

    def _real(self):
        if self._logger is None:
            global on_first_use
            import logging

            with _first_use_lock:
                if on_first_use is not None:
                    configure, on_first_use = on_first_use, None
                    configure()
                _quiet_library(logging)
            self._logger = logging.getLogger(self.name)
        return self._logger

    def debug(self, *args, **kwargs) -> None:
        if "logging" in sys.modules:
            self._real().debug(*args, **kwargs)

    def info(self, *args, **kwargs) -> None:
        if "logging" in sys.modules:
            self._real().info(*args, **kwargs)

    def warning(self, *args, **kwargs) -> None:
        self._real().warning(*args, **kwargs)

    def error(self, *args, **kwargs) -> None:
        self._real().error(*args, **kwargs)

    def exception(self, *args, **kwargs) -> None:
        self._real().exception(*args, **kwargs)


_library_quieted = False


def _quiet_library(logging) -> None:
    """A library prints nothing on its own: without handlers of the application's,
    sbx's warnings stay in each Result's `warnings` (the CLI installs its own)."""
    global _library_quieted
    if not _library_quieted:
        _library_quieted = True
        logging.getLogger("sandbox").addHandler(logging.NullHandler())


def getLogger(name: str) -> Logger:  # noqa: N802 - the name logging users know
    return Logger(name)
