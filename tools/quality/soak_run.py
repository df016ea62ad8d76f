"""What one soak run (tools/quality/soak.py) shares between its threads: the cart it plays (site, device,
beds, topics), every file dropped, the kills made and the crashes seen, the C-STORE counts and notes."""

from __future__ import annotations

import argparse
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

BEDS = ("bed-1", "bed-2", "bed-3", "bed-4")
SITE, DEVICE = "ward-7", "cart-1"
RESULT_TOPIC = f"cxr/{SITE}/{DEVICE}/result"
STATUS_TOPIC = f"cxr/{SITE}/{DEVICE}/status"


@dataclass
class Drop:
    """One file put into the watched folder."""

    name: str
    kind: str  # image | fuzz
    bed: str | None = None
    secrets: tuple[str, ...] = ()
    # How the spool's key of this image begins ('sop:<UID>/' or 'sha256:<hash>'; the key 'sop:<UID>' of
    # the first file of a UID counts as 'sop:<UID>/'): an image whose row
    # recovery registered after a kill between its rename and its row has no original name to match.
    key_prefix: str | None = None


@dataclass
class Run:
    args: argparse.Namespace
    rng: random.Random
    workdir: Path
    drops: list[Drop] = field(default_factory=list)
    daemon_kills: int = 0
    broker_kills: int = 0
    daemon_crashes: int = 0
    peak_rss_kb: int = 0
    notes: list[str] = field(default_factory=list)
    feeding_done: threading.Event = field(default_factory=threading.Event)
    cstore_port: int = 0  # the daemon's DICOM receiver; 0 = images only through the folder
    cstore_sent: int = 0
    cstore_retries: int = 0
    cstore_hostile: list[int | None] = field(default_factory=list)  # statuses for hostile codestreams

    def notes_once(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)
