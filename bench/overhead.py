"""Start-up cost of one sandboxed run from the shell: `sbx exec -- /bin/true` against
bubblewrap, `python3 -c pass` and a bare `/bin/true`, measured in the same run.

    python bench/overhead.py [--runs N] [--user NAME] [--sbx COMMAND]

Rootless is the point, so when started as root the script runs itself again as an
unprivileged user (default `sbxtest`, through setpriv) and measures from there.
The tools are timed in rounds, one run of each per round, so that other work on the
machine weighs on each alike; each line is the median over the rounds.

  bare     /bin/true
  unshare  util-linux unshare with the user, mount, pid, net, ipc, uts and cgroup
           namespaces, /bin/true
  python   /usr/bin/python3 -c pass (the floor for any tool written in Python)
  bwrap    bwrap --unshare-all, a read-only /usr (the host's /bin, /lib... as the
           same symlinks or read-only binds), a fresh /proc and /dev, /bin/true
  sbx      sbx exec -- /bin/true (default profile: every namespace, the host root
           filesystem, seccomp, the supervisor), from a cold Python each time
"""

from __future__ import annotations

import argparse
import os
import pwd
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
USR_FAMILY = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


def bwrap_command() -> list[str] | None:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None
    command = [bwrap, "--unshare-all", "--ro-bind", "/usr", "/usr"]
    for name in USR_FAMILY:
        path = f"/{name}"
        if os.path.islink(path):
            command += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            command += ["--ro-bind", path, path]
    return [*command, "--proc", "/proc", "--dev", "/dev", "/bin/true"]


def sbx_command(given: str | None) -> list[str]:
    """What a user types: the installed `sbx` (setup.sh installs this checkout), else
    `python -m sandbox` from the checkout (which pays about 9 ms more for runpy)."""
    if given:
        return [*shlex.split(given), "exec", "--", "/bin/true"]
    installed = shutil.which("sbx")
    if installed:
        return [installed, "exec", "--", "/bin/true"]
    return [sys.executable, "-m", "sandbox", "exec", "--", "/bin/true"]


def time_once(command: list[str], env: dict) -> float:
    """Seconds from spawn to exit of one run; a failed run stops the benchmark."""
    started = time.perf_counter()
    done = subprocess.run(
        command, env=env, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    elapsed_s = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{shlex.join(command)} failed ({done.returncode}): {done.stderr!r}")
    return elapsed_s


def measure(commands: dict[str, list[str]], runs: int, env: dict) -> dict[str, list]:
    for command in commands.values():  # warm the page cache and sbx's seccomp cache
        time_once(command, env)
    times: dict[str, list] = {name: [] for name in commands}
    for _ in range(runs):
        for name, command in commands.items():
            times[name].append(time_once(command, env))
    return times


def report(times: dict[str, list]) -> None:
    median_ms = {name: statistics.median(t) * 1000 for name, t in times.items()}
    print(f"{'':8} {'median':>10} {'p10':>9} {'p90':>9} {'x bare':>8} {'x python':>9}")
    for name, samples in times.items():
        ms = sorted(s * 1000 for s in samples)
        p10, p90 = ms[len(ms) // 10], ms[(len(ms) * 9) // 10 - (len(ms) % 10 == 0)]
        print(
            f"{name:8} {median_ms[name]:8.2f} ms {p10:6.2f} ms {p90:6.2f} ms "
            f"{median_ms[name] / median_ms['bare']:7.1f}x "
            f"{median_ms[name] / median_ms['python']:8.2f}x"
        )
    if "bwrap" in median_ms:
        print(f"sbx / bwrap: {median_ms['sbx'] / median_ms['bwrap']:.1f}x")
    print(f"sbx / python3 -c pass: {median_ms['sbx'] / median_ms['python']:.1f}x")


def drop_to(user: str) -> None:
    """Run this script again as `user` (only from root) and exit with its status."""
    entry = pwd.getpwnam(user)
    command = [
        "setpriv",
        f"--reuid={entry.pw_uid}",
        f"--regid={entry.pw_gid}",
        "--init-groups",
        "env",
        f"HOME={entry.pw_dir}",
        f"USER={user}",
        sys.executable,
        str(Path(__file__).resolve()),
        *sys.argv[1:],
    ]
    sys.exit(subprocess.run(command, cwd="/").returncode)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="rounds (default 30)")
    parser.add_argument(
        "--user",
        default="sbxtest",
        help="who to measure as when started as root (default sbxtest)",
    )
    parser.add_argument(
        "--sbx", help="the sbx command (default: `sbx` on PATH, else python -m sandbox)"
    )
    options = parser.parse_args()
    if os.geteuid() == 0:
        drop_to(options.user)

    env = dict(os.environ, PYTHONPATH=str(REPO))
    commands = {"bare": ["/bin/true"], "python": ["/usr/bin/python3", "-c", "pass"]}
    # util-linux unshare with every namespace sbx makes: the kernel's own floor.
    commands["unshare"] = [
        "unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork", "--net",
        "--ipc", "--uts", "--cgroup", "/bin/true",
    ]
    bwrap = bwrap_command()
    if bwrap is not None:
        commands["bwrap"] = bwrap
    else:
        print("bwrap is not installed: skipping it (Debian package bubblewrap)")
    commands["sbx"] = sbx_command(options.sbx)

    who = pwd.getpwuid(os.geteuid()).pw_name
    print(
        f"/bin/true, {options.runs} rounds, as {who} (uid {os.geteuid()}), "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    report(measure(commands, options.runs, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
