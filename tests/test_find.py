"""C-FIND matching (node.dicom.matching), its run against the index (node.archive.find) and ``POST /tools/find``.

The REST tests run on a real SQLite archive holding ten synthetic instances (3 patients, 4 studies, 6 series) and
compare whole ID lists in order, so a wider or narrower answer, or a different order, fails.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import make_instance, store_file
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


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    root = tmp_path_factory.mktemp("find")
    archive = open_archive(f"sqlite:///{root}/index.db", root / "storage", sync=False)
    cfg = config.build(None, {"StorageDirectory": str(root / "storage"), "IndexDirectory": str(root)}, environ={})
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
    yield out
    archive.close()


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
