"""The files of the archive: where they live, and how a received instance becomes one without ever being half.

Layout: ``<StorageDirectory>/ab/<uuid>`` where ``uuid`` is a random UUID4 and ``ab`` its first two hex digits.
No DICOM value ever reaches a path, so a crafted PatientID cannot write outside the storage.  One level of 256
folders (created at start) rather than Orthanc's two: a fresh archive would otherwise create a folder for almost
every instance, which costs more than the rest of the write here, and ext4/xfs index large folders anyway.

Life of a file (the order is what makes ``kill -9`` and power loss safe):

1. it is *spooled* as ``.tmp/<uuid>.spool`` while it arrives (pynetdicom writes the incoming C-STORE straight
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
import os
import shutil
import uuid as uuidlib
from collections.abc import Callable, Iterable
from pathlib import Path

SPOOL_SUFFIX = ".spool"


class StorageError(OSError):
    """The storage area failed (disk full, I/O error, permissions)."""


class SpoolFile:
    """A file being received: written sequentially, checksummed on the fly, write errors kept, not raised.

    pynetdicom writes each P-DATA fragment into it from its network thread, where an exception would abort the
    association; instead the first ``OSError`` (``ENOSPC``…) is remembered, the rest of the data is discarded,
    and the C-STORE handler answers "Out of resources" (0xA700) while the association stays usable.
    The attributes mirror what pynetdicom uses of a ``NamedTemporaryFile``: ``name``, ``write``,
    ``file.flush`` and ``close``.
    """

    def __init__(self, directory: Path) -> None:
        self.uuid = str(uuidlib.uuid4())
        self.name = str(directory / (self.uuid + SPOOL_SUFFIX))
        self.file = open(self.name, "xb", buffering=0)  # noqa: SIM115 - closed by close()
        self.size = 0
        self.error: OSError | None = None
        self._hash = hashlib.sha256()

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

    def sync(self) -> None:
        """Make the received bytes durable (raises the remembered write error first)."""
        if self.error is not None:
            raise self.error
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()

    def __enter__(self) -> SpoolFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FileStorage:
    """One storage area on a (possibly shared) filesystem."""

    def __init__(self, root: Path, sync: bool = True) -> None:
        self.root = Path(root)
        self.tmp = self.root / ".tmp"
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

    def new_spool(self) -> SpoolFile:
        return SpoolFile(self.tmp)

    def make_durable(self, spool: SpoolFile) -> None:
        """Step 1→2: fsync the spooled bytes (``SyncStorageArea`` false skips it, as Orthanc's option does)."""
        if self.sync:
            spool.sync()
        elif spool.error is not None:
            raise spool.error

    def publish(self, uuid: str) -> Path:
        """Step 3: move an indexed spool file to its final place."""
        final = self.path(uuid)
        try:
            os.rename(self.spool_path(uuid), final)
        except FileNotFoundError:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.spool_path(uuid), final)
        return final

    def discard_spool(self, uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.spool_path(uuid))

    def delete(self, uuid: str) -> None:
        """Remove a stored file."""
        p = self.path(uuid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)

    def read_bytes(self, uuid: str) -> bytes:
        return self.path(uuid).read_bytes()

    def recover(self, indexed: Callable[[Iterable[str]], set[str]]) -> tuple[int, int]:
        """Make storage agree with the index after a crash; return (finished renames, deleted leftovers).

        ``indexed(uuids)`` answers which of the given uuids have an index row.
        """
        spools: dict[str, Path] = {}
        leftovers: list[Path] = []
        for entry in os.scandir(self.tmp):
            name = entry.name
            if name.endswith(SPOOL_SUFFIX) and len(name) == 36 + len(SPOOL_SUFFIX):
                spools[name[:36]] = Path(entry.path)
            else:
                leftovers.append(Path(entry.path))
        keep = indexed(list(spools)) if spools else set()
        finished = 0
        for uuid, p in spools.items():
            if uuid in keep:
                self.publish(uuid)
                finished += 1
            else:
                leftovers.append(p)
        for p in leftovers:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        return finished, len(leftovers)

    def disk_usage(self) -> shutil._ntuple_diskusage:  # type: ignore[name-defined]
        return shutil.disk_usage(self.root)


def is_disk_error(exc: BaseException) -> bool:
    """True for errors that mean "the storage cannot take it now" (answered 0xA700, never 0xC000)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG)
