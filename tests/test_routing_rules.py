"""Routing rules (issue 4, part 1): validation that names the rule, and filter matching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from node import config
from node.routing.rules import Origin, RouteError, matching, parse_routes

DEST = ["dest", "archive"]


def rule(**kwargs: object) -> dict[str, object]:
    return {"Name": "r1", "Forward": ["dest"], **kwargs}


def ct() -> Dataset:
    ds = Dataset()
    ds.Modality = "CT"
    ds.StudyDescription = "CT CHEST W/O"
    ds.PatientID = "R12345"
    ds.StudyDate = "20200615"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.ReferencedImageSequence = Sequence([Dataset(), item])
    return ds


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ({"Forward": ["dest"]}, "Routes[0]: Name must be"),
        ([rule(), rule()], "Routes[1] (r1): another rule has the same Name"),
        ([rule(Forward=["nowhere"])],
         "Routes[0] (r1).Forward: 'nowhere' is not in DicomModalities (known: archive, dest)"),
        ([rule(Trigger="Sometimes")], "Routes[0] (r1): Trigger must be one of Instance, StableSeries, StableStudy"),
        ([rule(Anonymize={"DicomVersion": "nope"})], "Routes[0] (r1): DicomVersion must be one of"),
        ([rule(Modify={"Replace": {"NotATag": "x"}})], "Routes[0] (r1): \"Replace\": unknown DICOM tag 'NotATag'"),
        ([rule(Filter={"Tags": {"PatientID": {"Regex": "("}}})], "Routes[0] (r1).Filter.Tags.PatientID.Regex: invalid"),
        ([rule(Filter={"Tags": {"StudyDate": {"Range": "2020"}}})], "Range must be 'low-high'"),
        ([rule(Filter={"Calling": "X"})], "Routes[0] (r1).Filter: unknown key(s) Calling"),
        ([rule(Filter={"RemoteHost": "10.0.0.300"})], "RemoteHost: '10.0.0.300' is not an IP address"),
        ([rule(Forwards=["dest"])], "unknown key(s) Forwards"),
        ([{"Name": "r1"}], "Routes[0] (r1): the rule does nothing"),
        ([rule(DeleteSourceAfterSuccess="yes")], "Routes[0] (r1).DeleteSourceAfterSuccess must be true or false"),
        ([rule(PseudonymKeyFile="")], "Routes[0] (r1): PseudonymKeyFile must be the path"),
    ],
)  # fmt: skip
def test_invalid_rules_are_refused_naming_the_rule(routes: object, message: str) -> None:
    with pytest.raises(RouteError) as exc:
        parse_routes(routes if isinstance(routes, list) else [routes], DEST)
    assert message in str(exc.value)


def test_the_configuration_refuses_a_bad_rule_naming_file_key_and_rule(tmp_path: Path) -> None:
    path = tmp_path / "node.json"
    body = {"StorageDirectory": "s", "IndexDirectory": "i", "DicomModalities": {"dest": ["D", "127.0.0.1", 104]},
            "Routes": [{"Name": "gw", "Forward": ["dset"]}]}  # fmt: skip
    path.write_text(json.dumps(body))
    with pytest.raises(config.ConfigError, match=r"node\.json: key 'Routes': Routes\[0\] \(gw\)\.Forward: 'dset'"):
        config.build(str(path), {})


def test_the_example_gateway_configuration_is_valid(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "conf" / "gateway.example.json"
    text = example.read_text()
    copy = tmp_path / "gateway.json"
    copy.write_text(text)
    cfg = config.build(str(copy), {})
    (route,) = cfg.routes
    assert (route.name, route.trigger, route.forward, route.project) == (
        "anonymize-and-forward",
        "Instance",
        ("dest",),
        "research",
    )
    assert route.anonymize is not None and route.anonymize.dicom_version == "2023b"


def test_network_conditions() -> None:
    (r,) = parse_routes([rule(Filter={"CallingAet": ["CT*", "MR?"], "CalledAet": "GATEWAY",
                                      "RemoteHost": ["10.1.0.0/16", "127.0.0.1"]})], DEST)  # fmt: skip
    assert r.matches(None, Origin("CT_SCANNER", "GATEWAY", "10.1.2.3"))
    assert r.matches(None, Origin("MR1", "GATEWAY ", "127.0.0.1"))
    assert not r.matches(None, Origin("MR12", "GATEWAY", "127.0.0.1"))
    assert not r.matches(None, Origin("CT1", "OTHER", "127.0.0.1"))
    assert not r.matches(None, Origin("CT1", "GATEWAY", "10.2.0.1"))
    assert not r.matches(None, Origin("CT1", "GATEWAY", "not-an-ip"))
    assert not r.filter.needs_dataset


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({"Modality": "CT"}, True),
        ({"Modality": "MR"}, False),
        ({"Modality": ["MR", "CT"]}, True),
        ({"StudyDescription": "*CHEST*"}, True),
        ({"StudyDescription": "CT?CHEST*"}, True),
        ({"StudyDescription": "*HEAD*"}, False),
        ({"PatientID": {"Regex": "^R[0-9]+$"}}, True),
        ({"PatientID": {"Regex": "^X"}}, False),
        ({"StudyDate": {"Range": "20200101-20201231"}}, True),
        ({"StudyDate": {"Range": "20210101-"}}, False),
        ({"StudyDate": {"Range": "-20200615"}}, True),
        ({"InstitutionName": {"Present": False}}, True),
        ({"InstitutionName": {"Present": True}}, False),
        ({"ImageType": "AXIAL"}, True),  # any value of a multi-valued element
        ({"ReferencedImageSequence[*].ReferencedSOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}, True),
        ({"ReferencedImageSequence[0].ReferencedSOPClassUID": {"Present": True}}, False),
        ({"Modality": "CT", "PatientID": {"Regex": "^X"}}, False),  # all conditions must hold
    ],
)
def test_tag_conditions(tags: dict[str, object], expected: bool) -> None:
    (r,) = parse_routes([rule(Filter={"Tags": tags})], DEST)
    assert r.matches(ct(), Origin()) is expected
    assert r.filter.needs_dataset


def test_any_of_not_and_several_matching_rules() -> None:
    routes = parse_routes(
        [
            rule(Name="ct-or-mr", Filter={"AnyOf": [{"Tags": {"Modality": "MR"}}, {"Tags": {"Modality": "CT"}}]}),
            rule(Name="not-test", Filter={"Not": {"Tags": {"PatientID": "TEST*"}}}),
            rule(Name="mr-only", Filter={"Tags": {"Modality": "MR"}}),
            rule(Name="stable", Trigger="StableStudy"),
        ],
        DEST,
    )
    assert [r.name for r in matching(routes, "Instance", ct(), Origin())] == ["ct-or-mr", "not-test"]
    test_patient = ct()
    test_patient.PatientID = "TEST1"
    assert [r.name for r in matching(routes, "Instance", test_patient, Origin())] == ["ct-or-mr"]
    assert [r.name for r in matching(routes, "StableStudy", None, Origin())] == ["stable"]
