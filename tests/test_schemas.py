"""The JSON Schemas in the repository are the ones the code generates (editors and subscribers use them)."""

from __future__ import annotations

import json

import pytest

from appliance.config import config_json_schema
from appliance.result import SCHEMA_DIR, SCHEMAS, json_schema


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_payload_schema_is_current(name: str) -> None:
    committed = json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))
    assert committed == json_schema(SCHEMAS[name]), (
        f"run: cxr-appliance schema --out appliance/schemas ({name})"
    )


def test_config_schema_is_current() -> None:
    committed = json.loads((SCHEMA_DIR / "config.schema.json").read_text(encoding="utf-8"))
    assert committed == config_json_schema(), "run: cxr-appliance schema --out appliance/schemas"


def test_result_schema_requires_the_disclaimer_and_forbids_unknown_fields() -> None:
    schema = json.loads((SCHEMA_DIR / "result.v2.json").read_text(encoding="utf-8"))
    assert "disclaimer" in schema["properties"] and schema["additionalProperties"] is False
    assert schema["properties"]["disclaimer"]["const"] == "Not for diagnostic use"
