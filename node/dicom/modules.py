"""The Patient and General Study module tags Orthanc's split and merge work on (spec §4.6,
``DicomTag::AddTagsForModule``): a split may only change these, a merge copies them from the target study."""

from __future__ import annotations

PATIENT_MODULE: tuple[int, ...] = (
    0x00100010, 0x00100020, 0x00100030, 0x00100040, 0x00081120, 0x00100032, 0x00101000, 0x00101002,
    0x00101001, 0x00102160, 0x00104000, 0x00102201, 0x00102202, 0x00102292, 0x00102293, 0x00102294,
    0x00102297, 0x00102298, 0x00102299, 0x00120062, 0x00120063, 0x00120064, 0x00100021, 0x00100024,
)  # fmt: skip

STUDY_MODULE: tuple[int, ...] = (
    0x0020000D, 0x00080020, 0x00080030, 0x00080090, 0x00080096, 0x00200010, 0x00080050, 0x00080051,
    0x00081030, 0x00081048, 0x00081049, 0x00081060, 0x00081062, 0x00321034, 0x00081110, 0x00081032,
    0x00401012,
)  # fmt: skip

STUDY_UID, SERIES_UID = 0x0020000D, 0x0020000E

#: What ``/studies/{id}/split`` may ``Replace`` or ``Remove``.
SPLIT_ALLOWED: frozenset[int] = frozenset(PATIENT_MODULE + STUDY_MODULE) - {STUDY_UID, SERIES_UID}
