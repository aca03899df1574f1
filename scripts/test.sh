#!/usr/bin/env bash
# Install what the tests need (DCMTK and dicom3tools' dciodvfy from Debian, dicom-node with its test extras)
# and run the whole suite.
# Usage: bash scripts/test.sh [pytest args]      (CI runs exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
if [ ! -x /usr/bin/storescu ] || [ ! -x /usr/bin/storescp ] || [ ! -x /usr/bin/echoscu ] || [ ! -x /usr/bin/dciodvfy ]; then
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dcmtk dicom3tools
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
python3 -m ruff check node tests scripts
python3 -m pytest "$@"
