"""The appliance's one way of writing "now": UTC, ISO 8601, milliseconds (sorts as text in SQLite)."""

from __future__ import annotations

from datetime import datetime, timezone


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
