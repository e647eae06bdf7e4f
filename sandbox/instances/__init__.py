"""Instances: sandboxes that keep running, with the container verbs people know.

    create(name, command, options) -> state     start(name) -> state
    stop(name, grace_s) -> exit or None          remove(name, force)
    list_instances(include_stopped) -> [state]   get(name) -> state
    enter(name, argv) -> exit status             stats: sample() and compare()

No daemon: each running instance has its own detached supervisor (daemon.py). State
lives under the caller's XDG state directory (store.py).
"""

from .enter import enter
from .lifecycle import create, get, list_instances, log_parts, remove, start, stop
from .store import InstanceError

__all__ = [
    "InstanceError",
    "create",
    "enter",
    "get",
    "list_instances",
    "log_parts",
    "remove",
    "start",
    "stop",
]
