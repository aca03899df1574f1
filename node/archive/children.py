"""What a C-FIND answer learns from a resource's descendants: counts, modalities, SOP classes, and the
instance whose file stands for the resource.

The computed return keys are Orthanc 1.10's (``OrthancFindRequestHandler.cpp``, ``ComputeCounters``): each is
answered at its own level only (``NumberOfStudyRelatedSeries`` in a study answer, never in a series answer).
Every value is one aggregate query on indexed foreign keys, so a count costs the same for 1 or 10,000
children. Call inside a connection (the caller's thread holds one).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from peewee import Model, ModelSelect

from node.archive.models import Instance, Series, Study
from node.dicom.levels import Level

#: The computed keys of each level (keyword → what it counts or lists).
COMPUTED: dict[Level, frozenset[str]] = {
    Level.PATIENT: frozenset({"NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                              "NumberOfPatientRelatedInstances"}),
    Level.STUDY: frozenset({"NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "ModalitiesInStudy",
                            "SOPClassesInStudy"}),
    Level.SERIES: frozenset({"NumberOfSeriesRelatedInstances"}),
    Level.INSTANCE: frozenset(),
}  # fmt: skip
ALL_COMPUTED = frozenset().union(*COMPUTED.values())


def _series_of(level: Level, row_id: int) -> ModelSelect:
    q = Series.select(Series.id)
    if level is Level.STUDY:
        return q.where(Series.study == row_id)
    return q.join(Study, on=Series.study == Study.id).where(Study.patient == row_id)


def _instances_of(level: Level, row_id: int, *fields: Any) -> ModelSelect:
    q = Instance.select(*fields)
    if level is Level.SERIES:
        return q.where(Instance.series == row_id)
    return q.where(Instance.series.in_(_series_of(level, row_id)))


def _joined(values: list[str]) -> str:
    """Distinct non-empty values, sorted and joined by ``\\`` (Orthanc stores them in a ``std::set``)."""
    return "\\".join(sorted({v for v in values if v}))


def computed(level: Level, row: Model, wanted: Collection[str]) -> dict[str, str]:
    """The computed keys of ``wanted`` that ``level`` answers, as DICOM strings."""
    keys = COMPUTED[level] & set(wanted)
    out: dict[str, str] = {}
    if not keys:
        return out
    rid = row.id
    if level is Level.PATIENT:
        if "NumberOfPatientRelatedStudies" in keys:
            out["NumberOfPatientRelatedStudies"] = str(Study.select().where(Study.patient == rid).count())
        if "NumberOfPatientRelatedSeries" in keys:
            out["NumberOfPatientRelatedSeries"] = str(_series_of(level, rid).count())
        if "NumberOfPatientRelatedInstances" in keys:
            out["NumberOfPatientRelatedInstances"] = str(_instances_of(level, rid).count())
    elif level is Level.STUDY:
        if "NumberOfStudyRelatedSeries" in keys:
            out["NumberOfStudyRelatedSeries"] = str(_series_of(level, rid).count())
        if "NumberOfStudyRelatedInstances" in keys:
            out["NumberOfStudyRelatedInstances"] = str(_instances_of(level, rid).count())
        if "ModalitiesInStudy" in keys:
            rows = Series.select(Series.modality).where(Series.study == rid).distinct().tuples()
            out["ModalitiesInStudy"] = _joined([m for (m,) in rows])
        if "SOPClassesInStudy" in keys:
            rows = _instances_of(level, rid, Instance.sop_class_uid).distinct().tuples()
            out["SOPClassesInStudy"] = _joined([c for (c,) in rows])
    elif level is Level.SERIES:
        out["NumberOfSeriesRelatedInstances"] = str(_instances_of(level, rid).count())
    return out


def representative(level: Level, row: Model) -> Instance | None:
    """The instance whose file answers for a resource's tags the index does not keep: its first stored one
    (Orthanc reads one instance of the resource too). ``None`` when it has none left (deleted meanwhile)."""
    if level is Level.INSTANCE:
        return row  # type: ignore[return-value]
    return _instances_of(level, row.id).order_by(Instance.id).first()  # type: ignore[no-any-return]
