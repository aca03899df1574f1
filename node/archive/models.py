"""The index: one table per DICOM level, the changes log, global properties and files awaiting deletion.

Each level keeps Orthanc's public ID (SHA-1 of the DICOM identifiers, :mod:`node.dicom.ids`), its main DICOM
tags as JSON (what REST shows and C-FIND answers) and, as real indexed columns, the few tags that queries filter
on, so the common C-FIND and REST lookups never scan (:mod:`node.archive.find` pushes constraints onto them).

Case-insensitive matching (C-FIND's PN by default, every tag in ``/tools/find``) compares ``str.casefold()``ed
values, which no SQL function reproduces (SQLite's ``lower()`` folds ASCII only, PostgreSQL's depends on the
collation). So the tags such queries hit most keep a second, *folded* column (``*_folded``) filled in Python
and indexed: ``PatientName``, ``PatientID`` and ``AccessionNumber``. The models keep it in step with its source
on every insert, update and save (:meth:`BaseModel.update`), so no writer can forget it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, ClassVar

from peewee import (
    SQL,
    AutoField,
    BigIntegerField,
    BooleanField,
    CharField,
    CompositeKey,
    DatabaseProxy,
    DateTimeField,
    ForeignKeyField,
    IntegerField,
    Model,
    ModelInsert,
    ModelUpdate,
    TextField,
)

database = DatabaseProxy()

#: Bumped whenever the tables change; :func:`node.archive.db.migrate` knows how to get from each older one.
SCHEMA_VERSION = 5
# 2: Pseudonym; 3: Outbox, stability columns of Series and Study; 4: Metadata; 5: folded PatientName, PatientID
# and AccessionNumber columns, Series index (modality, study) instead of (modality)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def fold(text: str) -> str:
    """What case-insensitive matching compares (:class:`node.dicom.matching.Constraint` folds the same way):
    full Unicode case folding, so ``É``/``é`` and ``ß``/``SS`` meet, which SQL's ``lower()`` does not do."""
    return text.casefold()


#: The folded columns' SQL default: what schema 5's migration adds them with (:func:`node.archive.db._add_column`),
#: so a fresh index and a migrated one have the same DDL, and an SQL ``INSERT`` of an older schema's columns works.
FOLDED_DEFAULT = SQL("DEFAULT ''")


class BaseModel(Model):
    #: Source column name -> name of the column holding its :func:`fold` (indexed, for case-insensitive lookups).
    FOLDED: ClassVar[Mapping[str, str]] = {}

    class Meta:
        database = database
        legacy_table_names = False

    @classmethod
    def _with_folded(cls, data: Any, kwargs: dict[str, Any]) -> Any:
        """The row data with each folded column recomputed from its source, when the source is written.

        Recomputed even when the caller passed a folded value: ``save()`` passes every field, including a
        folded value read before the source changed. Anything but a plain string in a source column (an SQL
        expression) cannot be folded here and is refused rather than leaving a stale folded value behind.
        """
        normalized = cls._normalize_data(data, kwargs)
        if not cls.FOLDED or not isinstance(normalized, dict):
            return normalized
        for source, folded in cls.FOLDED.items():
            field = cls._meta.fields[source]
            if field in normalized:
                value = normalized[field]
                if not isinstance(value, str):
                    raise TypeError(f"{cls.__name__}.{source} must be written as a string (its folded copy "
                                    f"{folded} is computed in Python), got {type(value).__name__}")  # fmt: skip
                normalized[cls._meta.fields[folded]] = fold(value)
        return normalized

    @classmethod
    def update(cls, __data: Any = None, **update: Any) -> ModelUpdate:
        return super().update(cls._with_folded(__data, update))

    @classmethod
    def insert(cls, __data: Any = None, **insert: Any) -> ModelInsert:
        return super().insert(cls._with_folded(__data, insert))


class Patient(BaseModel):
    FOLDED: ClassVar[Mapping[str, str]] = {"patient_name": "patient_name_folded", "patient_id": "patient_id_folded"}

    id = AutoField()
    public_id = CharField(max_length=44, unique=True)
    patient_id = CharField(index=True)  # DICOM PatientID ("" when absent)
    patient_name = CharField(index=True, default="")
    patient_id_folded = CharField(index=True, default="", constraints=[FOLDED_DEFAULT])
    patient_name_folded = CharField(index=True, default="", constraints=[FOLDED_DEFAULT])
    main_tags = TextField()  # JSON {keyword: value}
    last_update = DateTimeField(default=utcnow)


class Study(BaseModel):
    FOLDED: ClassVar[Mapping[str, str]] = {"accession_number": "accession_number_folded"}

    id = AutoField()
    public_id = CharField(max_length=44, unique=True)
    patient = ForeignKeyField(Patient, backref="studies", on_delete="CASCADE")
    study_uid = CharField(index=True)
    study_date = CharField(index=True, default="")
    accession_number = CharField(index=True, default="")
    accession_number_folded = CharField(index=True, default="", constraints=[FOLDED_DEFAULT])
    main_tags = TextField()
    last_update = DateTimeField(default=utcnow, index=True)
    #: Set when an instance arrives, cleared when the resource is declared stable (``StableAge`` seconds later).
    stable_pending = BooleanField(default=True, index=True)
    #: ``received_at`` of the newest instance a stable trigger has covered: the next one covers newer ones only.
    stable_seen = DateTimeField(null=True)


class Series(BaseModel):
    id = AutoField()
    public_id = CharField(max_length=44, unique=True)
    study = ForeignKeyField(Study, backref="series", on_delete="CASCADE")
    series_uid = CharField(index=True)
    modality = CharField(default="")  # indexed with the study: see Meta
    main_tags = TextField()
    last_update = DateTimeField(default=utcnow, index=True)
    #: Set when an instance arrives, cleared when the resource is declared stable (``StableAge`` seconds later).
    stable_pending = BooleanField(default=True, index=True)
    #: ``received_at`` of the newest instance a stable trigger has covered: the next one covers newer ones only.
    stable_seen = DateTimeField(null=True)

    class Meta:
        #: (modality, study): ModalitiesInStudy finds the studies of a modality from the index alone, in study
        #: order, and "the CT series of these studies" is one index search; a modality-only lookup uses its prefix.
        indexes = ((("modality", "study"), False),)


class Instance(BaseModel):
    id = AutoField()
    public_id = CharField(max_length=44, unique=True)
    series = ForeignKeyField(Series, backref="instances", on_delete="CASCADE")
    sop_uid = CharField(index=True)
    main_tags = TextField()
    file_uuid = CharField(max_length=36, unique=True)
    file_size = BigIntegerField()
    file_sha256 = CharField(max_length=64)
    transfer_syntax = CharField(default="")
    sop_class_uid = CharField(default="")
    index_in_series = IntegerField(null=True)
    origin = CharField(default="")  # DicomProtocol, RestApi, Plugins… (Orthanc's vocabulary)
    remote_aet = CharField(default="")
    called_aet = CharField(default="")
    remote_ip = CharField(default="")
    received_at = DateTimeField(default=utcnow)


class Change(BaseModel):
    """Orthanc's ``/changes`` log: what later triggers (routing, stable series/study) read in order."""

    seq = AutoField()
    change_type = CharField()  # NewInstance, NewSeries, NewStudy, NewPatient, StableSeries, …
    level = CharField()  # Patient, Study, Series, Instance
    public_id = CharField(max_length=44, index=True)
    date = DateTimeField(default=utcnow)


class Property(BaseModel):
    """Global properties (schema version, later the Anonymized<N> counter)."""

    key = CharField(primary_key=True)
    value = TextField()


class Garbage(BaseModel):
    """Files whose index rows are gone in a committed transaction and that still have to be unlinked."""

    file_uuid = CharField(max_length=36, primary_key=True)


class Pseudonym(BaseModel):
    """A persistent old → new map per project (a routing rule or a group of rules).

    Instances anonymized one at a time (the gateway) still land in one new study, and a patient keeps one
    pseudonym across studies and restarts (deviations.md, last row). ``namespace`` is ``PATIENT`` or ``UID``
    (see :mod:`node.dicom.uidmap`).
    """

    id = AutoField()
    project = CharField(max_length=64)
    namespace = CharField(max_length=32)
    original = CharField(max_length=255)
    new = CharField(max_length=64)
    created_at = DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("project", "namespace", "original"), True),)


class Outbox(BaseModel):
    """One thing to deliver: an instance, as a rule transforms it, to one destination (the routing outbox).

    ``state`` goes pending → claimed → done, or back to pending with a later ``next_attempt`` after a failure,
    or to dead after the rule's last attempt (kept until retried or discarded). A claimed row whose
    ``lease_until`` has passed belongs to a worker that died: it is pending again. ``instance`` is the
    instance's public ID (not a foreign key: a row outlives a deleted instance and says so).
    """

    id = AutoField()
    instance = CharField(max_length=44)
    study = CharField(max_length=44, index=True)
    rule = CharField(max_length=64)
    destination = CharField(max_length=64)
    state = CharField(max_length=8, default="pending")
    attempts = IntegerField(default=0)
    next_attempt = DateTimeField(default=utcnow)
    lease_until = DateTimeField(null=True)
    claimed_by = CharField(max_length=128, default="")
    claim = CharField(max_length=36, default="")
    last_status = IntegerField(null=True)
    last_error = TextField(default="")
    created_at = DateTimeField(default=utcnow)
    updated_at = DateTimeField(default=utcnow)

    class Meta:
        indexes = (
            (("instance", "rule", "destination"), True),
            (("state", "destination", "next_attempt"), False),
            (("state", "next_attempt"), False),  # the workers' "anything due?" poll
        )


class Metadata(BaseModel):
    """Orthanc's metadata of a resource at any level beyond what the index columns hold: ``ModifiedFrom`` and
    ``AnonymizedFrom`` (the resource a job made this one from), which scripts use to avoid re-processing.

    Orthanc's public IDs do not collide across levels (they hash different strings), so the ID is the key.
    """

    public_id = CharField(max_length=44)
    name = CharField(max_length=64)
    value = TextField()

    class Meta:
        primary_key = CompositeKey("public_id", "name")


ALL_MODELS = (Patient, Study, Series, Instance, Change, Property, Garbage, Pseudonym, Outbox, Metadata)
