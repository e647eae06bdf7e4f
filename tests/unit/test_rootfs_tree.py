"""TreeWriter and the strict tar reader on small trees in a temporary directory:
what each rule creates, refuses or skips. (Files only; no namespaces.)"""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile

import pytest

from sandbox.rootfs.archive import (
    CHAR_DEVICE,
    DIR,
    FIFO,
    FILE,
    HARDLINK,
    SYMLINK,
    ArchiveError,
    Entry,
    directory_entries,
    tar_entries,
)
from sandbox.rootfs.tree import TreeWriter, UnsafeEntry, remove_tree, summarize


def content(data: bytes):
    return lambda: io.BytesIO(data)


def d(name, mode=0o755):
    return Entry(name, DIR, mode, 1000.0), None


def f(name, data=b"x", mode=0o644):
    return Entry(name, FILE, mode, 1000.0, size_bytes=len(data)), content(data)


def link(name, target):
    return Entry(name, SYMLINK, 0o777, 1000.0, target), None


def hard(name, target):
    return Entry(name, HARDLINK, 0o644, 1000.0, target), None


def build(root, *layers, layer_mode=False):
    writer = TreeWriter(str(root), layer_mode=layer_mode)
    try:
        for layer in layers:
            writer.begin_layer()
            writer.apply_all(iter(layer))
        summary = writer.summary()
        writer.finish()
    finally:
        writer.close()
    return writer, summary


@pytest.fixture
def root(tmp_path):
    path = tmp_path / "root"
    path.mkdir()
    yield path
    remove_tree(str(path))


def test_files_dirs_and_symlinks_are_created_with_their_modes(root):
    build(
        root,
        [
            d("./etc", 0o755),
            f("etc/hostname", b"sbx\n", 0o600),
            link("etc/mtab", "/proc/self/mounts"),
            d("ro", 0o555),
        ],
    )
    assert (root / "etc/hostname").read_bytes() == b"sbx\n"
    assert stat.S_IMODE(os.stat(root / "etc/hostname").st_mode) == 0o600
    assert os.readlink(root / "etc/mtab") == "/proc/self/mounts"
    assert stat.S_IMODE(os.stat(root / "ro").st_mode) == 0o555
    assert os.stat(root / "etc/hostname").st_mtime == 1000.0


def test_setuid_and_setgid_bits_are_cleared_with_a_note(root):
    writer, _ = build(
        root, [f("su", mode=0o4755), f("wall", mode=0o2755), d("mail", 0o3775)]
    )
    assert stat.S_IMODE(os.stat(root / "su").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(root / "wall").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(root / "mail").st_mode) == 0o1775  # sticky kept
    assert any("'su'" in note and "setuid" in note for note in writer.stats.notes)


def test_devices_and_fifos_are_skipped_with_a_note(root):
    writer, _ = build(
        root,
        [
            (Entry("dev/null", CHAR_DEVICE, 0o666, 0.0), None),
            (Entry("pipe", FIFO, 0o644, 0.0), None),
        ],
    )
    assert not os.path.lexists(root / "dev/null") and not os.path.lexists(root / "pipe")
    assert any("'dev/null'" in note for note in writer.stats.notes)


@pytest.mark.parametrize(
    "entries, bad",
    [
        ([link("out", "/tmp"), f("out/x")], "out/x"),
        ([link("up", ".."), f("up/up/x")], "up/up/x"),
        ([link("out", "/tmp"), d("out/dir")], "out/dir"),
        ([link("out", "/"), hard("out/x", "etc")], "out/x"),
        ([f("file"), f("file/x")], "file/x"),
        ([hard("h", "/etc/passwd")], "h"),
        ([hard("h", "../../etc/passwd")], "h"),
        ([hard("h", "etc/passwd")], "h"),
        ([link("out", "/etc"), hard("h", "out/passwd")], "h"),
        ([d("dir"), hard("h", "dir")], "h"),
    ],
)
def test_unsafe_entries_are_refused_by_name(root, entries, bad):
    with pytest.raises(UnsafeEntry) as caught:
        build(root, entries)
    assert caught.value.entry_name == bad


def test_a_file_replacing_a_symlink_does_not_write_through_it(root, tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("keep")
    build(root, [link("x", str(outside)), f("x", b"new")])
    assert outside.read_text() == "keep"
    assert (root / "x").read_bytes() == b"new" and not (root / "x").is_symlink()


def test_a_file_replacing_a_hard_link_leaves_the_other_name_alone(root):
    build(root, [f("a", b"one"), hard("b", "a"), f("a", b"two")])
    assert (root / "a").read_bytes() == b"two" and (root / "b").read_bytes() == b"one"


def test_hard_links_share_an_inode(root):
    build(root, [f("a", b"one"), hard("b", "./a")])
    assert os.stat(root / "a").st_ino == os.stat(root / "b").st_ino


def test_whiteout_and_opaque_directory_across_layers(root):
    lower = [d("d"), f("d/old1"), d("d/sub"), f("d/sub/old2"), f("gone"), f("keep")]
    upper = [
        f("d/new"),
        f(".wh.gone"),
        f("d/.wh..wh..opq"),
        d("d/sub"),
        f("d/sub/new2"),
    ]
    build(root, lower, upper, layer_mode=True)
    assert sorted(os.listdir(root)) == ["d", "keep"]
    assert sorted(os.listdir(root / "d")) == ["new", "sub"]
    assert os.listdir(root / "d/sub") == ["new2"]


def test_whiteouts_are_plain_names_outside_layer_mode(root):
    build(root, [f(".wh.x")])
    assert os.listdir(root) == [".wh.x"]


def test_digest_depends_on_content_mode_and_names(tmp_path):
    def digest(*entries):
        target = tmp_path / f"t{len(list(tmp_path.iterdir()))}"
        target.mkdir()
        return build(target, list(entries))[1].digest

    base = digest(f("a", b"1"), link("l", "a"))
    assert base == digest(f("a", b"1"), link("l", "a"))
    assert base != digest(f("a", b"2"), link("l", "a"))
    assert base != digest(f("a", b"1", 0o600), link("l", "a"))
    assert base != digest(f("b", b"1"), link("l", "b"))


def test_recorded_digest_matches_reading_the_tree_back(root):
    _, summary = build(
        root,
        [d("ro", 0o500), f("ro/x", b"data", 0o400), f("y", b"abc"), hard("z", "y")],
    )
    assert summarize(str(root)) == summary
    assert summary.size_bytes == 4 + 3


def test_remove_tree_removes_read_only_directories(tmp_path):
    top = tmp_path / "t"
    top.mkdir()
    build(top, [d("a", 0o000), d("b", 0o555), f("b/c")])
    remove_tree(str(top))
    assert not top.exists()


def test_directory_entries_turn_shared_inodes_into_hard_links(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a").write_text("a")
    os.link(src / "sub" / "a", src / "b")
    os.symlink("/etc", src / "etc")
    kinds = {e.name: (e.kind, e.link_target) for e, _ in directory_entries(str(src))}
    assert kinds["."] == (DIR, "")
    assert kinds["etc"] == (SYMLINK, "/etc")
    assert sorted([kinds["b"], kinds["sub/a"]]) == [(FILE, ""), (HARDLINK, "b")]


# --- the strict tar reader ----------------------------------------------------------


def tar_bytes(*members: tuple[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def read_all(path):
    return [
        (e.name, opener().read() if opener else None)
        for e, opener in tar_entries(str(path))
    ]


def test_tar_reader_reads_plain_and_gzip(tmp_path):
    raw = tar_bytes(("a", b"1" * 3000), ("b", b"2"))
    (tmp_path / "t.tar").write_bytes(raw)
    (tmp_path / "t.tgz").write_bytes(gzip.compress(raw))
    expected = [("a", b"1" * 3000), ("b", b"2")]
    assert read_all(tmp_path / "t.tar") == read_all(tmp_path / "t.tgz") == expected


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[:1024], "truncated"),  # cut at a member boundary
        (lambda raw: raw[:3072], "truncated"),  # no closing zero blocks
        (lambda raw: raw[:700], "truncated"),  # cut inside a member's data
        (lambda raw: raw[:1024] + b"\x01" * 512 + raw[1536:], "damaged tar header"),
        (lambda raw: b"", "not a tar archive"),
        (lambda raw: b"hello world" * 100, "not a tar archive"),
    ],
)
def test_tar_reader_refuses_damage_tarfile_would_accept(tmp_path, damage, message):
    raw = tar_bytes(("a", b"1" * 100), ("b", b"2" * 100), ("c", b"3"))
    (tmp_path / "bad.tar").write_bytes(damage(raw))
    with pytest.raises(ArchiveError, match=message):
        read_all(tmp_path / "bad.tar")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda gz: gz[: len(gz) // 2], "truncated"),
        (lambda gz: gz[:-8] + b"\0" * 8, "corrupt"),  # CRC and length trailer
    ],
)
def test_gzip_damage_is_caught(tmp_path, damage, message):
    raw = tar_bytes(*[(f"f{i}", os.urandom(2000)) for i in range(20)])
    (tmp_path / "bad.tgz").write_bytes(damage(gzip.compress(raw)))
    with pytest.raises(ArchiveError, match=message):
        read_all(tmp_path / "bad.tgz")
