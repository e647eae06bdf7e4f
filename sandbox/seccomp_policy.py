"""Seccomp policies in the OCI / Docker JSON format: parse, validate, plan. Pure.

A policy file is read once into a frozen :class:`Policy`; :meth:`Policy.plan` then
evaluates Docker's ``includes``/``excludes`` for one host (its architecture and kernel
version; a payload under sbx holds no capabilities) and maps every action onto the
small set sbx applies:

    allow   SCMP_ACT_ALLOW
    log     SCMP_ACT_LOG (allowed, and logged by the kernel's audit)
    errno   SCMP_ACT_ERRNO with errnoRet (EPERM when absent)
    trap    SCMP_ACT_TRAP (SIGSYS the payload may catch; uncaught, it kills)
    kill    SCMP_ACT_KILL, SCMP_ACT_KILL_THREAD, SCMP_ACT_KILL_PROCESS: a violation;
            the whole run ends with verdict SV (the kernel layer routes it to the
            supervisor, which names the syscall)

SCMP_ACT_TRACE is mapped to ``errno ENOSYS``: sbx runs no tracer, and without a tracer
the kernel fails a traced call with ENOSYS, so the program sees what it would see
elsewhere. SCMP_ACT_NOTIFY and ``listenerPath`` are refused: sbx's own supervisor is
the only listener.

Whatever ``architectures`` and ``archMap`` say, only the native ABI is planned; every
other ABI (i386 through ``int 0x80``, x32) is killed by the kernel layer.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
from dataclasses import dataclass

from .errors import UsageError

TOP_FIELDS = (
    "defaultAction",
    "defaultErrnoRet",
    "architectures",
    "archMap",
    "flags",
    "listenerPath",
    "listenerMetadata",
    "syscalls",
)
SYSCALL_FIELDS = (
    "names",
    "name",
    "action",
    "errnoRet",
    "args",
    "comment",
    "includes",
    "excludes",
)
ARG_FIELDS = ("index", "value", "valueTwo", "op")
FILTER_FIELDS = ("caps", "arches", "minKernel")
ARCHMAP_FIELDS = ("architecture", "subArchitectures")

ACTIONS = {
    "SCMP_ACT_ALLOW": "allow",
    "SCMP_ACT_LOG": "log",
    "SCMP_ACT_ERRNO": "errno",
    "SCMP_ACT_TRAP": "trap",
    "SCMP_ACT_KILL": "kill",
    "SCMP_ACT_KILL_THREAD": "kill",
    "SCMP_ACT_KILL_PROCESS": "kill",
    "SCMP_ACT_TRACE": "errno",
}
OPS = (
    "SCMP_CMP_NE",
    "SCMP_CMP_LT",
    "SCMP_CMP_LE",
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
)
ARCHES = (
    "SCMP_ARCH_X86",
    "SCMP_ARCH_X86_64",
    "SCMP_ARCH_X32",
    "SCMP_ARCH_ARM",
    "SCMP_ARCH_AARCH64",
    "SCMP_ARCH_MIPS",
    "SCMP_ARCH_MIPS64",
    "SCMP_ARCH_MIPS64N32",
    "SCMP_ARCH_MIPSEL",
    "SCMP_ARCH_MIPSEL64",
    "SCMP_ARCH_MIPSEL64N32",
    "SCMP_ARCH_PPC",
    "SCMP_ARCH_PPC64",
    "SCMP_ARCH_PPC64LE",
    "SCMP_ARCH_S390",
    "SCMP_ARCH_S390X",
    "SCMP_ARCH_PARISC",
    "SCMP_ARCH_PARISC64",
    "SCMP_ARCH_RISCV64",
)
# OCI flags sbx accepts. TSYNC and WAIT_KILLABLE_RECV change nothing for a payload
# that is single-threaded when its filter is installed; LOG asks the kernel to log
# every action but ALLOW. SPEC_ALLOW (turning off the speculative store bypass
# mitigation) is refused.
FLAGS = (
    "SECCOMP_FILTER_FLAG_TSYNC",
    "SECCOMP_FILTER_FLAG_LOG",
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
)
# os.uname().machine -> (libseccomp's name, the names Docker's "arches" use)
NATIVE_ARCHES = {
    "x86_64": ("SCMP_ARCH_X86_64", ("amd64", "x86_64")),
    "aarch64": ("SCMP_ARCH_AARCH64", ("arm64", "aarch64")),
    "riscv64": ("SCMP_ARCH_RISCV64", ("riscv64",)),
    "ppc64le": ("SCMP_ARCH_PPC64LE", ("ppc64le",)),
    "s390x": ("SCMP_ARCH_S390X", ("s390x",)),
}
MAX_ERRNO = 4095
U64_MAX = 2**64 - 1
SYSCALL_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


@dataclass(frozen=True)
class ArgCheck:
    """One argument comparison. For SCMP_CMP_MASKED_EQ, ``value`` is the mask and
    ``value_two`` the datum: (arg & value) == value_two."""

    index: int
    op: str
    value: int
    value_two: int = 0


@dataclass(frozen=True)
class Rule:
    names: tuple[str, ...]
    action: str  # one of the SCMP_ACT_* names in ACTIONS
    errno_ret: int | None
    args: tuple[ArgCheck, ...]
    includes: dict | None = None
    excludes: dict | None = None
    where: str = ""  # "syscalls[3]", for messages


@dataclass(frozen=True)
class Action:
    """What the kernel layer applies: kind in allow/log/errno/trap/kill."""

    kind: str
    errno: int = 0


@dataclass(frozen=True)
class PlannedRule:
    names: tuple[str, ...]
    action: Action
    args: tuple[ArgCheck, ...]
    where: str


@dataclass(frozen=True)
class Host:
    """The facts about a host that includes/excludes depend on."""

    machine: str  # os.uname().machine
    kernel: tuple[int, int]  # (major, minor)
    caps: frozenset[str] = frozenset()  # a payload under sbx holds none


@dataclass(frozen=True)
class FilterPlan:
    default: Action
    rules: tuple[PlannedRule, ...]
    log_flag: bool
    native_arch: str  # libseccomp's name, e.g. SCMP_ARCH_X86_64


@dataclass(frozen=True)
class Policy:
    path: str
    default_action: str
    default_errno_ret: int | None
    architectures: tuple[str, ...]
    flags: tuple[str, ...]
    rules: tuple[Rule, ...]
    digest: str  # sha256 hex of the canonical JSON content

    def plan(self, host: Host) -> FilterPlan:
        """The rules that apply on ``host``, with actions in sbx's terms."""
        if host.machine not in NATIVE_ARCHES:
            raise UsageError(
                f"{self.path}: sbx has no seccomp support for the {host.machine} "
                f"architecture; supported: {', '.join(NATIVE_ARCHES)}"
            )
        default = _action(self.default_action, self.default_errno_ret)
        rules = []
        for rule in self.rules:
            if not _applies(rule, host):
                continue
            action = _action(rule.action, rule.errno_ret)
            # libseccomp refuses a rule whose action is the default one; such a
            # rule changes nothing, so it is left out (as runc does).
            if action != default:
                rules.append(PlannedRule(rule.names, action, rule.args, rule.where))
        return FilterPlan(
            default=default,
            rules=tuple(rules),
            log_flag="SECCOMP_FILTER_FLAG_LOG" in self.flags,
            native_arch=NATIVE_ARCHES[host.machine][0],
        )


def load_policy(path: str) -> Policy:
    """Parse and validate an OCI/Docker seccomp JSON file.

    Raises UsageError with one line naming the file, the field and what is allowed.
    """
    return policy_from_bytes(read_policy_bytes(path), path)


def read_policy_bytes(path: str) -> bytes:
    """The policy file's bytes: a regular file of sane size (the checks are shared
    with the run's own reading, in sandbox.kernel.seccomp)."""
    from .kernel.seccomp import _read_policy_bytes

    return _read_policy_bytes(path)


def policy_from_bytes(raw: bytes, path: str) -> Policy:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise UsageError(f"{path}: nested too deeply to be a seccomp policy") from None
    return parse_policy(doc, path)


def parse_policy(doc: object, path: str) -> Policy:
    """Validate an already decoded policy document (see load_policy)."""
    check = _Checker(path)
    check.object(doc, "", TOP_FIELDS)
    if "defaultAction" not in doc:
        check.fail("defaultAction", "is required; use one of " + ", ".join(ACTIONS))
    default_action = check.action(doc["defaultAction"], "defaultAction")
    default_errno = check.errno_ret(doc.get("defaultErrnoRet"), "defaultErrnoRet")
    architectures = check.names(doc.get("architectures"), "architectures", ARCHES)
    flags = check.flags(doc.get("flags"))
    check.arch_map(doc.get("archMap"))
    if doc.get("listenerPath"):
        check.fail(
            "listenerPath",
            "is not supported: sbx's supervisor is the only seccomp listener; "
            "remove it",
        )
    syscalls = doc.get("syscalls") or []
    if not isinstance(syscalls, list):
        check.fail("syscalls", "must be a list of rules")
    rules = tuple(
        check.rule(entry, f"syscalls[{i}]") for i, entry in enumerate(syscalls)
    )
    return Policy(
        path=path,
        default_action=default_action,
        default_errno_ret=default_errno,
        architectures=architectures,
        flags=flags,
        rules=rules,
        digest=canonical_digest(doc),
    )


def canonical_digest(doc: object) -> str:
    """sha256 of the document's content, independent of key order and spacing."""
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _action(name: str, errno_ret: int | None) -> Action:
    if name == "SCMP_ACT_TRACE":
        return Action("errno", errno.ENOSYS)
    kind = ACTIONS[name]
    if kind == "errno":
        return Action("errno", errno.EPERM if errno_ret is None else errno_ret)
    return Action(kind)


def _applies(rule: Rule, host: Host) -> bool:
    """Docker's includes (all must hold) and excludes (none may hold)."""
    arch_names = NATIVE_ARCHES[host.machine][1]
    if rule.includes:
        if "caps" in rule.includes and not set(rule.includes["caps"]) <= host.caps:
            return False
        arches = rule.includes.get("arches")
        if arches and not set(arches) & set(arch_names):
            return False
        minimum = rule.includes.get("minKernel")
        if minimum and host.kernel < _kernel_version(minimum):
            return False
    if rule.excludes:
        if set(rule.excludes.get("caps") or ()) & host.caps:
            return False
        if set(rule.excludes.get("arches") or ()) & set(arch_names):
            return False
        minimum = rule.excludes.get("minKernel")
        if minimum and host.kernel >= _kernel_version(minimum):
            return False
    return True


def _kernel_version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


class _Checker:
    """Validation helpers: each failure is one line naming the file and field."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, field: str, message: str):
        where = f"{self.path}: {field}" if field else self.path
        raise UsageError(f"{where}: {message}")

    def object(self, value: object, field: str, allowed: tuple[str, ...]) -> None:
        if not isinstance(value, dict):
            self.fail(field, "must be a JSON object")
        for key in value:
            if key not in allowed:
                name = f"{field}.{key}" if field else key
                self.fail(name, "unknown field; allowed: " + ", ".join(allowed))

    def action(self, value: object, field: str) -> str:
        if value not in ACTIONS:
            shown = json.dumps(value)
            if value == "SCMP_ACT_NOTIFY":
                self.fail(field, f"{shown} is not supported: sbx's supervisor is the "
                          "only listener; use SCMP_ACT_KILL_PROCESS or SCMP_ACT_ERRNO")
            self.fail(field, f"{shown} is not an action; allowed: "
                      + ", ".join(ACTIONS))
        return value

    def errno_ret(self, value: object, field: str) -> int | None:
        if value is None:
            return None
        if not _is_int(value) or not 0 <= value <= MAX_ERRNO:
            self.fail(field, f"{json.dumps(value)} is not an errno; allowed: 0 to "
                      f"{MAX_ERRNO}")
        return value

    def uint64(self, value: object, field: str) -> int:
        if not _is_int(value) or not 0 <= value <= U64_MAX:
            self.fail(field, f"{json.dumps(value)} is not allowed; use an integer "
                      "from 0 to 2^64-1")
        return value

    def names(self, value: object, field: str, allowed: tuple[str, ...]) -> tuple:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail(field, "must be a list")
        for i, name in enumerate(value):
            if name not in allowed:
                self.fail(f"{field}[{i}]", f"{json.dumps(name)} is not allowed; "
                          "allowed: " + ", ".join(allowed))
        return tuple(value)

    def strings(self, value: object, field: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(field, "must be a list of strings")
        return tuple(value)

    def flags(self, value: object) -> tuple[str, ...]:
        if value is not None and "SECCOMP_FILTER_FLAG_SPEC_ALLOW" in (value or ()):
            self.fail("flags", "SECCOMP_FILTER_FLAG_SPEC_ALLOW is refused: sbx keeps "
                      "the speculative store bypass mitigation on; remove it")
        return self.names(value, "flags", FLAGS)

    def arch_map(self, value: object) -> None:
        # Read for validation only: sbx plans the native ABI alone.
        if value is None:
            return
        if not isinstance(value, list):
            self.fail("archMap", "must be a list")
        for i, entry in enumerate(value):
            field = f"archMap[{i}]"
            self.object(entry, field, ARCHMAP_FIELDS)
            self.names([entry.get("architecture")], f"{field}.architecture", ARCHES)
            subs = entry.get("subArchitectures")
            self.names(subs, f"{field}.subArchitectures", ARCHES)

    def rule(self, entry: object, field: str) -> Rule:
        self.object(entry, field, SYSCALL_FIELDS)
        names = list(self.strings(entry.get("names"), f"{field}.names"))
        if entry.get("name") is not None:
            if not isinstance(entry["name"], str):
                self.fail(f"{field}.name", "must be a string")
            names.append(entry["name"])
        if not names:
            self.fail(f"{field}.names", "is required: a list of syscall names")
        for i, name in enumerate(names):
            if not SYSCALL_NAME.match(name):
                self.fail(f"{field}.names[{i}]", f"{json.dumps(name)} is not a "
                          "syscall name (lower-case letters, digits, _)")
        if "action" not in entry:
            self.fail(f"{field}.action", "is required; use one of "
                      + ", ".join(ACTIONS))
        action = self.action(entry["action"], f"{field}.action")
        errno_ret = self.errno_ret(entry.get("errnoRet"), f"{field}.errnoRet")
        if errno_ret is not None and action not in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"):
            self.fail(f"{field}.errnoRet", "is allowed only with SCMP_ACT_ERRNO")
        args = entry.get("args") or []
        if not isinstance(args, list) or len(args) > 6:
            self.fail(f"{field}.args", "must be a list of at most 6 comparisons")
        checks = tuple(self.arg(a, f"{field}.args[{i}]") for i, a in enumerate(args))
        return Rule(
            names=tuple(names),
            action=action,
            errno_ret=errno_ret,
            args=checks,
            includes=self.condition(entry.get("includes"), f"{field}.includes"),
            excludes=self.condition(entry.get("excludes"), f"{field}.excludes"),
            where=field,
        )

    def arg(self, entry: object, field: str) -> ArgCheck:
        self.object(entry, field, ARG_FIELDS)
        index = entry.get("index")
        if not _is_int(index) or not 0 <= index <= 5:
            self.fail(f"{field}.index", f"{json.dumps(index)} is not allowed; use 0 "
                      "to 5")
        op = entry.get("op")
        if op not in OPS:
            self.fail(f"{field}.op", f"{json.dumps(op)} is not an operator; allowed: "
                      + ", ".join(OPS))
        value = self.uint64(entry.get("value", 0), f"{field}.value")
        value_two = self.uint64(entry.get("valueTwo", 0), f"{field}.valueTwo")
        return ArgCheck(index=index, op=op, value=value, value_two=value_two)

    def condition(self, entry: object, field: str) -> dict | None:
        if entry is None:
            return None
        self.object(entry, field, FILTER_FIELDS)
        caps = self.strings(entry.get("caps"), f"{field}.caps")
        for i, cap in enumerate(caps):
            if not cap.startswith("CAP_"):
                self.fail(f"{field}.caps[{i}]", f"{json.dumps(cap)} is not a "
                          "capability name (CAP_...)")
        arches = self.strings(entry.get("arches"), f"{field}.arches")
        minimum = entry.get("minKernel")
        if minimum is not None:
            if not isinstance(minimum, str) or not re.match(r"^\d+\.\d+", minimum):
                self.fail(f"{field}.minKernel", f"{json.dumps(minimum)} is not a "
                          "kernel version like \"5.8\"")
        out = {}
        if caps:
            out["caps"] = caps
        if arches:
            out["arches"] = arches
        if minimum:
            out["minKernel"] = minimum
        return out or None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
