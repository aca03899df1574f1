#!/usr/bin/env python3
"""Generate node/dicom/profiles.json from ../shared/spec/anonymization-profiles.tsv (PS3.15 Table E.1-1 actions).

The profiles are data: this script converts them, it does not retype them. Run it when the TSV changes;
``tests/test_profiles.py`` fails when the packaged file and the TSV disagree.

    python3 scripts/gen_profiles.py [--check]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TSV = ROOT.parent / "shared" / "spec" / "anonymization-profiles.tsv"
OUT = ROOT / "node" / "dicom" / "profiles.json"


def convert(tsv: Path) -> dict[str, list[list[str]]]:
    """``{version: [[tag, keyword, action], ...]}`` in the TSV's order (duplicate lines kept once)."""
    profiles: dict[str, list[list[str]]] = {}
    with tsv.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            entry = [row["tag"].strip().lower(), row["keyword"].strip(), row["action"].strip()]
            rows = profiles.setdefault(row["version"].strip(), [])
            if entry not in rows:
                rows.append(entry)
    return profiles


def render(profiles: dict[str, list[list[str]]]) -> str:
    lines = ["{"]
    for i, (version, rows) in enumerate(profiles.items()):
        lines.append(f"  {json.dumps(version)}: [")
        lines += [f"    {json.dumps(r)}{',' if j < len(rows) - 1 else ''}" for j, r in enumerate(rows)]
        lines.append("  ]" + ("," if i < len(profiles) - 1 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if the packaged file is out of date")
    a = ap.parse_args()
    text = render(convert(TSV))
    if a.check:
        same = OUT.exists() and OUT.read_text(encoding="utf-8") == text
        print("up to date" if same else f"{OUT} differs from {TSV}: run scripts/gen_profiles.py")
        return 0 if same else 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({', '.join(f'{v}: {len(r)}' for v, r in convert(TSV).items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
