"""SIGTERM and SIGHUP with work in flight: nothing lost, nothing twice (what systemd sends on stop/reload)."""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from tests.test_daemon import real_images
from testsupport.daemon import RESULT_TOPIC, DaemonProcess, wait_results
from testsupport.mosquitto import Broker, Subscriber, unique_by_message_id


def test_sigterm_with_a_backlog_exits_cleanly_and_the_rest_follows_after_restart(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    images = real_images(40)
    daemon = daemons(broker, model, inference={"max_batch": 1})
    with Subscriber(broker, RESULT_TOPIC, client_id="ward-sigterm") as sub:
        daemon.start()
        for index, image in enumerate(images):
            shutil.copyfile(image, daemon.inbox / f"t{index:02d}{image.suffix}")
        sub.wait_for(lambda msgs: len(msgs) >= 2, timeout=30)
        started = time.monotonic()
        assert daemon.stop(timeout=30) == 0
        assert time.monotonic() - started < 20, "SIGTERM must not wait for the whole backlog"
        assert "STOPPING=1" in daemon.notifications
        assert not daemon.spool_files("processing"), "the image in progress must be finished or requeued"
        done_before = len(daemon.spool_files("done"))
        assert done_before < len(images), "the stop came too late to leave work in flight"
        daemon.start()
        got = wait_results(sub, len(images), timeout=60)
        time.sleep(1.0)
        raw = [m.json()["message_id"] for m in sub.on_topic(RESULT_TOPIC)]
    assert len(got) == len(images), daemon.log()[-3000:]
    assert len(raw) == len(set(raw)), "a clean stop must not cause any repeat"
    assert len(daemon.spool_files("done")) == len(images)


def test_sighup_applies_a_new_location_without_losing_queued_work(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    images = real_images(10)
    daemon = daemons(broker, model, inference={"max_batch": 1})
    with Subscriber(broker, RESULT_TOPIC, client_id="ward-sighup") as sub:
        daemon.start()
        for index, image in enumerate(images[:5]):
            shutil.copyfile(image, daemon.inbox / f"h{index}{image.suffix}")
        wait_results(sub, 5, timeout=30)
        config = yaml.safe_load(daemon.config_path.read_text())
        config["device"]["location"] = "bed-9"
        config["ingest"]["poll_seconds"] = 0.25  # a restart-only section: kept, with a warning
        daemon.config_path.write_text(yaml.safe_dump(config))
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        assert daemon.wait_notification("RELOADING=1", 10)
        time.sleep(1.0)
        for index, image in enumerate(images[5:]):
            shutil.copyfile(image, daemon.inbox / f"h{index + 5}{image.suffix}")
        got = wait_results(sub, 10, timeout=30)
    assert len(unique_by_message_id(sub.on_topic(RESULT_TOPIC))) == 10
    locations = [p["location"] for p in got]
    assert locations[:5] == ["bed-3"] * 5 and locations[5:] == ["bed-9"] * 5
    log = daemon.log()
    assert (
        "SIGHUP: configuration reloaded" in log
        and "ingest changed; that takes effect at the next restart" in log
    )
    assert daemon.proc.poll() is None


def test_sighup_with_a_broken_config_keeps_running_on_the_old_one(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    daemon = daemons(broker, model)
    with Subscriber(broker, RESULT_TOPIC, client_id="ward-badhup") as sub:
        daemon.start()
        daemon.config_path.write_text(daemon.config_path.read_text() + "\nmqtt:\n  prot: 1\n")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        assert daemon.wait_notification("RELOADING=1", 10)
        image = real_images(1)[0]
        shutil.copyfile(image, daemon.inbox / f"after{image.suffix}")
        got = wait_results(sub, 1, timeout=20)
    assert got and got[0]["location"] == "bed-3"
    assert "keeping the running configuration" in daemon.log()
