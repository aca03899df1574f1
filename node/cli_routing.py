"""Routing operations from the command line: ``queue``, ``queue retry|discard``, ``replay``.

They work on the index directly (SQLite in WAL mode, or PostgreSQL), so they run next to a serving node: the
workers pick retried and replayed rows up within a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

from node.archive import outbox


def _archive(args: argparse.Namespace) -> tuple[Any, Any]:
    from node.archive.store import open_archive
    from node.cli import _load_config

    cfg = _load_config(args)
    return cfg, open_archive(
        cfg.database_url, cfg.storage_dir, sync=cfg["SyncStorageArea"], slot=cfg.spool_slot(f"cli-{os.getpid()}")
    )


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cmd_queue(args: argparse.Namespace) -> int:
    cfg, archive = _archive(args)
    db = archive.db
    try:
        with db.connection_context():
            if args.action == "retry":
                n = outbox.retry(db, args.rule, args.destination)
                print(f"{n} rows due again (dead and backed-off rows, attempts reset)")
                return 0
            if args.action == "discard":
                n = outbox.discard(db, args.rule, args.destination)
                print(f"{n} dead rows discarded")
                return 0
            stats = [s for s in outbox.stats(db, args.rule) if args.destination in (None, s.destination)]
            errors = outbox.dead_errors(db, args.rule, args.destination)
    finally:
        archive.close()
    if args.json:
        print(json.dumps({"Destinations": [s.as_dict() for s in stats], "DeadErrors": errors}, indent=2))
        return 0
    if not stats:
        print("the outbox is empty" + ("" if cfg.routes else " (no Routes configured)"))
        return 0
    print(f"{'destination':<20} {'pending':>8} {'in flight':>9} {'done':>8} {'dead':>6}  oldest pending")
    for s in stats:
        print(f"{s.destination:<20} {s.pending:>8} {s.in_flight:>9} {s.done:>8} {s.dead:>6}  "
              f"{_age(s.oldest_pending_s)}")  # fmt: skip
    for e in errors:
        print(f"dead: {e['Count']} rows to {e['Destination']} ({e['Rule']}): {e['Error']}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from node.routing.replay import replay

    cfg, archive = _archive(args)
    route = next((r for r in cfg.routes if r.name == args.rule), None)
    if route is None:
        known = ", ".join(r.name for r in cfg.routes) or "none"
        print(f"dicom-node replay: no rule named {args.rule!r} in {cfg.source} (rules: {known})")
        archive.close()
        return 2
    try:
        result = replay(archive, route, args.study)
    finally:
        archive.close()
    if result.instances == 0:
        print(f"no stored study has StudyInstanceUID {args.study}")
        return 1
    excluded = f"; {result.filtered_out} instances excluded by the rule's filter" if result.filtered_out else ""
    print(f"{result.queued} deliveries queued for {result.instances} instances of study {args.study} "
          f"(rule {route.name} → {', '.join(route.destinations)}){excluded}")  # fmt: skip
    return 0


def add_commands(sub: Any, add_config_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("queue", help="the routing outbox per destination; 'queue retry' / 'queue discard'")
    p.add_argument("action", nargs="?", choices=["show", "retry", "discard"], default="show",
                   help="retry: dead (and backed-off) rows are due again; discard: drop dead rows")  # fmt: skip
    p.add_argument("--rule", help="only this rule's rows")
    p.add_argument("--destination", help="only this destination's rows (a DicomModalities name, or @archive)")
    p.add_argument("--json", action="store_true")
    add_config_flags(p)
    p.set_defaults(func=cmd_queue)

    p = sub.add_parser("replay", help="send a stored study again through a rule: replay --study UID --rule R")
    p.add_argument("--study", required=True, metavar="StudyInstanceUID")
    p.add_argument("--rule", required=True)
    add_config_flags(p)
    p.set_defaults(func=cmd_replay)
