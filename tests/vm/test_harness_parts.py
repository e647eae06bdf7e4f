"""The VM harness's pure parts, checked without booting anything: the cpio writer
against cpio(1), the vmlinux extraction, the module dependency reader, stage 2."""

from __future__ import annotations

import lzma
import os
import shutil
import struct
import subprocess

import pytest

from tests.vm import harness


def test_newc_archive_lists_and_extracts_with_cpio(tmp_path):
    if shutil.which("cpio") is None:
        pytest.skip("cpio(1) is not installed, so there is nothing to compare with")
    archive = harness.newc_archive([
        ("bin", 0o040755, b"", 0),
        ("bin/hello", 0o100755, b"#!/bin/sh\necho hi\n", 0),
        ("odd-size", 0o100644, b"12345", 0),
        ("dev", 0o040755, b"", 0),
        ("dev/console", 0o020600, b"", os.makedev(5, 1)),
    ])
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=archive,
                             capture_output=True, check=True).stdout.decode()
    assert listing.split() == ["bin", "bin/hello", "odd-size", "dev", "dev/console"]

    subprocess.run(["cpio", "-i", "-d", "--quiet", "bin/hello", "odd-size"],
                   input=archive, cwd=tmp_path, check=True)
    assert (tmp_path / "bin" / "hello").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "odd-size").read_bytes() == b"12345"
    assert os.stat(tmp_path / "bin" / "hello").st_mode & 0o777 == 0o755


def test_extract_vmlinux_finds_the_elf_behind_a_decoy_payload():
    kernel = b"\x7fELF" + bytes(range(256)) * 64
    decoy = lzma.compress(b"not a kernel", format=lzma.FORMAT_XZ)
    image = b"MZ boot sector" + decoy + b"\x00" * 100 + lzma.compress(kernel) + b"tail"
    assert harness.extract_vmlinux(image) == kernel


def test_extract_vmlinux_says_what_is_missing():
    with pytest.raises(harness.VMError, match="no xz or gzip payload"):
        harness.extract_vmlinux(b"MZ nothing compressed here")


def _elf_with_modinfo(modinfo: bytes) -> bytes:
    """A minimal ELF64 file: a header, .modinfo, .shstrtab and three section headers."""
    shstrtab = b"\x00.modinfo\x00.shstrtab\x00"
    modinfo_at = 64
    shstrtab_at = modinfo_at + len(modinfo)
    shoff = shstrtab_at + len(shstrtab)
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 2)
    sections = bytes(64)  # the null section
    sections += struct.pack("<IIQQQQ", 1, 1, 0, 0, modinfo_at, len(modinfo)) + bytes(24)
    sections += struct.pack("<IIQQQQ", 10, 3, 0, 0, shstrtab_at, len(shstrtab))
    sections += bytes(24)
    return bytes(header) + modinfo + shstrtab + sections


def test_modinfo_depends_reads_the_modinfo_section():
    ko = _elf_with_modinfo(b"license=GPL\x00depends=9pnet,net-fs,virtio\x00name=x\x00")
    assert harness.modinfo_depends(ko) == ["9pnet", "net_fs", "virtio"]
    assert harness.modinfo_depends(_elf_with_modinfo(b"depends=\x00")) == []


def test_stage2_quotes_the_environment_and_drops_to_the_uid():
    script = harness.stage2_script(4242, {"GREETING": "it's a b", "X": "$(reboot)"})
    assert "/usr/bin/setpriv --reuid=4242 --regid=4242 --clear-groups" in script
    assert """'GREETING=it'"'"'s a b'""" in script
    assert "'X=$(reboot)'" in script
    assert f"/sys/fs/cgroup/{harness.scope_path(4242)}" in script
    assert harness.scope_path(4242).startswith("user.slice/user-4242.slice/user@4242.")
