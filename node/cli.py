"""The ``dicom-node`` command: serve, echo, store, stats, anonymize, modify, queue, replay."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from node import __version__, config, logs


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="JSON configuration (Orthanc-style, comments allowed)")
    g = p.add_argument_group("configuration overrides (each key also as env var DICOM_NODE_<KEY>)")
    for key, default in config.DEFAULTS.items():
        g.add_argument(config.flag_name(key), dest=f"cfg_{key}", metavar="VALUE",
                       help=f"{key} (default {default!r})")  # fmt: skip
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any key")


def _load_config(args: argparse.Namespace) -> config.Config:
    overrides: dict[str, Any] = {}
    for key in config.DEFAULTS:
        raw = getattr(args, f"cfg_{key}", None)
        if raw is not None:
            overrides[key] = config.parse_override(key, raw)
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise config.ConfigError(f"command line: --set needs KEY=VALUE, got {item!r}")
        overrides[key] = config.parse_override(key, raw)
    return config.build(args.config, overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from node.serve import serve

    return serve(_load_config(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-node", description="DICOM node: archive, de-identify, forward.")
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the DICOM server (C-STORE/C-ECHO SCP) on the archive")
    _add_config_flags(p)
    p.set_defaults(func=cmd_serve)
    from node import cli_tools

    cli_tools.add_commands(sub, _add_config_flags)
    from node import cli_edit

    cli_edit.add_commands(sub)
    from node import cli_routing

    cli_routing.add_commands(sub, _add_config_flags)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.setup(args.log_level)
    try:
        return int(args.func(args))
    except config.ConfigError as exc:
        print(f"dicom-node: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
