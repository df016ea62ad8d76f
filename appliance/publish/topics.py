"""The topic tree: <prefix>/<site>/<device_id>/{status, result, latest/<bed>, thumbnail/<bed>,
ack/<message_id>/<display account>, history/request, history/response}.

A bed name comes from config or DICOM tags, so it is sanitised before it becomes a topic level:
MQTT wildcards (+ #), the level separator (/), control characters and anything unusual become
'_', so "ICU bed 3/A" is published on .../latest/ICU_bed_3_A.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_LEVEL_CHARS = 64


def topic_level(value: str, default: str = "unassigned") -> str:
    """One safe topic level: letters, digits, '.', '_', '-'; never empty, never a wildcard."""
    level = _UNSAFE.sub("_", value.strip()).strip("_")[:MAX_LEVEL_CHARS]
    return level or default


@dataclass(frozen=True)
class Topics:
    prefix: str
    site: str
    device_id: str

    @property
    def base(self) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, self.site, self.device_id) if p.strip("/"))

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def result(self) -> str:
        return f"{self.base}/result"

    @property
    def ack(self) -> str:
        return f"{self.base}/ack"

    @property
    def ack_filter(self) -> str:
        """Displays publish to ack/<message_id>/<their account> (retained); '#' also matches older
        shapes, which the publisher ignores."""
        return f"{self.base}/ack/#"

    def latest(self, location: str) -> str:
        return f"{self.base}/latest/{topic_level(location)}"

    def thumbnail(self, location: str) -> str:
        return f"{self.base}/thumbnail/{topic_level(location)}"

    @property
    def history_request(self) -> str:
        """Displays ask for a patient's earlier results here (their ACL may write only this)."""
        return f"{self.base}/history/request"

    @property
    def history(self) -> str:
        return f"{self.base}/history/response"
