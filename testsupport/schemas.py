"""Validate payloads against the versioned JSON Schemas shipped in appliance/schemas/."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import jsonschema

from appliance.result import SCHEMA_DIR


@cache
def validator(schema_name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMA_DIR / schema_name).read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def assert_valid(payload: bytes | str | dict[str, Any], schema_name: str) -> dict[str, Any]:
    """Raise AssertionError listing every violation; return the decoded payload."""
    data = json.loads(payload) if isinstance(payload, bytes | str) else payload
    errors = sorted(validator(schema_name).iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
        raise AssertionError(f"payload does not match {schema_name}:\n" + "\n".join(lines))
    assert isinstance(data, dict)
    return data
