"""The four resource levels of the DICOM model, as Orthanc names them in URLs and bodies."""

from __future__ import annotations

from enum import IntEnum


class Level(IntEnum):
    """Ordered from the top: ``Level.PATIENT < Level.STUDY`` means "patient is above study"."""

    PATIENT = 0
    STUDY = 1
    SERIES = 2
    INSTANCE = 3

    @property
    def title(self) -> str:  # type: ignore[override]
        return self.name.capitalize()


_ALIASES = {
    "patient": Level.PATIENT, "patients": Level.PATIENT,
    "study": Level.STUDY, "studies": Level.STUDY,
    "series": Level.SERIES,
    "instance": Level.INSTANCE, "instances": Level.INSTANCE, "image": Level.INSTANCE, "images": Level.INSTANCE,
}  # fmt: skip


def parse_level(text: str) -> Level:
    """``Patient``/``Study``/``Series``/``Instance``, case-insensitive, plural and ``Image`` accepted (as Orthanc)."""
    level = _ALIASES.get(text.strip().lower()) if isinstance(text, str) else None
    if level is None:
        raise ValueError(f"unknown resource level {text!r} (expected Patient, Study, Series or Instance)")
    return level
