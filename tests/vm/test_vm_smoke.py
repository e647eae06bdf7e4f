"""The VM harness itself, and the delegated cgroup v2 facts sbx's cgroup2 backend relies
on, checked in the VM's real kernel as the unprivileged test user (no sbx involved)."""

from __future__ import annotations

import logging

import pytest

pytestmark = pytest.mark.vm
log = logging.getLogger(__name__)

IDENTITY_SCRIPT = r"""
echo "uid=$(id -u)"
echo "fstype=$(stat -f -c %T /sys/fs/cgroup)"
echo "mount_options=$(awk '$2 == "/sys/fs/cgroup" {print $4}' /proc/mounts)"
echo "cgroup=$(cat /proc/self/cgroup)"
echo "scope=$SBX_VM_CGROUP"
echo "controllers=$(cat "$SBX_VM_CGROUP/cgroup.controllers")"
echo "procs_owner=$(stat -c %u "$SBX_VM_CGROUP/cgroup.procs")"
echo "memory_max_owner=$(stat -c %u "$SBX_VM_CGROUP/memory.max")"
touch "$HOME/.sbx-vm-probe" /tmp/sbx-vm-probe "$XDG_RUNTIME_DIR/probe" \
    && echo "writable=yes"
echo "python=$(/usr/bin/python3 -c 'print(6 * 7)')"
echo "venv=$(/opt/sbx/venv/bin/python -c 'import sys; print(sys.prefix)')"
echo "extra=$SBX_VM_EXTRA"
echo "to stderr" >&2
exit 7
"""


def parse(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


def test_script_runs_unprivileged_in_a_delegated_cgroup2_scope(vm):
    result = vm.run(IDENTITY_SCRIPT, env={"SBX_VM_EXTRA": "a b 'c'"}, timeout_s=90)
    log.info("boot %.1f s, command %.1f s, total %.1f s", result.boot_s,
             result.command_s, result.total_s)
    facts = parse(result.stdout)

    assert result.returncode == 7, result.stderr
    assert result.stderr == "to stderr\n"
    assert facts["uid"] != "0"
    assert facts["fstype"] == "cgroup2fs"
    assert "nsdelegate" in facts["mount_options"].split(",")
    assert facts["cgroup"] == "0::" + facts["scope"].removeprefix("/sys/fs/cgroup")
    assert set(facts["controllers"].split()) >= {"memory", "pids", "cpu"}
    # Delegate=yes: the user owns cgroup.procs, but not the scope's own limits.
    assert facts["procs_owner"] == facts["uid"]
    assert facts["memory_max_owner"] == "0"
    assert facts["writable"] == "yes"
    assert facts["python"] == "42"
    assert facts["venv"] == "/opt/sbx/venv"
    assert facts["extra"] == "a b 'c'"


# What an unprivileged supervisor does in its delegated scope: leave the scope for a
# leaf (no internal processes), enable the controllers, and make one child per limit.
DELEGATION_SCRIPT = r"""
set -u
S=$SBX_VM_CGROUP
mkdir "$S/supervisor" && echo $$ > "$S/supervisor/cgroup.procs" || exit 10
echo "+memory +pids +cpu" > "$S/cgroup.subtree_control" || exit 11
echo "subtree_control=$(cat "$S/cgroup.subtree_control")"
mkdir "$S/pids" "$S/cpu" "$S/mem" || exit 12

# pids.max: a shell that starts 40 sleepers gets at most 8 tasks.
echo 8 > "$S/pids/pids.max" || exit 13
sh -c 'echo $$ > "$1/cgroup.procs"; for i in $(seq 40); do sleep 30 & done; wait' \
    fork "$S/pids" 2> /dev/null &
sleep 0.5
echo "pids_current=$(cat "$S/pids/pids.current")"
echo "pids_events=$(cat "$S/pids/pids.events")"
echo 1 > "$S/pids/cgroup.kill"
wait
sleep 0.2
echo "pids_after_kill=$(cat "$S/pids/pids.current")"

# cpu.max: half a CPU; a 1.5 s spin gets throttled.
echo "50000 100000" > "$S/cpu/cpu.max" || exit 14
echo "cpu_max=$(cat "$S/cpu/cpu.max")"
echo "spin_start=$(cut -d' ' -f1 /proc/uptime)"
sh -c 'echo $$ > "$1/cgroup.procs"; exec timeout 1.5 sh -c "while :; do :; done"' \
    spin "$S/cpu"
echo "spin_end=$(cut -d' ' -f1 /proc/uptime)"
echo "cpu_usage_usec=$(awk '$1 == "usage_usec" {print $2}' "$S/cpu/cpu.stat")"
echo "cpu_nr_throttled=$(awk '$1 == "nr_throttled" {print $2}' "$S/cpu/cpu.stat")"

# memory.max: a 200 MB allocation under 32 MB, no swap, is OOM-killed.
echo 32M > "$S/mem/memory.max" || exit 15
echo 0 > "$S/mem/memory.swap.max" || exit 16
sh -c 'echo $$ > "$1/cgroup.procs"; exec python3 -c "b = b\"x\" * (200 << 20)"' \
    hog "$S/mem"
echo "hog_status=$?"
echo "memory_max=$(cat "$S/mem/memory.max")"
echo "oom_kill=$(awk '$1 == "oom_kill" {print $2}' "$S/mem/memory.events")"
echo "memory_peak=$(cat "$S/mem/memory.peak")"

rmdir "$S/pids" "$S/cpu" "$S/mem" && echo "removed=yes"
"""


@pytest.fixture(scope="module")
def delegation(vm) -> dict[str, str]:
    result = vm.run(DELEGATION_SCRIPT, timeout_s=120)
    log.info("boot %.1f s, command %.1f s, total %.1f s", result.boot_s,
             result.command_s, result.total_s)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return parse(result.stdout)


def test_user_enables_controllers_after_leaving_the_scope(delegation):
    assert set(delegation["subtree_control"].split()) == {"memory", "pids", "cpu"}


def test_pids_max_holds_and_cgroup_kill_empties_the_child(delegation):
    assert int(delegation["pids_current"]) <= 8
    assert int(delegation["pids_events"].split()[1]) > 0  # "max N": forks refused
    assert delegation["pids_after_kill"] == "0"


def test_cpu_max_throttles_a_spinning_process(delegation):
    assert delegation["cpu_max"] == "50000 100000"
    assert int(delegation["cpu_nr_throttled"]) > 0
    wall_s = float(delegation["spin_end"]) - float(delegation["spin_start"])
    # Half a CPU for the spin's whole life, plus one 100 ms period of slack.
    assert int(delegation["cpu_usage_usec"]) / 1e6 <= 0.5 * wall_s + 0.1


def test_memory_hog_is_oom_killed_in_its_child(delegation):
    assert delegation["memory_max"] == str(32 << 20)
    assert delegation["hog_status"] == "137"  # SIGKILL from the OOM killer
    assert int(delegation["oom_kill"]) > 0
    assert int(delegation["memory_peak"]) <= 32 << 20


def test_user_removes_its_child_cgroups(delegation):
    assert delegation["removed"] == "yes"
