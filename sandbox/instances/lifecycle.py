"""create, start, stop, rm, ps and logs of instances.

Every state change happens under the instance's lock (store.locked); waiting for a
process to end (stop's grace period) happens outside it, so the supervisor can record
how its run ended meanwhile.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time

from ..errors import SandboxError, UsageError
from ..plan import Plan
from . import daemon, store
from .store import InstanceError

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0
KILL_WAIT_S = 5.0
CGROUP_REMOVE_TIMEOUT_S = 2.0
# `sbx exec` options that make no sense for an instance, and why.
NOT_FOR_INSTANCES = {
    "stdin": "an instance reads nothing (its stdin is /dev/null)",
    "stdout": "an instance's output is kept for `sbx logs`",
    "stderr": "an instance's output is kept for `sbx logs`",
    "json": "an instance's end is shown by `sbx ps -a`",
    "result": "an instance's end is shown by `sbx ps -a`",
}
PATH_OPTIONS = ("seccomp", "dir")
CLI_ONLY_OPTIONS = ("verbose", "quiet", "help")


# --- create ------------------------------------------------------------------------


def create(name: str, command: list[str], options: dict) -> dict:
    """Record a new instance that will run `command` with these `sbx exec` options
    (as execopts.parse returns them). Raises UsageError or InstanceError."""
    store.check_name(name)
    options = _instance_options(options)
    if os.geteuid() == 0 and "host_id" not in options:
        # One host id for the instance's whole life (its /box is chowned to it).
        from ..api import fresh_root_host_id

        options["host_id"] = fresh_root_host_id()
    own_box = options.get("dir") is None
    plan = _plan(command, options)  # checks every option before anything is made
    with store.locked(name, must_exist=False):
        if os.path.exists(store.instance_dir(name)):
            raise InstanceError(_exists_message(name))
        os.makedirs(store.instance_dir(name), mode=0o700)
        try:
            if own_box:
                options["dir"] = _make_box(name, plan)
            summary = {
                "rootfs": plan.rootfs,
                "profile": plan.profile,
                "limits": limit_summary(plan),
                "box_dir": options["dir"],
                "own_box": own_box,
            }
            state = store.new_state(name, command, options, summary)
            store.save(name, state)
        except BaseException:
            store.remove_tree(store.instance_dir(name))
            raise
    log.info("created instance %s", name)
    return state


def _exists_message(name: str) -> str:
    try:
        current = store.observe(store.load(name))["state"]
    except InstanceError:
        current = "unreadable"
    force = "-f " if current == "running" else ""
    return (
        f"an instance named {name!r} already exists ({current}); choose another name "
        f"or remove it first with `sbx rm {force}{name}`"
    )


def _instance_options(options: dict) -> dict:
    out = {}
    for key, value in options.items():
        if key in NOT_FOR_INSTANCES and value:
            flag = "--" + key.replace("_", "-")
            why = NOT_FOR_INSTANCES[key]
            raise UsageError(f"{flag} does not apply to instances: {why}")
        if key in CLI_ONLY_OPTIONS or value is None or value == []:
            continue
        if key in PATH_OPTIONS or (key == "profile" and _is_path(value)):
            value = os.path.abspath(value)
        if key == "env":
            value = [list(pair) for pair in value]
        if repr(value) == "UNLIMITED":  # --wall none and the like, kept as text
            value = "none"
        out[key] = value
    return out


def _is_path(profile: str) -> bool:
    return "/" in profile or profile.endswith(".toml")


def _make_box(name: str, plan: Plan) -> str:
    """The instance's /box on the host, writable by the payload's host id."""
    box = store.path_of(name, "box")
    os.mkdir(box, 0o700)
    if os.geteuid() == 0 and plan.ids.switch_to is not None:
        os.chown(box, *plan.ids.switch_to)
    elif plan.ids.use_helpers:
        # The payload runs as a subordinate id the caller cannot chown to; the box's
        # parent (0700, the caller's) keeps every other host user out.
        os.chmod(box, 0o777)
    return box


def limit_summary(plan: Plan) -> dict:
    limits = plan.limits
    return {
        "memory_max_bytes": limits.memory_max_bytes,
        "pids_max": limits.pids_max,
        "cpus": limits.cpus,
        "cpu_time_s": limits.cpu_time_s,
        "wall_timeout_s": limits.wall_timeout_s,
    }


def _plan(command: list[str], options: dict) -> Plan:
    from .. import api

    options = dict(options)
    if "env" in options:
        options["env"] = [tuple(pair) for pair in options["env"]]
    profile = options.pop("profile", None)
    options.pop("log_max", None)
    return api.plan_for(list(command), profile, **options)


# --- start -------------------------------------------------------------------------


def start(name: str) -> dict:
    """Start a created or exited instance; returns its state once it runs."""
    with store.locked(name):
        state = store.load(name)
        view = store.observe(state)
        if view["state"] == "running":
            raise InstanceError(
                f"instance {name!r} is already running (supervisor pid "
                f"{state['run']['supervisor']['pid']}); stop it first with "
                f"`sbx stop {name}`"
            )
        if state["state"] == "running":
            _settle(name, state, view)
        plan = _plan(state["command"], state["options"])
        log_max = state["options"].get("log_max", daemon.LOG_MAX_BYTES)
        run, commit = daemon.launch(name, plan, log_max)
        state.update(state="running", run=run, exit=None)
        store.save(name, state)
        commit()
    log.info("started instance %s", name)
    return state


def _settle(name: str, state: dict, view: dict) -> None:
    """Record that a run whose supervisor died is over, and remove its cgroup."""
    remove_cgroup(state["run"])
    state["state"] = "exited"
    state["exit"] = view["exit"]
    store.save(name, state)


# --- stop --------------------------------------------------------------------------


def stop(name: str, grace_s: float = STOP_GRACE_S) -> dict | None:
    """SIGTERM to the payload (through the supervisor and init), SIGKILL to the
    sandbox after grace_s. Returns how it ended, or None if it was not running."""
    with store.locked(name):
        state = store.load(name)
        view = store.observe(state)
        if view["state"] != "running":
            if state["state"] == "running":
                _settle(name, state, view)
            return None
        run = state["run"]
        run["stop_requested_at"] = time.time()
        store.save(name, state)
        supervisor_fd = _pidfd(run["supervisor"])
        if supervisor_fd is not None:
            signal.pidfd_send_signal(supervisor_fd, signal.SIGTERM)
    if supervisor_fd is None:
        return _after_stop(name, run["id"])  # it died just now
    try:
        log.info("instance %s: SIGTERM sent; waiting up to %.1f s", name, grace_s)
        if not _wait_fd(supervisor_fd, grace_s):
            log.info("instance %s: still running after %.1f s: SIGKILL", name, grace_s)
            _note_kill(name, run["id"])
            _kill_init(run)
            if not _wait_fd(supervisor_fd, KILL_WAIT_S):
                signal.pidfd_send_signal(supervisor_fd, signal.SIGKILL)
                _wait_fd(supervisor_fd, KILL_WAIT_S)
    finally:
        os.close(supervisor_fd)
    return _after_stop(name, run["id"])


def _note_kill(name: str, run_id: str) -> None:
    """Record that the grace period ran out, for the supervisor to report why."""
    with store.locked(name):
        state = store.load(name)
        if state["state"] == "running" and state["run"]["id"] == run_id:
            state["run"]["killed_at"] = time.time()
            store.save(name, state)


def _after_stop(name: str, run_id: str) -> dict | None:
    try:
        with store.locked(name):
            state = store.load(name)
            view = store.observe(state)
            same_run = (state.get("run") or {}).get("id") == run_id
            if same_run and state["state"] == "running" and view["state"] != "running":
                _settle(name, state, view)
            return view.get("exit") if same_run else None
    except InstanceError:
        return None  # removed meanwhile


def _pidfd(ident: dict) -> int | None:
    """A pidfd for a recorded process, or None if it is no longer that process."""
    from ..kernel import libc

    try:
        fd = libc.pidfd_open(ident["pid"])
    except OSError:
        return None
    if not store.is_alive(ident):  # checked after opening: the fd names this process
        os.close(fd)
        return None
    return fd


def _wait_fd(fd: int, timeout_s: float) -> bool:
    """True once the process of a pidfd has ended."""
    return bool(select.select([fd], [], [], timeout_s)[0])


def _kill_init(run: dict) -> None:
    """SIGKILL the sandbox's init, the last step of a stop: its pid namespace dies
    with it, and the supervisor records the end and removes the cgroup."""
    init_fd = _pidfd(run["init"])
    if init_fd is None:
        return
    try:
        signal.pidfd_send_signal(init_fd, signal.SIGKILL)
    finally:
        os.close(init_fd)


# --- rm ----------------------------------------------------------------------------


def remove(name: str, force: bool = False) -> None:
    """Remove an instance: its state, its box and logs, and any cgroup left behind.
    A running instance is refused unless force, which kills it first."""
    with store.locked(name):
        state = store.load(name)
        view = store.observe(state)
        if view["state"] == "running":
            if not force:
                raise InstanceError(
                    f"instance {name!r} is running; stop it first (`sbx stop {name}`) "
                    f"or remove it anyway with `sbx rm -f {name}`"
                )
            _kill_now(state["run"])
        if state.get("run"):
            remove_cgroup(state["run"])
        store.remove_tree(store.instance_dir(name))
        store.remove_lock(name)
    log.info("removed instance %s", name)


def _kill_now(run: dict) -> None:
    """SIGKILL the supervisor (the sandbox dies with it) and wait for both."""
    for ident in (run["supervisor"], run["init"]):
        fd = _pidfd(ident)
        if fd is None:
            continue
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            if not _wait_fd(fd, KILL_WAIT_S):
                raise SandboxError(
                    f"process {ident['pid']} of the instance did not die within "
                    f"{KILL_WAIT_S:.0f} s of SIGKILL"
                )
        finally:
            os.close(fd)


def remove_cgroup(run: dict) -> None:
    """Kill what is left in the run's cgroup directories and remove them (the
    supervisor does this itself unless it was killed)."""
    dirs = dict.fromkeys(((run.get("cgroup") or {}).get("dirs") or {}).values())
    for directory in dirs:
        if os.path.isdir(directory):
            _remove_cgroup_dir(directory)


def _remove_cgroup_dir(directory: str) -> None:
    procs = os.path.join(directory, "cgroup.procs")
    deadline = time.monotonic() + CGROUP_REMOVE_TIMEOUT_S
    while True:
        for pid in _read_pids(procs):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.rmdir(directory)
            log.info("removed the leftover cgroup %s", directory)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"cannot remove the instance's cgroup {directory}: "
                    f"{os.strerror(e.errno)}; tasks left: {_read_pids(procs)}"
                ) from e
        time.sleep(0.01)


def _read_pids(path: str) -> list[int]:
    try:
        with open(path) as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


# --- ps and logs -------------------------------------------------------------------


def list_instances(include_stopped: bool = False) -> list[dict]:
    """Every instance as it really is (see store.observe); running ones only unless
    include_stopped."""
    views = []
    for name in store.list_names():
        try:
            view = store.observe(store.load(name))
        except InstanceError:
            continue  # removed while listing
        if include_stopped or view["state"] == "running":
            views.append(view)
    return views


def get(name: str) -> dict:
    with store.locked(name):
        return store.observe(store.load(name))


def log_parts(name: str, stream: str) -> list[str]:
    """The files holding a stream's output, oldest first."""
    current = store.path_of(name, f"{stream}.log")
    return [p for p in (current + ".1", current) if os.path.exists(p)]
