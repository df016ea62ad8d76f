"""The durable outbox on its own: order, idempotency, the bound and its policy, survival of kill -9."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.publish import Outbox


def test_rows_come_back_in_order_and_leave_only_when_acked(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3")
    for n in range(5):
        assert box.put(f"t/{n % 2}", f"p{n}", 1, False, message_id=f"m{n}")
    rows = box.pending(limit=10)
    assert [r.message_id for r in rows] == ["m0", "m1", "m2", "m3", "m4"]
    assert [r.payload for r in rows] == [f"p{n}".encode() for n in range(5)]
    assert box.pending(after_id=rows[2].id, limit=10) == rows[3:]
    box.mark_acked([rows[0].id, rows[3].id])
    assert box.depth() == 3
    assert [r.message_id for r in box.pending()] == ["m1", "m2", "m4"]
    assert box.state_of("t/0", "m0") == "acked"


def test_put_is_idempotent_even_after_the_row_was_sent(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3")
    assert box.put("t", "x", message_id="a")
    assert not box.put("t", "x", message_id="a")
    assert box.put("other", "x", message_id="a")  # same message on another topic is another row
    box.mark_acked([r.id for r in box.pending()])
    assert not box.put("t", "x", message_id="a")  # tombstone: a crash-recovery re-put sends nothing
    assert box.depth() == 0
    assert box.put_many([("t", "x", 1, False, "a"), ("t", "y", 1, False, "b")]) == 1


def test_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    box = Outbox(path)
    box.put("t", b"\x00\xffbinary", 1, True, message_id="a")
    box.close()
    [row] = Outbox(path).pending()
    assert (row.payload, row.retain, row.qos) == (b"\x00\xffbinary", True, 1)


def test_a_returned_put_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    code = (
        "import sys, time\n"
        "from appliance.publish.outbox import Outbox\n"
        "box = Outbox(sys.argv[1])\n"
        "for n in range(10**6):\n"
        "    box.put('t', 'x' * 2000, message_id=str(n))\n"
        "    print(n, flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert proc.stdout is not None
    last = -1
    for line in proc.stdout:
        last = int(line)
        if last >= 200:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The child kept putting between our read and the kill: what it printed before dying
    # is still in the pipe, and every such put returned, so it must be there too.
    for line in proc.stdout:
        last = int(line)
    proc.stdout.close()
    box = Outbox(path)
    ids = [int(r.message_id) for r in box.pending(limit=10**6)]
    assert ids[: last + 1] == list(range(last + 1))  # every acknowledged put is there, in order
    assert len(ids) in (last + 1, last + 2)  # at most the one in progress beyond it


def test_bound_drops_superseded_retained_state_first_then_oldest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox(tmp_path / "o.sqlite3", max_pending=6)
    # result + latest/<bed> pairs, as the publisher writes them.
    for n in range(3):
        box.put_many([("r", f"{n}", 1, False, f"m{n}"), (f"latest/bed-{n % 2}", f"{n}", 1, True, f"m{n}")])
    assert box.depth() == 6 and box.dropped == 0
    with caplog.at_level(logging.ERROR):
        box.put_many([("r", "3", 1, False, "m3"), ("latest/bed-1", "3", 1, True, "m3")])
    # latest/bed-0 m0 is superseded by m2; latest/bed-1 m1 by m3: those go, every result stays.
    assert [(r.topic, r.message_id) for r in box.pending()] == [
        ("r", "m0"), ("r", "m1"), ("r", "m2"), ("latest/bed-0", "m2"), ("r", "m3"), ("latest/bed-1", "m3"),
    ]  # fmt: skip
    assert box.dropped == 2
    assert caplog.text.count("OUTBOX FULL") == 2 and "superseded" in caplog.text
    # No superseded state left: the oldest rows go next, loudly.
    box.put("r", "4", message_id="m4")
    assert box.pending()[0].message_id == "m1"
    assert box.depth() == 6 and box.dropped == 3
    assert "oldest unsent message m0 on r" in caplog.text
    assert Outbox(tmp_path / "o.sqlite3", max_pending=6).dropped == 3  # the count persists


def test_prune_sent_keeps_pending(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3", keep_sent_seconds=0)
    box.put("t", "a", message_id="a")
    box.put("t", "b", message_id="b")
    box.mark_acked([box.pending()[0].id])
    assert box.prune_sent() == 1
    assert [r.message_id for r in box.pending()] == ["b"]


def test_an_older_outbox_database_is_adopted_unsent_rows_and_tombstones_alike(tmp_path: Path) -> None:
    older = Outbox(tmp_path / "spool" / "outbox.sqlite3", max_pending=1)  # as an older version kept it
    assert older.put("t", "sent", message_id="a") and older.put("t", "waiting", message_id="b")  # drops a
    older.mark_acked([r.id for r in older.pending()])
    assert older.put("t", "unsent", message_id="c")
    older.close()

    box = Outbox(tmp_path / "appliance.sqlite3")
    assert box.put("t", "new", message_id="d")
    assert box.adopt(tmp_path / "spool" / "outbox.sqlite3") == 3
    assert not (tmp_path / "spool" / "outbox.sqlite3").exists()
    assert [(r.message_id, r.payload) for r in box.pending()] == [("d", b"new"), ("c", b"unsent")]
    assert not box.put("t", "again", message_id="b")  # its tombstone came along: nothing sent twice
    assert box.dropped == 1
