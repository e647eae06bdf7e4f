"""`sbx doctor`: what this host lets sbx do, for the user who asks, and how to fix
what is missing.

Each check tries the real thing where it can (a user namespace, an overlay inside
one) in a forked child, so the answer is the kernel's, not a guess from sysctls; the
sysctls are then used to explain a failure. The CLI calls `run_checks`, prints
`render(...)` and exits with `exit_code(...)`: non-zero when `sbx exec` cannot run.
"""

from __future__ import annotations

import ctypes
import errno
import json as jsonlib
import os
import pwd
import shutil
import stat
import tempfile
from dataclasses import asdict, dataclass, field

from .kernel import cgroups
from .plan import Limits

OK, WARN, FAIL, INFO = "ok", "warn", "fail", "info"

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_MS_REC = 16384
_MS_PRIVATE = 1 << 18

# Limits a grader typically asks for: used to say which mechanism would enforce each.
_SAMPLE_LIMITS = Limits(
    memory_max_bytes=256 << 20, pids_max=64, cpus=1.0, cpu_time_s=2.0
)


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn", "fail" or "info"
    summary: str
    detail: list[str] = field(default_factory=list)
    fix: str | None = None
    data: dict = field(default_factory=dict)  # machine-readable facts for --json


# --- small helpers -----------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _sysctl(name: str) -> int | None:
    text = _read("/proc/sys/" + name.replace(".", "/"))
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]


def _check_call(what: str, result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)


def _unshare(flags: int) -> None:
    _check_call(f"unshare({flags:#x})", _libc.unshare(flags))


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    _check_call(
        f"mount -t {fstype} {target}",
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
    )


def _write_file(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise OSError(e.errno, e.strerror, f"write {path}") from None


def _in_child(body) -> tuple[str, int] | None:
    """Run `body` in a forked child. None when it succeeded, else (the failed step,
    errno)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(read_end)
            body()
        except OSError as e:
            os.write(write_end, f"{e.errno}\0{e.filename or e}".encode())
            code = 1
        except BaseException as e:  # noqa: BLE001 - the child must always exit
            os.write(write_end, f"0\0{e}".encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        report = f.read().decode(errors="replace")
    os.waitpid(pid, 0)
    if not report:
        return None
    err, _, step = report.partition("\0")
    return step, int(err)


def _failure_text(step: str, err: int) -> str:
    if not err:
        return step  # not a kernel call: the child's own error
    return f"{step} failed: {errno.errorcode.get(err, err)} ({os.strerror(err)})"


def _enter_user_namespace(also: int = 0) -> None:
    """In a child: a new user namespace (plus `also`), mapping our ids to root."""
    uid, gid = os.geteuid(), os.getegid()
    _unshare(_CLONE_NEWUSER | also)
    _write_file("/proc/self/setgroups", "deny")
    _write_file("/proc/self/uid_map", f"0 {uid} 1\n")
    _write_file("/proc/self/gid_map", f"0 {gid} 1\n")


# --- user namespaces -----------------------------------------------------------------


def check_user_namespaces() -> Check:
    sysctls = {
        "user.max_user_namespaces": _sysctl("user.max_user_namespaces"),
        "kernel.unprivileged_userns_clone": _sysctl("kernel.unprivileged_userns_clone"),
        "kernel.apparmor_restrict_unprivileged_userns": _sysctl(
            "kernel.apparmor_restrict_unprivileged_userns"
        ),
    }
    shown = [f"{k} = {v}" for k, v in sysctls.items() if v is not None]
    failure = _in_child(_enter_user_namespace)
    data = {"sysctls": sysctls, "works": failure is None}
    if failure is None:
        return Check(
            "user namespaces",
            OK,
            f"uid {os.geteuid()} can create a user namespace and map its ids",
            shown,
            data=data,
        )
    step, err = failure
    why, fix = _explain_userns_failure(step, err, sysctls)
    return Check(
        "user namespaces",
        FAIL,
        f"cannot create a user namespace: {_failure_text(step, err)}",
        [why, *shown],
        fix,
        data,
    )


def _explain_userns_failure(step: str, err: int, sysctls: dict) -> tuple[str, str]:
    if sysctls["user.max_user_namespaces"] == 0:
        return (
            "user.max_user_namespaces is 0: user namespaces are switched off",
            "sysctl -w user.max_user_namespaces=15000 (and in /etc/sysctl.d)",
        )
    if sysctls["kernel.unprivileged_userns_clone"] == 0 and os.geteuid() != 0:
        return (
            "kernel.unprivileged_userns_clone is 0: only root may create them",
            "sysctl -w kernel.unprivileged_userns_clone=1 (and in /etc/sysctl.d)",
        )
    if sysctls["kernel.apparmor_restrict_unprivileged_userns"] == 1:
        return (
            "AppArmor restricts unprivileged user namespaces (Ubuntu 23.10 and "
            "later): the namespace is created but without capabilities, so the id "
            "maps cannot be written",
            "add an AppArmor profile granting `userns,` to sbx's python, or "
            "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0",
        )
    if err in (errno.ENOSPC, errno.EUSERS):
        return (
            "the limit on user namespaces (user.max_user_namespaces) is reached",
            "raise user.max_user_namespaces",
        )
    return (
        "the kernel refused; a seccomp filter of a container around sbx can do this",
        "run sbx on the host, or in a container allowed to create user namespaces",
    )


# --- overlayfs -----------------------------------------------------------------------


def check_overlay() -> Check:
    scratch = tempfile.mkdtemp(prefix="sbx-doctor-")
    try:
        failure = _in_child(lambda: _overlay_in_userns(scratch))
    finally:
        os.rmdir(scratch)
    if failure is None:
        return Check(
            "overlayfs in a user namespace",
            OK,
            "an overlay with a tmpfs upper layer mounts inside a user namespace",
            data={"works": True},
        )
    step, err = failure
    return Check(
        "overlayfs in a user namespace",
        WARN,
        "overlayfs cannot be mounted in a user namespace: "
        + _failure_text(step, err),
        [
            "the default `host` root (read-only binds) still works; root file "
            "system images that need an overlay do not",
            "overlayfs in user namespaces needs Linux 5.11 or later (Ubuntu and "
            "Debian kernels had it earlier as a patch)",
        ],
        "use a newer kernel, or the `host` root",
        {"works": False, "step": step, "errno": err},
    )


def _overlay_in_userns(scratch: str) -> None:
    _enter_user_namespace(_CLONE_NEWNS)
    # Nothing mounted here may reach the host's mount namespace.
    _mount("none", "/", "", _MS_REC | _MS_PRIVATE, "")
    _mount("sbx-doctor", scratch, "tmpfs", 0, "size=1m")
    for name in ("lower", "upper", "work", "merged"):
        os.mkdir(os.path.join(scratch, name))
    with open(os.path.join(scratch, "lower", "file"), "w") as f:
        f.write("lower\n")
    paths = {n: os.path.join(scratch, n) for n in ("lower", "upper", "work")}
    options = "lowerdir={lower},upperdir={upper},workdir={work}".format(**paths)
    _mount("overlay", os.path.join(scratch, "merged"), "overlay", 0, options)
    with open(os.path.join(scratch, "merged", "file"), "a") as f:
        f.write("upper\n")


# --- seccomp -------------------------------------------------------------------------


def check_seccomp() -> Check:
    actions = (_read("/proc/sys/kernel/seccomp/actions_avail") or "").split()
    status = _read("/proc/self/status") or ""
    filters = "Seccomp_filters:" in status or "Seccomp:" in status
    data = {"actions": actions, "libseccomp": _libseccomp_found()}
    missing = {"kill_process", "errno", "allow"} - set(actions)
    if not actions or not filters or missing:
        return Check(
            "seccomp",
            FAIL,
            "the kernel cannot load seccomp filters with the actions sbx uses "
            f"(missing: {' '.join(sorted(missing)) or 'seccomp itself'})",
            fix="use a kernel built with CONFIG_SECCOMP_FILTER (Linux 4.14 or later)",
            data=data,
        )
    if not data["libseccomp"]:
        return Check(
            "seccomp",
            FAIL,
            "libseccomp.so.2 is not installed: sbx compiles its policies with it",
            fix="apt-get install libseccomp2 (or your system's libseccomp package)",
            data=data,
        )
    notif = "user_notif" in actions
    return Check(
        "seccomp",
        OK,
        "seccomp filters work; actions: " + " ".join(actions),
        [] if notif else ["no user_notif (Linux < 5.0): not needed by sbx"],
        data=data,
    )


def _libseccomp_found() -> bool:
    try:
        ctypes.CDLL("libseccomp.so.2")
        return True
    except OSError:
        return False


# --- cgroups -------------------------------------------------------------------------


def _layout_meaning(facts: cgroups.CgroupFacts, v2_root_controllers: set) -> str:
    """One sentence: the limits root and unprivileged users get on this host."""
    v1 = [c for c in ("memory", "pids", "cpu") if c in facts.v1_dirs]
    v2 = [c for c in ("memory", "pids", "cpu") if c in v2_root_controllers]
    if v1:
        root = f"cgroup v1 {'/'.join(v1)} limits"
    elif v2:
        root = (
            f"cgroup v2 {'/'.join(v2)} limits (in a cgroup of its own: under "
            "systemd, systemd-run --scope)"
        )
    else:
        root = "rlimits only"
    if v2:
        user = (
            f"cgroup v2 {'/'.join(v2)} limits in a delegated subtree "
            "(systemd's user@UID.service, or systemd-run --user --scope "
            "-p Delegate=yes), rlimits elsewhere"
        )
    else:
        user = "rlimits only"
    return f"root gets {root}; unprivileged users get {user}"


def _v2_root_controllers() -> tuple[str | None, set]:
    mounts = cgroups.parse_mountinfo(_read("/proc/self/mountinfo") or "")
    mount = cgroups.find_cgroup2_mount(mounts)
    if mount is None:
        return None, set()
    text = _read(os.path.join(mount.mount_point, "cgroup.controllers")) or ""
    return mount.mount_point, set(text.split())


def check_cgroup_layout() -> Check:
    facts = cgroups.read_facts()
    v2_mount, v2_root = _v2_root_controllers()
    meaning = _layout_meaning(facts, v2_root)
    where = {
        "hybrid": f"cgroup v1 controllers, and cgroup2 at {v2_mount}",
        "legacy": "cgroup v1 only",
        "unified": f"cgroup v2 only, at {v2_mount}",
        "none": "no cgroup file system is mounted",
    }[facts.layout]
    detail = [meaning]
    if facts.layout == "hybrid" and not v2_root & {"memory", "pids", "cpu"}:
        detail.append(
            "the memory, pids and cpu controllers are bound to cgroup v1, so no "
            "cgroup v2 subtree can have them and delegation cannot help"
        )
    # Not a failure on any layout: sbx runs everywhere, with weaker limits.
    return Check(
        "cgroup layout",
        OK if facts.layout == "unified" else WARN,
        f"{facts.layout} cgroup layout ({where})",
        detail,
        None if facts.layout == "unified" else (
            "for unprivileged cgroup limits, boot with the unified hierarchy "
            "(systemd.unified_cgroup_hierarchy=1)"
        ),
        {
            "layout": facts.layout,
            "cgroup2_mount": v2_mount,
            "cgroup2_root_controllers": sorted(v2_root),
            "v1_controllers": sorted(facts.v1_dirs),
            "meaning": meaning,
        },
    )


def check_cgroup_delegation() -> Check:
    facts = cgroups.read_facts()
    plan = cgroups.plan_mechanisms(facts, _SAMPLE_LIMITS)
    mechanisms = plan.mechanisms
    who = "root" if facts.euid == 0 else f"uid {facts.euid}"
    detail = [
        f"own cgroup v2: {facts.v2_dir or 'none'} (controllers: "
        f"{' '.join(sorted(facts.v2_controllers)) or 'none'}; "
        f"{'writable' if facts.v2_writable else 'not writable'})",
        "limits would be enforced by: "
        + ", ".join(f"{k} {v}" for k, v in mechanisms.items()),
        *plan.no_cgroup_reasons,
    ]
    data = {
        "backend": plan.backend,
        "mechanisms": mechanisms,
        "v2_dir": facts.v2_dir,
        "v2_controllers": sorted(facts.v2_controllers),
        "v2_writable": facts.v2_writable,
        "v1_writable": sorted(facts.v1_writable),
    }
    if plan.backend != "rlimit":
        label = {"cgroup2": "a delegated cgroup v2 subtree", "cgroup1": "cgroup v1"}
        return Check(
            "cgroup limits for you",
            OK,
            f"{who} gets per-run limits from {label[plan.backend]}",
            detail + list(plan.warnings),
            data=data,
        )
    return Check(
        "cgroup limits for you",
        WARN,
        f"{who} gets no per-run cgroup: memory and task limits fall back to "
        "rlimits, --cpus is not enforced, --require-cgroup refuses to run",
        detail,
        _delegation_fix(facts),
        data,
    )


def _delegation_fix(facts: cgroups.CgroupFacts) -> str:
    if facts.v2_controllers & {"memory", "pids"} and not facts.v2_writable:
        return (
            "run sbx in a delegated cgroup: "
            "systemd-run --user --scope -p Delegate=yes sbx exec ..."
        )
    if facts.v1_dirs:
        return (
            "run as root for cgroup v1 limits, or boot with the unified hierarchy "
            "(systemd.unified_cgroup_hierarchy=1) for delegated cgroup v2"
        )
    return "mount cgroup2 with the memory, pids and cpu controllers"


# --- subordinate ids -----------------------------------------------------------------


def _helper_is_privileged(path: str) -> bool:
    st = os.stat(path)
    if st.st_mode & stat.S_ISUID and st.st_uid == 0:
        return True
    try:
        return bool(os.getxattr(path, "security.capability"))
    except OSError:
        return False


def _subordinate_range(path: str, name: str, uid: int) -> tuple[int, int] | None:
    for line in (_read(path) or "").splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (name, str(uid)):
            try:
                return int(parts[1]), int(parts[2])
            except ValueError:
                continue
    return None


def check_id_helpers() -> Check:
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    helpers = {h: shutil.which(h) for h in ("newuidmap", "newgidmap")}
    ranges = {
        f: _subordinate_range(f"/etc/{f}", name, uid) for f in ("subuid", "subgid")
    }
    data = {"helpers": helpers, "ranges": ranges, "user": name}
    problems = [f"{h} is not installed" for h, p in helpers.items() if not p]
    problems += [
        f"{h} ({p}) is neither setuid root nor has file capabilities"
        for h, p in helpers.items()
        if p and not _helper_is_privileged(p)
    ]
    missing = [f for f, r in ranges.items() if not r]
    problems += [f"/etc/{f} has no range for {name}" for f in missing]
    if uid == 0:
        return Check(
            "subordinate ids",
            INFO,
            "root maps its payload to an unprivileged id without newuidmap",
            problems,
            data=data,
        )
    if not problems:
        shown = ", ".join(f"{f} {r[0]}+{r[1]}" for f, r in ranges.items())
        return Check("subordinate ids", OK, f"{name} has {shown}", data=data)
    return Check(
        "subordinate ids",
        WARN,
        "the payload shares your uid on the host (no subordinate ids usable)",
        problems,
        f"apt-get install uidmap; usermod --add-subuids 100000-165535 "
        f"--add-subgids 100000-165535 {name}",
        data,
    )


# --- the report ----------------------------------------------------------------------

CHECKS = (
    check_user_namespaces,
    check_overlay,
    check_seccomp,
    check_cgroup_layout,
    check_cgroup_delegation,
    check_id_helpers,
)


def run_checks() -> list[Check]:
    checks = []
    for check in CHECKS:
        try:
            checks.append(check())
        except Exception as e:  # noqa: BLE001 - one broken check must not hide others
            name = check.__name__.removeprefix("check_").replace("_", " ")
            checks.append(Check(name, FAIL, f"the check itself failed: {e!r}"))
    return checks


def exit_code(checks: list[Check]) -> int:
    """1 when `sbx exec` cannot run here (a failed check), else 0."""
    return 1 if any(c.status == FAIL for c in checks) else 0


def render(checks: list[Check], json: bool = False) -> str:
    can_run = exit_code(checks) == 0
    if json:
        return jsonlib.dumps(
            {"can_run": can_run, "checks": [asdict(c) for c in checks]}, indent=2
        )
    warnings = sum(c.status == WARN for c in checks)
    head = "sbx exec can run here" if can_run else "sbx exec cannot run here"
    lines = [f"{head} ({warnings} warning{'s' if warnings != 1 else ''})"]
    for c in checks:
        lines.append(f"[{c.status.upper():^4}] {c.name}: {c.summary}")
        lines += [f"       {d}" for d in c.detail]
        if c.fix and c.status in (WARN, FAIL):
            lines.append(f"       fix: {c.fix}")
    return "\n".join(lines) + "\n"
