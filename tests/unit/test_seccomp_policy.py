"""The pure seccomp layer: parsing, one-line errors, includes/excludes, planning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox.errors import UsageError
from sandbox.seccomp_policy import Action, Host, load_policy, parse_policy

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "tests" / "data" / "docker-default-seccomp.json"
X86_64 = Host(machine="x86_64", kernel=(6, 1))


def write(tmp_path, doc) -> str:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return str(path)


def error_of(tmp_path, doc) -> str:
    with pytest.raises(UsageError) as info:
        load_policy(write(tmp_path, doc))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_action_names_the_field_and_the_allowed_values(tmp_path):
    doc = {"defaultAction": "SCMP_ACT_ALLOW",
           "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"},
                        {"names": ["ptrace"], "action": "SCMP_ACT_KILLL"}]}
    message = error_of(tmp_path, doc)
    assert message.startswith(f"{tmp_path}/policy.json: syscalls[1].action: ")
    assert '"SCMP_ACT_KILLL" is not an action' in message
    assert "SCMP_ACT_KILL_PROCESS" in message


def test_unknown_field_is_an_error(tmp_path):
    message = error_of(tmp_path, {"defaultAction": "SCMP_ACT_ALLOW",
                                  "syscals": []})
    assert ": syscals: unknown field; allowed: defaultAction," in message


def test_unknown_field_in_a_rule_is_an_error(tmp_path):
    doc = {"defaultAction": "SCMP_ACT_ALLOW",
           "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW", "arg": []}]}
    assert ": syscalls[0].arg: unknown field" in error_of(tmp_path, doc)


@pytest.mark.parametrize("arg, field", [
    ({"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}, "syscalls[0].args[0].index"),
    ({"index": 0, "value": 1, "op": "SCMP_CMP_LIKE"}, "syscalls[0].args[0].op"),
    ({"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}, "syscalls[0].args[0].value"),
    ({"index": 0, "value": 2**64, "op": "SCMP_CMP_EQ"}, "syscalls[0].args[0].value"),
    ({"index": 0, "value": True, "op": "SCMP_CMP_EQ"}, "syscalls[0].args[0].value"),
])
def test_bad_argument_comparisons(tmp_path, arg, field):
    doc = {"defaultAction": "SCMP_ACT_ALLOW",
           "syscalls": [{"names": ["clone"], "action": "SCMP_ACT_ERRNO",
                         "args": [arg]}]}
    assert f": {field}: " in error_of(tmp_path, doc)


@pytest.mark.parametrize("doc, field", [
    ({}, "defaultAction"),
    ({"defaultAction": "SCMP_ACT_NOTIFY"}, "defaultAction"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": 5000}, "defaultErrnoRet"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_PDP11"]},
     "architectures[0]"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/agent.sock"},
     "listenerPath"),
    ({"defaultAction": "SCMP_ACT_ALLOW",
      "flags": ["SECCOMP_FILTER_FLAG_SPEC_ALLOW"]}, "flags"),
    ({"defaultAction": "SCMP_ACT_ALLOW",
      "syscalls": [{"action": "SCMP_ACT_ALLOW"}]}, "syscalls[0].names"),
    ({"defaultAction": "SCMP_ACT_ALLOW",
      "syscalls": [{"names": ["Read Me"], "action": "SCMP_ACT_ALLOW"}]},
     "syscalls[0].names[0]"),
    ({"defaultAction": "SCMP_ACT_ALLOW",
      "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW", "errnoRet": 1}]},
     "syscalls[0].errnoRet"),
    ({"defaultAction": "SCMP_ACT_ALLOW",
      "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",
                    "includes": {"kernel": "5.4"}}]}, "syscalls[0].includes.kernel"),
    ({"defaultAction": "SCMP_ACT_ALLOW",
      "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",
                    "excludes": {"caps": ["SYS_ADMIN"]}}]},
     "syscalls[0].excludes.caps[0]"),
])
def test_each_error_names_its_field(tmp_path, doc, field):
    assert f"policy.json: {field}: " in error_of(tmp_path, doc)


def test_invalid_json_and_missing_file(tmp_path):
    assert "not valid JSON" in error_of(tmp_path, "{")
    with pytest.raises(UsageError, match="cannot read the seccomp policy"):
        load_policy(str(tmp_path / "absent.json"))


def test_unknown_syscall_name_is_not_a_parse_error(tmp_path):
    doc = {"defaultAction": "SCMP_ACT_ALLOW",
           "syscalls": [{"names": ["no_such_call_yet"], "action": "SCMP_ACT_ERRNO"}]}
    policy = load_policy(write(tmp_path, doc))
    assert policy.rules[0].names == ("no_such_call_yet",)


def test_digest_ignores_spacing_and_key_order():
    a = {"defaultAction": "SCMP_ACT_ALLOW",
         "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO"}]}
    b = json.loads(json.dumps(a, indent=4, sort_keys=True))
    c = {"defaultAction": "SCMP_ACT_ALLOW",
         "syscalls": [{"names": ["read"], "action": "SCMP_ACT_KILL"}]}
    assert parse_policy(a, "a").digest == parse_policy(b, "b").digest
    assert parse_policy(a, "a").digest != parse_policy(c, "c").digest


def test_actions_are_mapped_to_sbx_terms():
    doc = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 13,
           "syscalls": [
               {"names": ["a1"], "action": "SCMP_ACT_ERRNO"},
               {"names": ["a2"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
               {"names": ["a3"], "action": "SCMP_ACT_TRACE"},
               {"names": ["a4"], "action": "SCMP_ACT_KILL"},
               {"names": ["a5"], "action": "SCMP_ACT_KILL_THREAD"},
               {"names": ["a6"], "action": "SCMP_ACT_KILL_PROCESS"},
               {"names": ["a7"], "action": "SCMP_ACT_TRAP"},
               {"names": ["a8"], "action": "SCMP_ACT_LOG"},
               {"names": ["a9"], "action": "SCMP_ACT_ALLOW"},
               {"names": ["a10"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
           ]}
    plan = parse_policy(doc, "p").plan(X86_64)
    assert plan.default == Action("errno", 13)
    got = {rule.names[0]: rule.action for rule in plan.rules}
    assert got == {
        "a1": Action("errno", 1),  # errnoRet defaults to EPERM, not defaultErrnoRet
        "a2": Action("errno", 38),
        "a3": Action("errno", 38),  # TRACE without a tracer: ENOSYS
        "a4": Action("kill"),
        "a5": Action("kill"),
        "a6": Action("kill"),
        "a7": Action("trap"),
        "a8": Action("log"),
        "a9": Action("allow"),
        # a10 equals the default action: left out
    }
    assert plan.native_arch == "SCMP_ARCH_X86_64"


def test_docker_profile_plans_for_an_unprivileged_x86_64_payload():
    policy = load_policy(str(DOCKER))
    plan = policy.plan(X86_64)
    allowed = {n for r in plan.rules if r.action == Action("allow") for n in r.names}
    # caps-gated rules drop out: no capabilities inside sbx
    assert "mount" not in allowed and "reboot" not in allowed
    assert "unshare" not in allowed and "bpf" not in allowed
    # arch-gated rules: amd64 ones stay, other architectures' go
    assert "arch_prctl" in allowed and "modify_ldt" in allowed
    assert "riscv_flush_icache" not in allowed and "set_tls" not in allowed
    # minKernel 4.8 holds on 6.1
    assert "ptrace" in allowed
    clone = [r for r in plan.rules if r.names == ("clone",)]
    assert [(r.args[0].index, r.args[0].value) for r in clone] == [(0, 0x7E020000)]
    clone3 = [r for r in plan.rules if r.names == ("clone3",)]
    assert clone3[0].action == Action("errno", 38)


def test_min_kernel_and_capabilities_are_evaluated():
    policy = load_policy(str(DOCKER))
    old = policy.plan(Host(machine="x86_64", kernel=(4, 4)))
    allowed = {n for r in old.rules if r.action == Action("allow") for n in r.names}
    assert "ptrace" not in allowed
    admin = Host(machine="x86_64", kernel=(6, 1), caps=frozenset({"CAP_SYS_ADMIN"}))
    plan = policy.plan(admin)
    allowed = {n for r in plan.rules if r.action == Action("allow") for n in r.names}
    assert "mount" in allowed
    assert not [r for r in plan.rules if r.names == ("clone3",)]


def test_aarch64_plans_its_own_rules():
    plan = load_policy(str(DOCKER)).plan(Host(machine="aarch64", kernel=(6, 1)))
    allowed = {n for r in plan.rules for n in r.names}
    assert "set_tls" in allowed and "arch_prctl" not in allowed
    assert plan.native_arch == "SCMP_ARCH_AARCH64"


def test_unsupported_architecture_is_a_usage_error():
    policy = load_policy(str(DOCKER))
    with pytest.raises(UsageError, match="no seccomp support for the mips"):
        policy.plan(Host(machine="mips", kernel=(6, 1)))


@pytest.mark.parametrize("name", ["default", "strict"])
def test_shipped_policies_load(name):
    policy = load_policy(str(REPO / "profiles" / "seccomp" / f"{name}.json"))
    plan = policy.plan(X86_64)
    kinds = {r.action.kind for r in plan.rules}
    if name == "strict":
        assert plan.default == Action("kill")
        assert kinds == {"allow", "errno"}
    else:
        assert plan.default == Action("allow")
        assert kinds == {"errno"}


@pytest.mark.parametrize("name", ["default", "strict"])
def test_ioctl_terminal_requests_are_compared_on_the_low_32_bits(name):
    policy = load_policy(str(REPO / "profiles" / "seccomp" / f"{name}.json"))
    for rule in policy.plan(X86_64).rules:
        if rule.names == ("ioctl",):
            (check,) = rule.args
            assert (check.index, check.op, check.value) == (
                1, "SCMP_CMP_MASKED_EQ", 0xFFFFFFFF)
            if name == "default":
                assert check.value_two in (0x5412, 0x541C)
            else:
                assert check.value_two not in (0x5412, 0x541C)
