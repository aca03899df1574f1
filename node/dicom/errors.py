"""Typed rejections of a modification/anonymization request or of one instance it is applied to.

Each carries the Orthanc error code it corresponds to (the REST layer answers HTTP 400 with Orthanc's error
body; an unknown tag is 400 too, where Orthanc says 500: deviations.md, case 67). Messages name the field or
tag at fault.
"""

from __future__ import annotations


class RequestError(ValueError):
    """A request body or value we refuse (HTTP 400)."""

    orthanc_status = 8  # BadRequest
    orthanc_error = "Bad request"


class BadParameterType(RequestError):
    orthanc_status = 5
    orthanc_error = "Bad type for a parameter"


class ParameterOutOfRange(RequestError):
    orthanc_status = 3
    orthanc_error = "Parameter out of range"


class BadFileFormat(RequestError):
    orthanc_status = 15
    orthanc_error = "Bad file format"


class UnknownTag(RequestError):
    orthanc_status = 27
    orthanc_error = "Unknown DICOM tag"


class NotSupported(RequestError):
    """Valid request that this node cannot carry out (e.g. a transfer syntax with no encoder installed)."""

    orthanc_status = 1  # NotImplemented
    orthanc_error = "Not implemented yet"
