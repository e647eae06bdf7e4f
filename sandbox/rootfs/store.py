"""The image store: layers kept once by content digest, images as small manifests.

Layout, under ``$XDG_DATA_HOME/sbx/rootfs`` (``~/.local/share/sbx/rootfs`` when the
variable is unset or not absolute)::

    lock                    flock(2) taken for every change of images/ or layers/
    images/NAME.json        one manifest per image (see Image)
    layers/SHA256/          one extracted tree per layer, never written after import
    locks/SHA256            flock(2), shared while a run uses the layer
    tmp/PID-RANDOM/         work space of an import in progress

Why images are flattened
------------------------
An OCI image's layers delete files of lower layers with whiteouts. overlayfs, which
the sandbox mounts with the image's layers as lower directories, knows two forms of
whiteout, and neither is available to every importing user on every kernel:

- a 0/0 character device, which an unprivileged user cannot create on the host
  filesystem the store lives on;
- extended attributes (``user.overlay.whiteout``, ``user.overlay.opaque``), honoured
  only when the overlay is mounted with ``userxattr`` (kernel 5.11 or later), with
  per-file whiteouts in that form only from kernel 6.7, and only where the store's
  filesystem accepts ``user.*`` attributes.

So the importer applies every layer of an image, whiteouts included, into one merged
tree and stores that as the image's single layer. The lower directories then hold only
directories, regular files and symlinks; the mount needs no ``userxattr`` and works
with every overlayfs that can be mounted in a user namespace. The cost: two images
built on the same base share nothing unless their merged trees are identical; identical
trees (the same image imported twice, under two names, or from a tar and from a
directory holding the same files) are stored once, because a layer's name is the
digest of its content (:func:`sandbox.rootfs.tree.summarize`).

The manifest keeps a list of layers all the same, so a later store can keep OCI layers
apart (with xattr whiteouts) without changing how images are listed or mounted.

Atomicity: a layer is written in ``tmp/``, renamed into ``layers/`` (or dropped if an
identical one is there), and the manifest is written last, through a temporary file
and a rename, under the lock. An import that fails at any point leaves no manifest, so
``list_images`` never shows half an image; its work directory is removed on the way
out, or by the next import if the process died.

Removing an image while a sandbox runs on it: the manifest goes at once, but a layer
that a run holds (:meth:`Store.hold_layers`, a shared flock on ``locks/SHA256``) is
kept until the run lets go, so a running overlay never loses its lower directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import SandboxError, UsageError
from .tree import remove_tree, summarize

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
# overlayfs options the lower directories need beyond lowerdir= (see module doc).
LOWERDIRS_NEED_USERXATTR = False
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
DIGEST_PATTERN = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Image:
    """An imported image, as its manifest records it.

    `layers` are digests of directories under ``layers/``, bottom layer first (the
    order they were applied in); :func:`image_lowerdirs` gives them top first.
    `source_layers` are the digests of the source's own layers (OCI, docker), for
    provenance. `notes` lists what the import skipped or changed (device nodes not
    created, setuid bits cleared).
    """

    name: str
    source: str
    source_format: str
    created: str  # ISO 8601, UTC
    layers: tuple[str, ...]
    size_bytes: int
    source_layers: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=(), compare=False)

    def to_json(self) -> dict:
        data = asdict(self)
        data["version"] = MANIFEST_VERSION
        data["layers"] = list(self.layers)
        data["source_layers"] = list(self.source_layers)
        data["notes"] = list(self.notes)
        return data

    @classmethod
    def from_json(cls, data: dict) -> Image:
        if data.get("version") != MANIFEST_VERSION:
            raise ValueError(
                f"manifest version {data.get('version')!r} is not {MANIFEST_VERSION}"
            )
        layers = tuple(data["layers"])
        if not layers or not all(DIGEST_PATTERN.fullmatch(d) for d in layers):
            raise ValueError("layers must be a non-empty list of sha256 hex digests")
        return cls(
            name=str(data["name"]),
            source=str(data["source"]),
            source_format=str(data["source_format"]),
            created=str(data["created"]),
            layers=layers,
            size_bytes=int(data["size_bytes"]),
            source_layers=tuple(data.get("source_layers", ())),
            notes=tuple(data.get("notes", ())),
        )


def check_name(name: str) -> str:
    """`name` if it can name an image, else UsageError saying what is allowed."""
    if not NAME_PATTERN.fullmatch(name or ""):
        raise UsageError(
            f"invalid image name {name!r}: use 1-128 letters, digits, '.', '_', '+' "
            "or '-', starting with a letter or digit"
        )
    return name


def default_root() -> Path:
    """Where the current user's store lives (XDG base directory rules)."""
    data_home = os.environ.get("XDG_DATA_HOME", "")
    if not os.path.isabs(data_home):
        data_home = os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data_home) / "sbx" / "rootfs"


class Store:
    """The directories of one store. Nothing is created until something is written."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.images = self.root / "images"
        self.layers = self.root / "layers"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"

    # --- reading -------------------------------------------------------------------

    def manifest_path(self, name: str) -> Path:
        return self.images / f"{check_name(name)}.json"

    def layer_path(self, digest: str) -> Path:
        if not DIGEST_PATTERN.fullmatch(digest):
            raise SandboxError(f"corrupt store: {digest!r} is not a layer digest")
        return self.layers / digest

    def read(self, name: str) -> Image:
        path = self.manifest_path(name)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise UsageError(
                f"no image named {name!r}; `sbx rootfs list` shows the images there are"
            ) from None
        try:
            return Image.from_json(json.loads(text))
        except (ValueError, KeyError, TypeError) as exc:
            raise SandboxError(
                f"the manifest of image {name!r} ({path}) is damaged: {exc}; "
                f"remove it with `sbx rootfs rm {name}` and import the image again"
            ) from exc

    def all(self) -> list[Image]:
        """Every readable image, sorted by name; damaged manifests are logged and
        left out."""
        if not self.images.is_dir():
            return []
        images = []
        for path in sorted(self.images.glob("*.json")):
            try:
                images.append(self.read(path.stem))
            except (SandboxError, UsageError) as exc:
                log.warning("%s", exc)
        return images

    # --- writing -------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock (exclusive) for the duration of the block."""
        self._ensure_dirs()
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def new_work_dir(self) -> Path:
        """A fresh directory in tmp/ for one import, named after this process so a
        later import can tell it is abandoned."""
        self._ensure_dirs()
        work = self.tmp / f"{os.getpid()}-{secrets.token_hex(6)}"
        work.mkdir(mode=0o700)
        return work

    def remove_abandoned_work_dirs(self) -> None:
        """Remove tmp/ directories whose import process no longer exists."""
        if not self.tmp.is_dir():
            return
        for work in self.tmp.iterdir():
            pid_text = work.name.split("-", 1)[0]
            if pid_text.isdigit() and not _process_exists(int(pid_text)):
                log.info("removing %s, left by an import that did not finish", work)
                remove_tree(str(work))

    def commit(self, image: Image, layer_dirs: dict[str, Path], replace: bool) -> None:
        """Move the new layers into place and write the manifest, all under the lock.

        `layer_dirs` maps each digest of `image.layers` to its built tree in tmp/; a
        layer already stored is not stored twice.
        """
        with self.locked():
            manifest = self.manifest_path(image.name)
            if manifest.exists() and not replace:
                raise UsageError(
                    f"an image named {image.name!r} already exists; remove it first "
                    f"(`sbx rootfs rm {image.name}`) or import under another name"
                )
            for digest, built in layer_dirs.items():
                if self.layer_path(digest).exists():
                    log.info("layer %s is already stored; sharing it", digest[:12])
                    remove_tree(str(built))
                else:
                    os.rename(built, self.layer_path(digest))
            _write_atomically(manifest, json.dumps(image.to_json(), indent=2) + "\n")
            self._collect_garbage()
        log.info("stored image %s (%d bytes)", image.name, image.size_bytes)

    def hold_layers(self, name: str) -> tuple[Image, list[int]]:
        """Take a shared lock on each layer of image `name` so no removal deletes them
        while a run uses them. Returns the image and the lock descriptors (close-on-
        exec; closing them lets go)."""
        with self.locked():
            image = self.read(name)
            fds = []
            for digest in image.layers:
                fd = os.open(
                    self.locks / digest, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
                fcntl.flock(fd, fcntl.LOCK_SH)
                fds.append(fd)
        return image, fds

    def collect_garbage(self) -> None:
        """Remove every layer no image refers to and no run holds."""
        with self.locked():
            self._collect_garbage()

    def remove(self, name: str) -> None:
        with self.locked():
            manifest = self.manifest_path(name)
            if not manifest.exists():
                raise UsageError(
                    f"no image named {name!r}; `sbx rootfs list` shows the images"
                )
            manifest.unlink()
            _fsync_dir(self.images)
            self._collect_garbage()
        log.info("removed image %s", name)

    def _collect_garbage(self) -> None:
        """Remove layers no manifest refers to. Called with the lock held. A layer
        is first renamed into tmp/, so it disappears from layers/ at once. Nothing is
        collected while a manifest cannot be read: its layers may still be wanted."""
        wanted = set()
        for path in self.images.glob("*.json"):
            try:
                wanted.update(self.read(path.stem).layers)
            except (SandboxError, UsageError) as exc:
                log.warning("not removing unused layers: %s", exc)
                return
        for layer in self.layers.iterdir():
            if layer.name in wanted:
                continue
            lock = self.locks / layer.name
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                log.info("keeping layer %s: a run still uses it", layer.name[:12])
                continue
            try:
                doomed = self.tmp / f"{os.getpid()}-gc-{layer.name[:12]}"
                os.rename(layer, doomed)
                remove_tree(str(doomed))
                os.unlink(lock)
            finally:
                os.close(fd)
            log.info("removed layer %s (no image uses it)", layer.name[:12])

    def _ensure_dirs(self) -> None:
        for path in (self.root.parent, self.root):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in (self.images, self.layers, self.tmp, self.locks):
            path.mkdir(mode=0o700, exist_ok=True)


def verify_layer(store: Store, digest: str) -> bool:
    """Whether the stored layer still has the content it was stored with."""
    return summarize(str(store.layer_path(digest))).digest == digest


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.rename(temporary, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
