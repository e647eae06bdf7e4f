"""Seccomp: compile a policy to classic BPF, cache it, install it, read violations.

The supervisor calls :func:`prepare` (policy file -> :class:`Filter`, compiled once
per policy, host and libseccomp version, then read from a cache file); the payload
calls :func:`install` as its last step before execve; when the filter's listener
becomes readable the supervisor calls :func:`read_violation` to name the syscall.

Kill actions and the violation verdict. When the kernel offers seccomp user
notification, every kill action of the policy is compiled as SECCOMP_RET_USER_NOTIF
and the payload's filter gets a listener fd: the offending call blocks, the
supervisor reads which syscall it was and kills the run (verdict SV naming it).
Without user notification, kill actions are SECCOMP_RET_KILL_PROCESS and the
supervisor only sees SIGSYS. A filter for a foreign ABI (i386 through int 0x80, x32
numbers on x86_64) always kills the process at once, with no notification.

pyseccomp costs about 40 ms to import, so it is imported only to compile (cold
cache) and to name a syscall number after a violation.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

from .. import log as logs
from ..errors import SandboxError, UsageError, kernel_error
from ..record import record, replace

try:  # the built-in SHA-256: hashlib's OpenSSL start-up costs more than the lookup
    from _sha256 import sha256
except ImportError:  # pragma: no cover - CPython builds without it
    from hashlib import sha256

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from ..seccomp_policy import Action, FilterPlan, Host

# The warm path (a cached filter) never parses the policy: sandbox.seccomp_policy
# (the JSON parser and its regular expressions) is imported only to compile.

log = logs.getLogger(__name__)

# Bump when the way a plan becomes BPF changes: old cache entries are then unused.
COMPILER_VERSION = 3

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_LOG = 1 << 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

RET_KILL_PROCESS = 0x80000000
RET_TRAP = 0x00030000
RET_ERRNO = 0x00050000
RET_USER_NOTIF = 0x7FC00000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000
BPF_RET_K = 0x06  # BPF_RET | BPF_K: "return the constant k"
SOCK_FILTER = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k

_SECCOMP_NR = {"x86_64": 317, "aarch64": 277, "riscv64": 277, "ppc64le": 358,
               "s390x": 348}
# struct seccomp_notif: u64 id, u32 pid, u32 flags, struct seccomp_data (64 bytes)
NOTIF = struct.Struct("=QIIiIQ6Q")
# _IOWR('!', 0, struct seccomp_notif)
SECCOMP_IOCTL_NOTIF_RECV = (3 << 30) | (NOTIF.size << 16) | (ord("!") << 8) | 0
# AUDIT_ARCH_* values the kernel reports in seccomp_data.arch
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7, "riscv64": 0xC00000F3,
               "ppc64le": 0xC0000015, "s390x": 0x80000016}


@record(frozen=True)
class Filter:
    """What one run needs to install a policy. Picklable."""

    bpf: bytes  # the compiled program: struct sock_filter[]
    notify: bool  # kill actions go to the supervisor through a listener fd
    digest: str  # the policy's digest


def prepare(path: str) -> Filter:
    """Load the policy at ``path`` and return its compiled filter, from the cache
    when these exact bytes were compiled before on this host with this libseccomp.

    The warm path reads two files and hashes one; it neither parses the JSON nor
    imports pyseccomp.
    """
    try:
        st = os.stat(path)
        key = (path, st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        key = None
    if key is not None and key in _prepared:
        return _prepared[key]
    compiled = _prepare(path)
    if key is not None:
        _prepared[key] = compiled
    return compiled


# Filters this process already prepared, by the policy file's identity: a warm API
# process or `sbx batch` then reads nothing per run.
_prepared: dict = {}


def forget_prepared() -> None:
    """Drop the in-memory filters (the on-disk cache stays)."""
    _prepared.clear()


def _prepare(path: str) -> Filter:
    raw = _read_policy_bytes(path)
    host = _host_key()
    notify = notify_supported()
    cache_file = _cache_path(raw, host, notify)
    cached = _read_cache(cache_file, notify)
    if cached is not None:
        log.debug("seccomp filter for %s read from %s", path, cache_file)
        return cached

    from ..seccomp_policy import policy_from_bytes

    policy = policy_from_bytes(raw, path)
    bpf = compile_plan(policy.plan(host_facts()), notify)
    compiled = Filter(bpf=bpf, notify=notify, digest=policy.digest)
    _write_cache(cache_file, compiled)
    log.info("seccomp policy %s compiled: %d instructions", path,
             len(bpf) // SOCK_FILTER.size)
    return compiled


MAX_POLICY_BYTES = 4 << 20  # Docker's default profile is 13 KB


def _read_policy_bytes(path: str) -> bytes:
    import stat

    try:
        with open(path, "rb") as stream:
            st = os.fstat(stream.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UsageError(f"{path}: a seccomp policy must be a regular file")
            data = stream.read(MAX_POLICY_BYTES + 1)
            if len(data) > MAX_POLICY_BYTES:
                raise UsageError(
                    f"{path}: larger than {MAX_POLICY_BYTES >> 20} MB; not a seccomp policy"
                )
            return data
    except OSError as exc:
        raise UsageError(
            f"{path}: cannot read the seccomp policy: {exc.strerror}"
        ) from None


def _host_key() -> tuple[str, tuple[int, int]]:
    """(machine, (kernel major, minor)): what includes/excludes depend on."""
    uname = os.uname()
    major, minor = (uname.release.split(".") + ["0"])[:2]
    return uname.machine, (int(major), int(_digits(minor)))


def host_facts() -> Host:
    from ..seccomp_policy import Host

    machine, kernel = _host_key()
    return Host(machine=machine, kernel=kernel)


def notify_supported() -> bool:
    """True when this kernel has seccomp user notification (Linux 5.0+)."""
    try:
        with open("/proc/sys/kernel/seccomp/actions_avail") as stream:
            return "user_notif" in stream.read().split()
    except OSError:
        return False


def libseccomp_version() -> str:
    """The version of the libseccomp.so.2 the compiler would load, without pyseccomp."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return "none"
    lib.seccomp_version.restype = ctypes.POINTER(ctypes.c_uint * 3)
    return ".".join(str(part) for part in lib.seccomp_version().contents)


def compile_plan(plan: FilterPlan, notify: bool) -> bytes:
    """Compile a plan with libseccomp (through pyseccomp) to classic BPF bytes."""
    try:
        import pyseccomp as sc
    except (ImportError, RuntimeError) as exc:
        raise SandboxError(
            f"cannot compile a seccomp policy: pyseccomp is unusable ({exc}); install "
            "libseccomp2 and pyseccomp, or run without --seccomp"
        ) from exc

    flt = sc.SyscallFilter(_action_value(sc, plan.default, notify))
    # Only the native ABI is in the filter; any other (i386 via int 0x80, x32
    # numbers on x86_64, which libseccomp checks for) is a violation of the whole run:
    # notified like a kill action, so that a child dying of it cannot go unnoticed.
    flt.set_attr(sc.Attr.ACT_BADARCH, RET_USER_NOTIF if notify else RET_KILL_PROCESS)
    flt.set_attr(sc.Attr.CTL_OPTIMIZE, 2)
    if plan.log_flag:
        flt.set_attr(sc.Attr.CTL_LOG, 1)
    for rule in plan.rules:
        action = _action_value(sc, rule.action, notify)
        args = [_arg(sc, check) for check in rule.args]
        for name in rule.names:
            _add_rule(sc, flt, action, name, args, rule.where)
    return _export(flt)


def _action_value(sc, action: Action, notify: bool) -> int:
    if action.kind == "allow":
        return RET_ALLOW
    if action.kind == "log":
        return RET_LOG
    if action.kind == "errno":
        return RET_ERRNO | action.errno
    if action.kind == "trap":
        return RET_TRAP
    return RET_USER_NOTIF if notify else RET_KILL_PROCESS


_OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
        "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}


def _arg(sc, check) -> object:
    return sc.Arg(check.index, _OPS[check.op], check.value, check.value_two)


def _add_rule(sc, flt, action: int, name: str, args: list, where: str) -> None:
    number = sc.resolve_syscall(sc.Arch.NATIVE, name)
    if number == -1:
        log.warning("seccomp policy: syscall %r (%s) is unknown to libseccomp on this "
                    "host; its rule is skipped", name, where)
        return
    if number < 0:
        # A name libseccomp knows but this architecture lacks (socketcall, chown32
        # on x86_64): nothing can call it here.
        log.debug("seccomp: %s does not exist on this architecture", name)
        return
    try:
        flt.add_rule(action, number, *args)
    except OSError as exc:
        raise UsageError(
            f"{where}: libseccomp refused the rule for {name!r}: {exc.strerror}; "
            "check its action and args"
        ) from None


def _export(flt) -> bytes:
    read_fd, write_fd = os.pipe()
    try:
        with os.fdopen(write_fd, "wb", closefd=True) as sink:
            flt.export_bpf(sink)
        chunks = []
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(read_fd)


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return os.path.join(base, "sbx", "seccomp")


def _cache_path(raw: bytes, host: tuple, notify: bool) -> str:
    # The compiled program depends on the policy's content, on how this host
    # evaluates its includes/excludes (architecture, kernel version), on notify
    # support and on the libseccomp that generated it.
    machine, kernel = host
    facts = repr([machine, list(kernel), notify, libseccomp_version(), COMPILER_VERSION])
    name = sha256(facts.encode() + b"\0" + raw).hexdigest()[:40]
    return os.path.join(_cache_dir(), f"{name}.bpf")


# A cache file: one header line, then the BPF program.
_CACHE_MAGIC = b"sbx-seccomp-bpf"


def _read_cache(cache_file: str, notify: bool) -> Filter | None:
    try:
        with open(cache_file, "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.debug("seccomp cache %s unreadable (%s); compiling", cache_file, exc)
        return None
    header, _, bpf = data.partition(b"\n")
    parts = header.split(b" ")
    if len(parts) != 2 or parts[0] != _CACHE_MAGIC or not bpf:
        return None
    if len(bpf) % SOCK_FILTER.size:
        return None
    return Filter(bpf=bpf, notify=notify, digest=parts[1].decode())


def _write_cache(cache_file: str, compiled: Filter) -> None:
    """Atomic write (temporary file + rename); a cache that cannot be written only
    costs the next run a compile."""
    directory = os.path.dirname(cache_file)
    data = _CACHE_MAGIC + b" " + compiled.digest.encode() + b"\n" + compiled.bpf
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        import tempfile

        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".bpf")
        try:
            with os.fdopen(fd, "wb") as stream:
                stream.write(data)
            os.rename(tmp, cache_file)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        log.warning("seccomp cache %s not written (%s); the next run compiles again",
                    cache_file, exc.strerror)


def _digits(text: str) -> str:
    out = ""
    for char in text:
        if not char.isdigit():
            break
        out += char
    return out or "0"


# --- payload side ---------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(f: Filter) -> int | None:
    """Install ``f`` on the calling thread. Call it after no_new_privs (or holding
    CAP_SYS_ADMIN) as the very last step before execve. Returns the listener fd
    (close-on-exec) when kill actions go to the supervisor, else None."""
    try:
        if not f.notify:
            _load(f.bpf, 0)
            return None
        try:
            return _load(f.bpf, SECCOMP_FILTER_FLAG_NEW_LISTENER)
        except OSError as exc:
            # EBUSY: a filter already stacked on this process has a listener (sbx
            # nested in a sandbox that uses one); only one is allowed per stack.
            # EINVAL: a kernel that does not know the flag.
            if exc.errno not in (errno.EBUSY, errno.EINVAL):
                raise
        log.warning("seccomp user notification unavailable here; violations kill "
                    "the payload with SIGSYS and the syscall is not named")
        _load(without_notify(f).bpf, 0)
        return None
    except OSError as exc:
        raise _install_error(exc) from None


def without_notify(f: Filter) -> Filter:
    """The same filter with every notify return turned into kill-process."""
    out = bytearray(f.bpf)
    for offset in range(0, len(out), SOCK_FILTER.size):
        code, jt, jf, k = SOCK_FILTER.unpack_from(out, offset)
        if code == BPF_RET_K and k == RET_USER_NOTIF:
            SOCK_FILTER.pack_into(out, offset, code, jt, jf, RET_KILL_PROCESS)
    return replace(f, bpf=bytes(out), notify=False)


def _load(bpf: bytes, flags: int) -> int:
    buffer = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // SOCK_FILTER.size, ctypes.addressof(buffer))
    number = _SECCOMP_NR[os.uname().machine]
    result = _libc.syscall(number, SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(prog))
    if result >= 0:
        return result
    err = ctypes.get_errno()
    if err == errno.ENOSYS and flags == 0:
        # Kernels before 3.17 have no seccomp(2); prctl does the same without flags.
        result = _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog),
                             0, 0)
        if result == 0:
            return 0
        err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


def _install_error(exc: OSError) -> SandboxError:
    hint = "the seccomp filter was rejected by the kernel"
    if exc.errno == errno.EACCES:
        hint = "set no_new_privs (prctl PR_SET_NO_NEW_PRIVS) before installing"
    return kernel_error("seccomp(SECCOMP_SET_MODE_FILTER)", exc.errno, hint)


# --- supervisor side ------------------------------------------------------------


def read_violation(listener_fd: int) -> str:
    """Receive the pending notification on ``listener_fd`` and return the name of
    the syscall that violated the policy (e.g. "ptrace"). The caller kills the run:
    the offending call stays blocked until then."""
    buffer = bytearray(NOTIF.size)  # the kernel requires it zeroed
    try:
        fcntl.ioctl(listener_fd, SECCOMP_IOCTL_NOTIF_RECV, buffer, True)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            # The task died (or was killed) before its notification was read.
            return "unknown (the caller exited before it could be read)"
        raise kernel_error("ioctl(SECCOMP_IOCTL_NOTIF_RECV)", exc.errno,
                           "the seccomp listener fd is not usable") from None
    _id, _pid, _flags, number, arch, _ip, *_args = NOTIF.unpack(buffer)
    return syscall_name(number, arch)


def syscall_name(number: int, arch: int | None = None) -> str:
    machine = os.uname().machine
    native = _AUDIT_ARCH.get(machine)
    try:
        import pyseccomp as sc

        name = sc.resolve_syscall(arch or native, number).decode()
    except (ImportError, RuntimeError, ValueError):
        name = f"syscall {number}"
    if arch is not None and arch != native:
        name += f" (arch {arch:#x})"
    return name
