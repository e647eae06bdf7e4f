"""Root filesystem images: a store, safe importers, and what the mount side needs.

The CLI wires these (``sbx rootfs import|list|show|rm``); the sandbox core mounts an
overlay whose lower directories are :func:`image_lowerdirs` of the chosen image. The
lower directories need no ``userxattr`` option (:data:`LOWERDIRS_NEED_USERXATTR`):
images are flattened at import, see :mod:`sandbox.rootfs.store`.
"""

from __future__ import annotations

from .importer import ImportRefused, import_image
from .store import LOWERDIRS_NEED_USERXATTR, Image, Store, verify_layer

__all__ = [
    "Image",
    "ImportRefused",
    "LOWERDIRS_NEED_USERXATTR",
    "Store",
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


def verify_image(name: str, store: Store | None = None) -> bool:
    """Whether every layer of the image still has the content it was imported with
    (reads every file)."""
    store = store or Store()
    return all(verify_layer(store, digest) for digest in store.read(name).layers)
