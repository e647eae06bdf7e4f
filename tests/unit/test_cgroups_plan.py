"""The pure half of sandbox.kernel.cgroups: parsing /proc text, the exact text
written into cgroup files, and which mechanism enforces each limit."""

from __future__ import annotations

import resource

import pytest

from sandbox.kernel import cgroups as cg
from sandbox.plan import Limits

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_PROC_CGROUP = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/d7b8
2:cpuacct:/
1:cpu:/
0::/
"""
UNIFIED_MOUNTINFO = (
    "25 1 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - "
    "cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"
    "26 1 0:23 / /tmp rw - tmpfs tmpfs rw\n"
)
UNIFIED_PROC_CGROUP = (
    "0::/user.slice/user-1000.slice/user@1000.service/app.slice/sbx.scope\n"
)
ALL_LIMITS = Limits(
    memory_max_bytes=64 << 20, pids_max=32, cpus=0.5, cpu_time_s=2.0
)


def test_hybrid_mountinfo_gives_the_unified_mount_and_v1_hierarchies():
    mounts = cg.parse_mountinfo(HYBRID_MOUNTINFO)
    assert [m.mount_point for m in mounts][-1] == "/sys/fs/cgroup/unified"
    assert cg.find_cgroup2_mount(mounts).mount_point == "/sys/fs/cgroup/unified"
    assert cg.find_v1_mount(mounts, "memory").mount_point == "/sys/fs/cgroup/memory"
    assert cg.find_v1_mount(mounts, "freezer") is None
    assert cg.classify_layout(mounts) == "hybrid"


def test_unified_mountinfo_with_optional_fields():
    mounts = cg.parse_mountinfo(UNIFIED_MOUNTINFO)
    assert len(mounts) == 1
    assert cg.find_cgroup2_mount(mounts).mount_point == "/sys/fs/cgroup"
    assert cg.classify_layout(mounts) == "unified"


def test_legacy_and_none_layouts():
    legacy = "\n".join(HYBRID_MOUNTINFO.splitlines()[:-1])
    assert cg.classify_layout(cg.parse_mountinfo(legacy)) == "legacy"
    assert cg.classify_layout([]) == "none"


def test_comounted_v1_controllers():
    text = (
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
    )
    (mount,) = cg.parse_mountinfo(text)
    assert mount.controllers == {"cpu", "cpuacct"}
    assert mount.mount_point == "/sys/fs/cgroup/cpu,cpuacct"


def test_escaped_mount_point():
    text = r"41 31 0:38 / /mnt/c\040g rw - cgroup2 cgroup2 rw" + "\n"
    assert cg.parse_mountinfo(text)[0].mount_point == "/mnt/c g"


def test_proc_cgroup_v2_and_v1_paths():
    member = cg.parse_proc_cgroup(HYBRID_PROC_CGROUP)
    assert member.v2_path == "/"
    assert member.v1_paths["memory"] == "/process_api/d7b8"
    assert member.v1_paths["pids"] == "/"
    assert "name=systemd" not in member.v1_paths
    unified = cg.parse_proc_cgroup(UNIFIED_PROC_CGROUP)
    assert unified.v2_path.endswith("/app.slice/sbx.scope")
    assert unified.v1_paths == {}


def test_comounted_proc_cgroup_line():
    member = cg.parse_proc_cgroup("3:cpu,cpuacct:/a/b\n")
    assert member.v1_paths == {"cpu": "/a/b", "cpuacct": "/a/b"}


def test_own_cgroup_directory_from_mount_root():
    mount = cg.CgroupMount("/sys/fs/cgroup", "/", "cgroup2")
    assert mount.directory("/") == "/sys/fs/cgroup"
    assert mount.directory("/a/b") == "/sys/fs/cgroup/a/b"
    # A mount of a subtree (a cgroup namespace, a bind mount) shows only below it.
    sub = cg.CgroupMount("/mnt/cg", "/user.slice", "cgroup2")
    assert sub.directory("/user.slice/x") == "/mnt/cg/x"
    assert sub.directory("/user.slice") == "/mnt/cg"
    assert sub.directory("/system.slice") is None
    assert sub.directory("/user.slicex") is None


@pytest.mark.parametrize(
    "cpus, text",
    [
        (0.5, "50000 100000"),
        (1.0, "100000 100000"),
        (2.0, "200000 100000"),
        (1.25, "125000 100000"),
        (0.001, "1000 100000"),  # the kernel's 1 ms minimum
        (None, "max 100000"),
    ],
)
def test_cpu_max_text(cpus, text):
    assert cg.cpu_max_text(cpus) == text


def test_v2_writes_exact():
    writes = cg.v2_writes(ALL_LIMITS, frozenset({"memory", "pids", "cpu"}))
    assert writes == [
        ("memory.max", "67108864"),
        ("memory.swap.max", "0"),
        ("pids.max", "32"),
        ("cpu.max", "50000 100000"),
    ]
    assert cg.v2_writes(Limits(), frozenset({"memory", "pids", "cpu"})) == []
    assert cg.v2_writes(ALL_LIMITS, frozenset({"pids"})) == [("pids.max", "32")]


def test_v1_writes_exact():
    writes = cg.v1_writes(ALL_LIMITS, frozenset({"memory", "pids", "cpu", "cpuacct"}))
    assert writes == {
        "memory": [
            ("memory.limit_in_bytes", "67108864"),
            ("memory.memsw.limit_in_bytes", "67108864"),
        ],
        "pids": [("pids.max", "32")],
        "cpu": [("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "50000")],
    }


@pytest.mark.parametrize(
    "release, version",
    [("6.1.0-18-amd64", (6, 1)), ("5.14.0", (5, 14)), ("6.18.44-fc", (6, 18)),
     ("4.19.0+", (4, 19)), ("garbage", (0, 0))],
)
def test_kernel_version(release, version):
    assert cg.kernel_version(release) == version


# --- choosing mechanisms -----------------------------------------------------------

V1_DIRS = {
    "memory": "/sys/fs/cgroup/memory/process_api/d7b8",
    "pids": "/sys/fs/cgroup/pids",
    "cpu": "/sys/fs/cgroup/cpu",
    "cpuacct": "/sys/fs/cgroup/cpuacct",
    "freezer": "/sys/fs/cgroup/freezer",
}


def hybrid_facts(euid: int) -> cg.CgroupFacts:
    """This build host: cgroup v2 has only hugetlb; v1 is writable by root only."""
    return cg.CgroupFacts(
        layout="hybrid",
        euid=euid,
        kernel=(6, 18),
        v2_dir="/sys/fs/cgroup/unified",
        v2_is_root=True,
        v2_controllers=frozenset({"hugetlb"}),
        v2_writable=euid == 0,
        v1_dirs=V1_DIRS,
        v1_writable=frozenset(V1_DIRS) if euid == 0 else frozenset(),
    )


def delegated_facts(controllers=("cpu", "memory", "pids")) -> cg.CgroupFacts:
    return cg.CgroupFacts(
        layout="unified",
        euid=1000,
        kernel=(6, 1),
        v2_dir="/sys/fs/cgroup/user.slice/user@1000.service/sbx.scope",
        v2_controllers=frozenset(controllers),
        v2_writable=True,
    )


def test_root_on_hybrid_host_gets_cgroup1_for_everything():
    plan = cg.plan_mechanisms(hybrid_facts(0), ALL_LIMITS)
    assert plan.backend == "cgroup1"
    assert plan.mechanisms == {
        "memory": "cgroup1", "pids": "cgroup1", "cpus": "cgroup1",
        "cpu_time": "cgroup1",
    }
    assert plan.rlimits == () and plan.warnings == ()
    assert "bound to cgroup v1" in plan.no_cgroup_reasons[0]


def test_user_on_hybrid_host_falls_back_to_rlimits_with_warnings():
    plan = cg.plan_mechanisms(hybrid_facts(1001), ALL_LIMITS)
    assert plan.backend == "rlimit"
    assert plan.mechanisms == {
        "memory": "rlimit", "pids": "rlimit", "cpus": "none",
        "cpu_time": "supervisor",
    }
    assert plan.rlimits == (
        (resource.RLIMIT_DATA, 64 << 20, 64 << 20),
        (resource.RLIMIT_NPROC, 32, 32),
    )
    assert len(plan.warnings) == 4
    assert "RLIMIT_DATA" in plan.warnings[0]
    assert "own user namespace" in plan.warnings[1]
    assert plan.refusal is None


def test_nproc_warning_names_old_kernels():
    facts = cg.CgroupFacts(layout="legacy", euid=1000, kernel=(5, 10))
    plan = cg.plan_mechanisms(facts, Limits(pids_max=8))
    assert "every process of the host uid" in plan.warnings[0]


def test_require_cgroup_refusal_says_why_and_how():
    plan = cg.plan_mechanisms(hybrid_facts(1001), ALL_LIMITS, require_cgroup=True)
    assert plan.refusal is not None
    assert "\n" not in plan.refusal
    assert "no cgroup is available" in plan.refusal
    assert "needs root" in plan.refusal
    assert "Delegate=yes" in plan.refusal


def test_require_cgroup_is_met_by_root_on_hybrid():
    plan = cg.plan_mechanisms(hybrid_facts(0), ALL_LIMITS, require_cgroup=True)
    assert plan.refusal is None


def test_delegated_v2_is_preferred():
    plan = cg.plan_mechanisms(delegated_facts(), ALL_LIMITS)
    assert plan.backend == "cgroup2"
    assert plan.controllers == {"cpu", "memory", "pids"}
    assert set(plan.mechanisms.values()) == {"cgroup2"}
    assert plan.warnings == ()


def test_v2_without_cpu_controller_still_reads_cpu_time():
    plan = cg.plan_mechanisms(delegated_facts(("memory", "pids")), ALL_LIMITS)
    assert plan.mechanisms["cpu_time"] == "cgroup2"
    assert plan.mechanisms["cpus"] == "none"
    assert len(plan.warnings) == 1 and "--cpus" in plan.warnings[0]
    strict = cg.plan_mechanisms(
        delegated_facts(("memory", "pids")), ALL_LIMITS, require_cgroup=True
    )
    assert "cannot enforce the cpus limit" in strict.refusal


def test_v2_failure_at_apply_time_replans_without_v2():
    failure = "write '+memory' to x failed: EBUSY"
    plan = cg.plan_mechanisms(delegated_facts(), ALL_LIMITS, v2_failure=failure)
    assert plan.backend == "rlimit"
    assert plan.no_cgroup_reasons[0] == failure


def test_undelegated_v2_is_explained():
    facts = cg.CgroupFacts(
        layout="unified",
        euid=1000,
        kernel=(6, 1),
        v2_dir="/sys/fs/cgroup/user.slice/user-1000.slice/session-2.scope",
        v2_controllers=frozenset({"memory", "pids", "cpu"}),
    )
    plan = cg.plan_mechanisms(facts, Limits(memory_max_bytes=1 << 30))
    assert "not delegated to uid 1000" in plan.no_cgroup_reasons[0]


def test_unset_limits_are_none_and_silent():
    plan = cg.plan_mechanisms(hybrid_facts(1001), Limits())
    assert set(plan.mechanisms.values()) == {"none"}
    assert plan.rlimits == () and plan.warnings == ()


def test_swap_without_memsw_is_warned():
    facts = cg.CgroupFacts(
        layout="legacy",
        euid=0,
        kernel=(6, 1),
        v1_dirs={"memory": "/sys/fs/cgroup/memory"},
        v1_writable=frozenset({"memory"}),
        v1_memsw=False,
        swap_active=True,
    )
    plan = cg.plan_mechanisms(facts, Limits(memory_max_bytes=1 << 20))
    assert plan.mechanisms["memory"] == "cgroup1"
    assert any("swapaccount=1" in w for w in plan.warnings)


def test_no_systemd_reexec_twice():
    environ = {cg.SCOPE_ENV: "1", "XDG_RUNTIME_DIR": "/run/user/1000"}
    assert cg.systemd_scope_command(["sbx", "exec", "true"], environ) is None


def test_leaf_names_carry_the_supervisor_pid():
    assert cg.leaf_name("a1b2c3", 4242) == "sbx-4242-a1b2c3"
    assert cg.stale_owner("sbx-4242-a1b2c3") == 4242
    assert cg.stale_owner("sbx-sup-77") == 77
    assert cg.stale_owner("sbx-aef901a660a8") is None  # no pid: never touched
    assert cg.stale_owner("other-12-x") is None
