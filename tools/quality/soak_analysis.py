"""The soak's checks (tools/quality/soak.py), once everything has settled: every image accounted for
exactly once in the spool, every journal result delivered once (redeliveries counted apart), order per
bed, database integrity, the outbox drained, no patient name or ID in any payload."""

from __future__ import annotations

import collections
import itertools
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testsupport.daemon import DaemonProcess
from testsupport.mosquitto import Received, Subscriber
from tools.quality.soak_run import RESULT_TOPIC, STATUS_TOPIC, Drop, Run


def sqlite_rows(path: Path, query: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(query).fetchall()
    finally:
        db.close()


def integrity(path: Path) -> str:
    return (
        ", ".join(str(r[0]) for r in sqlite_rows(path, "PRAGMA integrity_check"))
        if path.exists()
        else "missing"
    )


def account(
    images: Sequence[Drop], rows: Sequence[tuple[str | None, str]]
) -> tuple[list[str], list[str], list[str]]:
    """Every image dropped must have exactly one spool row, found by its original name; `rows` are the
    spool's (original, key). A row recovery registered from a file whose row a kill cut off has no
    original name: it is matched to an image without a row by the start of the spool's key, each row to
    one image at most. Returns (images not accounted for, images matched that way, rows left unmatched)."""
    originals = collections.Counter(Path(str(original)).name for original, _ in rows if original)
    orphans = [key for original, key in rows if not original]
    recovered: list[str] = []
    for drop in images:
        if originals[drop.name] == 0 and drop.key_prefix:
            # '/' closes a UID key: 'sop:<UID>' (the first of its UID) matches the prefix 'sop:<UID>/'
            match = next((key for key in orphans if f"{key}/".startswith(drop.key_prefix)), None)
            if match is not None:
                orphans.remove(match)
                recovered.append(drop.name)
    not_accounted = [d.name for d in images if originals[d.name] != 1 and d.name not in recovered]
    return not_accounted, recovered, orphans


def settle(run: Run, daemon: DaemonProcess, sub: Subscriber, timeout: float) -> bool:
    """Wait until the inbox is empty (truncated files wait out the watcher's timeout), the spool has
    nothing waiting, and every result in the journal reached the display."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = any(p.is_file() for p in daemon.inbox.rglob("*")) or daemon.spool_files("incoming")
        waiting = waiting or daemon.spool_files("processing")
        if not waiting and not missing_results(daemon, sub):
            return True
        time.sleep(1.0)
    return False


def journal_results(daemon: DaemonProcess) -> dict[str, str]:
    """image_id -> message_id of every result in the journal."""
    rows = sqlite_rows(daemon.workdir / "journal.sqlite3", "SELECT image_id, message_id FROM results")
    return {str(a): str(b) for a, b in rows}


def missing_results(daemon: DaemonProcess, sub: Subscriber) -> set[str]:
    got = {m.json()["message_id"] for m in sub.on_topic(RESULT_TOPIC)}
    return set(journal_results(daemon).values()) - got


def analyse(run: Run, daemon: DaemonProcess, sub: Subscriber, secrets: set[str]) -> dict[str, Any]:
    messages: list[Received] = list(sub.messages)
    results = [m.json() for m in messages if m.topic == RESULT_TOPIC]
    journal = journal_results(daemon)
    received_ids = [r["message_id"] for r in results]
    per_image: dict[str, set[str]] = collections.defaultdict(set)
    for r in results:
        per_image[r["image"]["image_id"]].add(r["message_id"])
    spool = daemon.workdir / "journal.sqlite3"  # the appliance's database holds the spool's rows
    items = sqlite_rows(spool, "SELECT seq, image_id, state, original, key FROM items ORDER BY seq")
    states = collections.Counter(str(r[2]) for r in items)
    # Order per bed: first arrivals of each bed's results must follow the spool's acceptance order.
    seq = {str(r[1]): int(r[0]) for r in items}
    first: dict[str, dict[str, Any]] = {}
    for r in results:
        first.setdefault(r["message_id"], r)
    order_violations = 0
    for bed in {str(r.get("location")) for r in first.values()}:
        seqs = [seq.get(r["image"]["image_id"], -1) for r in first.values() if str(r.get("location")) == bed]
        order_violations += sum(1 for a, b in itertools.pairwise(seqs) if b < a)
    # Every image dropped: exactly one spool row, done or quarantine; exactly one result if done.
    images = [d for d in run.drops if d.kind == "image"]
    not_accounted, recovered, orphans = account(images, [(r[3], str(r[4])) for r in items])
    unfinished = [str(r[1]) for r in items if r[2] not in ("done", "quarantine")]
    quarantine_dir = daemon.spool / "quarantine"
    reasons: collections.Counter[str] = collections.Counter()
    for text in quarantine_dir.glob("*.reason.txt"):
        body = text.read_text(errors="replace")
        reason = next(
            (line.split(":", 1)[1].strip() for line in body.splitlines() if line.startswith("reason")), ""
        )
        reasons[reason or body.splitlines()[0][:60]] += 1
    everything = b"\n".join(m.payload for m in messages)
    leaks = sorted(s for s in secrets if s.encode() in everything)
    outbox = daemon.workdir / "journal.sqlite3"  # and the outbox
    outbox_pending = sqlite_rows(outbox, "SELECT COUNT(*) FROM outbox WHERE state = 'pending'")[0][0]
    statuses = [m.json() for m in messages if m.topic == STATUS_TOPIC]
    return {
        "results": len(set(received_ids)),
        "journal_results": len(journal),
        "lost": len(set(journal.values()) - set(received_ids)),
        "duplicates": sum(1 for ids in per_image.values() if len(ids) > 1),
        "redeliveries": len(received_ids) - len(set(received_ids)),
        "order_violations": order_violations,
        "images_not_accounted": not_accounted[:20],
        "images_not_accounted_count": len(not_accounted),
        "images_registered_by_recovery": len(recovered),
        "rows_unmatched": len(orphans),
        "unfinished": len(unfinished),
        "spool_states": dict(states),
        "quarantined": len(list(quarantine_dir.glob("*.reason.txt"))),
        "quarantine_reasons": dict(reasons.most_common()),
        "phi_leaks": leaks,
        "phi_strings_checked": len(secrets),
        "payloads_scanned": len(messages),
        "outbox_pending": int(outbox_pending),
        "integrity": {  # one database (the store) since v2: each name is what it holds
            "journal": integrity(daemon.workdir / "journal.sqlite3"),
            "spool": integrity(spool),
            "outbox": integrity(outbox),
        },
        "status_messages": len(statuses),
        "last_status": statuses[-1] if statuses else None,
    }
