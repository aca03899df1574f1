"""The files of the archive: where they live, and how a received instance becomes one without ever being half.

Layout: ``<StorageDirectory>/ab/<uuid>`` where ``uuid`` is a random UUID4 and ``ab`` its first two hex digits.
No DICOM value ever reaches a path, so a crafted PatientID cannot write outside the storage.  One level of 256
folders (created at start) rather than Orthanc's two: a fresh archive would otherwise create a folder for almost
every instance, which costs more than the rest of the write here, and ext4/xfs index large folders anyway.

Life of a file (the order is what makes ``kill -9`` and power loss safe):

1. it is *spooled* as ``.tmp/<slot>/<uuid>.spool`` while it arrives (pynetdicom writes the incoming C-STORE straight
   into it, so memory stays bounded however large the instance);
2. it is ``fsync``'ed, then the index row that names ``uuid`` is committed;
3. it is renamed to its final place, and only then does the sender hear Success.

A crash before (2) leaves a spool file with no index row: :meth:`FileStorage.recover` deletes it.  A crash
between (2) and (3) leaves a spool file whose uuid *is* indexed: recovery finishes the rename.  So at start the
storage and the index agree again, and no scan of the whole archive is needed, only of ``.tmp``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import shutil
import uuid as uuidlib
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Protocol

SPOOL_SUFFIX = ".spool"


class StorageError(OSError):
    """The storage area failed (disk full, I/O error, permissions)."""


class SpoolFile:
    """A file being received: written sequentially, checksummed on the fly, write errors kept, not raised.

    pynetdicom writes each P-DATA fragment into it from its network thread, where an exception would abort the
    association; instead the first ``OSError`` (``ENOSPC``, ``EMFILE``…, even when creating the file) is
    remembered, the rest of the data is discarded, and the C-STORE handler answers "Out of resources" (0xA700)
    while the association stays usable.  The attributes mirror what pynetdicom uses of a
    ``NamedTemporaryFile``: ``name``, ``write``, ``file.flush`` and ``close``.
    """

    def __init__(self, directory: Path) -> None:
        self.uuid = str(uuidlib.uuid4())
        self.directory = directory
        self.name = str(directory / (self.uuid + SPOOL_SUFFIX))
        self.size = 0
        self.error: OSError | None = None
        self.committed = False  # set once an index row names this file: from then on it is never discarded
        self._hash = hashlib.sha256()
        self._syncing: Future[None] | None = None
        try:
            self.file: io.FileIO = open(self.name, "xb", buffering=0)  # noqa: SIM115 - closed by close()
        except OSError as exc:
            self.error = exc
            self.file = _ClosedFile()

    def write(self, data: bytes) -> int:
        if self.error is None:
            try:
                view = memoryview(data)
                while view:
                    n = self.file.write(view)
                    view = view[n:]
            except OSError as exc:
                self.error = exc
            else:
                self._hash.update(data)
                self.size += len(data)
        return len(data)

    def flush(self) -> None:  # the file is unbuffered: nothing to do
        pass

    @property
    def sha256(self) -> str:
        """Checksum of the file as stored (SHA-256: with SHA extensions it is the cheapest strong hash here)."""
        return self._hash.hexdigest()

    def _fsync(self) -> None:
        # The folder is not fsync'ed: on Linux's journaling filesystems (ext4, xfs, btrfs) the fsync of a new
        # file also makes its directory entry durable (ext4 commits the journal transaction that holds the
        # create, xfs forces its log, btrfs logs the parent entry). A folder fsync per instance measured 8 %
        # of throughput here for nothing on those; other filesystems are not supported for the storage.
        os.fsync(self.file.fileno())

    def sync(self) -> None:
        """Make the received bytes durable (raises the remembered write error first)."""
        if self.error is not None:
            raise self.error
        if self._syncing is not None:
            self._syncing.result()
        else:
            self._fsync()

    def begin_sync(self, pool: Executor) -> None:
        """Start the fsync in ``pool`` so that the disk flushes while the caller parses the header.

        ``fsync`` releases the GIL: for a 0.5 MB image it is about as long as reading the index tags, and the
        two overlap instead of adding up. :meth:`sync` then only waits for it.
        """
        if self.error is None and self._syncing is None:
            self._syncing = pool.submit(self._fsync)

    def close(self) -> None:
        if self._syncing is not None and not self._syncing.done():
            with contextlib.suppress(OSError):  # never close the fd under a running fsync
                self._syncing.result()
        if not self.file.closed:
            self.file.close()


class _ClosedFile(io.FileIO):
    """Stands in for a spool file that could not be created (its error is already recorded)."""

    def __init__(self) -> None:  # no file behind it
        pass

    @property
    def closed(self) -> bool:
        return True

    def close(self) -> None:
        pass


class Storage(Protocol):
    """What the rest of dicom-node uses of a storage area: the interface another backend implements.

    :class:`FileStorage` is the one implementation (a local or shared filesystem). ``docs/storage.md`` says how
    an object store (S3-compatible) fits behind this: spooling stays local (``tmp``, ``new_spool``,
    ``spool_path``, ``make_durable``, ``discard_spool``), ``publish`` uploads, ``locate`` gives a local file
    (a read-through cache), ``delete`` removes the object. Nothing outside :mod:`node.archive.storage` builds a
    storage path itself.
    """

    root: Path
    tmp: Path
    sync: bool

    def new_spool(self) -> SpoolFile: ...
    def spool_path(self, uuid: str) -> Path: ...
    def make_durable(self, spool: SpoolFile) -> None: ...
    def publish(self, uuid: str) -> Path: ...
    def discard_spool(self, uuid: str) -> None: ...
    def delete(self, uuid: str) -> None: ...
    def locate(self, uuid: str) -> Path: ...
    def slots(self, prefix: str) -> list[str]: ...
    def recover(
        self, indexed: Callable[[Iterable[str]], set[str]], slots: Iterable[str] | None = None
    ) -> tuple[int, int]: ...
    def disk_usage(self) -> shutil._ntuple_diskusage: ...  # type: ignore[name-defined]


class FileStorage:
    """One storage area on a (possibly shared) filesystem.

    Each receiver process spools into its own folder ``.tmp/<slot>``, so that the parent can recover one
    receiver that died without touching the spool files of the others.
    """

    def __init__(self, root: Path, sync: bool = True, slot: str = "0") -> None:
        self.root = Path(root)
        self.tmp_root = self.root / ".tmp"
        self.tmp = self.tmp_root / slot
        self.sync = sync
        self.tmp.mkdir(parents=True, exist_ok=True)
        for i in range(256):
            (self.root / f"{i:02x}").mkdir(exist_ok=True)

    def path(self, uuid: str) -> Path:
        """Where the file of ``uuid`` lives (``uuid`` comes from us, never from DICOM data)."""
        if len(uuid) != 36 or not all(c in "0123456789abcdef-" for c in uuid):
            raise ValueError(f"not a storage uuid: {uuid!r}")
        return self.root / uuid[0:2] / uuid

    def spool_path(self, uuid: str) -> Path:
        return self.tmp / (uuid + SPOOL_SUFFIX)

    def locate(self, uuid: str) -> Path:
        """The file of an indexed instance: its final place, or a spool whose publication is still pending."""
        final = self.path(uuid)
        if final.exists():
            return final
        for d in self._spool_dirs():
            candidate = d / (uuid + SPOOL_SUFFIX)
            if candidate.exists():
                return candidate
        return final

    def new_spool(self) -> SpoolFile:
        return SpoolFile(self.tmp)

    def make_durable(self, spool: SpoolFile) -> None:
        """Step 1→2: fsync the spooled bytes (``SyncStorageArea`` false skips it, as Orthanc's option does)."""
        if self.sync:
            spool.sync()
        elif spool.error is not None:
            raise spool.error

    def publish(self, uuid: str) -> Path:
        """Step 3: move an indexed spool file to its final place (``FileNotFoundError``: no such spool)."""
        final = self.path(uuid)
        try:
            os.rename(self.spool_path(uuid), final)
        except FileNotFoundError:
            if not self.spool_path(uuid).exists():
                raise
            final.parent.mkdir(parents=True, exist_ok=True)  # its folder was removed: recreate
            os.rename(self.spool_path(uuid), final)
        return final

    def discard_spool(self, uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.spool_path(uuid))

    def delete(self, uuid: str) -> None:
        """Remove a file wherever it is: published, or still a spool of any receiver (a racing overwrite).

        Spools first, then the final place: the owner publishes by an atomic rename, so whichever side of it the
        file is on, it is found (final place first could miss a file renamed between the two unlinks).
        """
        for p in (*(d / (uuid + SPOOL_SUFFIX) for d in self._spool_dirs()), self.path(uuid)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)

    def slots(self, prefix: str) -> list[str]:
        """The spool folders whose names start with ``prefix`` (one node's, on a storage that nodes share)."""
        return [d.name for d in self._spool_dirs() if d.name.startswith(prefix)]

    def _spool_dirs(self) -> list[Path]:
        try:
            return [Path(e.path) for e in os.scandir(self.tmp_root) if e.is_dir()]
        except FileNotFoundError:
            return []

    def recover(
        self, indexed: Callable[[Iterable[str]], set[str]], slots: Iterable[str] | None = None
    ) -> tuple[int, int]:
        """Make storage agree with the index after a crash; return (finished renames, deleted leftovers).

        ``indexed(uuids)`` answers which of the given uuids have an index row.  ``slots`` limits recovery to
        the spool folders of those receivers (default: all, and stray files directly under ``.tmp``).
        """
        dirs = [self.tmp_root / s for s in slots] if slots is not None else [self.tmp_root, *self._spool_dirs()]
        spools: dict[str, Path] = {}
        leftovers: list[Path] = []
        for d in dirs:
            if not d.is_dir():
                continue
            for entry in os.scandir(d):
                if entry.is_dir():
                    continue  # a slot folder (scanned on its own)
                name = entry.name
                if name.endswith(SPOOL_SUFFIX) and len(name) == 36 + len(SPOOL_SUFFIX):
                    spools[name[:36]] = Path(entry.path)
                else:
                    leftovers.append(Path(entry.path))
        keep = indexed(list(spools)) if spools else set()
        finished = 0
        for uuid, p in spools.items():
            if uuid in keep:
                with contextlib.suppress(FileNotFoundError):  # replaced meanwhile by a live receiver
                    os.rename(p, self.path(uuid))
                    finished += 1
            else:
                leftovers.append(p)
        for p in leftovers:
            p.unlink(missing_ok=True)
        return finished, len(leftovers)

    def disk_usage(self) -> shutil._ntuple_diskusage:  # type: ignore[name-defined]
        return shutil.disk_usage(self.root)


def is_disk_error(exc: BaseException) -> bool:
    """True for errors that mean "the storage cannot take it now" (answered 0xA700, never 0xC000)."""
    return isinstance(exc, OSError) and exc.errno in (
        errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG, errno.EMFILE, errno.ENFILE,
    )  # fmt: skip
