"""The store in-process, on a temporary directory: manifests, sharing, damage,
verification. (Files only; the kernel side is in tests/integration.)"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile

import pytest

from sandbox import rootfs
from sandbox.errors import SandboxError, UsageError
from sandbox.rootfs import Store


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store")


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("sbx\n")
    os.symlink("etc/hostname", src / "link")
    return src


def test_import_list_show_lowerdirs_and_remove(store, tree):
    image = rootfs.import_image(str(tree), "t", store=store)
    assert image.source_format == "directory" and image.size_bytes == 4
    assert rootfs.list_images(store) == [image]
    assert rootfs.show_image("t", store) == image
    (lower,) = rootfs.image_lowerdirs("t", store)
    with open(os.path.join(lower, "link")) as linked:
        assert linked.read() == "sbx\n"
    manifest = json.loads((store.images / "t.json").read_text())
    assert manifest["layers"] == [os.path.basename(lower)]
    assert not rootfs.LOWERDIRS_NEED_USERXATTR
    rootfs.remove_image("t", store)
    assert rootfs.list_images(store) == [] and os.listdir(store.layers) == []


def test_verify_notices_a_changed_layer(store, tree):
    rootfs.import_image(str(tree), "t", store=store)
    assert rootfs.verify_image("t", store)
    (lower,) = rootfs.image_lowerdirs("t", store)
    with open(os.path.join(lower, "etc", "hostname"), "a") as changed:
        changed.write("x")
    assert not rootfs.verify_image("t", store)


def test_a_damaged_manifest_is_reported_and_protects_its_layers(store, tree, tmp_path):
    rootfs.import_image(str(tree), "kept", store=store)
    other = tmp_path / "other"
    other.mkdir()
    rootfs.import_image(str(other), "other", store=store)
    (store.images / "kept.json").write_text("{not json")
    assert [image.name for image in rootfs.list_images(store)] == ["other"]
    with pytest.raises(SandboxError, match="damaged"):
        rootfs.show_image("kept", store)
    rootfs.remove_image("other", store)
    assert len(os.listdir(store.layers)) == 2  # nothing collected while one is unread
    rootfs.remove_image("kept", store)  # a damaged image can still be removed
    assert os.listdir(store.layers) == []


def test_usage_errors_are_one_line(store, tree):
    for call in (
        lambda: rootfs.show_image("missing", store),
        lambda: rootfs.remove_image("missing", store),
        lambda: rootfs.import_image(str(tree), "bad/name", store=store),
        lambda: rootfs.import_image("/nonexistent/x.tar", "x", store=store),
        lambda: rootfs.import_image("/dev/null", "x", store=store),
    ):
        with pytest.raises(UsageError) as caught:
            call()
        assert "\n" not in str(caught.value)


def test_a_failed_import_leaves_no_trace(store, tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\x1f\x8b" + os.urandom(200))
    with pytest.raises(UsageError, match="cannot import"):
        rootfs.import_image(str(bad), "bad", store=store)
    assert rootfs.list_images(store) == []
    assert os.listdir(store.tmp) == [] and os.listdir(store.layers) == []


def test_a_size_limit_stops_a_decompression_bomb(store, tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("zeros")
        info.size = 64 << 20
        archive.addfile(info, io.BytesIO(bytes(info.size)))
    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(gzip.compress(buffer.getvalue()))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(UsageError, match="more than the limit of 1048576 bytes"):
        rootfs.import_image(str(bomb), "bomb", max_size_bytes=1 << 20, store=store)
    assert rootfs.list_images(store) == [] and os.listdir(store.tmp) == []
