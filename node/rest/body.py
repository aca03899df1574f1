"""Request bodies: JSON whatever the Content-Type says (``curl -d`` sends form-encoded), as Orthanc parses them."""

from __future__ import annotations

import json
from typing import Any

from node.rest.errors import bad_request


def parse_json(raw: bytes) -> Any:
    """A request body as JSON; an empty body is ``{}`` (Orthanc's default request)."""
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


def json_object(raw: bytes) -> dict[str, Any]:
    """A body that must be a JSON object (every job route's)."""
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    return body
