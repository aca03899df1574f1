"""Client sub-commands of ``dicom-node``: echo, store, stats (filled in below)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_commands(sub: Any, add_config_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    return None
