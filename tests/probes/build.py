"""Build the C probes with the host's gcc into a directory every caller can read.

Binaries are never committed: the tests build them from source each session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_probe(dest: Path | None = None) -> Path:
    """Compile probe.c; return the binary's path. Raises RuntimeError without gcc."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc is not installed; the seccomp probes need it")
    if dest is None:
        dest = Path(tempfile.mkdtemp(prefix="sbx-probe-"))
    os.chmod(dest, 0o755)  # the unprivileged test user runs it too
    binary = dest / "probe"
    subprocess.run(
        [gcc, "-O1", "-Wall", "-Werror", "-o", str(binary), str(HERE / "probe.c")],
        check=True,
        capture_output=True,
    )
    os.chmod(binary, 0o755)
    return binary


def build_c_program(source: str, dest: Path, name: str) -> Path:
    """Compile a small C program (a payload for the tests) into dest/name."""
    src = dest / f"{name}.c"
    src.write_text(source)
    binary = dest / name
    subprocess.run(["gcc", "-O1", "-o", str(binary), str(src)], check=True)
    os.chmod(binary, 0o755)
    return binary
