"""The OpenAPI document and what schemathesis generates from it: no request may make the server fail (5xx).

The app runs on a real SQLite archive holding one stored study, so generated requests meet real rows as well as
unknown IDs. Requests go through the ASGI app in-process (no socket), like the other REST tests.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from conftest import make_instance, store_file
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from node import config
from node.archive.store import open_archive
from node.rest.app import create_app

_DIR = Path(tempfile.mkdtemp(prefix="dicom-node-schema-"))
_CFG = config.build(None, {"StorageDirectory": str(_DIR / "storage"), "IndexDirectory": str(_DIR)}, environ={})
_ARCHIVE = open_archive(f"sqlite:///{_DIR}/index.db", _DIR / "storage")
for _i in range(2):
    store_file(_ARCHIVE, make_instance(_DIR / f"{_i}.dcm", patient_id="SCHEMA", study_uid="7.7", series_uid="7.7.1",
                                       sop_uid=f"7.7.1.{_i}"))  # fmt: skip
APP = create_app(_CFG, _ARCHIVE)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


def test_the_openapi_document_and_docs_are_served() -> None:
    client = TestClient(APP)
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    for route in ("/system", "/studies/{public_id}/anonymize", "/tools/bulk-modify", "/jobs/{job_id}",
                  "/studies/{public_id}/split", "/tools/find"):  # fmt: skip
        assert route in paths, route
    assert all(op.get("summary") for ops in paths.values() for op in ops.values()), "every route says what it does"
    assert client.get("/docs").status_code == 200


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_generated_request_makes_the_server_fail(case: schemathesis.Case) -> None:
    response = case.call()
    where = (case.method, case.formatted_path, response.status_code, response.text)
    assert response.status_code < 500 or response.status_code == 507, where
