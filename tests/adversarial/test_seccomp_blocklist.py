"""Every door the issue lists, knocked on with the C probe under both shipped
policies, as root and as the unprivileged user, on the real kernel.

Each probe runs three ways: under the policy as shipped (the errno, ENOSYS, or a
violation the supervisor names), under the same filter with its errnos marked
(200 + errno: proves the refusal came from the filter, not from the kernel's own
permission check, which also says EPERM to an unprivileged caller), and for the
controls, without a filter.
"""

from __future__ import annotations

import pytest

from tests.probes.cases import BLOCKED, CONTROLS, STRICT_ERRNO
from tests.probes.fixtures import (  # noqa: F401  (fixtures)
    MARK_BASE,
    outcome,
    policy_path,
    probe_bin,
    run_filtered,
)

NAMES = list(BLOCKED)


def _run(caller, probe_bin, policy, names, mark=False) -> dict[str, str]:
    results = run_filtered(caller, policy, [[str(probe_bin), n] for n in names], mark)
    return {name: outcome(r) for name, r in zip(names, results)}


def test_default_policy_returns_eperm_for_every_blocked_call(caller, probe_bin):
    got = _run(caller, probe_bin, policy_path(caller, "default"), NAMES)
    want = {name: f"exit {err}" for name, (_, err) in BLOCKED.items()}
    assert got == want


def test_default_policy_refusals_come_from_the_filter(caller, probe_bin):
    got = _run(caller, probe_bin, policy_path(caller, "default"), NAMES, mark=True)
    want = {name: f"exit {MARK_BASE + err}" for name, (_, err) in BLOCKED.items()}
    assert got == want


def test_strict_policy_names_each_violation(caller, probe_bin):
    got = _run(caller, probe_bin, policy_path(caller, "strict"), NAMES)
    want = {
        name: f"exit {STRICT_ERRNO[name]}" if name in STRICT_ERRNO
        else f"violation {syscall}"
        for name, (syscall, _) in BLOCKED.items()
    }
    assert got == want


def test_strict_policy_errnos_come_from_the_filter(caller, probe_bin):
    names = list(STRICT_ERRNO)
    got = _run(caller, probe_bin, policy_path(caller, "strict"), names, mark=True)
    assert got == {n: f"exit {MARK_BASE + STRICT_ERRNO[n]}" for n in names}


@pytest.mark.parametrize("policy", ["default", "strict"])
def test_allowed_calls_reach_the_kernel(caller, probe_bin, policy):
    names = list(CONTROLS)
    baseline = _run(caller, probe_bin, "none", names)
    assert baseline == {
        "getpid": "exit 0", "read": "exit 9", "ioctl:tcgets": "exit 9",
        "clone:plain": "exit 22",
    }
    assert _run(caller, probe_bin, policy_path(caller, policy), names) == baseline


def test_probes_are_harmless_without_a_filter(caller, probe_bin):
    """Unfiltered, no blocked probe succeeds: each fails on its invalid arguments
    (or the kernel's own permission check), so it proves nothing by succeeding
    and changes nothing on the host."""
    got = _run(caller, probe_bin, "none", NAMES)
    assert all(result != "exit 0" for result in got.values()), got
