#!/usr/bin/env bash
# Install what the tests need (DCMTK and dicom3tools' dciodvfy and Orthanc from Debian, a PostgreSQL server,
# dicom-node with its test extras) and run the whole suite: once on SQLite, then every suite that uses the
# index (archive, engine jobs, gateway, REST, Query/Retrieve) and the multi-node tests once more on PostgreSQL.
# Usage: bash scripts/test.sh [pytest args]      (CI runs exactly this through .ci/run)
#        DICOM_NODE_TEST_POSTGRES=postgresql://user:pw@host/postgres bash scripts/test.sh   (a server of yours)
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
PG_URL="${DICOM_NODE_TEST_POSTGRES:-$(bash scripts/postgres.sh)}"
env -u DICOM_NODE_TEST_POSTGRES python3 -m pytest "$@"
DICOM_NODE_TEST_POSTGRES="$PG_URL" python3 -m pytest -m "not sqlite_only" \
  tests/test_archive.py tests/test_outbox.py tests/test_pseudonyms.py tests/test_find.py tests/test_scp.py \
  tests/test_gateway.py tests/test_rest_jobs.py tests/test_rest_gateway.py tests/test_rest_edit.py \
  tests/test_rest_content.py tests/test_rest_browse.py tests/test_rest_modalities.py tests/test_qr_find.py \
  tests/test_qr_retrieve.py tests/test_access.py tests/test_multinode.py "$@"
