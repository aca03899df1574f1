"""The read side of the index shared by the CLI, the REST API and the Q/R SCP."""

from __future__ import annotations

from dataclasses import dataclass

from peewee import fn

from node.archive.models import Instance, Patient, Series, Study
from node.archive.store import Archive


@dataclass(frozen=True, slots=True)
class Statistics:
    """Orthanc's ``/statistics`` figures."""

    patients: int
    studies: int
    series: int
    instances: int
    total_disk_size: int
    disk_free: int
    disk_total: int

    def as_orthanc(self) -> dict[str, int | str]:
        mb = self.total_disk_size // (1024 * 1024)
        return {
            "CountPatients": self.patients,
            "CountStudies": self.studies,
            "CountSeries": self.series,
            "CountInstances": self.instances,
            "TotalDiskSize": str(self.total_disk_size),
            "TotalDiskSizeMB": mb,
            "TotalUncompressedSize": str(self.total_disk_size),
            "TotalUncompressedSizeMB": mb,
        }


def statistics(archive: Archive) -> Statistics:
    with archive.db.connection_context():
        size = Instance.select(fn.COALESCE(fn.SUM(Instance.file_size), 0)).scalar()
        usage = archive.storage.disk_usage()
        return Statistics(
            patients=Patient.select().count(),
            studies=Study.select().count(),
            series=Series.select().count(),
            instances=Instance.select().count(),
            total_disk_size=int(size or 0),
            disk_free=usage.free,
            disk_total=usage.total,
        )
