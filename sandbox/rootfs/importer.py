"""Importing images from the files people have: tarballs, directories, OCI image
layouts (a directory or its tar) and ``docker save`` archives.

Every source goes through :class:`sandbox.rootfs.tree.TreeWriter`, the one place that
decides what may be written; an archive of a layout (OCI, docker) is itself unpacked
by the same code first, so the outer archive gets no more trust than the layers in it.

What a source is, is decided by its content, not its name:

- a directory holding ``oci-layout`` and ``index.json``: an OCI image layout;
- a directory holding a ``manifest.json`` that lists ``Layers``: a ``docker save``
  tree;
- any other directory: a root filesystem, copied;
- a file: a tar archive (plain, gzip, xz or bzip2), unpacked; if what it unpacks to is
  one of the two layouts above it is imported as that, else it is the root filesystem.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import SandboxError, UsageError
from .archive import ArchiveError, EntryStream, directory_entries, tar_entries
from .store import Image, Store, check_name
from .tree import TreeWriter, UnsafeEntry, remove_tree

log = logging.getLogger(__name__)

OCI_INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
BLOB_CHUNK_BYTES = 1 << 20
# platform.machine() names -> OCI architecture names.
OCI_ARCHITECTURES = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


class ImportRefused(UsageError):
    """The source holds an entry sbx will not import; `entry` names it."""

    def __init__(self, message: str, entry: str) -> None:
        super().__init__(message)
        self.entry = entry


@dataclass(frozen=True)
class LayerRef:
    """One layer of a layout: its file and the digest the layout gives it."""

    path: Path
    digest: str  # "sha256:HEX" for OCI, the member path for docker save
    label: str  # how errors name it, e.g. "layer 2 of 3 (sha256:1a2b3c4d5e6f)"


# --- public entry point ------------------------------------------------------------


def import_image(
    source: str,
    name: str,
    *,
    replace: bool = False,
    max_size_bytes: int | None = None,
    store: Store | None = None,
) -> Image:
    """Import `source` as image `name` and return it.

    `max_size_bytes` caps the file content unpacked (each archive counted on its
    own), so a decompression bomb fails cleanly instead of filling the disk.

    UsageError (ImportRefused for an unsafe entry) when the source is missing, not a
    format sbx reads, damaged, or holds something sbx refuses; SandboxError when the
    store cannot be written. Either way nothing is stored.
    """
    store = store or Store()
    check_name(name)
    path = _check_source(source, store)
    if store.manifest_path(name).exists() and not replace:
        raise UsageError(
            f"an image named {name!r} already exists; remove it first "
            f"(`sbx rootfs rm {name}`) or import under another name"
        )
    with store.locked():
        store.remove_abandoned_work_dirs()
    work = store.new_work_dir()
    log.info("importing %s as image %s", path, name)
    try:
        image, layer_dir = _build(path, name, work, max_size_bytes)
        store.commit(image, {image.layers[0]: layer_dir}, replace)
        return image
    except UnsafeEntry as exc:
        raise ImportRefused(
            f"cannot import {source!r}: {exc}; nothing was stored", exc.entry_name
        ) from exc
    except ArchiveError as exc:
        raise UsageError(
            f"cannot import {source!r}: {exc}; nothing was stored"
        ) from exc
    except OSError as exc:
        raise SandboxError(
            f"cannot import {source!r}: writing the store {store.root} failed: {exc}"
        ) from exc
    finally:
        remove_tree(str(work))


def _check_source(source: str, store: Store) -> Path:
    path = Path(os.path.abspath(source))
    if not path.exists():
        raise UsageError(f"cannot import {source!r}: no such file or directory")
    real, store_real = os.path.realpath(path), os.path.realpath(store.root)
    if os.path.commonpath([real, store_real]) == store_real:
        raise UsageError(f"cannot import {source!r}: it is inside the image store")
    if path.is_dir() and os.path.commonpath([real, store_real]) == real:
        raise UsageError(
            f"cannot import {source!r}: the image store {store.root} is inside it; "
            "import a directory that does not contain the store"
        )
    if not (path.is_dir() or path.is_file()):
        raise UsageError(
            f"cannot import {source!r}: it is neither a directory nor a regular file"
        )
    return path


# --- building the merged tree ------------------------------------------------------


def _build(
    path: Path, name: str, work: Path, max_bytes: int | None
) -> tuple[Image, Path]:
    """Build the image's tree in `work` and describe it. Returns the image and the
    directory holding its (single, merged) layer."""
    unpacked = None
    if path.is_dir():
        layout = path
    else:
        layout = work / "unpacked"
        layout.mkdir()
        entries = tar_entries(str(path), repr(str(path)))
        unpacked = _write_tree(layout, entries, max_bytes)

    layer_dir = work / "layer"
    layers = _layout_layers(layout)
    refs: list[LayerRef] = []
    if layers is not None:
        source_format, refs = layers
        layer_dir.mkdir()
        summary, notes = _apply_layers(layer_dir, refs, max_bytes)
    elif unpacked is None:
        source_format = "directory"
        layer_dir.mkdir()
        entries = directory_entries(str(path))
        summary, notes = _write_tree(layer_dir, entries, max_bytes)
    else:
        # A plain root filesystem tarball: what was unpacked is the layer.
        source_format = "tar"
        layer_dir = layout
        summary, notes = unpacked

    image = Image(
        name=name,
        source=str(path),
        source_format=source_format,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        layers=(summary.digest,),
        size_bytes=summary.size_bytes,
        source_layers=tuple(ref.digest for ref in refs),
        notes=tuple(notes),
    )
    return image, layer_dir


def _write_tree(root: Path, entries: EntryStream, max_bytes: int | None):
    writer = TreeWriter(str(root), max_bytes=max_bytes)
    try:
        writer.apply_all(entries)
        summary = writer.summary()
        writer.finish()
    finally:
        writer.close()
    return summary, writer.stats.notes


def _apply_layers(root: Path, refs: list[LayerRef], max_bytes: int | None):
    writer = TreeWriter(str(root), layer_mode=True, max_bytes=max_bytes)
    try:
        for ref in refs:
            _verify_blob(ref)
            writer.begin_layer()
            try:
                writer.apply_all(tar_entries(str(ref.path), ref.label))
            except UnsafeEntry as exc:
                reason = f"(in {ref.label}) {exc.reason}"
                raise UnsafeEntry(exc.entry_name, reason) from exc
            log.info("applied %s", ref.label)
        summary = writer.summary()
        writer.finish()
    finally:
        writer.close()
    return summary, writer.stats.notes


def _verify_blob(ref: LayerRef) -> None:
    if not ref.digest.startswith("sha256:"):
        return  # docker save names layers by path; their digests are in the config
    digest = hashlib.sha256()
    with open(ref.path, "rb") as blob:
        while chunk := blob.read(BLOB_CHUNK_BYTES):
            digest.update(chunk)
    if "sha256:" + digest.hexdigest() != ref.digest:
        raise ArchiveError(f"{ref.label} does not match its digest (damaged blob)")


# --- layouts -----------------------------------------------------------------------


def _layout_layers(root: Path) -> tuple[str, list[LayerRef]] | None:
    """("oci" or "docker", the layers bottom first) if `root` is a layout, else
    None."""
    if (root / "oci-layout").is_file() and (root / "index.json").is_file():
        return "oci", oci_layers(root)
    manifest = root / "manifest.json"
    if manifest.is_file():
        try:
            entries = json.loads(manifest.read_text())
        except (ValueError, UnicodeDecodeError):
            return None
        if (
            isinstance(entries, list)
            and entries
            and all(isinstance(e, dict) and "Layers" in e for e in entries)
        ):
            return "docker", docker_layers(root, entries)
    return None


def oci_layers(root: Path) -> list[LayerRef]:
    """The layers of the one image in the OCI layout at `root`, bottom first."""
    layout = _read_json(_inside(root, "oci-layout", "oci-layout"), "oci-layout")
    if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
        raise ArchiveError("oci-layout has no imageLayoutVersion: not an OCI layout")
    index = _read_json(_inside(root, "index.json", "index.json"), "index.json")
    descriptor = choose_manifest(index)
    while descriptor.get("mediaType") in OCI_INDEX_TYPES:
        index = _read_json(blob_path(root, descriptor.get("digest", "")), "an index")
        descriptor = choose_manifest(index)
    manifest = _read_json(blob_path(root, descriptor.get("digest", "")), "manifest")
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(layers, list) or not layers:
        raise ArchiveError("the image manifest lists no layers")
    refs = []
    for number, layer in enumerate(layers, start=1):
        digest = str(layer.get("digest", ""))
        label = f"layer {number} of {len(layers)} ({digest[:19]})"
        refs.append(LayerRef(blob_path(root, digest), digest, label))
    return refs


def choose_manifest(index) -> dict:
    """The descriptor of the image to import from an OCI index: the only one, or the
    only one for this machine's platform."""
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise ArchiveError("index.json lists no manifests")
    distinct = list({str(m.get("digest")): m for m in manifests}.values())
    if len(distinct) > 1:
        arch = OCI_ARCHITECTURES.get(platform.machine(), platform.machine())
        distinct = [
            m
            for m in distinct
            if m.get("platform", {}).get("architecture") == arch
            and m.get("platform", {}).get("os", "linux") == "linux"
        ]
    if len(distinct) != 1:
        raise ArchiveError(
            f"the index lists {len(manifests)} manifests and sbx cannot tell which "
            "one to import; export a single image (one tag, one platform)"
        )
    return distinct[0]


def blob_path(root: Path, digest: str) -> Path:
    """The file of blob `digest` ("sha256:HEX"), which must lie inside `root`."""
    algorithm, _, hex_digest = digest.partition(":")
    if (
        algorithm != "sha256"
        or len(hex_digest) != 64
        or not all(c in "0123456789abcdef" for c in hex_digest)
    ):
        raise ArchiveError(f"{digest!r} is not a sha256 digest sbx can look up")
    return _inside(root, f"blobs/sha256/{hex_digest}", f"blob {digest[:19]}")


def docker_layers(root: Path, entries: list) -> list[LayerRef]:
    """The layers of the one image in a `docker save` tree, bottom first."""
    distinct = list({json.dumps(e.get("Layers")): e for e in entries}.values())
    if len(distinct) != 1:
        raise ArchiveError(
            f"manifest.json lists {len(distinct)} different images; save one image "
            "(`docker save IMAGE:TAG`) and import that"
        )
    layers = distinct[0]["Layers"]
    if not isinstance(layers, list) or not layers:
        raise ArchiveError("manifest.json lists no layers")
    refs = []
    for number, member in enumerate(layers, start=1):
        label = f"layer {number} of {len(layers)} ({member})"
        refs.append(LayerRef(_inside(root, str(member), label), str(member), label))
    return refs


def _inside(root: Path, relative: str, label: str) -> Path:
    """`root/relative` after resolving symlinks, refused unless it is still inside
    `root`: a layout may link duplicate layers to each other, never elsewhere."""
    if relative.startswith("/") or ".." in relative.split("/"):
        raise ArchiveError(f"{label}: {relative!r} points outside the layout")
    real_root = os.path.realpath(root)
    resolved = os.path.realpath(root / relative)
    if os.path.commonpath([resolved, real_root]) != real_root:
        raise ArchiveError(f"{label}: {relative!r} resolves outside the layout")
    if not os.path.isfile(resolved):
        raise ArchiveError(f"{label}: {relative!r} is missing from the layout")
    return Path(resolved)


def _read_json(path: Path, label: str):
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"{label} is not valid JSON ({exc})") from exc
