"""Pure checks of the rootfs package: entry names, image names, manifests, layout
descriptors. No archive is unpacked here."""

from __future__ import annotations

import json

import pytest

from sandbox.errors import UsageError
from sandbox.rootfs.archive import ArchiveError, compression_of
from sandbox.rootfs.importer import blob_path, choose_manifest
from sandbox.rootfs.store import Image, Store, check_name, default_root
from sandbox.rootfs.tree import UnsafeEntry, clean_name

HEX = "ab" * 32


@pytest.mark.parametrize(
    "name, parts",
    [
        ("./etc/passwd", ("etc", "passwd")),
        ("etc//passwd/", ("etc", "passwd")),
        ("./", ()),
        (".", ()),
        ("a/./b", ("a", "b")),
        ("..foo/bar..", ("..foo", "bar..")),
    ],
)
def test_clean_name_keeps_relative_names(name, parts):
    assert clean_name(name) == parts


@pytest.mark.parametrize(
    "name, why",
    [
        ("/tmp/x", "absolute"),
        ("../x", "'..'"),
        ("a/../../x", "'..'"),
        ("a/..", "'..'"),
        ("a\0b", "NUL"),
    ],
)
def test_clean_name_refuses_escapes_and_names_the_entry(name, why):
    with pytest.raises(UnsafeEntry) as caught:
        clean_name(name)
    assert caught.value.entry_name == name
    assert repr(name) in str(caught.value) and why in str(caught.value)


@pytest.mark.parametrize("name", ["debian", "bookworm-minbase", "a.b_c+d-1", "X" * 128])
def test_check_name_accepts(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "-x", "a/b", "a b", "é", "X" * 129])
def test_check_name_refuses_with_one_line(name):
    with pytest.raises(UsageError) as caught:
        check_name(name)
    assert "\n" not in str(caught.value)


def test_default_root_follows_xdg_data_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_root() == tmp_path / "sbx" / "rootfs"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_root() == tmp_path / ".local" / "share" / "sbx" / "rootfs"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_root() == tmp_path / ".local" / "share" / "sbx" / "rootfs"


def test_image_manifest_round_trip():
    image = Image(
        "deb",
        "/src.tar",
        "tar",
        "2025-01-01T00:00:00+00:00",
        (HEX,),
        10,
        ("sha256:" + HEX,),
        ("note",),
    )
    data = json.loads(json.dumps(image.to_json()))
    assert data["version"] == 1 and data["layers"] == [HEX]
    assert Image.from_json(data) == image


@pytest.mark.parametrize("layers", [[], ["../../etc"], ["AB" * 32]])
def test_image_manifest_refuses_bad_layer_digests(layers):
    image = Image("deb", "/s", "tar", "t", (HEX,), 1)
    data = image.to_json() | {"layers": layers}
    with pytest.raises(ValueError):
        Image.from_json(data)


def test_store_layer_path_refuses_non_digests(tmp_path):
    store = Store(tmp_path)
    assert store.layer_path(HEX) == tmp_path / "layers" / HEX
    with pytest.raises(Exception, match="not a layer digest"):
        store.layer_path("../x")


@pytest.mark.parametrize(
    "head, kind",
    [
        (b"\x1f\x8b\x08\x00", "gzip"),
        (b"\xfd7zXZ\x00\x00", "xz"),
        (b"BZh91AY", "bzip2"),
        (b"\x28\xb5\x2f\xfd\x00", "zstd"),
        (b"./\x00\x00", "none"),
    ],
)
def test_compression_is_told_by_magic_bytes(head, kind):
    assert compression_of(head) == kind


def test_choose_manifest_single_and_per_platform(monkeypatch):
    one = {"digest": "sha256:" + HEX, "mediaType": "m"}
    assert choose_manifest({"manifests": [one, dict(one)]}) == one
    amd = {
        "digest": "sha256:" + "1" * 64,
        "platform": {"architecture": "amd64", "os": "linux"},
    }
    arm = {
        "digest": "sha256:" + "2" * 64,
        "platform": {"architecture": "arm64", "os": "linux"},
    }
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert choose_manifest({"manifests": [arm, amd]}) == amd
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert choose_manifest({"manifests": [arm, amd]}) == arm


def test_choose_manifest_refuses_ambiguity_and_emptiness():
    a = {"digest": "sha256:" + "1" * 64}
    b = {"digest": "sha256:" + "2" * 64}
    with pytest.raises(ArchiveError, match="cannot tell which"):
        choose_manifest({"manifests": [a, b]})
    with pytest.raises(ArchiveError, match="no manifests"):
        choose_manifest({"manifests": []})


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:../../../etc/passwd",
        "sha512:" + HEX,
        "sha256:" + HEX.upper(),
        HEX,
        "sha256:" + HEX[:-1] + "/",
    ],
)
def test_blob_path_refuses_digests_that_are_not_sha256_hex(tmp_path, digest):
    with pytest.raises(ArchiveError, match="not a sha256 digest"):
        blob_path(tmp_path, digest)


def test_blob_path_refuses_a_blob_linking_outside(tmp_path):
    (tmp_path / "blobs" / "sha256").mkdir(parents=True)
    (tmp_path / "blobs" / "sha256" / HEX).symlink_to("/etc/passwd")
    with pytest.raises(ArchiveError, match="outside the layout"):
        blob_path(tmp_path, "sha256:" + HEX)
