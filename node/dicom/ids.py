"""Orthanc-compatible resource identifiers.

Orthanc names every patient, study, series and instance by the SHA-1 of its DICOM identifiers, so the same
file gets the same ID on any Orthanc (and on dicom-node): scripts written against Orthanc's REST API keep
working. See ``orthanc-semantics.md`` §5.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def orthanc_hash(value: str) -> str:
    """SHA-1 of ``value`` (UTF-8) as 40 lower-case hex digits in five dash-separated groups of eight."""
    h = hashlib.sha1(value.encode("utf-8")).hexdigest()
    return "-".join(h[i : i + 8] for i in range(0, 40, 8))


@dataclass(frozen=True, slots=True)
class ResourceIds:
    """The four Orthanc IDs of one instance and of its parents."""

    patient: str
    study: str
    series: str
    instance: str


def resource_ids(patient_id: str, study_uid: str, series_uid: str, sop_uid: str) -> ResourceIds:
    """IDs of an instance and its parents from its (already trimmed) DICOM identifiers.

    An absent PatientID is passed as ``""`` (Orthanc tolerates it since 1.5.7).
    """
    study_key = f"{patient_id}|{study_uid}"
    series_key = f"{study_key}|{series_uid}"
    return ResourceIds(
        patient=orthanc_hash(patient_id),
        study=orthanc_hash(study_key),
        series=orthanc_hash(series_key),
        instance=orthanc_hash(f"{series_key}|{sop_uid}"),
    )
