"""The log formatters: one record, one line, whatever a file name holds."""

from __future__ import annotations

import json
import logging

from appliance.logs import JsonFormatter, TextFormatter

# A newline and a carriage return that would forge a line, a terminal escape that would clear the
# screen, a C1 "next line", a Unicode line separator, and a file name's undecodable byte (surrogate).
HOSTILE = "scan.dcm\n2026-01-01 00:00:00 INFO appliance: all fine\r\x1b[2J\x85\u2028\udcff.dcm"


def record(message: str, *args: object, **fields: object) -> logging.LogRecord:
    rec = logging.LogRecord("appliance.test", logging.WARNING, __file__, 1, message, args, None)
    rec.fields = fields
    return rec


def test_text_lines_escape_control_characters_in_messages_and_fields() -> None:
    line = TextFormatter().format(record("quarantined %s: %s", HOSTILE, "decode failed", name=HOSTILE))
    assert len(line.splitlines()) == 1
    assert not any(ch in line for ch in "\n\r\x1b\x85\u2028\udcff")
    assert "scan.dcm\\n2026-01-01" in line and "\\x1b[2J\\x85\\u2028\\udcff.dcm" in line
    assert line.endswith(
        "name=scan.dcm\\n2026-01-01 00:00:00 INFO appliance: all fine\\r\\x1b[2J\\x85\\u2028\\udcff.dcm"
    )


def test_json_lines_stay_one_object_per_line() -> None:
    line = JsonFormatter().format(record("quarantined %s", HOSTILE, name=HOSTILE))
    assert len(line.splitlines()) == 1 and "\x1b" not in line
    entry = json.loads(line)
    assert entry["message"] == f"quarantined {HOSTILE}" and entry["name"] == HOSTILE
