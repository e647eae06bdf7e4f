"""The `vm` fixture: runs shell scripts in a small cgroup v2 VM (see harness.py).

It skips, with the reason, only when qemu cannot run on this host. Everything else that
goes wrong (the kernel cannot be fetched, the VM does not boot) fails the test."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.vm import harness


@dataclass(frozen=True)
class VM:
    """Boots a fresh VM for each `run`; the prepared image is shared."""

    image: harness.VMImage

    def run(self, script: str, as_uid: int | None = None, timeout_s: float = 120.0,
            env: dict[str, str] | None = None) -> harness.VMResult:
        return harness.run_in_vm(script, as_uid=as_uid, timeout_s=timeout_s, env=env)


@pytest.fixture(scope="session")
def vm() -> VM:
    reason = harness.unavailable_reason()
    if reason is not None:
        pytest.skip(f"cannot boot the cgroup v2 test VM: {reason}")
    return VM(harness.prepare_image())
