"""Sources of filesystem entries: tar streams and directories, read without trust.

Both kinds of source become the same thing: an iterator of :class:`Entry` values, each
a name as the source spells it, a kind, permission bits, a modification time and, for
regular files, a way to read the content. Nothing here writes anywhere; deciding
whether a name is acceptable and creating it is :mod:`sandbox.rootfs.tree`'s job.

Tar streams are read with :mod:`tarfile` in stream mode, but three of its lenient
habits are closed off here, because each turns a damaged archive into a silently
smaller image:

- a header with a bad checksum, or a short read where a header should be, ends
  iteration quietly in tarfile; here it is an :class:`ArchiveError`;
- an archive that stops without the end-of-archive zero block is accepted by tarfile;
  here it is reported as truncated;
- tarfile's own gzip reader does not check the trailer; here the decompressors of
  :mod:`gzip`, :mod:`lzma` and :mod:`bz2` are used, and the stream is read to its end
  so that their CRC and length checks run.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 1 << 20

# The kinds an Entry can have. Only the first four are ever created in a store.
DIR, FILE, SYMLINK, HARDLINK = "dir", "file", "symlink", "hardlink"
CHAR_DEVICE, BLOCK_DEVICE, FIFO, SOCKET = (
    "char-device",
    "block-device",
    "fifo",
    "socket",
)
OTHER = "other"

GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
BZIP2_MAGIC = b"BZh"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class ArchiveError(Exception):
    """The archive is damaged, truncated or not an archive. The message says which."""


class _HeaderProblem(Exception):
    """Raised inside tarfile's header reading; converted to ArchiveError outside it,
    where the archive's name is known."""


@dataclass(frozen=True)
class Entry:
    """One filesystem entry from a source, before any check.

    `name` is the raw name (a tar member name, or a path relative to a source
    directory); `link_target` is a symlink's target or a hard link's target name.
    """

    name: str
    kind: str
    mode: int
    mtime_s: float
    link_target: str = ""
    size_bytes: int = 0


# A regular file's content: call it to get a readable binary stream (or None for
# entries without content). The stream is only valid until the next entry is asked for.
Opener = Callable[[], BinaryIO]
EntryStream = Iterator[tuple[Entry, "Opener | None"]]


# --- tar -------------------------------------------------------------------------


def compression_of(head: bytes) -> str:
    """The compression a stream starting with `head` uses: gzip, xz, bzip2, zstd or
    none."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(XZ_MAGIC):
        return "xz"
    if head.startswith(BZIP2_MAGIC):
        return "bzip2"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


class _CheckedReader:
    """A read-only stream that turns every decoding failure into ArchiveError, so
    callers can tell a damaged archive (bad input) from a failing store (host)."""

    def __init__(self, raw: BinaryIO, label: str, underlying: BinaryIO) -> None:
        self._raw = raw
        self._label = label
        self._underlying = underlying

    def read(self, size: int = -1) -> bytes:
        try:
            return self._raw.read(size)
        except EOFError as exc:
            raise ArchiveError(f"{self._label} is truncated ({exc})") from exc
        except (OSError, zlib.error, lzma.LZMAError, ValueError) as exc:
            raise ArchiveError(f"{self._label} is corrupt ({exc})") from exc

    def close(self) -> None:
        # The decompressors do not close a file object they were handed.
        try:
            self._raw.close()
        finally:
            self._underlying.close()


def _decompressed(path: str, label: str) -> _CheckedReader:
    raw = open(path, "rb")
    head = raw.read(8)
    raw.seek(0)
    kind = compression_of(head)
    if kind == "zstd":
        raw.close()
        raise ArchiveError(
            f"{label} is zstd-compressed, which this Python cannot read; "
            "decompress it first (zstd -d) and import the .tar"
        )
    openers = {
        "gzip": lambda: gzip.GzipFile(fileobj=raw, mode="rb"),
        "xz": lambda: lzma.LZMAFile(raw, mode="rb"),
        "bzip2": lambda: bz2.BZ2File(raw, mode="rb"),
    }
    stream = openers[kind]() if kind in openers else raw
    log.debug("reading %s (%s compression)", path, kind)
    return _CheckedReader(stream, label, raw)


class _StrictTarInfo(tarfile.TarInfo):
    """TarInfo whose header reading refuses what tarfile would quietly accept."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        buf = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
        if len(buf) < tarfile.BLOCKSIZE:
            raise _HeaderProblem("ends where a tar header should be (truncated)")
        if buf.count(0) == tarfile.BLOCKSIZE:
            tarfile_.sbx_seen_end = True
        try:
            obj = cls.frombuf(buf, tarfile_.encoding, tarfile_.errors)
        except tarfile.InvalidHeaderError as exc:
            raise _HeaderProblem(f"has a damaged tar header ({exc})") from exc
        obj.offset = tarfile_.fileobj.tell() - tarfile.BLOCKSIZE
        return obj._proc_member(tarfile_)


def _kind_of_member(member: tarfile.TarInfo) -> str:
    if member.isreg():
        return FILE
    if member.isdir():
        return DIR
    if member.issym():
        return SYMLINK
    if member.islnk():
        return HARDLINK
    if member.ischr():
        return CHAR_DEVICE
    if member.isblk():
        return BLOCK_DEVICE
    if member.isfifo():
        return FIFO
    return OTHER


def tar_entries(path: str, label: str | None = None) -> EntryStream:
    """The entries of the tar archive at `path` (plain, gzip, xz or bzip2), in order.

    Raises ArchiveError, naming `label` (default: the path), when the archive is
    truncated, damaged or not a tar archive at all. Checks run to the end of the
    stream, so the error can come after the last entry was yielded.
    """
    label = label or repr(path)
    reader = _decompressed(path, label)
    try:
        try:
            archive = tarfile.open(fileobj=reader, mode="r|", tarinfo=_StrictTarInfo)
        except (tarfile.TarError, _HeaderProblem) as exc:
            raise ArchiveError(f"{label} is not a tar archive ({exc})") from exc
        yield from _members(archive, label)
        if not getattr(archive, "sbx_seen_end", False):
            raise ArchiveError(
                f"{label} ends without an end-of-archive block (truncated)"
            )
        # Read to the end so the decompressor checks its trailer (CRC, length).
        while reader.read(READ_CHUNK_BYTES):
            pass
    finally:
        reader.close()


def _members(archive: tarfile.TarFile, label: str) -> EntryStream:
    while True:
        try:
            member = archive.next()
        except _HeaderProblem as exc:
            raise ArchiveError(f"{label} {exc}") from exc
        except tarfile.TarError as exc:
            raise ArchiveError(f"{label} is truncated or damaged ({exc})") from exc
        if member is None:
            return
        kind = _kind_of_member(member)
        entry = Entry(
            name=member.name,
            kind=kind,
            mode=member.mode & 0o7777,
            mtime_s=float(member.mtime),
            link_target=member.linkname if kind in (SYMLINK, HARDLINK) else "",
            size_bytes=member.size if kind == FILE else 0,
        )
        opener = None
        if kind == FILE:

            def opener(member: tarfile.TarInfo = member) -> BinaryIO:
                return _ArchiveMemberReader(archive, member, label)

        yield entry, opener


class _ArchiveMemberReader:
    """A member's content, with short reads reported as truncation."""

    def __init__(self, archive: tarfile.TarFile, member: tarfile.TarInfo, label: str):
        self._file = archive.extractfile(member)
        self._label = label
        self._name = member.name

    def read(self, size: int = -1) -> bytes:
        try:
            return self._file.read(size)
        except tarfile.TarError as exc:
            raise ArchiveError(
                f"{self._label} is truncated or damaged in entry {self._name!r} ({exc})"
            ) from exc

    def close(self) -> None:
        self._file.close()


# --- directories -----------------------------------------------------------------


def _kind_of_stat(st: os.stat_result) -> str:
    kinds = (
        (stat.S_ISDIR, DIR),
        (stat.S_ISREG, FILE),
        (stat.S_ISLNK, SYMLINK),
        (stat.S_ISCHR, CHAR_DEVICE),
        (stat.S_ISBLK, BLOCK_DEVICE),
        (stat.S_ISFIFO, FIFO),
        (stat.S_ISSOCK, SOCKET),
    )
    for test, kind in kinds:
        if test(st.st_mode):
            return kind
    return OTHER


def directory_entries(top: str) -> EntryStream:
    """The entries below directory `top`, parents before children, names sorted.

    Walks with directory file descriptors and never follows a symlink (os.fwalk with
    follow_symlinks=False), so a link swapped in during the walk cannot lead outside
    `top`. A file with several names inside `top` becomes one file and hard links.
    The first entry is `top` itself, named ".".
    """
    root = os.stat(top, follow_symlinks=False)
    yield Entry(".", DIR, stat.S_IMODE(root.st_mode), root.st_mtime), None
    first_name_of: dict[tuple[int, int], str] = {}

    # os.fwalk skips unreadable directories unless told otherwise: an image with a
    # directory silently missing is worse than no image.
    def unreadable(exc: OSError) -> None:
        raise ArchiveError(f"cannot read {exc.filename!r} in {top!r}: {exc.strerror}")

    walk = os.fwalk(top, follow_symlinks=False, onerror=unreadable)
    for dirpath, dirnames, filenames, dirfd in walk:
        rel_dir = os.path.relpath(dirpath, top)
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            yield _directory_entry(top, rel, name, st, dirfd, first_name_of)


def _directory_entry(
    top: str,
    rel: str,
    name: str,
    st: os.stat_result,
    dirfd: int,
    first_name_of: dict[tuple[int, int], str],
) -> tuple[Entry, Opener | None]:
    kind = _kind_of_stat(st)
    mode = stat.S_IMODE(st.st_mode)
    if kind == SYMLINK:
        return Entry(
            rel, kind, mode, st.st_mtime, os.readlink(name, dir_fd=dirfd)
        ), None
    if kind != FILE:
        return Entry(rel, kind, mode, st.st_mtime), None

    if st.st_nlink > 1:
        key = (st.st_dev, st.st_ino)
        if key in first_name_of:
            return Entry(rel, HARDLINK, mode, st.st_mtime, first_name_of[key]), None
        first_name_of[key] = rel

    def opener() -> BinaryIO:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(name, flags, dir_fd=dirfd)
        except OSError as exc:
            raise ArchiveError(
                f"cannot read {rel!r} in {top!r}: {exc.strerror}"
            ) from exc
        # The name was a regular file when listed; refuse whatever replaced it since.
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ArchiveError(f"{rel!r} changed while it was being imported")
        return os.fdopen(fd, "rb")

    return Entry(rel, FILE, mode, st.st_mtime, size_bytes=st.st_size), opener
