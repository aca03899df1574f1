#!/usr/bin/env bash
# Install dicom-node and start it with the embedded default configuration
# (DICOM on port 4242, AE DICOMNODE, SQLite index + files under ./dicom-node-data). Extra args go to `serve`.
set -euo pipefail
python3 -m pip install -q --disable-pip-version-check -e "$(dirname "$0")/.."
exec dicom-node serve "$@"
