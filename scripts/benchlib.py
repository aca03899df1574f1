"""What the side-by-side benchmark scripts share: paths, the shared harness, the dataset, small formatting.

Imported by ``bench_anonymize.py`` and ``bench_gateway.py`` (their folder is on ``sys.path`` when they run).
"""

from __future__ import annotations

import importlib
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT.parent / "shared" / "bench"
DATA = Path(os.environ.get("BENCH_DATA", "/tmp/dicombench-data"))
TMP_ROOT = os.environ.get("BENCH_TMP", "/tmp")

#: One measurement (a row of the saved JSON).
Rec = dict[str, Any]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt_num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def load_harness() -> ModuleType:
    """The shared harness (``../shared/bench/bench.py``) as a module: storescu driver, servers, Orthanc."""
    if not (BENCH / "bench.py").is_file():
        sys.exit(f"{BENCH}/bench.py not found: the benchmark harness lives in ../shared/bench")
    sys.path.insert(0, str(BENCH))
    return importlib.import_module("bench")


def ensure_data(ds_dir: Path) -> None:
    """Generate the ``ct`` dataset if missing (for one kind, make_dataset.py's --out is the dataset folder)."""
    if not (ds_dir / "manifest.json").exists():
        log(f"generating the ct dataset in {ds_dir}")
        subprocess.run([sys.executable, str(BENCH / "make_dataset.py"), "ct", "--out", str(ds_dir)], check=True)
