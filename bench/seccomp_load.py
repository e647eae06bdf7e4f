"""Per-run cost of loading a seccomp policy: warm cache versus compiling from scratch.

    python bench/seccomp_load.py [POLICY ...]     (default: the shipped policies)

For each policy, in one run, prints the median of:
  cold     prepare() with an empty cache: parse, import-free compile, write the cache
           (pyseccomp is imported once up front, so its ~40 ms import is not counted
           here; it is shown separately)
  warm     prepare() reading the cached BPF: what every run pays
  install  install() in a forked child (after no_new_privs), the kernel's part
and the ratios cold/warm and cold/(warm + install). Each sample of "install" forks
a child, so it is timed inside the child and sent back through a pipe.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sandbox.kernel import seccomp  # noqa: E402

ROUNDS = 200
INSTALL_ROUNDS = 50


def median_s(samples: list[float]) -> float:
    return statistics.median(samples)


def time_cold(path: str) -> float:
    samples = []
    for _ in range(ROUNDS // 10):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["XDG_CACHE_HOME"] = cache
            seccomp.forget_prepared()
            start = time.perf_counter()
            seccomp.prepare(path)
            samples.append(time.perf_counter() - start)
    return median_s(samples)


def time_warm(path: str, cache: str) -> float:
    os.environ["XDG_CACHE_HOME"] = cache
    seccomp.prepare(path)
    samples = []
    for _ in range(ROUNDS):
        # From the disk cache, as a fresh `sbx exec` reads it (a warm API process
        # keeps the filter in memory and pays even less).
        seccomp.forget_prepared()
        start = time.perf_counter()
        seccomp.prepare(path)
        samples.append(time.perf_counter() - start)
    return median_s(samples)


def time_install(f: seccomp.Filter) -> float:
    libc = ctypes.CDLL(None, use_errno=True)
    samples = []
    for _ in range(INSTALL_ROUNDS):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
            start = time.perf_counter()
            listener = seccomp.install(f)
            elapsed = time.perf_counter() - start
            os.write(write_fd, struct.pack("d", elapsed))
            if listener is not None:
                os.close(listener)
            os._exit(0)
        os.close(write_fd)
        data = os.read(read_fd, 8)
        os.close(read_fd)
        os.waitpid(pid, 0)
        samples.append(struct.unpack("d", data)[0])
    return median_s(samples)


def time_import() -> float:
    start = time.perf_counter()
    import pyseccomp  # noqa: F401

    return time.perf_counter() - start


def main(paths: list[str]) -> int:
    import_s = time_import()
    print(f"import pyseccomp (paid only on a cold cache): {import_s * 1e3:.1f} ms")
    print(f"{'policy':<34} {'cold ms':>8} {'warm ms':>8} {'install ms':>10} "
          f"{'cold/warm':>10} {'cold/(warm+install)':>20}")
    with tempfile.TemporaryDirectory() as cache:
        for path in paths:
            cold = time_cold(path)
            warm = time_warm(path, cache)
            install = time_install(seccomp.prepare(path))
            name = os.path.relpath(path, REPO) if path.startswith(str(REPO)) else path
            print(f"{name:<34} {cold * 1e3:>8.2f} {warm * 1e3:>8.3f} "
                  f"{install * 1e3:>10.3f} {cold / warm:>9.0f}x "
                  f"{cold / (warm + install):>19.0f}x")
    return 0


if __name__ == "__main__":
    default = [str(REPO / "profiles" / "seccomp" / f"{n}.json")
               for n in ("strict", "default")]
    default.append(str(REPO / "tests" / "data" / "docker-default-seccomp.json"))
    sys.exit(main(sys.argv[1:] or default))
