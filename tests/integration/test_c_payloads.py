"""C programs built with the host's gcc, run inside: how they end is reported exactly
(exit code, or the fatal signal by name) and sbx exits as a shell would."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.conftest import compile_c, shared_tmpdir

PROGRAMS = {
    "exit3": "#include <stdlib.h>\nint main(void) { exit(3); }\n",
    "fpe": "#include <signal.h>\nint main(void) { raise(SIGFPE); return 0; }\n",
    "abort": "#include <stdlib.h>\nint main(void) { abort(); }\n",
    "segv": "int main(void) { *(volatile int *)0 = 1; return 0; }\n",
    "hello": (
        "#include <stdio.h>\n#include <unistd.h>\n"
        'int main(void) { printf("hello %d\\n", (int)getuid()); return 0; }\n'
    ),
}


@pytest.fixture(scope="module")
def programs():
    """Build each program once, into a directory every caller can read."""
    with shared_tmpdir("sbx-c-") as build:
        for name, source in PROGRAMS.items():
            compile_c(build, name, source)
        yield build


def run_c(caller, programs: Path, name: str):
    done = caller.run(["exec", "--json", "--dir", str(programs), "--", f"./{name}"])
    assert done.stdout, f"no result (exit {done.returncode}): {done.stderr!r}"
    return done, json.loads(done.stdout)


def test_exit_3_is_re_with_exit_code_3(caller, programs):
    done, res = run_c(caller, programs, "exit3")
    assert (res["verdict"], res["exit_code"], res["signal"]) == ("RE", 3, None)
    assert done.returncode == 3


@pytest.mark.parametrize(
    ("name", "signal_name"),
    # Integer division by zero is not used: this host's CPU returns 0 instead of
    # trapping, so raise() is the portable way to die of SIGFPE.
    [("fpe", "SIGFPE"), ("abort", "SIGABRT"), ("segv", "SIGSEGV")],
)
def test_fatal_signal_is_re_with_its_name(caller, programs, name, signal_name):
    done, res = run_c(caller, programs, name)
    assert (res["verdict"], res["signal"], res["exit_code"]) == (
        "RE",
        signal_name,
        None,
    )
    assert done.returncode == 128 + signal.Signals[signal_name].value


def test_ok_program_and_its_output(caller, programs):
    done, res = run_c(caller, programs, "hello")
    assert (res["verdict"], res["exit_code"]) == ("OK", 0)
    assert res["stdout"] == "hello 1000\n"
    assert done.returncode == 0
