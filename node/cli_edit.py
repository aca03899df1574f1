"""``dicom-node anonymize`` and ``dicom-node modify``: the engine on folders of files.

    dicom-node anonymize PATH... --out DIR [--body JSON|@file.json] [--jobs N] [--dry-run]
    dicom-node modify    PATH... --out DIR --body '{"Replace": {"InstitutionName": "X"}}'

The body is the JSON of Orthanc's ``/anonymize`` or ``/modify`` (``Replace``, ``Keep``, ``Remove``,
``DicomVersion``, ``Transcode``…). A bad body stops before any file is touched, with exit code 2 and a message
naming the field. Exit code 1 when any file failed (each is listed with the reason), 0 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from node import batch
from node.dicom import fileio, preview
from node.dicom.errors import RequestError
from node.dicom.request import Modification, parse_anonymize, parse_modify
from node.dicom.transcode import check_target
from node.dicom.uidmap import KeyedUidMap


def _body(text: str | None) -> Any:
    if text is None:
        return {}
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise RequestError(f"--body: cannot read {text[1:]}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"--body is not valid JSON: {exc}") from None


def _key(path: str | None) -> bytes:
    if path is None:
        return os.urandom(32)
    p = Path(path)
    if not p.exists():
        key = os.urandom(32)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.hex().encode() + b"\n")
        print(f"created a new pseudonym key in {p} (keep it secret: it links outputs to inputs)", file=sys.stderr)
        return key
    text = p.read_text(encoding="ascii").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise RequestError(f"--key-file {p}: expected a hexadecimal key") from None
    if len(key) < 16:
        raise RequestError(f"--key-file {p}: the key must have at least 16 bytes")
    return key


def _parse(args: argparse.Namespace) -> Modification:
    body = _body(args.body)
    if args.transcode and isinstance(body, dict):
        body = {**body, "Transcode": args.transcode}
    if args.command == "anonymize":
        return parse_anonymize(body, default_private_creator=args.private_creator)
    return parse_modify(body, default_private_creator=args.private_creator)


def _dry_run(inputs: list[str], job: batch.Job, show_values: bool) -> int:
    for path in inputs:
        try:
            loaded = fileio.load(path)
        except Exception:  # noqa: BLE001 - look for the first readable instance
            continue
        if loaded.sop_class == fileio.MEDIA_STORAGE_DIRECTORY:
            continue
        before = copy.deepcopy(loaded.ds)
        batch.edit(loaded, job, KeyedUidMap(job.key))
        print(f"# dry run on {path}: nothing is written")
        print(preview.render(list(preview.compare(before, loaded.ds)), show_values=show_values))
        return 0
    print("dicom-node: no DICOM instance found in the inputs", file=sys.stderr)
    return 1


def cmd_edit(args: argparse.Namespace) -> int:
    try:
        mod = _parse(args)
        if mod.transcode:
            check_target(mod.transcode)
        key = _key(args.key_file)
    except RequestError as exc:
        print(f"dicom-node {args.command}: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    inputs = [str(p) for p, _named in fileio.iter_files(args.paths, exclude=out)]
    job = batch.Job(mod=mod, out_dir=str(out), key=key, name_counter=args.name_counter, overwrite=args.overwrite)
    if args.dry_run:
        return _dry_run(inputs, job, args.show_values)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(inputs), unit="file", disable=args.quiet or None, file=sys.stderr)
    started = time.perf_counter()
    summary = batch.run(inputs, job, jobs=args.jobs or os.cpu_count() or 1, on_outcome=lambda _o: bar.update())
    bar.close()
    elapsed = time.perf_counter() - started
    written = summary.count("written")
    print(f"{args.command}: {written} written, {summary.count('duplicate')} duplicate(s), "
          f"{summary.count('skipped')} skipped (not DICOM), {len(summary.failed)} failed "
          f"in {elapsed:.1f} s ({written / elapsed if elapsed else 0:.0f} files/s) -> {out}")  # fmt: skip
    for o in summary.outcomes:
        if o.status == "skipped" and args.verbose:
            print(f"  skipped {o.source}: {o.reason}")
    for o in summary.failed:
        print(f"  FAILED {o.source}: {o.reason}", file=sys.stderr)
    return 1 if summary.failed else 0


def add_commands(sub: Any) -> None:
    for name, what in (("anonymize", "de-identify"), ("modify", "modify")):
        p = sub.add_parser(name, help=f"{what} DICOM files and folders into --out (inputs are never changed)")
        p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (walked recursively)")
        p.add_argument("--out", "-o", required=True, metavar="DIR",
                       help="output folder: DIR/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm")  # fmt: skip
        p.add_argument("--body", "-b", metavar="JSON|@FILE", help=f"Orthanc /{name} body (default {{}})")
        p.add_argument("--jobs", "-j", type=int, default=0, metavar="N", help="worker processes (default: cores)")
        p.add_argument("--transcode", metavar="UID", help="output transfer syntax (same as Transcode in the body)")
        p.add_argument("--dry-run", action="store_true",
                       help="show what would happen to each element of the first file; write nothing")  # fmt: skip
        p.add_argument("--show-values", action="store_true", help="with --dry-run: also print original values")
        p.add_argument("--name-counter", type=int, default=1, metavar="N",
                       help="PatientName becomes Anonymized<N> (Orthanc's counter; default 1)")  # fmt: skip
        p.add_argument("--key-file", metavar="FILE",
                       help="pseudonym key (created if missing): the same key gives the same new UIDs and "
                            "PatientIDs in every run; default a fresh random key per run")  # fmt: skip
        p.add_argument(
            "--private-creator",
            default="",
            metavar="NAME",
            help="private creator for the VR of private tags in Replace (Orthanc's DefaultPrivateCreator)",
        )
        p.add_argument("--overwrite", action="store_true", help="replace existing output files")
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
        p.add_argument("--verbose", "-v", action="store_true", help="also list skipped files")
        p.set_defaults(func=cmd_edit)
