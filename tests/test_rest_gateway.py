"""The gateway's REST routes (``/routes``, ``/outbox``, retry, discard, replay) on a running node with a real
destination (DCMTK ``storescp``), repointed over ``PUT /modalities`` while the routing workers run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from conftest import free_port
from test_gateway import StoreSCP, wait_for
from test_rest_modalities import study_files
from test_scp import storescu

from node.dicom.ids import resource_ids

FILTER = {"Tags": {"Modality": ["CT", "MR"]}}
RULE = {"Name": "fwd", "Filter": FILTER, "Forward": ["dest"]}
STUDY = "1.2.826.0.1.55"


def dest_counts(http: httpx.Client, path: str = "/outbox") -> dict[str, Any]:
    return {d["Destination"]: d for d in http.get(path).json()["Destinations"]}


def test_routes_outbox_retry_discard_and_replay(node_factory: Any, tmp_path: Path) -> None:
    down = free_port()
    node = node_factory(DicomModalities={"dest": ["DEST", "127.0.0.1", down]}, Routes=[RULE], RoutingMaxAttempts=1,
                        RoutingRetryDelay=1).start()  # fmt: skip
    files = study_files(tmp_path / "in", "GW1", STUDY, 3)
    assert storescu(node, files).returncode == 0
    http = node.rest()

    wait_for(lambda: dest_counts(http).get("dest", {}).get("Dead") == 3, 30, "3 dead rows", node)
    [route] = http.get("/routes").json()
    assert route["Name"] == "fwd" and route["Trigger"] == "Instance" and route["Filter"] == FILTER
    assert route["Actions"] == ["Forward"] and route["Forward"] == ["dest"] and route["Destinations"] == ["dest"]
    assert route["DeleteSourceAfterSuccess"] is False and route["Project"] == "fwd"
    [queue] = route["Queue"]
    assert queue["Destination"] == "dest" and queue["Dead"] == 3 and queue["Pending"] == 0 and queue["Done"] == 0
    assert set(queue) == {"Destination", "Pending", "InFlight", "Done", "Dead", "OldestPendingSeconds"}
    assert http.get("/routes/fwd").json() == route
    outbox = http.get("/outbox").json()
    [error] = outbox["DeadErrors"]
    assert error["Count"] == 3 and error["Rule"] == "fwd" and str(down) in error["Error"]
    assert outbox["Rules"] == [{"Rule": "fwd", "Destinations": outbox["Destinations"]}]
    assert http.get("/outbox", params={"destination": "elsewhere"}).json()["Destinations"] == []

    # repoint the destination over REST: the workers resolve it before each batch
    scp = StoreSCP(tmp_path / "received").start()
    try:
        r = http.put("/modalities/dest", json={"AET": scp.aet, "Host": "127.0.0.1", "Port": scp.port})
        assert r.status_code == 200
        assert http.post("/outbox/retry", json={"Rule": "fwd", "Destination": "dest"}).json() == {"Retried": 3}
        wait_for(lambda: dest_counts(http)["dest"]["Done"] == 3, 30, "3 delivered rows", node)
        assert len(scp.files()) == 3
        assert http.get("/routes/fwd").json()["Queue"][0]["Done"] == 3

        study = resource_ids("GW1", STUDY, "", "").study
        r = http.post("/routes/fwd/replay", json={"Study": study})  # the Orthanc ID
        assert r.json() == {"Rule": "fwd", "StudyInstanceUID": STUDY, "Instances": 3, "Queued": 3, "FilteredOut": 0}
        wait_for(lambda: len(scp.files()) == 6, 30, "the replayed study", node)
    finally:
        scp.stop()

    # down again: a replay by StudyInstanceUID ends dead, and discard drops those rows
    http.put("/modalities/dest", json={"AET": "DEST", "Host": "127.0.0.1", "Port": down})
    assert http.post("/routes/fwd/replay", json={"Study": STUDY}).json()["Queued"] == 3
    wait_for(lambda: dest_counts(http)["dest"]["Dead"] == 3, 30, "3 dead rows again", node)
    assert http.post("/outbox/discard", json={"Rule": "fwd"}).json() == {"Discarded": 3}
    assert dest_counts(http).get("dest", {}).get("Dead", 0) == 0 and http.get("/outbox").json()["DeadErrors"] == []
    assert http.post("/outbox/discard").json() == {"Discarded": 0}


def test_unknown_rules_and_bad_bodies(node_factory: Any) -> None:
    node = node_factory(DicomModalities={"dest": ["DEST", "127.0.0.1", free_port()]}, Routes=[RULE]).start()
    http = node.rest()
    nope = {"Rule": "nope"}
    for r in (http.get("/routes/nope"), http.post("/routes/nope/replay", json={"Study": STUDY}),
              http.post("/outbox/retry", json=nope), http.post("/outbox/discard", json=nope)):  # fmt: skip
        assert r.status_code == 404 and "nope" in r.json()["Details"], r.text
    r = http.post("/routes/fwd/replay", json={"Study": "1.2.3.4.5"})
    assert r.status_code == 404 and "1.2.3.4.5" in r.json()["Details"]
    assert http.post("/routes/fwd/replay", json={}).status_code == 400
    assert http.post("/outbox/retry", json={"Rule": 7}).status_code == 400
    assert http.post("/outbox/retry", json=[]).status_code == 400
    r = http.delete("/modalities/dest")
    assert r.status_code == 400 and "fwd" in r.json()["Details"]
