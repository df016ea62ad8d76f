"""The appliance's one database (appliance/store.py): nested transactions, actions after the commit, and
a commit whose MQTT wake-up goes ahead of the disk while the file moves wait for it."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from appliance.store import Store


def _store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "appliance.sqlite3")
    store.db.execute("CREATE TABLE rows (x TEXT)")
    return store


def test_actions_run_after_the_outermost_commit_in_order(tmp_path: Path) -> None:
    store = _store(tmp_path)
    seen: list[str] = []
    with store.transaction() as db:
        db.execute("INSERT INTO rows VALUES ('a')")
        with store.transaction():  # joins the outer one
            store.after_commit(lambda: seen.append("inner"))
        store.after_commit(lambda: seen.append("outer"), before_sync=True)
        assert seen == []
    assert seen == ["inner", "outer"]
    store.after_commit(lambda: seen.append("now"))  # no transaction open: at once
    assert seen[-1] == "now"


def test_wake_first_runs_the_wake_before_the_sync_and_the_moves_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(tmp_path)
    seen: list[str] = []
    real_sync = store.sync

    def recorded_sync() -> None:
        seen.append("sync")
        real_sync()  # a real fsync of the -wal file

    monkeypatch.setattr(store, "sync", recorded_sync)
    with store.transaction(wake_first=True) as db:
        db.execute("INSERT INTO rows VALUES ('result')")
        store.after_commit(lambda: seen.append("move file"))
        store.after_commit(lambda: seen.append("wake sender"), before_sync=True)
    assert seen == ["wake sender", "sync", "move file"]
    # Committed for every reader, before and after the sync.
    other = sqlite3.connect(store.path)
    assert other.execute("SELECT x FROM rows").fetchall() == [("result",)]
    other.close()


def test_a_failing_sync_keeps_the_moves_back_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(tmp_path)
    seen: list[str] = []

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"), store.transaction(wake_first=True) as db:
        db.execute("INSERT INTO rows VALUES ('result')")
        store.after_commit(lambda: seen.append("move file"))
        store.after_commit(lambda: seen.append("wake sender"), before_sync=True)
    # The sender was woken (its message id lets the ward drop a second copy); the file did not move
    # ahead of a row that may not be on disk: recovery or the retried hand-off moves it.
    assert seen == ["wake sender"]


def test_a_transaction_that_raises_rolls_back_and_drops_its_actions(tmp_path: Path) -> None:
    store = _store(tmp_path)
    seen: list[str] = []
    with pytest.raises(RuntimeError), store.transaction(wake_first=True) as db:
        db.execute("INSERT INTO rows VALUES ('x')")
        store.after_commit(lambda: seen.append("wake"), before_sync=True)
        raise RuntimeError("a stage failed")
    assert seen == [] and store.db.execute("SELECT COUNT(*) FROM rows").fetchone() == (0,)
    with store.transaction() as db:  # the next transaction's actions are its own
        store.after_commit(lambda: seen.append("next"))
    assert seen == ["next"]


def test_sync_syncs_the_log_sqlite_writes_even_through_a_linked_path(tmp_path: Path) -> None:
    """SQLite names its -wal file after the database's real path: a link to the database must not make
    sync() look for (or skip) another file."""
    real = tmp_path / "data" / "appliance.sqlite3"
    real.parent.mkdir()
    link = tmp_path / "appliance.sqlite3"
    link.symlink_to(real)
    store = Store(link)
    store.db.execute("CREATE TABLE rows (x TEXT)")
    with store.transaction(wake_first=True) as db:
        db.execute("INSERT INTO rows VALUES ('result')")
    assert not Path(f"{link}-wal").exists()  # what a sync by the given path would have missed
    assert store._wal_fd is not None
    assert os.path.samestat(os.fstat(store._wal_fd), os.stat(f"{real}-wal"))
    store.close()
    assert store._wal_fd is None


@pytest.mark.parametrize("wake_first", [False, True])
def test_what_must_precede_the_disk_runs_before_it_and_stops_the_rest_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wake_first: bool
) -> None:
    """`before_durable`: just before COMMIT in either mode (after it another thread's durable commit could
    carry the rows to the disk first); a failure rolls the transaction back, nothing after it runs."""
    store = _store(tmp_path)
    seen: list[str] = []
    real_sync = store.sync

    def recorded_sync() -> None:
        seen.append("sync")
        real_sync()

    monkeypatch.setattr(store, "sync", recorded_sync)

    def visible() -> list[tuple[str]]:
        other = sqlite3.connect(store.path)
        try:
            return other.execute("SELECT x FROM rows").fetchall()
        finally:
            other.close()

    def settle() -> None:
        seen.append(f"settle, committed: {bool(visible())}")

    with store.transaction(wake_first=wake_first) as db:
        db.execute("INSERT INTO rows VALUES ('done')")
        store.before_durable(settle)
        store.after_commit(lambda: seen.append("move file"))
        store.after_commit(lambda: seen.append("wake sender"), before_sync=True)
    if wake_first:
        assert seen == ["settle, committed: False", "wake sender", "sync", "move file"]
    else:
        assert seen == ["settle, committed: False", "move file", "wake sender"]

    seen.clear()

    def failing() -> None:
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"), store.transaction(wake_first=wake_first) as db:
        db.execute("INSERT INTO rows VALUES ('second')")
        store.before_durable(failing)
        store.after_commit(lambda: seen.append("move file"))
        store.after_commit(lambda: seen.append("wake sender"), before_sync=True)
    assert seen == [] and ("second",) not in visible()
    store.before_durable(lambda: seen.append("at once"))  # no transaction open
    assert seen[-1] == "at once"
