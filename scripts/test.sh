#!/usr/bin/env bash
# Install what the tests need (DCMTK and dicom3tools' dciodvfy from Debian, dicom-node with its test extras)
# and run the whole suite.
# Usage: bash scripts/test.sh [pytest args]      (CI runs exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
if [ ! -x /usr/bin/storescu ] || [ ! -x /usr/bin/dcmqrscp ] || [ ! -x /usr/bin/dciodvfy ] || [ ! -x /usr/sbin/Orthanc ]; then
  $SUDO apt-get update -q
  # Orthanc 1.10 is a real peer of the Query/Retrieve tests (it queries and retrieves from the node)
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends dcmtk dicom3tools orthanc
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
python3 -m ruff check node tests scripts
python3 -m pytest "$@"
