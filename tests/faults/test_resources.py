"""Resource exhaustion: the spool disk fills up (a real 3 MB tmpfs), the outbox grows during a long outage.

Disk full: the daemon stops accepting, says so on the retained status topic (degraded, accepting
false), leaves new files where they are, and once space returns it accepts them and loses nothing.
Outbox: with the broker away, the outbox stays within mqtt.outbox_max by its documented policy
(superseded retained `latest/<bed>` first, then the oldest unsent), and every drop is counted.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.conftest import STATUS_TOPIC, image_ids, real_images, results, wait_results, wait_until
from testsupport.daemon import DaemonProcess
from testsupport.mosquitto import Broker, Subscriber


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs (we are root in CI); skipped with the reason where mounting is not allowed."""
    where = tmp_path / "spool-disk"
    where.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def statuses(sub: Subscriber) -> list[dict[str, object]]:
    return [m.json() for m in sub.on_topic(STATUS_TOPIC)]


def test_spool_disk_full_stops_accepting_says_so_and_resumes_losing_nothing(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess], small_disk: Path
) -> None:
    images = real_images(40, ".png")[-40:]  # the larger PNGs: the disk fills after a handful
    daemon = daemons(
        broker,
        model,
        ingest={"spool": str(small_disk / "spool"), "min_free_mb": 1.5, "poll_seconds": 0.2},
    )
    with Subscriber(broker, "cxr/#", client_id="display-disk") as sub:
        daemon.start()
        dropped: list[Path] = []
        for index, image in enumerate(images):
            shutil.copyfile(image, daemon.inbox / f"d{index:02d}.png")
            dropped.append(image)
            if wait_until(lambda: any(s.get("accepting") is False for s in statuses(sub)), 1.0):
                break
        degraded = [s for s in statuses(sub) if s.get("accepting") is False]
        assert degraded, f"never said it stopped accepting after {len(dropped)} images\n{daemon.log()}"
        assert degraded[-1]["state"] == "degraded" and "full" in str(degraded[-1]["reason"])
        # While full: new files are left in the inbox untouched, nothing quarantined for it.
        late = real_images(43, ".png")[40:]
        for index, image in enumerate(late):
            shutil.copyfile(image, daemon.inbox / f"late{index}.png")
        wait_until(lambda: False, 2.0)
        assert all((daemon.inbox / f"late{i}.png").exists() for i in range(3))
        assert not list((daemon.spool / "quarantine").glob("*.reason.txt"))
        # Space returns (the clinical engineer clears done/ or the volume grows): it resumes.
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
        total = len(dropped) + len(late)
        got = wait_results(sub, total, timeout=60)
        back = wait_until(lambda: statuses(sub)[-1].get("accepting") is True, 10)
    assert back, statuses(sub)[-3:]
    assert statuses(sub)[-1]["state"] == "online"
    assert len(got) == total, f"{len(got)} of {total} results after space returned\n{daemon.log()[-3000:]}"
    assert len(set(image_ids(got))) == total
    assert not any(p.is_file() for p in daemon.inbox.iterdir()), "files left behind in the inbox"
    assert "not accepting images" in daemon.log()


def test_outbox_stays_within_its_bound_during_a_long_outage(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    count, bound = 110, 100  # 110 results + 110 latest/<bed> rows = 220 for a bound of 100
    daemon = daemons(broker, model, mqtt={"outbox_max": bound})
    with Subscriber(broker, "cxr/#", client_id="display-outage") as sub:
        daemon.start()
        broker.stop()  # the ward network is gone for the whole run
        for index, image in enumerate(real_images(count)):
            shutil.copyfile(image, daemon.inbox / f"o{index:03d}{image.suffix}")
        outbox = daemon.workdir / "journal.sqlite3"  # the appliance's database holds the outbox
        assert wait_until(lambda: len(daemon.spool_files("done")) == count, 120), daemon.log()[-2000:]
        db = sqlite3.connect(outbox)
        pending = db.execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending'").fetchone()[0]
        kind = (
            "CASE WHEN topic LIKE '%/result' THEN 'result' WHEN topic LIKE '%/latest/%' THEN 'latest'"
            " WHEN topic LIKE '%/thumbnail/%' THEN 'thumbnail' END"
        )
        dropped = dict(db.execute(f"SELECT {kind}, COUNT(*) FROM outbox WHERE state = 'dropped' GROUP BY 1"))
        thumbnails = db.execute("SELECT COUNT(*) FROM outbox WHERE topic LIKE '%/thumbnail/%'").fetchone()[0]
        order = [
            r[0] for r in db.execute("SELECT message_id FROM outbox WHERE topic LIKE '%/result' ORDER BY id")
        ]
        kept_results = {
            r[0]
            for r in db.execute(
                "SELECT message_id FROM outbox WHERE topic LIKE '%/result' AND state = 'pending'"
            )
        }
        db.close()
        assert pending == bound
        # Policy: the superseded retained rows go first (109 `latest/<bed>`, and every thumbnail/<bed> but
        # the newest), then the oldest unsent results.
        rows = 2 * count + thumbnails
        results_dropped = rows - bound - (count - 1) - (thumbnails - 1)
        assert thumbnails == count  # one per image read (the bed's picture, or an empty one to clear it)
        assert dropped == {"latest": count - 1, "thumbnail": thumbnails - 1, "result": results_dropped}, (
            dropped
        )
        assert kept_results == set(order[results_dropped:])
        assert daemon.log().count("OUTBOX FULL") == rows - bound
        broker.start()
        got = wait_results(sub, len(kept_results), timeout=60)
        wait_until(lambda: False, 1.5)
        latest = [m for m in sub.on_topic("cxr/ward-7/cart-1/latest/#")]
    assert {str(p["message_id"]) for p in results(sub)} == kept_results, "a kept result was not delivered"
    assert len(got) == len(kept_results)
    assert latest and latest[-1].json()["message_id"] == order[-1], "latest/<bed> must be the newest result"
