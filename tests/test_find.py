"""C-FIND matching (node.dicom.matching), its run against the index (node.archive.find) and ``POST /tools/find``.

The REST tests run on a real SQLite archive holding ten synthetic instances (3 patients, 4 studies, 6 series) and
compare whole ID lists in order, so a wider or narrower answer, or a different order, fails.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_instance, new_database_url, store_file
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from node import config
from node.archive.find import NotIndexedTag, find, inherited_tags, pushdown
from node.archive.models import Patient, Study
from node.archive.store import Archive, open_archive
from node.dicom.ids import resource_ids
from node.dicom.levels import Level
from node.dicom.matching import (
    BadQueryValue,
    Kind,
    QueryError,
    UnknownQueryTag,
    effective,
    parse_constraint,
    parse_query,
)
from node.rest.app import create_app

# -- matching: each rule -----------------------------------------------------------------------------------------


def c(key: str, value: str, **kw: Any) -> Any:
    return parse_constraint(key, value, **kw)


def test_single_value_is_exact_and_case_sensitive_by_default() -> None:
    con = c("PatientID", "AB12")
    assert con.kind is Kind.SINGLE
    assert con.matches("AB12")
    assert not con.matches("ab12") and not con.matches("AB123") and not con.matches("") and not con.matches(None)


def test_case_insensitive_everywhere_for_rest_and_on_pn_only_for_dimse() -> None:
    assert c("PatientName", "doe^john", case_sensitive=False).matches("DOE^JOHN")
    assert c("Modality", "ct", case_sensitive=False).matches("CT")  # /tools/find: every VR (AddRestConstraint)
    assert c("PatientName", "doe^john", case_sensitive=False, pn_only=True).matches("DOE^JOHN")
    assert not c("Modality", "ct", case_sensitive=False, pn_only=True).matches("CT")  # C-FIND: PN only
    assert not c("PatientName", "doe^john").matches("DOE^JOHN")
    assert c("PatientName", "smith^élodie", case_sensitive=False).matches("SMITH^ÉLODIE")  # not ASCII-only


def test_wildcards_star_and_question_mark_on_the_whole_value() -> None:
    con = c("PatientName", "DOE*")
    assert con.kind is Kind.WILDCARD
    assert con.matches("DOE") and con.matches("DOE^JOHN") and not con.matches("JOHN^DOE")
    q = c("PatientID", "A?C")
    assert q.matches("ABC") and not q.matches("AC") and not q.matches("ABBC")
    assert c("StudyDescription", "*HEAD*").matches("CT HEAD NECK")
    dots = c("StudyDescription", "A.B*")  # regex characters are literal
    assert dots.matches("A.BC") and not dots.matches("AXBC")
    assert c("PatientName", "d?e*", case_sensitive=False).matches("DOE^JANE")


def test_wildcards_are_refused_on_vrs_without_them_but_a_lone_star_is_universal() -> None:
    with pytest.raises(BadQueryValue, match="StudyInstanceUID"):
        c("StudyInstanceUID", "1.2.*")
    with pytest.raises(BadQueryValue, match="StudyDate"):
        c("StudyDate", "2020*")
    for key in ("StudyInstanceUID", "StudyDate", "PatientName"):
        assert c(key, "*").is_universal and c(key, "*").matches(None)


def test_list_of_values_with_backslash() -> None:
    con = c("SeriesInstanceUID", "1.2.3\\1.2.4")
    assert con.kind is Kind.LIST and con.values == ("1.2.3", "1.2.4")
    assert con.matches("1.2.3") and con.matches("1.2.4")
    assert not con.matches("1.2.5") and not con.matches("1.2.3\\1.2.4") and not con.matches("")
    assert c("Modality", "ct\\mr", case_sensitive=False).matches("MR")


def test_date_ranges_open_and_closed() -> None:
    since = c("StudyDate", "20200101-")
    assert since.kind is Kind.RANGE and since.values == ("20200101", "")
    assert since.matches("20200101") and since.matches("20211231") and not since.matches("20191231")
    until = c("StudyDate", "-20201231")
    assert until.matches("20201231") and until.matches("19990101") and not until.matches("20210101")
    both = c("StudyDate", "20200101-20201231")
    assert both.matches("20200615") and not both.matches("20210101") and not both.matches("20191231")
    assert not since.matches("") and not until.matches(None)  # an empty value never matches a range
    assert c("StudyDate", "-").is_universal


def test_time_and_datetime_ranges_cover_what_the_bound_prefixes() -> None:
    tm = c("StudyTime", "0800-1200")
    assert tm.matches("0800") and tm.matches("093015.123") and tm.matches("1200") and tm.matches("120059")
    assert not tm.matches("075959") and not tm.matches("1201")
    dt = c("AcquisitionDateTime", "20200101-20201231")
    assert dt.matches("20201231235959") and dt.matches("20200101000000") and not dt.matches("20210101000000")


def test_date_values_with_two_dashes_are_refused_naming_the_tag() -> None:
    with pytest.raises(BadQueryValue, match="StudyDate"):
        c("StudyDate", "2020-01-01")
    assert c("StudyDate", "20200101\\20200102").kind is Kind.LIST  # a list of dates is fine
    assert c("PatientID", "A-B").kind is Kind.SINGLE  # a dash means a range on DA/TM/DT only


def test_empty_value_is_universal_and_dropped_by_effective() -> None:
    cons = parse_query({"PatientName": "", "Modality": "CT", "StudyDate": "*"})
    assert [x.kind for x in cons] == [Kind.UNIVERSAL, Kind.SINGLE, Kind.UNIVERSAL]
    assert [x.keyword for x in effective(cons)] == ["Modality"]
    assert cons[0].matches(None) and cons[0].matches("ANY")


def test_query_parser_accepts_keywords_and_hex_tags() -> None:
    cons = parse_query({"PatientName": "DOE*", "StudyDate": "2020-", "0020,000d": "1.2", "(0008,0060)": "CT"})
    assert [(x.keyword, x.vr, x.kind) for x in cons] == [
        ("PatientName", "PN", Kind.WILDCARD),
        ("StudyDate", "DA", Kind.RANGE),
        ("StudyInstanceUID", "UI", Kind.SINGLE),
        ("Modality", "CS", Kind.SINGLE),
    ]
    assert cons[1].values == ("2020", "")


def test_query_parser_names_what_it_refuses() -> None:
    with pytest.raises(UnknownQueryTag, match="NoSuchTag") as err:
        parse_query({"NoSuchTag": "x"})
    assert isinstance(err.value, ValueError)
    with pytest.raises(QueryError, match=r"PatientID.*string"):
        parse_query({"PatientID": 12})
    with pytest.raises(BadQueryValue, match="ReferencedSeriesSequence"):
        parse_query({"ReferencedSeriesSequence": "x"})
    with pytest.raises(QueryError, match="object"):
        parse_query(["PatientID"])  # type: ignore[arg-type]


# -- matching: properties ----------------------------------------------------------------------------------------

_LITERAL = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="*?\\"), min_size=1)


@given(_LITERAL, st.booleans())
def test_a_literal_value_always_matches_itself(value: str, sensitive: bool) -> None:
    for key in ("PatientName", "StudyDescription", "PatientID"):
        assert c(key, value, case_sensitive=sensitive).matches(value)


@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters="*?\\"), min_size=1))
def test_case_insensitive_literals_ignore_ascii_case(value: str) -> None:
    assert c("PatientName", value, case_sensitive=False).matches(value.swapcase())


@given(st.one_of(st.none(), st.text()))
def test_a_star_matches_everything(value: str | None) -> None:
    for key in ("PatientName", "Modality", "StudyInstanceUID", "StudyDate"):
        assert c(key, "*").matches(value)


@given(_LITERAL, st.text())
def test_a_prefix_wildcard_matches_every_extension(prefix: str, rest: str) -> None:
    assert c("PatientName", prefix + "*").matches(prefix + rest)


_DATE = st.dates().map(lambda d: d.strftime("%Y%m%d"))


@given(_DATE, _DATE, _DATE)
def test_a_date_range_is_the_interval(lower: str, upper: str, value: str) -> None:
    assert c("StudyDate", f"{lower}-{upper}").matches(value) == (lower <= value <= upper)
    assert c("StudyDate", f"{lower}-").matches(value) == (lower <= value)
    assert c("StudyDate", f"-{upper}").matches(value) == (value <= upper)


# -- a real archive ------------------------------------------------------------------------------------------------

PATIENTS = {
    "P1": {"PatientName": "DOE^JOHN", "PatientSex": "M"},
    "P2": {"PatientName": "doe^jane", "PatientSex": "F"},
    "P3": {"PatientName": "SMITH^ÉLODIE", "PatientSex": "F", "SpecificCharacterSet": "ISO_IR 192"},
}
#: study uid -> (patient, tags)
STUDIES = {
    "1.9.1": ("P1", {"StudyDate": "20200115", "AccessionNumber": "ACC1", "StudyDescription": "CT HEAD"}),
    "1.9.2": ("P1", {"StudyDate": "20201231", "AccessionNumber": "ACC2", "StudyDescription": "MR KNEE"}),
    "1.9.3": ("P2", {"StudyDate": "20190610", "AccessionNumber": "ACC3", "StudyDescription": "CT CHEST"}),
    "1.9.4": ("P3", {"AccessionNumber": "ACC4", "StudyDescription": "US ABDOMEN"}),  # no StudyDate
}
#: series uid -> (study uid, modality, instance count), in storage order
SERIES = {
    "1.9.1.1": ("1.9.1", "CT", 2),
    "1.9.1.2": ("1.9.1", "SR", 1),
    "1.9.2.1": ("1.9.2", "MR", 2),
    "1.9.3.1": ("1.9.3", "CT", 2),
    "1.9.3.2": ("1.9.3", "PT", 1),
    "1.9.4.1": ("1.9.4", "US", 2),
}


class Corpus:
    """The archive, its client, and the public IDs of what it holds (lists in storage order)."""

    def __init__(self, archive: Archive, client: TestClient) -> None:
        self.archive = archive
        self.client = client
        self.patient: dict[str, str] = {}
        self.study: dict[str, str] = {}
        self.series: dict[str, str] = {}
        self.instance: dict[str, str] = {}  # sop uid -> id
        self.instances_of: dict[str, list[str]] = {}  # series uid -> sop uids

    def post(self, body: Any, **kw: Any) -> Any:
        return self.client.post("/tools/find", content=json.dumps(body), **kw)

    def ids(self, level: str, query: dict[str, str], **extra: Any) -> list[str]:
        r = self.post({"Level": level, "Query": query, **extra})
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]


def _populate(root: Path, session: bool = False) -> Corpus:
    """An archive under ``root`` holding the corpus above, stored as the receiver stores."""
    url = new_database_url(root, session=session)
    archive = open_archive(url, root / "storage", sync=False)
    cfg = config.build(None, {"StorageDirectory": str(root / "storage"), "IndexDirectory": str(root),
                              "Database": url}, environ={})  # fmt: skip
    out = Corpus(archive, TestClient(create_app(cfg, archive)))
    n = 0
    for series_uid, (study_uid, modality, count) in SERIES.items():
        patient_id, study_tags = STUDIES[study_uid]
        for i in range(count):
            sop_uid = f"{series_uid}.{i + 1}"
            path = make_instance(root / f"{n}.dcm", patient_id=patient_id, study_uid=study_uid,
                                 series_uid=series_uid, sop_uid=sop_uid, Modality=modality, InstanceNumber=i + 1,
                                 **PATIENTS[patient_id], **study_tags)  # fmt: skip
            store_file(archive, path)
            n += 1
            ids = resource_ids(patient_id, study_uid, series_uid, sop_uid)
            out.patient.setdefault(patient_id, ids.patient)
            out.study.setdefault(study_uid, ids.study)
            out.series.setdefault(series_uid, ids.series)
            out.instance[sop_uid] = ids.instance
            out.instances_of.setdefault(series_uid, []).append(sop_uid)
    assert n == 10
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    out = _populate(tmp_path_factory.mktemp("find"), session=True)
    yield out
    out.archive.close()


def test_every_level_without_constraints_lists_everything_in_storage_order(corpus: Corpus) -> None:
    assert corpus.ids("Patient", {}) == [corpus.patient[p] for p in ("P1", "P2", "P3")]
    assert corpus.ids("Study", {}) == [corpus.study[s] for s in STUDIES]
    assert corpus.ids("Series", {}) == [corpus.series[s] for s in SERIES]
    assert corpus.ids("Instance", {}) == list(corpus.instance.values())
    assert corpus.ids("sTuDy", {}) == corpus.ids("Study", {})  # the level is case-insensitive
    assert corpus.ids("Study", {"StudyDate": "", "PatientName": "*"}) == [corpus.study[s] for s in STUDIES]


def test_patient_level_single_wildcard_list_and_case(corpus: Corpus) -> None:
    p = corpus.patient
    assert corpus.ids("Patient", {"PatientID": "P2"}) == [p["P2"]]
    assert corpus.ids("Patient", {"0010,0020": "P3"}) == [p["P3"]]  # a tag as gggg,eeee
    assert corpus.ids("Patient", {"PatientID": "P1\\P3"}) == [p["P1"], p["P3"]]
    assert corpus.ids("Patient", {"PatientID": "P?"}) == [p["P1"], p["P2"], p["P3"]]
    assert corpus.ids("Patient", {"PatientSex": "F"}) == [p["P2"], p["P3"]]
    # CaseSensitive defaults to false (Orthanc's default, CaseSensitivePN)
    assert corpus.ids("Patient", {"PatientName": "DOE*"}) == [p["P1"], p["P2"]]
    assert corpus.ids("Patient", {"PatientName": "DOE*"}, CaseSensitive=True) == [p["P1"]]
    assert corpus.ids("Patient", {"PatientName": "DOE*"}, CaseSensitive=False) == [p["P1"], p["P2"]]
    assert corpus.ids("Patient", {"PatientName": "doe^jane"}, CaseSensitive=True) == [p["P2"]]
    assert corpus.ids("Patient", {"PatientName": "DOE^JANE"}, CaseSensitive=True) == []
    assert corpus.ids("Patient", {"PatientName": "smith^élodie"}) == [p["P3"]]
    assert corpus.ids("Patient", {"PatientName": "?OE^J*N*"}) == [p["P1"], p["P2"]]
    assert corpus.ids("Patient", {"PatientID": "p1"}, CaseSensitive=True) == []


def test_study_level_dates_accession_and_description(corpus: Corpus) -> None:
    s = corpus.study
    assert corpus.ids("Study", {"StudyDate": "20200101-"}) == [s["1.9.1"], s["1.9.2"]]
    assert corpus.ids("Study", {"StudyDate": "-20200115"}) == [s["1.9.1"], s["1.9.3"]]
    assert corpus.ids("Study", {"StudyDate": "20200101-20201231"}) == [s["1.9.1"], s["1.9.2"]]
    assert corpus.ids("Study", {"StudyDate": "20201231"}) == [s["1.9.2"]]
    assert corpus.ids("Study", {"StudyDate": "2020-"}) == [s["1.9.1"], s["1.9.2"]]
    assert corpus.ids("Study", {"StudyDate": "20190610\\20201231"}) == [s["1.9.2"], s["1.9.3"]]
    assert corpus.ids("Study", {"AccessionNumber": "ACC3"}) == [s["1.9.3"]]
    assert corpus.ids("Study", {"AccessionNumber": "acc*"}, CaseSensitive=True) == []
    assert corpus.ids("Study", {"AccessionNumber": "acc*"}) == [s[u] for u in STUDIES]
    assert corpus.ids("Study", {"StudyDescription": "CT*"}) == [s["1.9.1"], s["1.9.3"]]
    assert corpus.ids("Study", {"StudyInstanceUID": "1.9.4\\1.9.2"}) == [s["1.9.2"], s["1.9.4"]]


def test_parent_level_constraints(corpus: Corpus) -> None:
    s, se = corpus.study, corpus.series
    assert corpus.ids("Study", {"PatientName": "DOE^JOHN", "StudyDescription": "CT*"}) == [s["1.9.1"]]
    assert corpus.ids("Study", {"PatientID": "P1"}) == [s["1.9.1"], s["1.9.2"]]
    assert corpus.ids("Study", {"PatientSex": "F"}) == [s["1.9.3"], s["1.9.4"]]
    assert corpus.ids("Series", {"StudyDate": "20200101-", "Modality": "CT"}) == [se["1.9.1.1"]]
    assert corpus.ids("Series", {"PatientName": "doe*", "Modality": "CT"}) == [se["1.9.1.1"], se["1.9.3.1"]]
    sop = corpus.instances_of["1.9.2.1"]
    assert corpus.ids("Instance", {"PatientID": "P1", "Modality": "MR"}) == [corpus.instance[u] for u in sop]
    # the Orthanc book's example shape: Modality, a StudyDate range, a universal PatientID
    ct = corpus.instances_of["1.9.1.1"]
    query = {"Modality": "CT", "StudyDate": "20200101-", "PatientID": "*"}
    assert corpus.ids("Instance", query) == [corpus.instance[u] for u in ct]


def test_lower_level_constraints_need_one_matching_descendant(corpus: Corpus) -> None:
    s, p = corpus.study, corpus.patient
    assert corpus.ids("Study", {"Modality": "CT"}) == [s["1.9.1"], s["1.9.3"]]
    assert corpus.ids("Study", {"Modality": "CT\\US"}) == [s["1.9.1"], s["1.9.3"], s["1.9.4"]]
    assert corpus.ids("Patient", {"StudyDate": "2020-"}) == [p["P1"]]
    assert corpus.ids("Patient", {"Modality": "PT"}) == [p["P2"]]
    # series and instance constraints must hold on one chain: SR series has only instance .1
    assert corpus.ids("Study", {"Modality": "SR", "SOPInstanceUID": "1.9.1.2.1"}) == [s["1.9.1"]]
    assert corpus.ids("Study", {"Modality": "SR", "SOPInstanceUID": "1.9.1.1.1"}) == []


def test_series_and_instance_levels(corpus: Corpus) -> None:
    se, inst = corpus.series, corpus.instance
    assert corpus.ids("Series", {"Modality": "CT"}) == [se["1.9.1.1"], se["1.9.3.1"]]
    assert corpus.ids("Series", {"Modality": "ct"}, CaseSensitive=True) == []
    assert corpus.ids("Series", {"SeriesInstanceUID": "1.9.3.2\\1.9.1.2"}) == [se["1.9.1.2"], se["1.9.3.2"]]
    assert corpus.ids("Instance", {"SOPInstanceUID": "1.9.3.1.2"}) == [inst["1.9.3.1.2"]]
    assert corpus.ids("Instance", {"InstanceNumber": "2"}) == [
        inst[u] for u in ("1.9.1.1.2", "1.9.2.1.2", "1.9.3.1.2", "1.9.4.1.2")
    ]
    assert corpus.ids("Instance", {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}) == list(inst.values())
    assert corpus.ids("Instance", {"SOPClassUID": "1.2.3"}) == []


def test_expand_answers_the_resources_as_get_shows_them(corpus: Corpus) -> None:
    sid = corpus.study["1.9.1"]
    [found] = corpus.ids("Study", {"AccessionNumber": "ACC1"}, Expand=True)
    assert found == corpus.client.get(f"/studies/{sid}").json()
    assert found["PatientMainDicomTags"]["PatientName"] == "DOE^JOHN" and "RequestedTags" not in found
    assert corpus.ids("Study", {"AccessionNumber": "ACC1"}, Expand=False) == [sid]
    [inst] = corpus.ids("Instance", {"SOPInstanceUID": "1.9.2.1.1"}, Expand=True,
                        RequestedTags=["PatientName", "0008,0020", "Modality", "PatientAge"])  # fmt: skip
    assert inst["ID"] == corpus.instance["1.9.2.1.1"] and inst["Type"] == "Instance"
    assert inst["RequestedTags"] == {"PatientName": "DOE^JOHN", "StudyDate": "20201231", "Modality": "MR"}


def test_limit_and_since_page_through_the_matches(corpus: Corpus) -> None:
    everything = list(corpus.instance.values())
    assert corpus.ids("Instance", {}, Limit=3) == everything[:3]
    assert corpus.ids("Instance", {}, Since=3, Limit=4) == everything[3:7]
    assert corpus.ids("Instance", {}, Since=9) == everything[9:]
    assert corpus.ids("Instance", {}, Since=20) == []
    assert corpus.ids("Instance", {}, Limit=0) == everything  # 0: no limit, as Orthanc
    ct = [corpus.instance[u] for u in (*corpus.instances_of["1.9.1.1"], *corpus.instances_of["1.9.3.1"])]
    assert corpus.ids("Instance", {"Modality": "CT"}, Since=1, Limit=2) == ct[1:3]  # after filtering


def test_form_encoded_body_is_still_json(corpus: Corpus) -> None:
    body = json.dumps({"Level": "Patient", "Query": {"PatientID": "P3"}})
    r = corpus.client.post("/tools/find", content=body,
                           headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert r.status_code == 200 and r.json() == [corpus.patient["P3"]]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "JSON object"),
        ({"Query": {}}, '"Level" is missing'),
        ({"Level": 3, "Query": {}}, '"Level" should be a string'),
        ({"Level": "Frame", "Query": {}}, "Frame"),
        ({"Level": "Study", "Query": "PatientID=1"}, '"Query" should be a JSON object'),
        ({"Level": "Study", "Query": {"PatientID": 5}}, "PatientID"),
        ({"Level": "Study", "Query": {"NoSuchTag": "x"}}, "NoSuchTag"),
        ({"Level": "Study", "Query": {"StudyInstanceUID": "1.2.*"}}, "StudyInstanceUID"),
        ({"Level": "Study", "Query": {"StudyDate": "2020-01-01"}}, "StudyDate"),
        ({"Level": "Study", "Query": {"PatientAge": "030Y"}}, "PatientAge"),
        ({"Level": "Study", "Query": {}, "Limit": "5"}, '"Limit" should be an integer'),
        ({"Level": "Study", "Query": {}, "Limit": -1}, '"Limit" should be a positive integer'),
        ({"Level": "Study", "Query": {}, "Since": 1.5}, '"Since" should be an integer'),
        ({"Level": "Study", "Query": {}, "Limit": True}, '"Limit" should be an integer'),
        ({"Level": "Study", "Query": {}, "CaseSensitive": "yes"}, '"CaseSensitive" should be a Boolean'),
        ({"Level": "Study", "Query": {}, "Expand": 1}, '"Expand" should be a Boolean'),
        ({"Level": "Study", "Query": {}, "RequestedTags": "PatientName"}, '"RequestedTags"'),
        ({"Level": "Study", "Query": {}, "RequestedTags": ["Bogus"]}, "Bogus"),
    ],
)
def test_bad_bodies_answer_400_naming_the_problem(corpus: Corpus, body: Any, needle: str) -> None:
    r = corpus.client.post("/tools/find", content=body if isinstance(body, str) else json.dumps(body))
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["HttpStatus"] == 400 and err["Uri"] == "/tools/find" and err["Method"] == "POST"
    assert needle in err["Details"], err["Details"]


def test_empty_body_is_refused_for_its_missing_level(corpus: Corpus) -> None:
    r = corpus.client.post("/tools/find", content=b"")
    assert r.status_code == 400 and "Level" in r.json()["Details"]


# -- the index runner directly -------------------------------------------------------------------------------------


def _brute_force(level: Level, query: dict[str, str], sensitive: bool) -> list[str]:
    """Every row of the level checked in Python alone (no SQL filter): what find() must agree with."""
    from node.archive.find import MODELS, plan

    cons = parse_query(query, case_sensitive=sensitive)
    by_level = plan(level, cons)
    assert all(lv <= level for lv in by_level), "brute force covers own and parent levels only"
    model = MODELS[level]
    out = []
    for row in model.select().order_by(model.id):
        tags = inherited_tags(row)
        if all(x.matches(tags.get(x.keyword)) for x in effective(cons)):
            out.append(row.public_id)
    return out


@pytest.mark.parametrize(
    ("level", "query"),
    [
        (Level.INSTANCE, {"PatientName": "DOE*", "Modality": "C?"}),
        (Level.INSTANCE, {"StudyDate": "-20201231", "AccessionNumber": "ACC?"}),
        (Level.SERIES, {"AccessionNumber": "ACC1\\ACC3", "Modality": "CT\\PT"}),
        (Level.STUDY, {"PatientID": "P*", "StudyInstanceUID": "1.9.2\\1.9.3"}),
        (Level.PATIENT, {"PatientName": "*^J*"}),
        (Level.STUDY, {"PatientName": "DOE^J*", "StudyDate": "20200101-"}),
    ],
)
def test_sql_pushdown_never_changes_the_answer(corpus: Corpus, level: Level, query: dict[str, str]) -> None:
    with corpus.archive.db.connection_context():
        for sensitive in (True, False):
            expected = _brute_force(level, query, sensitive)
            assert expected, "a query that matches nothing proves little"
            cons = parse_query(query, case_sensitive=sensitive)
            for batch in (1, 2, 500):  # keyset pages of every size give the same rows
                assert [r.public_id for r in find(corpus.archive.db, level, cons, batch=batch)] == expected


def test_prefix_pushdown_for_other_databases_selects_the_same_rows(corpus: Corpus) -> None:
    con = parse_constraint("PatientName", "DOE*")
    with corpus.archive.db.connection_context():
        for sqlite in (True, False):
            cond = pushdown(con, Patient.patient_name, sqlite)
            assert cond is not None
            rows = [r.public_id for r in Patient.select().where(cond).order_by(Patient.id)]
            assert rows == [corpus.patient["P1"]]
        date = parse_constraint("StudyDate", "-20200115")
        cond = pushdown(date, Study.study_date, True)
        assert cond is not None
        rows = [r.public_id for r in Study.select().where(cond).order_by(Study.id)]
        assert rows == [corpus.study["1.9.1"], corpus.study["1.9.3"]]
        insensitive = parse_constraint("PatientName", "DOE*", case_sensitive=False)
        assert pushdown(insensitive, Patient.patient_name, True) is None  # stays in Python


@given(
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1),
    st.text(st.characters(blacklist_categories=("Cs",))),
)
def test_prefix_range_upper_bound_is_above_every_extension(prefix: str, rest: str) -> None:
    from node.archive.find import _successor

    upper = _successor(prefix)
    assert upper is None or prefix + rest < upper
    assert upper is None or not upper.startswith(prefix)


def test_max_results_caps_matches_before_since_and_lower_levels_page(corpus: Corpus) -> None:
    db = corpus.archive.db
    with db.connection_context():
        everything = [r.public_id for r in find(db, Level.INSTANCE, [])]
        assert [r.public_id for r in find(db, Level.INSTANCE, [], max_results=4)] == everything[:4]
        assert [r.public_id for r in find(db, Level.INSTANCE, [], max_results=4, since=2)] == everything[2:4]
        cons = parse_query({"Modality": "CT\\US"})
        expected = [corpus.study[s] for s in ("1.9.1", "1.9.3", "1.9.4")]
        for batch in (1, 2, 3, 500):
            assert [r.public_id for r in find(db, Level.STUDY, cons, batch=batch)] == expected
        with pytest.raises(NotIndexedTag, match="PatientAge"):
            find(db, Level.STUDY, parse_query({"PatientAge": "030Y"}))  # refused when called, not iterated
        assert len(list(find(db, Level.STUDY, parse_query({"PatientAge": ""})))) == 4  # universal: no error


# -- index support (schema 5): query plans, folded columns, ModalitiesInStudy, migration ---------------------------


def _constraints(query: dict[str, str], mode: str) -> list[Any]:
    """``cfind``: C-FIND's default (PN case-insensitive, the rest exact); ``rest``: ``/tools/find``'s default
    (every tag case-insensitive); ``sensitive``: everything case-sensitive."""
    if mode == "cfind":
        return parse_query(query, case_sensitive=False, pn_only=True)
    return parse_query(query, case_sensitive=mode == "sensitive")


def _traced(db: Any, monkeypatch: pytest.MonkeyPatch, level: Level, cons: list[Any]) -> tuple[list[Any], list[Any]]:
    """find()'s rows (and their inherited tags) and every statement it ran, as (sql, params)."""
    statements: list[tuple[str, Any]] = []
    real = db.execute_sql

    def spy(sql: str, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        statements.append((sql, params))
        return real(sql, params, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(db, "execute_sql", spy)
        rows = list(find(db, level, cons))
        ran = len(statements)
        for row in rows:
            inherited_tags(row)
        assert len(statements) == ran, "inherited_tags() of a row find() yielded must not query"
    return rows, statements


def _plan_lines(db: Any, statements: list[tuple[str, Any]]) -> list[str]:
    lines = []
    for sql, params in statements:
        lines += [str(r[3]) for r in db.connection().execute("EXPLAIN QUERY PLAN " + sql, params or ()).fetchall()]
    return lines


def _walks_a_table(line: str) -> bool:
    """A plan step that reads a table (or index) whole: ``SCAN``, or a rowid *range* (the keyset walk of a
    table looks like ``SEARCH t1 USING INTEGER PRIMARY KEY (rowid>?)``). ``rowid=?`` lookups are fine, and so
    is ``SCAN json_each VIRTUAL TABLE``: the page's own list of ids, passed as one JSON parameter."""
    if line.startswith("SCAN json_each VIRTUAL TABLE"):
        return False
    return line.startswith("SCAN") or "rowid>" in line or "rowid<" in line


#: (level, query, matching mode, indexes the plans must name): every query kind a viewer sends, through find().
PLANNED = [
    (Level.STUDY, {"PatientID": "P1"}, "cfind", ["patient_patient_id"]),
    (Level.PATIENT, {"PatientID": "P1"}, "cfind", ["patient_patient_id"]),
    (Level.STUDY, {"PatientName": "doe*"}, "cfind", ["patient_patient_name_folded"]),
    (Level.PATIENT, {"PatientName": "DOE*"}, "cfind", ["patient_patient_name_folded"]),
    (Level.STUDY, {"PatientName": "smith^é*"}, "cfind", ["patient_patient_name_folded"]),
    (Level.STUDY, {"PatientName": "doe^john"}, "cfind", ["patient_patient_name_folded"]),
    (Level.STUDY, {"PatientName": "DOE*"}, "sensitive", ["patient_patient_name"]),
    (Level.STUDY, {"StudyDate": "20200101-20200131"}, "cfind", ["study_study_date"]),
    (Level.STUDY, {"StudyDate": "20200101-"}, "cfind", ["study_study_date"]),
    (Level.STUDY, {"StudyDate": "-20200131"}, "cfind", ["study_study_date"]),
    (Level.STUDY, {"AccessionNumber": "ACC1"}, "cfind", ["study_accession_number"]),
    (Level.STUDY, {"AccessionNumber": "acc1"}, "rest", ["study_accession_number_folded"]),
    (Level.STUDY, {"PatientID": "p1"}, "rest", ["patient_patient_id_folded"]),
    (Level.STUDY, {"StudyInstanceUID": "1.9.2"}, "cfind", ["study_study_uid"]),
    (Level.STUDY, {"StudyInstanceUID": "1.9.2"}, "rest", ["study_study_uid"]),  # no letter: the plain index
    (Level.STUDY, {"StudyInstanceUID": "1.9.1\\1.9.2"}, "cfind", ["study_study_uid"]),
    (Level.SERIES, {"StudyInstanceUID": "1.9.1"}, "cfind", ["study_study_uid", "series_study_id"]),
    (Level.SERIES, {"SeriesInstanceUID": "1.9.1.2"}, "cfind", ["series_series_uid"]),
    (Level.INSTANCE, {"StudyInstanceUID": "1.9.1", "SeriesInstanceUID": "1.9.1.1"}, "cfind", ["instance_series_id"]),
    (Level.INSTANCE, {"SOPInstanceUID": "1.9.3.1.2"}, "cfind", ["instance_sop_uid"]),
    (Level.STUDY, {"ModalitiesInStudy": "CT"}, "cfind", ["series_modality_study_id"]),
    (Level.STUDY, {"ModalitiesInStudy": "CT\\MR"}, "cfind", ["series_modality_study_id"]),
    (Level.PATIENT, {"ModalitiesInStudy": "PT"}, "cfind", ["series_modality_study_id"]),
    (Level.STUDY, {"ModalitiesInStudy": "CT", "StudyDate": "20200101-"}, "cfind",
     ["study_study_date", "series_modality_study_id"]),
    (Level.STUDY, {"PatientName": "DOE*", "StudyDate": "20200101-20201231"}, "cfind", []),
]  # fmt: skip


@pytest.mark.sqlite_only  # SQLite's EXPLAIN QUERY PLAN; PostgreSQL plans by statistics (scripts/bench_qr.py)
@pytest.mark.parametrize(("level", "query", "mode", "indexes"), PLANNED, ids=lambda v: str(v) if v else "-")
def test_common_queries_are_index_searches_only(
    corpus: Corpus, monkeypatch: pytest.MonkeyPatch, level: Level, query: dict[str, str], mode: str,
    indexes: list[str],
) -> None:  # fmt: skip
    """SQLite's plan for every statement find() runs: no table or index walked whole, the expected indexes used.

    Without ``ANALYZE`` (never run) SQLite's plans do not depend on the table sizes, so these ten rows plan as
    a million do (``scripts/bench_qr.py`` measures those)."""
    db = corpus.archive.db
    with db.connection_context():
        rows, statements = _traced(db, monkeypatch, level, _constraints(query, mode))
        assert rows, "a query that matches nothing would not run every statement"
        assert [r.public_id for r in rows] == [r.public_id for r in find(db, level, _constraints(query, mode))]
        lines = _plan_lines(db, statements)
    assert not [line for line in lines if _walks_a_table(line)], "\n".join(lines)
    for name in indexes:
        assert any(f"INDEX {name} (" in line for line in lines), f"{name} unused:\n" + "\n".join(lines)


@pytest.mark.sqlite_only
def test_the_plan_check_catches_a_table_walk(corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    """A listing and a constraint no column holds do walk the table, and the check above says so."""
    db = corpus.archive.db
    with db.connection_context():
        for query in ({}, {"PatientSex": "F"}, {"StudyDescription": "CT*"}):
            _, statements = _traced(db, monkeypatch, Level.STUDY, _constraints(query, "cfind"))
            assert any(_walks_a_table(line) for line in _plan_lines(db, statements)), query


@pytest.mark.parametrize(
    ("level", "query"),
    [
        (Level.PATIENT, {"PatientID": "p1\\P3"}),
        (Level.STUDY, {"PatientID": "p?"}),
        (Level.STUDY, {"AccessionNumber": "acc*"}),
        (Level.STUDY, {"AccessionNumber": "aCc2\\ACC4"}),
        (Level.SERIES, {"PatientName": "SMITH^é*"}),
        (Level.INSTANCE, {"PatientName": "doe^J*", "StudyInstanceUID": "1.9.1\\1.9.3"}),
        (Level.STUDY, {"StudyInstanceUID": "1.9.4", "PatientName": "*élodie"}),
    ],
)
def test_case_insensitive_pushdown_never_changes_the_answer(
    corpus: Corpus, level: Level, query: dict[str, str]
) -> None:
    """Folded columns and fold-invariant values answer exactly what matching every row in Python answers."""
    with corpus.archive.db.connection_context():
        expected = _brute_force(level, query, False)
        assert expected
        for batch in (1, 2, 500):
            found = find(corpus.archive.db, level, parse_query(query, case_sensitive=False), batch=batch)
            assert [r.public_id for r in found] == expected


def test_fold_invariant_characters_are_what_no_other_character_folds_to() -> None:
    """What lets a case-insensitive UID, date or numeric ID use the plain index: over all of Unicode, case
    folding maps these characters to themselves and never produces them from anything else."""
    from node.archive.find import FOLD_INVARIANT

    assert all(ch.casefold() == ch for ch in FOLD_INVARIANT)
    for cp in range(sys.maxunicode + 1):
        ch = chr(cp)
        folded = ch.casefold()
        if folded != ch:
            assert not set(folded) & FOLD_INVARIANT, hex(cp)


def test_modalities_in_study_is_a_modality_of_one_of_the_series(corpus: Corpus) -> None:
    s, p = corpus.study, corpus.patient
    db = corpus.archive.db
    with db.connection_context():
        for batch in (1, 2, 500):

            def ids(level: Level, query: dict[str, str]) -> list[str]:
                return [r.public_id for r in find(db, level, parse_query(query), batch=batch)]  # noqa: B023

            assert ids(Level.STUDY, {"ModalitiesInStudy": "CT"}) == [s["1.9.1"], s["1.9.3"]]
            assert ids(Level.STUDY, {"ModalitiesInStudy": "US\\CT"}) == [s["1.9.1"], s["1.9.3"], s["1.9.4"]]
            assert ids(Level.STUDY, {"ModalitiesInStudy": "S?"}) == [s["1.9.1"]]
            assert ids(Level.STUDY, {"ModalitiesInStudy": "CT", "StudyDate": "20200101-"}) == [s["1.9.1"]]
            assert ids(Level.STUDY, {"ModalitiesInStudy": "MR", "PatientID": "P2"}) == []
            assert ids(Level.STUDY, {"ModalitiesInStudy": "XA"}) == []
            assert ids(Level.PATIENT, {"ModalitiesInStudy": "PT"}) == [p["P2"]]
            assert ids(Level.STUDY, {"ModalitiesInStudy": ""}) == [s[u] for u in STUDIES]
        with pytest.raises(NotIndexedTag, match="ModalitiesInStudy"):
            find(db, Level.SERIES, parse_query({"ModalitiesInStudy": "CT"}))
    assert corpus.ids("Study", {"ModalitiesInStudy": "ct"}) == [s["1.9.1"], s["1.9.3"]]  # REST: any case


def test_rows_carry_their_parents_tags(corpus: Corpus) -> None:
    """inherited_tags() of a row find() yielded (parents read in the same query) equals reading the parents."""
    from node.archive.find import MODELS

    db = corpus.archive.db
    with db.connection_context():
        for level in Level:
            for query in ({}, {"PatientID": "P1\\P3"}):
                rows = list(find(db, level, parse_query(query)))
                assert rows
                for row in rows:
                    fresh = MODELS[level].get_by_id(row.id)
                    assert inherited_tags(row) == inherited_tags(fresh)


@pytest.fixture
def rebind() -> Iterator[None]:
    """Put the models back on the module's archive after a test that opened another index."""
    from node.archive.models import database

    bound = database.obj
    yield
    database.initialize(bound)


def test_folded_columns_follow_their_source_on_every_write(tmp_path: Path, rebind: None, db_url: str) -> None:
    from node.archive.db import open_index

    db = open_index(db_url)
    with db.connection_context():
        p = Patient.create(public_id="x", patient_id="Ab1", patient_name="Straße^Éva", main_tags="{}")
        row = Patient.get_by_id(p.id)
        assert (row.patient_name_folded, row.patient_id_folded) == ("strasse^éva", "ab1")
        Patient.update(patient_name="DOE^JOHN").where(Patient.id == p.id).execute()  # what rewrite.py does
        assert Patient.get_by_id(p.id).patient_name_folded == "doe^john"
        row = Patient.get_by_id(p.id)
        row.patient_name = "ROE^JANE"
        row.save()
        assert Patient.get_by_id(p.id).patient_name_folded == "roe^jane"
        Patient.insert({Patient.public_id: "y", Patient.patient_id: "Q", Patient.patient_name: "Ÿ",
                        Patient.main_tags: "{}"}).execute()  # fmt: skip
        assert Patient.get(Patient.public_id == "y").patient_name_folded == "ÿ"
        study = Study.create(public_id="s", patient=p.id, study_uid="1.2", accession_number="AbC", main_tags="{}")
        assert Study.get_by_id(study.id).accession_number_folded == "abc"
        with pytest.raises(TypeError, match="patient_name"):
            Patient.update(patient_name=Patient.patient_id).execute()  # an SQL expression cannot be folded
    db.close()


#: Queries whose answers must not change across the 4 -> 5 migration (level, query, mode).
_MIGRATION_QUERIES = [
    (Level.PATIENT, {"PatientName": "doe*"}, "cfind"),
    (Level.STUDY, {"PatientName": "SMITH^é*"}, "cfind"),
    (Level.STUDY, {"PatientID": "p1"}, "rest"),
    (Level.STUDY, {"AccessionNumber": "acc?"}, "rest"),
    (Level.STUDY, {"StudyDate": "20200101-"}, "cfind"),
    (Level.SERIES, {"StudyInstanceUID": "1.9.1"}, "cfind"),
    (Level.STUDY, {"Modality": "CT\\US"}, "sensitive"),
    (Level.INSTANCE, {"PatientName": "*j*", "Modality": "MR"}, "cfind"),
]


@pytest.mark.sqlite_only  # the SQLite file rewritten to schema 4; test_pseudonyms migrates on both databases
@pytest.mark.parametrize("version", [4, 2])
def test_an_older_index_is_migrated_with_its_folded_columns_filled(tmp_path: Path, rebind: None, version: int) -> None:
    """An index written by schema 4 (no folded columns, ``series (modality)`` index) opens as schema 5: every
    existing row gets its folded values, the indexes are swapped, and every query answers as before. From 2
    (no stability columns either) too: adding a column never rebuilds a table, whose ``DROP TABLE`` would
    cascade into the levels below (it emptied ``series`` and ``instance`` before schema 5)."""
    from node.archive.db import open_index
    from node.archive.models import SCHEMA_VERSION, Property

    corpus = _populate(tmp_path)
    db = corpus.archive.db
    with db.connection_context():
        before = [[r.public_id for r in find(db, lv, _constraints(q, m))] for lv, q, m in _MIGRATION_QUERIES]
    corpus.archive.close()
    assert all(before)

    con = sqlite3.connect(tmp_path / "index.db")  # back to what schema 4 created
    for table, column in (("patient", "patient_name_folded"), ("patient", "patient_id_folded"),
                          ("study", "accession_number_folded")):  # fmt: skip
        con.execute(f"DROP INDEX {table}_{column}")
        con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    con.execute("DROP INDEX series_modality_study_id")
    con.execute("CREATE INDEX series_modality ON series (modality)")
    if version < 3:
        for table in ("series", "study"):
            con.execute(f"DROP INDEX {table}_stable_pending")
            con.execute(f"ALTER TABLE {table} DROP COLUMN stable_pending")
            con.execute(f"ALTER TABLE {table} DROP COLUMN stable_seen")
    con.execute(f"UPDATE property SET value = '{version}' WHERE key = 'SchemaVersion'")
    con.commit()
    tables = ("patient", "study", "series", "instance")
    counts = [con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables]
    con.close()
    assert counts == [3, 4, 6, 10]

    db = open_index(f"sqlite:///{tmp_path}/index.db")
    with db.connection_context():
        assert Property.get(Property.key == "SchemaVersion").value == str(SCHEMA_VERSION) == "5"
        assert [db.execute_sql(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables] == counts
        patients = list(Patient.select())
        for p in patients:
            assert (p.patient_name_folded, p.patient_id_folded) == (p.patient_name.casefold(), p.patient_id.casefold())
        assert sorted(s.accession_number_folded for s in Study.select()) == ["acc1", "acc2", "acc3", "acc4"]
        indexes = {r[0] for r in db.execute_sql("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()}
        assert {"patient_patient_name_folded", "patient_patient_id_folded", "study_accession_number_folded",
                "series_modality_study_id"} <= indexes  # fmt: skip
        assert "series_modality" not in indexes
        after = [[r.public_id for r in find(db, lv, _constraints(q, m))] for lv, q, m in _MIGRATION_QUERIES]
    assert after == before
    db.close()
    open_index(f"sqlite:///{tmp_path}/index.db").close()  # and opens again as it is


@pytest.mark.parametrize(
    ("level", "query", "mode"),
    [
        (Level.STUDY, {"StudyDate": "20200101-"}, "cfind"),
        (Level.STUDY, {"StudyDate": "-20201231", "PatientName": "doe*"}, "cfind"),
        (Level.STUDY, {"Modality": "CT\\US"}, "sensitive"),
        (Level.STUDY, {"ModalitiesInStudy": "MR", "StudyDate": "2020-"}, "cfind"),
        (Level.PATIENT, {"Modality": "PT", "SOPInstanceUID": "1.9.3.2.1"}, "sensitive"),
        (Level.STUDY, {"Modality": "SR", "SOPInstanceUID": "1.9.1.2.1"}, "sensitive"),
        (Level.SERIES, {"PatientID": "p1", "Modality": "C*"}, "rest"),
        (Level.INSTANCE, {"AccessionNumber": "ACC1\\acc3", "InstanceNumber": "2"}, "rest"),
        (Level.PATIENT, {"PatientName": "SMITH^É*"}, "cfind"),
    ],
)
def test_skipping_the_python_recheck_where_sql_is_exact_changes_nothing(
    corpus: Corpus, monkeypatch: pytest.MonkeyPatch, level: Level, query: dict[str, str], mode: str
) -> None:
    """Where every constraint's SQL predicate is exact, find() trusts it (no re-check, descendants from the
    index alone); the answers equal those of the always-re-checking path, for every page size."""
    import node.archive.find as find_mod

    db = corpus.archive.db
    with db.connection_context():
        fast = [[r.public_id for r in find(db, level, _constraints(query, mode), batch=b)] for b in (1, 2, 500)]
        monkeypatch.setattr(find_mod, "_exact", lambda *args: False)
        slow = [r.public_id for r in find(db, level, _constraints(query, mode))]
    assert slow and fast == [slow, slow, slow]
