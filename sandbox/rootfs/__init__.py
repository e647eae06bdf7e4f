"""Root filesystem images: a store, safe importers, and what the mount side needs.

The CLI wires these (``sbx rootfs import|list|show|rm``); the sandbox core mounts an
overlay whose lower directories are :func:`image_lowerdirs` of the chosen image. The
lower directories need no ``userxattr`` option (:data:`LOWERDIRS_NEED_USERXATTR`):
images are flattened at import, see :mod:`sandbox.rootfs.store`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from .importer import ImportRefused, import_image
from .store import LOWERDIRS_NEED_USERXATTR, Image, Store, verify_layer

__all__ = [
    "Image",
    "ImportRefused",
    "LOWERDIRS_NEED_USERXATTR",
    "Store",
    "image_in_use",
    "image_lowerdirs",
    "import_image",
    "list_images",
    "remove_image",
    "show_image",
    "verify_image",
]


def list_images(store: Store | None = None) -> list[Image]:
    """Every image in the store, sorted by name."""
    return (store or Store()).all()


def show_image(name: str, store: Store | None = None) -> Image:
    """The image called `name`; UsageError if there is none."""
    return (store or Store()).read(name)


def remove_image(name: str, store: Store | None = None) -> None:
    """Remove image `name` and every layer no other image uses."""
    (store or Store()).remove(name)


def image_lowerdirs(name: str, store: Store | None = None) -> list[str]:
    """The image's layer directories, top layer first, as overlayfs's ``lowerdir=``
    option lists them (joined with ':'). They are never written to: mount them as
    lower directories only. Mount with ``userxattr`` only if LOWERDIRS_NEED_USERXATTR.
    """
    store = store or Store()
    image = store.read(name)
    return [str(store.layer_path(digest)) for digest in reversed(image.layers)]


@contextlib.contextmanager
def image_in_use(name: str, store: Store | None = None) -> Iterator[list[str]]:
    """Hold image `name` for a run and give its lower directories (top first).

    While the block runs, `remove_image` removes the manifest but keeps the layers;
    they are removed when the last holder leaves. The locks are close-on-exec, so the
    payload never inherits them; the supervisor, which outlives the payload, should be
    the one holding them.
    """
    store = store or Store()
    image, fds = store.hold_layers(name)
    try:
        yield [str(store.layer_path(digest)) for digest in reversed(image.layers)]
    finally:
        for fd in fds:
            os.close(fd)
        if not store.manifest_path(name).exists():
            store.collect_garbage()


def verify_image(name: str, store: Store | None = None) -> bool:
    """Whether every layer of the image still has the content it was imported with
    (reads every file)."""
    store = store or Store()
    return all(verify_layer(store, digest) for digest in store.read(name).layers)
