"""Clinician feedback export: the journal's acknowledgements with their verdicts, as CSV for audit.

Rows are `Journal.feedback()` rows (FEEDBACK_COLUMNS): the patient appears only as the salted
pseudonymous key, never a name or patient ID.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import Any, TextIO

from appliance.journal import FEEDBACK_COLUMNS

# A cell starting with one of these is a formula to Excel/LibreOffice; free text typed at a ward
# display (`by`, `comment`) must not run as one on the auditor's PC (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return "" if value is None else value


def write_csv(rows: Iterable[dict[str, Any]], out: TextIO) -> int:
    """Write a header and one line per row; returns the number of rows written."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FEEDBACK_COLUMNS)
    count = 0
    for row in rows:
        writer.writerow([_cell(row[name]) for name in FEEDBACK_COLUMNS])
        count += 1
    return count
