"""Client sub-commands of ``dicom-node``: ``echo``, ``store`` and ``stats``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from node.dicom.fileio import iter_files
from node.net.scu import (
    FileToSend,
    NotAnInstance,
    Target,
    TargetError,
    echo,
    inspect,
    parse_target,
    store_files,
)


def _target(text: str) -> Target:
    try:
        return parse_target(text)
    except TargetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_echo(args: argparse.Namespace) -> int:
    ok, outcome = echo(args.target, args.aet, args.timeout)
    print(f"C-ECHO {args.target}: {'success' if ok else 'FAILED'} ({outcome})")
    return 0 if ok else 1


def cmd_store(args: argparse.Namespace) -> int:
    """Send files and folders; print a summary; exit 1 when any file failed."""
    files: list[FileToSend] = []
    failures: list[tuple[Path, str]] = []
    skipped: list[tuple[Path, str]] = []
    for path, explicit in iter_files(args.paths):
        try:
            files.append(inspect(path))
        except NotAnInstance as exc:
            skipped.append((path, str(exc)))
        except (InvalidDicomError, OSError, ValueError, KeyError, EOFError) as exc:
            why = f"not a DICOM file ({exc})" if not isinstance(exc, OSError) else f"unreadable ({exc.strerror})"
            (failures if explicit else skipped).append((path, why))
    bar = tqdm(total=len(files), unit="file", disable=args.quiet or not sys.stderr.isatty(), file=sys.stderr)

    def on_done(f: FileToSend, ok: bool, why: str) -> None:
        bar.update(1)

    report = store_files(files, args.target, args.aet, args.timeout, on_done)
    bar.close()
    report.failures[:0] = failures
    report.skipped.extend(skipped)
    print(f"sent {report.sent} of {len(files)} DICOM files to {args.target}"
          + (f" ({report.warnings} with warnings)" if report.warnings else "")
          + (f"; {len(report.skipped)} files skipped (not DICOM instances)" if report.skipped else ""))  # fmt: skip
    for path, why in report.failures:
        print(f"FAILED {path}: {why}")
    if report.failures:
        print(f"{len(report.failures)} failed")
    return 0 if report.ok else 1


def cmd_stats(args: argparse.Namespace) -> int:
    from node.archive.query import statistics
    from node.archive.store import open_archive
    from node.cli import _load_config

    cfg = _load_config(args)
    archive = open_archive(
        cfg.database_url, cfg.storage_dir, sync=cfg["SyncStorageArea"], slot=cfg.spool_slot(f"cli-{os.getpid()}")
    )
    st = statistics(archive)
    archive.close()
    if args.json:
        print(json.dumps(st.as_orthanc(), indent=2))
        return 0
    print(f"patients   {st.patients}\nstudies    {st.studies}\nseries     {st.series}\ninstances  {st.instances}")
    print(f"stored     {st.total_disk_size / 1e6:.1f} MB in {cfg.storage_dir}")
    print(f"disk free  {st.disk_free / 1e9:.1f} GB of {st.disk_total / 1e9:.1f} GB")
    return 0


def add_commands(sub: Any, add_config_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("echo", help="C-ECHO a remote AE: dicom-node echo AET@host:port")
    p.add_argument("target", type=_target, metavar="AET@host:port")
    p.add_argument("--aet", default="DICOMNODE", help="our calling AE title")
    p.add_argument("--timeout", type=float, default=10)
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("store", help="C-STORE files and folders: dicom-node store PATH... --to AET@host:port")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--to", dest="target", type=_target, required=True, metavar="AET@host:port")
    p.add_argument("--aet", default="DICOMNODE", help="our calling AE title")
    p.add_argument("--timeout", type=float, default=30)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_store)

    p = sub.add_parser("stats", help="counts per level and disk usage of the archive")
    add_config_flags(p)
    p.add_argument("--json", action="store_true", help="Orthanc's /statistics JSON")
    p.set_defaults(func=cmd_stats)
