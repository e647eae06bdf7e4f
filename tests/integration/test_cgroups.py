"""sandbox.kernel.cgroups against the real kernel of this host.

As root on a host with cgroup v1 controllers, a run cgroup is created below our own
cgroup and really limits a child; as the unprivileged test user, the rlimit fallback is
chosen with warnings and --require-cgroup refuses. The cgroup v2 path is tested in the
VM (tests/vm)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from sandbox.errors import SandboxError
from sandbox.kernel import cgroups
from sandbox.plan import Limits

TOUCH_200MB = """
b = bytearray(200 << 20)
for i in range(0, len(b), 4096):
    b[i] = 1
"""
FORK_MANY = """
import os, time
made = 0
for _ in range(64):
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        made += 1
    except BlockingIOError:
        print(made, "refused", flush=True)
        break
else:
    print(made, "all", flush=True)
time.sleep(30)
"""
SPIN_300MS = """
import time
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
"""


def _v1_or_skip() -> cgroups.CgroupFacts:
    if os.geteuid() != 0:
        pytest.skip("cgroup v1 run groups need root")
    facts = cgroups.read_facts()
    missing = {"memory", "pids", "cpuacct"} - facts.v1_writable
    if missing:
        pytest.skip(f"no writable cgroup v1 {', '.join(sorted(missing))} here")
    return facts


@pytest.fixture
def v1_runs():
    """Makes cgroup v1 run groups; closes each after the test and checks that
    nothing of it is left."""
    _v1_or_skip()
    made = []

    def make(**limits) -> cgroups.RunCgroup:
        run_id = "test-" + uuid.uuid4().hex[:8]
        made.append(cgroups.open_run_cgroup(Limits(**limits), run_id, True))
        return made[-1]

    yield make
    for run in made:
        run.close()
        assert not any(os.path.exists(d) for d in run.dirs.values())


def _start_in(run: cgroups.RunCgroup, code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code], preexec_fn=run.join_self, **kw
    )


def test_root_on_this_host_gets_cgroup1_below_its_own_cgroups(v1_runs):
    v1_run = v1_runs()
    facts = cgroups.read_facts()
    assert v1_run.backend == "cgroup1"
    for controller, directory in v1_run.dirs.items():
        assert os.path.dirname(directory) == facts.v1_dirs[controller]


def test_memory_limit_oom_kills_and_peak_is_near_the_limit(v1_runs):
    v1_run = v1_runs(memory_max_bytes=64 << 20)
    assert v1_run.mechanisms["memory"] == "cgroup1"
    child = _start_in(v1_run, TOUCH_200MB)
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert v1_run.oom_killed()
    peak = v1_run.peak_memory_bytes()
    assert 48 << 20 <= peak <= 64 << 20, peak


def test_no_oom_under_the_limit(v1_runs):
    v1_run = v1_runs(memory_max_bytes=256 << 20)
    child = _start_in(v1_run, TOUCH_200MB.replace("200", "32"))
    assert child.wait(timeout=30) == 0
    assert not v1_run.oom_killed()
    assert v1_run.peak_memory_bytes() >= 32 << 20


def test_pids_limit_holds_and_kill_leaves_nothing(v1_runs):
    v1_run = v1_runs(pids_max=16)
    child = _start_in(v1_run, FORK_MANY, stdout=subprocess.PIPE, text=True)
    made, how = child.stdout.readline().split()
    assert how == "refused" and int(made) < 16
    assert 1 < len(v1_run.pids()) <= 16
    v1_run.kill()
    assert child.wait(timeout=10) == -signal.SIGKILL
    child.stdout.close()
    deadline = time.monotonic() + 5
    while v1_run.pids() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert v1_run.pids() == []


def test_cpu_time_is_read_from_cpuacct(v1_runs):
    v1_run = v1_runs(cpu_time_s=5.0, cpus=1.0)
    assert v1_run.mechanisms["cpu_time"] == "cgroup1"
    assert v1_run.mechanisms["cpus"] == "cgroup1"
    assert _start_in(v1_run, SPIN_300MS).wait(timeout=30) == 0
    assert 0.3e9 <= v1_run.cpu_time_ns() < 5e9


def test_close_is_idempotent_and_kills_what_is_left(v1_runs):
    v1_run = v1_runs()
    child = _start_in(v1_run, "import time; time.sleep(60)")
    v1_run.close()
    v1_run.close()
    v1_run.kill()  # after close: nothing left to kill, and no error
    assert child.wait(timeout=10) == -signal.SIGKILL


def test_groups_of_dead_supervisors_are_removed_by_the_next_run(v1_runs):
    facts = cgroups.read_facts()
    parent = facts.v1_dirs["pids"]
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = os.path.join(parent, cgroups.leaf_name("stale", dead.pid))
    live = os.path.join(parent, cgroups.leaf_name("live", os.getpid()))
    young = os.path.join(parent, cgroups.leaf_name("young", dead.pid))
    for path in (stale, live, young):
        os.mkdir(path)
    old = time.time() - 60
    os.utime(stale, (old, old))
    os.utime(live, (old, old))
    try:
        cgroups.forget_reaped()  # earlier runs of this process looked already
        v1_runs(pids_max=8)
        assert not os.path.exists(stale)
        assert os.path.exists(live) and os.path.exists(young)
    finally:
        for path in (stale, live, young):
            if os.path.exists(path):
                os.rmdir(path)


def test_a_dead_supervisors_young_group_is_looked_at_again_once_old(v1_runs, monkeypatch):
    """Looks for stale groups are rare (every REAP_EVERY_S in one process), but a group
    skipped for being too young is looked at again once it is old enough."""
    monkeypatch.setattr(cgroups, "STALE_AGE_S", 0.5)
    parent = cgroups.read_facts().v1_dirs["pids"]
    dead = subprocess.Popen(["true"])
    dead.wait()
    young = os.path.join(parent, cgroups.leaf_name("young", dead.pid))
    os.mkdir(young)
    try:
        cgroups.forget_reaped()
        v1_runs(pids_max=8)
        assert os.path.exists(young)
        time.sleep(0.7)
        v1_runs(pids_max=8)
        assert not os.path.exists(young)
    finally:
        if os.path.exists(young):
            os.rmdir(young)


# --- the unprivileged user -----------------------------------------------------------

USER_SCRIPT = """
import json, logging, resource, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
from sandbox.errors import SandboxError
from sandbox.kernel import cgroups
from sandbox.plan import Limits
limits = Limits(memory_max_bytes=64 << 20, pids_max=32, cpus=0.5, cpu_time_s=2.0)
run = cgroups.open_run_cgroup(limits, "user-test", False)
try:
    cgroups.open_run_cgroup(limits, "user-test-strict", True)
    refusal = None
except SandboxError as e:
    refusal = [str(e), e.exit_code]
print(json.dumps({"mechanisms": run.mechanisms, "warnings": run.warnings,
                  "rlimits": run.rlimits(), "refusal": refusal,
                  "cpu": run.cpu_time_ns(), "oom": run.oom_killed()}))
"""


def _as_user(user_caller, code: str) -> subprocess.CompletedProcess:
    command = user_caller.command([])[:-2]  # setpriv ... python, without -m sandbox
    return subprocess.run(
        [*command, "-c", code],
        env=user_caller.env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


def test_unprivileged_user_gets_rlimits_with_warnings(user_caller):
    facts = cgroups.read_facts()
    if facts.v2_controllers & {"memory", "pids"} and facts.layout == "unified":
        pytest.skip("this host has cgroup v2 controllers: see the VM tests")
    done = _as_user(user_caller, USER_SCRIPT)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["mechanisms"] == {
        "memory": "rlimit",
        "pids": "rlimit",
        "cpus": "none",
        "cpu_time": "supervisor",
    }
    assert len(out["warnings"]) == 4
    assert done.stderr.count("WARNING ") >= 4
    assert "RLIMIT_DATA" in done.stderr
    assert out["cpu"] is None and out["oom"] is False
    message, exit_code = out["refusal"]
    assert exit_code == 125
    assert message.startswith("--require-cgroup: no cgroup is available (")
    assert "needs root" in message and "Delegate=yes" in message


def test_fallback_rlimits_really_limit_a_process(user_caller):
    code = USER_SCRIPT.split("run = ")[0] + """
run = cgroups.open_run_cgroup(Limits(memory_max_bytes=64 << 20), "x", False)
for r, soft, hard in run.rlimits():
    resource.setrlimit(r, (soft, hard))
try:
    bytearray(200 << 20)
    print("allocated")
except MemoryError:
    print("refused")
"""
    done = _as_user(user_caller, code)
    assert done.stdout.strip() == "refused", done.stderr


def test_require_cgroup_refusal_as_root_is_not_raised_here():
    _v1_or_skip()
    run_id = "strict-" + uuid.uuid4().hex[:8]
    run = cgroups.open_run_cgroup(Limits(pids_max=8), run_id, True)
    try:
        assert run.mechanisms["pids"] == "cgroup1"
    finally:
        run.close()


# --- delegated cgroup v2, in the VM --------------------------------------------------

# Runs first while the VM's shell is still in the delegated scope: the scope cannot
# enable controllers for children (no internal processes), and sbx must say so.
VM_BUSY = """
import json, sys
from sandbox.errors import SandboxError
from sandbox.kernel import cgroups
from sandbox.plan import Limits
limits = Limits(memory_max_bytes=64 << 20)
try:
    cgroups.open_run_cgroup(limits, "busy", True)
    strict = None
except SandboxError as e:
    strict = str(e)
loose = cgroups.open_run_cgroup(limits, "busy2", False)
print(json.dumps({"strict": strict, "loose": loose.mechanisms}))
"""
# Then the shell execs into this one, leaving the scope to sbx.
VM_MAIN = """
import json, os, signal, subprocess, sys, time
from sandbox.kernel import cgroups
from sandbox.plan import Limits
out = {}
scope = os.environ["SBX_VM_CGROUP"]

def start(run, code, **kw):
    argv = [sys.executable, "-c", code]
    return subprocess.Popen(argv, preexec_fn=run.join_self, **kw)

limits = Limits(memory_max_bytes=64 << 20, pids_max=16, cpus=0.5, cpu_time_s=5.0)
run = cgroups.open_run_cgroup(limits, "mem", True)
out["mechanisms"] = run.mechanisms
out["warnings"] = run.warnings
out["leaf"] = run.path
out["self"] = open("/proc/self/cgroup").read().strip()
out["cpu.max"] = open(run.path + "/cpu.max").read().strip()
out["swap.max"] = open(run.path + "/memory.swap.max").read().strip()
child = start(run, TOUCH_200MB)
out["mem_rc"] = child.wait()
out["oom"] = run.oom_killed()
out["peak"] = run.peak_memory_bytes()
run.close()
out["mem_leaf_left"] = os.path.exists(run.path)

run = cgroups.open_run_cgroup(limits, "pids", True)
child = start(run, FORK_MANY, stdout=subprocess.PIPE, text=True)
out["forks"] = child.stdout.readline().split()
out["pids_before_kill"] = len(run.pids())
run.kill()
out["pids_rc"] = child.wait()
child.stdout.close()
deadline = time.monotonic() + 10  # killed tasks exit slowly under emulation
while run.pids() and time.monotonic() < deadline:
    time.sleep(0.05)
out["pids_after_kill"] = run.pids()
run.close()

run = cgroups.open_run_cgroup(limits, "cpu", True)
out["cpu_rc"] = start(run, SPIN_300MS).wait()
out["cpu_ns"] = run.cpu_time_ns()
child = start(run, FORK_MANY, stdout=subprocess.PIPE, text=True)
child.stdout.readline()
cgroups.freeze_and_kill(run.path)
out["freezer_rc"] = child.wait()
child.stdout.close()
run.close()
out["left"] = sorted(os.listdir(scope))
print(json.dumps(out))
"""


def _vm_script(tree: str) -> str:
    head = f"cd / && export PYTHONPATH={tree}\n"
    busy = f"/usr/bin/python3 - <<'EOF'\n{VM_BUSY}\nEOF\n"
    defs = "\n".join(
        f"{name} = {globals()[name]!r}"
        for name in ("TOUCH_200MB", "FORK_MANY", "SPIN_300MS")
    )
    main = VM_MAIN.replace("out = {}", defs + "\nout = {}")
    return head + busy + f"exec /usr/bin/python3 - <<'EOF'\n{main}\nEOF\n"


@pytest.mark.vm
@pytest.mark.slow
def test_delegated_cgroup2_in_vm(sbx_tree):
    from tests.vm import harness

    reason = harness.unavailable_reason()
    if reason:
        pytest.skip(f"the cgroup v2 VM cannot run here: {reason}")
    if str(sbx_tree).startswith("/tmp"):
        pytest.skip(f"the VM hides the host's /tmp, where the tree is: {sbx_tree}")
    done = harness.run_in_vm(_vm_script(str(sbx_tree)), timeout_s=240)
    assert done.returncode == 0, done.stderr + done.console[-2000:]
    busy_line, main_line = done.stdout.strip().splitlines()[-2:]
    busy, out = json.loads(busy_line), json.loads(main_line)

    assert "no-internal-processes" in busy["strict"]
    assert "holds other processes" in busy["strict"]
    assert "\n" not in busy["strict"]
    assert busy["loose"]["memory"] == "rlimit"

    assert set(out["mechanisms"].values()) == {"cgroup2"}
    assert out["warnings"] == []
    # The supervisor moved itself into a leaf of the delegated scope.
    assert out["self"].startswith("0::/user.slice/")
    assert "/sbx-vm.scope/sbx-sup-" in out["self"]
    assert re.search(r"/sbx-[0-9]+-mem$", out["leaf"])
    assert out["cpu.max"] == "50000 100000" and out["swap.max"] == "0"
    assert out["mem_rc"] == -signal.SIGKILL and out["oom"] is True
    assert 48 << 20 <= out["peak"] <= 64 << 20
    assert out["mem_leaf_left"] is False
    made, how = out["forks"]
    assert how == "refused" and int(made) < 16
    assert out["pids_rc"] == -signal.SIGKILL and out["pids_after_kill"] == []
    assert out["cpu_rc"] == 0 and out["cpu_ns"] >= 0.3e9
    assert out["freezer_rc"] == -signal.SIGKILL
    # Only the supervisor's own leaf is left while it runs; the run leaves are gone.
    assert [n for n in out["left"] if n.startswith("sbx-")] == [
        n for n in out["left"] if n.startswith("sbx-sup-")
    ]
