"""Tag tokens, dcmodify-style paths (spec §2.3-2.4) and the de-identification profiles as data (spec §1)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT
from hypothesis import given
from hypothesis import strategies as st

from node.dicom.profiles import UnknownDicomVersion, load_profile, versions
from node.dicom.tags import ANY_ITEM, DicomPath, TagError, UnknownTagError, parse_path, parse_tag


@pytest.mark.parametrize(
    ("token", "tag"),
    [
        ("PatientName", 0x00100010), ("0008-103E", 0x0008103E), ("00e1,10c2", 0x00E110C2), ("00100010", 0x00100010),
        ("(0010,0020)", 0x00100020), ("  StudyInstanceUID ", 0x0020000D), ("OtherPatientIDs", 0x00101000),
    ],
)  # fmt: skip
def test_tag_tokens(token: str, tag: int) -> None:
    assert parse_tag(token) == tag


def test_parentheses_are_refused_where_orthanc_refuses_them() -> None:
    with pytest.raises(UnknownTagError):
        parse_tag("(0010,0010)", parentheses=False)  # inside item objects of a JSON sequence value


def test_edge_case_67_unknown_name_is_a_clear_error_naming_it() -> None:
    with pytest.raises(UnknownTagError, match="'NotATag'"):
        parse_path("NotATag")
    with pytest.raises(UnknownTagError):
        parse_tag("patientname")  # keywords are case-sensitive


def test_paths_with_indices_and_wildcards() -> None:
    p = parse_path("SharedFunctionalGroupsSequence[*].ReferencedImageSequence[1].ReferencedSOPClassUID")
    assert p.prefix == ((0x52009229, ANY_ITEM), (0x00081140, 1)) and p.final == 0x00081150
    p = parse_path("(5200,9230)[*].2005,140f[*].(0008,0023)")
    assert p.prefix == ((0x52009230, None), (0x2005140F, None)) and p.final == 0x00080023
    assert parse_path("PatientName").is_top_level


@pytest.mark.parametrize(
    "bad",
    [
        "ReferencedImageSequence[-1].ReferencedSOPInstanceUID", "X[].Y", "X0].Y", "(0010,0010)[.PatientID",
        "ReferencedImageSequence.PatientName", "ReferencedImageSequence[1]", "", "a..b",
        "ReferencedImageSequence[x].PatientName", "[0].PatientName",
    ],
)  # fmt: skip
def test_edge_case_68_malformed_paths(bad: str) -> None:
    with pytest.raises(TagError):
        parse_path(bad)


_tags = st.integers(min_value=0x00080000, max_value=0x7FDFFFFF).filter(lambda t: t & 0xFFFF != 0)
_indices = st.one_of(st.none(), st.integers(min_value=0, max_value=10_000))


@given(st.lists(st.tuples(_tags, _indices), max_size=4), _tags)
def test_property_a_path_survives_printing_and_parsing(prefix: list[tuple[int, int | None]], final: int) -> None:
    path = DicomPath(tuple((parse_tag(f"{t:08x}"), i) for t, i in prefix), parse_tag(f"{final:08x}"))
    assert parse_path(str(path)) == path


@pytest.mark.parametrize(
    ("version", "removals", "clearings", "uids", "ranges"),
    [("2008", 39, 0, 8, 0), ("2017c", 216, 20, 31, 3), ("2021b", 317, 85, 47, 3), ("2023b", 408, 138, 51, 3)],
)
def test_profile_sizes_match_the_spec_table(
    version: str, removals: int, clearings: int, uids: int, ranges: int
) -> None:
    p = load_profile(version)
    assert (len(p.removals), len(p.clearings), len(p.uids), len(p.removed_ranges)) == (
        removals, clearings, uids, ranges,
    )  # fmt: skip
    assert p.keep_remap_nested == {0x00081140, 0x00082112} and p.remove_private
    assert p.regenerate_uids == {0x00080018, 0x0020000D, 0x0020000E} and p.patient_uuid == {0x00100020}
    assert p.replacements[0x00120062] == "YES" and p.replacements[0x00100010] == "Anonymized<N>"
    assert p.replacements[0x00120063].startswith(f"Orthanc <version> - PS 3.15-{version} Table E.1-1")


def test_notable_actions_per_version() -> None:
    # spec §1.3 / test_issue_146: StudyDate kept in 2008, cleared after; ContentSequence remove -> clear in 2021b
    assert 0x00080020 not in load_profile("2008").clearings and 0x00080020 in load_profile("2017c").clearings
    assert 0x0040A730 in load_profile("2017c").removals and 0x0040A730 in load_profile("2021b").clearings
    assert 0x00500020 not in load_profile("2017c").removals and 0x00500020 in load_profile("2021b").removals
    assert load_profile().version == "2023b" and set(versions()) == {"2008", "2017c", "2021b", "2023b"}
    assert load_profile().in_removed_range(0x50020010) and load_profile().in_removed_range(0x60023000)
    assert not load_profile().in_removed_range(0x60020010)


def test_unknown_dicom_version_is_refused() -> None:
    with pytest.raises(UnknownDicomVersion, match="'nope'"):
        load_profile("nope")


def test_packaged_profiles_are_generated_from_the_spec_tsv() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_profiles.py"), "--check"], capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
