"""Foreign syscall ABIs: a 64-bit program entering the kernel through int 0x80 (the
i386 table, where socketcall creates a socket) or with the x32 bit set. A filter
written for x86_64 numbers means nothing there, so sbx refuses both outright, whatever
the policy's JSON lists in "architectures": the call is a violation of the whole run
(named through the filter's listener where the kernel has user notification, else
the process dies of SIGSYS), and an end-to-end run says SV even when only a child
made the call."""

from __future__ import annotations

import json
import os

import pytest

from tests.probes.fixtures import (  # noqa: F401  (fixtures)
    SIGSYS,
    outcome,
    policy_path,
    probe_bin,
    run_filtered,
)

pytestmark = pytest.mark.skipif(
    os.uname().machine != "x86_64", reason="int 0x80 and x32 exist on x86_64 only"
)


def test_int80_socketcall_works_without_a_filter(caller, probe_bin):
    """The baseline: on this host the i386 entry is open, so blocking it matters."""
    (result,) = run_filtered(caller, "none", [[str(probe_bin), "int80_socket"]])
    if outcome(result) == "exit 38":
        pytest.skip("this kernel has IA32 emulation disabled")
    assert outcome(result) == "exit 0"


@pytest.mark.parametrize("policy", ["default", "strict"])
@pytest.mark.parametrize("probe", ["int80_socket", "x32_getpid"])
def test_foreign_abi_is_killed(caller, probe_bin, policy, probe):
    (result,) = run_filtered(caller, policy_path(caller, policy),
                             [[str(probe_bin), probe]])
    assert _refused(outcome(result)), outcome(result)


def _refused(seen: str) -> bool:
    """Killed by the filter: named as a violation (foreign syscalls are named with
    their arch or number) or, without user notification, dead of SIGSYS."""
    return seen.startswith("violation ") or seen == f"signal {SIGSYS}"


@pytest.mark.parametrize("policy", ["default", "strict"])
def test_a_child_using_a_foreign_abi_makes_the_run_sv(caller, probe_bin, policy):
    # The main process exits 0 after its child made the call: still a violation.
    done = caller.run(["exec", "--json", "--profile", policy, "--dir",
                       str(probe_bin.parent), "--", "sh", "-c",
                       f"/box/{probe_bin.name} int80_socket; exit 0"])
    result = json.loads(done.stdout)
    assert result["verdict"] == "SV", result
    assert done.returncode != 0


def test_listing_foreign_arches_does_not_open_them(caller, probe_bin):
    """An allow-everything policy that names i386 and x32 still kills them."""
    # next to the probe: a directory the test user can read
    policy = probe_bin.parent / "open.json"
    policy.write_text(json.dumps({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": ["getpid"], "action": "SCMP_ACT_LOG"}],
    }))
    os.chmod(policy, 0o644)
    results = run_filtered(caller, str(policy), [[str(probe_bin), "int80_socket"],
                                                 [str(probe_bin), "x32_getpid"],
                                                 [str(probe_bin), "getpid"]])
    seen = [outcome(r) for r in results]
    assert _refused(seen[0]) and _refused(seen[1]) and seen[2] == "exit 0", seen
