"""Writing entries into an image tree without ever leaving it.

:class:`TreeWriter` applies :class:`~sandbox.rootfs.archive.Entry` values to a
directory (the image being built, inside the store) under these rules:

- A name is checked before anything is done with it (:func:`clean_name`): absolute
  names and names with a ``..`` component are refused, ``.`` and empty components are
  dropped.
- Every parent directory is opened component by component, relative to the one
  before, with ``O_NOFOLLOW | O_DIRECTORY``: a component that is a symlink (or a file)
  refuses the entry. Nothing is ever resolved through a symlink, so no entry can land
  outside the tree whatever links earlier entries made.
- Regular files are created fresh (the old name is unlinked first, then
  ``O_CREAT | O_EXCL | O_NOFOLLOW``): content is never written into an existing inode,
  which could be a hard link shared with another name.
- Symlinks are stored as they are, never followed here; the sandbox resolves them
  later inside its own root.
- Hard links may only point at a file already in the tree (an earlier entry of this
  image), found by the same symlink-free walk.
- Device nodes, FIFOs and sockets are never created: they are skipped with a note.
- Setuid and setgid bits are cleared (with a note); the sticky bit is kept. Nothing
  is chowned, so every file belongs to the importing user. Extended attributes (file
  capabilities, SELinux labels, overlayfs markers) are not copied.

Directories keep owner rwx while the tree is built and get their recorded modes in
:meth:`TreeWriter.finish`, deepest first, so a read-only directory in an image does not
stop a later entry from being written into it.

OCI whiteouts are applied by :meth:`TreeWriter.begin_layer` / entries named ``.wh.X``
and ``.wh..wh..opq`` when the writer is in layer mode: the tree is the merged result of
all layers (see :mod:`sandbox.rootfs.store` for why images are flattened).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import stat
from dataclasses import dataclass, field

from .archive import (
    DIR,
    FILE,
    HARDLINK,
    READ_CHUNK_BYTES,
    SYMLINK,
    ArchiveError,
    Entry,
    EntryStream,
    Opener,
)

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
SETID_BITS = stat.S_ISUID | stat.S_ISGID
BUILD_DIR_MODE = 0o700


class UnsafeEntry(Exception):
    """An entry that would write outside the tree or break a rule above; it names the
    entry and says why."""

    def __init__(self, entry_name: str, reason: str) -> None:
        self.entry_name = entry_name
        self.reason = reason
        super().__init__(f"entry {entry_name!r} {reason}")


class _MissingParent(UnsafeEntry):
    """A directory an entry needs is not in the tree (and may not be created)."""


def clean_name(name: str) -> tuple[str, ...]:
    """The components of a source entry name, or UnsafeEntry.

    ``./a//b/`` becomes ``("a", "b")``; ``.`` alone becomes ``()`` (the tree's root).
    Absolute names and ``..`` components are refused rather than rewritten: an archive
    that has them was not made to be unpacked in a chosen directory.
    """
    if "\0" in name:
        raise UnsafeEntry(name, "has a NUL byte in its name")
    if name.startswith("/"):
        raise UnsafeEntry(name, "is an absolute path; image entries must be relative")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise UnsafeEntry(name, "has a '..' component, which could leave the image")
    return parts


@dataclass
class TreeStats:
    """What an import did besides creating entries: one note per skipped or altered
    entry, and the counts."""

    notes: list[str] = field(default_factory=list)
    entries: int = 0
    whiteouts: int = 0


class TreeWriter:
    """Applies entries to the directory `root` (which must exist and be empty)."""

    def __init__(
        self, root: str, layer_mode: bool = False, max_bytes: int | None = None
    ) -> None:
        self.root = root
        self.layer_mode = layer_mode
        # File content written so far, against max_bytes (a decompression bomb stops
        # here instead of filling the disk).
        self.max_bytes = max_bytes
        self.written_bytes = 0
        self.stats = TreeStats()
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        # The root gets a fixed mode and time unless the source names it ("./").
        self._dir_modes: dict[tuple[str, ...], tuple[int, float]] = {(): (0o755, 0.0)}
        self._file_digests: dict[tuple[str, ...], str] = {}
        self._this_layer: set[tuple[str, ...]] = set()
        os.fchmod(self._root_fd, BUILD_DIR_MODE)

    def close(self) -> None:
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    # --- public steps ------------------------------------------------------------

    def begin_layer(self) -> None:
        """Start the next layer: whiteouts from now on hide only earlier layers."""
        self._this_layer = set()

    def apply_all(self, entries: EntryStream) -> None:
        for entry, opener in entries:
            self.apply(entry, opener)

    def apply(self, entry: Entry, opener: Opener | None) -> None:
        parts = clean_name(entry.name)
        self.stats.entries += 1
        if not parts:
            if entry.kind != DIR:
                raise UnsafeEntry(
                    entry.name, "names the image's root but is not a directory"
                )
            self._dir_modes[()] = (self._safe_mode(entry), entry.mtime_s)
            return
        if self.layer_mode and parts[-1].startswith(WHITEOUT_PREFIX):
            self._whiteout(entry, parts)
            return
        self._create(entry, parts, opener)

    def finish(self) -> None:
        """Give directories their recorded modes and times, deepest first."""
        for parts in sorted(self._dir_modes, key=len, reverse=True):
            mode, mtime_s = self._dir_modes[parts]
            try:
                fd = self._open_dir(parts, entry_name="/".join(parts) or ".")
            except UnsafeEntry:
                continue  # removed by a later whiteout or replaced by a non-directory
            try:
                os.fchmod(fd, mode)
                os.utime(fd, (mtime_s, mtime_s))
            finally:
                if fd != self._root_fd:
                    os.close(fd)

    def summary(self) -> TreeSummary:
        """The tree's digest and size (see :func:`summarize`), from the digests
        recorded while writing, so file content is not read twice. Call it before
        :meth:`finish`, while every directory is still readable."""
        return summarize(self.root, self._file_digests, self._dir_modes)

    # --- creation ----------------------------------------------------------------

    def _create(self, entry: Entry, parts: tuple[str, ...], opener: Opener | None):
        parent_fd = self._open_parent(parts, entry.name)
        try:
            if entry.kind == DIR:
                self._make_dir(parent_fd, parts, entry)
            elif entry.kind == FILE:
                self._make_file(parent_fd, parts, entry, opener)
            elif entry.kind == SYMLINK:
                self._replace(parent_fd, parts)
                os.symlink(entry.link_target, parts[-1], dir_fd=parent_fd)
                self._set_time(parent_fd, parts[-1], entry.mtime_s)
            elif entry.kind == HARDLINK:
                self._make_hardlink(parent_fd, parts, entry)
            else:
                self._note(
                    f"skipped {entry.kind} {entry.name!r}: sbx creates no "
                    "device nodes, FIFOs or sockets in images"
                )
                return
            self._mark(parts)
        finally:
            if parent_fd != self._root_fd:
                os.close(parent_fd)

    def _make_dir(self, parent_fd: int, parts: tuple[str, ...], entry: Entry) -> None:
        existing = _lstat(parent_fd, parts[-1])
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            self._replace(parent_fd, parts)
            os.mkdir(parts[-1], BUILD_DIR_MODE, dir_fd=parent_fd)
        self._dir_modes[parts] = (self._safe_mode(entry), entry.mtime_s)

    def _make_file(self, parent_fd, parts, entry: Entry, opener: Opener | None) -> None:
        self._replace(parent_fd, parts)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(parts[-1], flags, 0o600, dir_fd=parent_fd)
        digest = hashlib.sha256()
        try:
            if opener is not None:
                source = opener()
                try:
                    self._copy(source, fd, digest)
                finally:
                    source.close()
            os.fchmod(fd, self._safe_mode(entry))
            os.utime(fd, (entry.mtime_s, entry.mtime_s))
        finally:
            os.close(fd)
        self._file_digests[parts] = digest.hexdigest()

    def _make_hardlink(self, parent_fd: int, parts, entry: Entry) -> None:
        try:
            target = clean_name(entry.link_target)
        except UnsafeEntry as exc:
            reason = f"is a hard link whose target {exc.reason}"
            raise UnsafeEntry(entry.name, reason) from exc
        if not target:
            raise UnsafeEntry(entry.name, "is a hard link to the image's root")
        try:
            target_fd = self._open_parent(target, entry.name, create=False)
        except _MissingParent:
            raise UnsafeEntry(
                entry.name,
                f"is a hard link to {entry.link_target!r}, which is not in the image",
            ) from None
        try:
            found = _lstat(target_fd, target[-1])
            if found is None or stat.S_ISDIR(found.st_mode):
                raise UnsafeEntry(
                    entry.name,
                    f"is a hard link to {entry.link_target!r}, which is not a file "
                    "created earlier in this image",
                )
            if target == parts:
                return
            self._replace(parent_fd, parts)
            os.link(
                target[-1],
                parts[-1],
                src_dir_fd=target_fd,
                dst_dir_fd=parent_fd,
                follow_symlinks=False,
            )
        finally:
            if target_fd != self._root_fd:
                os.close(target_fd)
        if target in self._file_digests:
            self._file_digests[parts] = self._file_digests[target]

    def _safe_mode(self, entry: Entry) -> int:
        if entry.mode & SETID_BITS and entry.kind in (FILE, DIR):
            bits = "setuid" if entry.mode & stat.S_ISUID else "setgid"
            self._note(f"cleared the {bits} bit of {entry.name!r}")
        return entry.mode & 0o7777 & ~SETID_BITS

    # --- whiteouts ---------------------------------------------------------------

    def _whiteout(self, entry: Entry, parts: tuple[str, ...]) -> None:
        """Apply an OCI whiteout: ``.wh..wh..opq`` hides everything earlier layers put
        in its directory; ``.wh.NAME`` removes NAME. Entries of the current layer are
        kept whatever the order of the archive."""
        self.stats.whiteouts += 1
        directory = parts[:-1]
        try:
            parent_fd = self._open_parent(parts, entry.name, create=False)
        except _MissingParent:
            return  # nothing below a missing directory to hide
        try:
            if parts[-1] == OPAQUE_MARKER:
                self._clear_lower(parent_fd, directory)
                self._mark(directory)
                return
            hidden = parts[-1][len(WHITEOUT_PREFIX) :]
            if hidden in ("", ".", ".."):
                raise UnsafeEntry(entry.name, "is a whiteout with no name to hide")
            target = directory + (hidden,)
            if target not in self._this_layer:
                self._remove(parent_fd, target)
        finally:
            if parent_fd != self._root_fd:
                os.close(parent_fd)

    def _clear_lower(self, dir_fd: int, directory: tuple[str, ...]) -> None:
        """Remove from `directory`, at every depth, what earlier layers put there.
        A directory this layer wrote into is kept, and cleared in turn."""
        for name in os.listdir(dir_fd):
            child = directory + (name,)
            if child not in self._this_layer:
                self._remove(dir_fd, child)
                continue
            found = _lstat(dir_fd, name)
            if found is not None and stat.S_ISDIR(found.st_mode):
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                sub_fd = os.open(name, flags, dir_fd=dir_fd)
                try:
                    self._clear_lower(sub_fd, child)
                finally:
                    os.close(sub_fd)

    # --- low-level helpers ---------------------------------------------------------

    def _mark(self, parts: tuple[str, ...]) -> None:
        for depth in range(1, len(parts) + 1):
            self._this_layer.add(parts[:depth])

    def _note(self, text: str) -> None:
        # Not a weakened guarantee (the image is safer than its source): INFO.
        log.info("%s", text)
        self.stats.notes.append(text)

    def _open_parent(self, parts, entry_name: str, create: bool = True) -> int:
        return self._open_dir(parts[:-1], entry_name, create)

    def _open_dir(self, parts, entry_name: str, create: bool = False) -> int:
        """A descriptor for directory `parts`, walked one component at a time without
        following any symlink; missing directories are created when `create`."""
        fd = self._root_fd
        for depth, name in enumerate(parts, start=1):
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                next_fd = os.open(name, flags, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise _MissingParent(
                        entry_name,
                        f"needs {'/'.join(parts[:depth])!r}, which is not in the image",
                    ) from None
                os.mkdir(name, BUILD_DIR_MODE, dir_fd=fd)
                self._dir_modes.setdefault(parts[:depth], (0o755, 0.0))
                next_fd = os.open(name, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                what = "a symlink" if exc.errno == errno.ELOOP else "not a directory"
                raise UnsafeEntry(
                    entry_name,
                    f"passes through {'/'.join(parts[:depth])!r}, which is {what}; "
                    "sbx never follows links while importing",
                ) from None
            finally:
                if fd != self._root_fd:
                    os.close(fd)
            fd = next_fd
        return fd

    def _replace(self, parent_fd: int, parts: tuple[str, ...]) -> None:
        """Remove whatever is at `parts` so a new entry can take the name."""
        if _lstat(parent_fd, parts[-1]) is not None:
            self._remove(parent_fd, parts)

    def _remove(self, parent_fd: int, parts: tuple[str, ...]) -> None:
        found = _lstat(parent_fd, parts[-1])
        if found is None:
            return
        if stat.S_ISDIR(found.st_mode):
            # Directories below the build root are owner-rwx until finish(), so the
            # descriptor-based rmtree can empty them.
            shutil.rmtree(parts[-1], dir_fd=parent_fd)
        else:
            os.unlink(parts[-1], dir_fd=parent_fd)
        depth = len(parts)
        for table in (self._file_digests, self._dir_modes):
            for key in [k for k in table if k[:depth] == parts]:
                del table[key]

    def _copy(self, source, fd: int, digest) -> None:
        while chunk := source.read(READ_CHUNK_BYTES):
            self.written_bytes += len(chunk)
            if self.max_bytes is not None and self.written_bytes > self.max_bytes:
                raise ArchiveError(
                    f"it unpacks to more than the limit of {self.max_bytes} bytes"
                )
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]

    def _set_time(self, parent_fd: int, name: str, mtime_s: float) -> None:
        os.utime(name, (mtime_s, mtime_s), dir_fd=parent_fd, follow_symlinks=False)


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


# --- digests ---------------------------------------------------------------------


@dataclass(frozen=True)
class TreeSummary:
    digest: str  # hex sha256, see summarize()
    size_bytes: int  # regular file content, each inode counted once
    entries: int


def summarize(
    root: str,
    file_digests: dict[tuple[str, ...], str] | None = None,
    dir_modes: dict[tuple[str, ...], tuple[int, float]] | None = None,
) -> TreeSummary:
    """The tree's digest: a sha256 over a canonical listing of the tree at `root`:
    for each entry in sorted order, its path, kind, permission bits, whole-second
    mtime, and its content digest (files) or target (symlinks). Two trees with the
    same digest look the same to a program inside the sandbox (owners aside, which are
    always the importer).

    `file_digests` and `dir_modes` let a writer supply what it recorded; without them
    everything is read from disk (used to verify a stored layer).
    """
    file_digests = file_digests or {}
    dir_modes = dir_modes or {}
    listing = hashlib.sha256()
    inodes: set[int] = set()
    size_bytes = entries = 0
    for parts, st in _walk(root):
        entries += 1
        path = "/".join(parts) or "."
        if stat.S_ISDIR(st.st_mode):
            mode, mtime_s = dir_modes.get(
                parts, (stat.S_IMODE(st.st_mode), st.st_mtime)
            )
            line = f"d {mode:04o} {int(mtime_s)} {path}"
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(os.path.join(root, *parts))
            line = f"l {int(st.st_mtime)} {path} -> {target}"
        else:
            content = file_digests.get(parts) or _file_digest(
                os.path.join(root, *parts)
            )
            if st.st_ino not in inodes:
                inodes.add(st.st_ino)
                size_bytes += st.st_size
            line = (
                f"f {stat.S_IMODE(st.st_mode):04o} {int(st.st_mtime)} {path} {content}"
            )
        listing.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return TreeSummary(listing.hexdigest(), size_bytes, entries)


def _walk(root: str):
    """(components, lstat) for every entry under root, the root first, sorted."""
    stack: list[tuple[str, ...]] = [()]
    while stack:
        parts = stack.pop()
        st = os.stat(os.path.join(root, *parts), follow_symlinks=False)
        yield parts, st
        if stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(os.path.join(root, *parts)), reverse=True)
            stack.extend(parts + (name,) for name in names)


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", opener=_nofollow_opener) as source:
        while chunk := source.read(READ_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _nofollow_opener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


# --- removal -----------------------------------------------------------------------


def remove_tree(path: str) -> None:
    """Remove a tree this user built, even where an image made directories read-only
    for their owner (0555, 0000): owner rwx is restored top-down first. Symlinks are
    never followed."""
    if not os.path.lexists(path):
        return
    if os.geteuid() != 0:
        _make_owner_writable(path)
    shutil.rmtree(path)


def _make_owner_writable(top: str) -> None:
    stack = [top]
    while stack:
        path = stack.pop()
        st = os.stat(path, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            continue
        if st.st_mode & 0o700 != 0o700:
            os.chmod(path, stat.S_IMODE(st.st_mode) | 0o700)
        with os.scandir(path) as children:
            stack.extend(c.path for c in children if c.is_dir(follow_symlinks=False))
