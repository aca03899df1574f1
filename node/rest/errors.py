"""Orthanc's error body, for every error the API answers (spec §4.5): scripts written against Orthanc parse it.

``{"HttpStatus": 404, "HttpError": "Not Found", "Message": …, "Details": …, "Method": …, "Uri": …,
"OrthancError": …, "OrthancStatus": …}``.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from node.dicom.errors import RequestError


class RestError(Exception):
    """An error with its HTTP status, Orthanc error code and a message that names the problem."""

    def __init__(self, http_status: int, orthanc_status: int, orthanc_error: str, details: str = "") -> None:
        super().__init__(details or orthanc_error)
        self.http_status = http_status
        self.orthanc_status = orthanc_status
        self.orthanc_error = orthanc_error
        self.details = details


def from_request_error(exc: RequestError) -> RestError:
    """A refused request body or value: 400, with the Orthanc status its kind has (BadFileFormat…)."""
    return RestError(400, exc.orthanc_status, exc.orthanc_error, str(exc))


def unknown_resource(what: str) -> RestError:
    return RestError(404, 17, "Unknown resource", what)


def bad_request(details: str) -> RestError:
    return RestError(400, 8, "Bad request", details)


def body(request: Request, err: RestError) -> dict[str, Any]:
    out: dict[str, Any] = {
        "HttpError": HTTPStatus(err.http_status).phrase,
        "HttpStatus": err.http_status,
        "Message": err.orthanc_error,
        "Method": request.method,
        "OrthancError": err.orthanc_error,
        "OrthancStatus": err.orthanc_status,
        "Uri": request.url.path,
    }
    if err.details:
        out["Details"] = err.details
    return out


def response(request: Request, err: RestError) -> JSONResponse:
    return JSONResponse(body(request, err), status_code=err.http_status)
