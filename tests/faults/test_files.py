"""Power loss and hostile input on the file side, through the running daemon (real watcher, spool, MQTT).

Power loss: a file truncated after the watcher saw it, files renamed while the daemon works, a USB
folder removed mid-import and restored. Nothing partial is ever published, the complete file is
processed when it appears, each image yields one result. Hostile names from a stick: newlines, very
long names, shell metacharacters, non-ASCII, symlinks pointing outside (quarantined, target untouched).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from tests.faults.conftest import image_ids, real_images, results, wait_results, wait_until
from testsupport import data
from testsupport.daemon import DaemonProcess
from testsupport.mosquitto import Broker, Subscriber

NATIVE_DX = "1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"


def reasons_in(daemon: DaemonProcess) -> list[str]:
    return [p.read_text(errors="replace") for p in (daemon.spool / "quarantine").glob("*.reason.txt")]


def test_file_truncated_after_the_watcher_saw_it_is_only_processed_once_complete(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    whole = (data.cxr_data() / "dicom" / NATIVE_DX).read_bytes()
    daemon = daemons(broker, model)
    with Subscriber(broker, "cxr/#", client_id="display-trunc") as sub:
        daemon.start()
        target = daemon.inbox / "cut.dcm"
        target.write_bytes(whole[: len(whole) // 2])  # closed half-written: the watcher sees it, waits
        time.sleep(1.5)
        with target.open("r+b") as handle:  # power loss: the file system kept less than was written
            handle.truncate(len(whole) // 5)
        time.sleep(1.5)
        assert not results(sub) and target.exists(), "a partial file was taken"
        target.write_bytes(whole)  # the unit writes it again after the reboot
        got = wait_results(sub, 1, timeout=20)
        time.sleep(1.0)
        got = results(sub)
    assert len(got) == 1 and got[0]["status"] == "ok", got
    assert not reasons_in(daemon), reasons_in(daemon)


def test_files_renamed_while_the_daemon_works_give_one_result_each(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    images = real_images(6)
    daemon = daemons(broker, model)
    with Subscriber(broker, "cxr/#", client_id="display-rename") as sub:
        daemon.start()
        for index, image in enumerate(images):
            path = daemon.inbox / f"r{index}{image.suffix}"
            shutil.copyfile(image, path)
            for hop in range(3):  # a modality renaming its output (tmp -> final -> archived name)
                moved = path.with_name(f"r{index}-{hop}{image.suffix}")
                try:
                    path.rename(moved)
                except FileNotFoundError:
                    break  # the daemon already took it: also fine
                path = moved
        got = wait_results(sub, len(images), timeout=30)
        time.sleep(1.5)
        got = results(sub)
    assert len(got) == len(images), f"{len(got)} results for {len(images)} images\n{daemon.log()[-3000:]}"
    assert len(set(image_ids(got))) == len(images)
    assert all(p["status"] == "ok" for p in got), [p.get("reason") for p in got]
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_usb_folder_removed_mid_import_then_restored(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    images = real_images(8)
    usb, pulled = tmp_path / "usb", tmp_path / "usb-pulled"
    daemon = daemons(broker, model, ingest={"extra_watch": [str(usb)]})
    with Subscriber(broker, "cxr/#", client_id="display-usb") as sub:
        daemon.start()
        (usb / "DCIM").mkdir(parents=True)
        for index, image in enumerate(images[:4]):
            shutil.copyfile(image, usb / "DCIM" / f"u{index}{image.suffix}")
        half = images[4].read_bytes()
        (usb / "DCIM" / f"u4{images[4].suffix}").write_bytes(half[: len(half) // 3])
        usb.rename(pulled)  # the stick is pulled: its folder vanishes with a half-copied file on it
        time.sleep(2.0)
        shutil.rmtree(pulled)
        assert daemon.proc is not None and daemon.proc.poll() is None
        (usb / "DCIM").mkdir(parents=True)  # plugged in again, the copy redone completely
        for index, image in enumerate(images):
            shutil.copyfile(image, usb / "DCIM" / f"u{index}{image.suffix}")
        got = wait_results(sub, len(images), timeout=40)
        time.sleep(1.5)
        got = results(sub)
    assert len(got) == len(images), f"{len(got)} of {len(images)}\n{daemon.log()[-3000:]}"
    assert len(set(image_ids(got))) == len(images)
    assert all(p["status"] == "ok" for p in got), "a partial file was published"
    assert not reasons_in(daemon), reasons_in(daemon)


def test_hostile_names_and_symlinks_from_a_stick(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    shutil.copyfile(real_images(1, ".png")[0], secret)
    before = secret.read_bytes()
    names = [
        "new\nline.png",
        "x" * 250 + ".png",  # 254 bytes: near NAME_MAX
        "-rf --no-preserve-root.png",
        "$(touch pwned) `id`; rm -rf ~.png",
        "ünïcødé 名前 ⚕.png",
        "back\\slash%s%n{}.png",
    ]
    images = real_images(len(names), ".png")
    daemon = daemons(broker, model)
    with Subscriber(broker, "cxr/#", client_id="display-hostile") as sub:
        daemon.start()
        nested = daemon.inbox / ".." / daemon.inbox.name / "sub"  # a path with .. resolving inside
        nested.mkdir()
        for name, image in zip(names, images, strict=True):
            shutil.copyfile(image, nested / name)
        (daemon.inbox / "escape.png").symlink_to(secret)
        (daemon.inbox / "shadow.dcm").symlink_to("/etc/shadow")
        (daemon.inbox / "up.dcm").symlink_to("../../../../../../etc/passwd")
        got = wait_results(sub, len(names), timeout=30)
        assert wait_until(lambda: len(reasons_in(daemon)) >= 3, 15), reasons_in(daemon)
        time.sleep(1.0)
        got = results(sub)
        everything = b"\n".join(m.payload for m in sub.messages)
    assert len(got) == len(names), f"{len(got)} of {len(names)}\n{daemon.log()[-3000:]}"
    assert all(p["status"] == "ok" for p in got)
    reasons = reasons_in(daemon)
    assert sum("symlink outside watched folder" in r for r in reasons) == 3, reasons
    assert secret.read_bytes() == before, "the target of a symlink was touched"
    assert Path("/etc/shadow").exists() and Path("/etc/passwd").exists()
    assert not (Path.cwd() / "pwned").exists()
    # File names never reach the ward display (a stick's names may carry a patient's name).
    for name in names:
        assert name.encode() not in everything
    assert os.listdir(nested) == [], "hostile-named files left behind"


def test_a_newline_in_a_file_name_cannot_forge_a_log_line(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    forged_name = "scan\n2026-01-01 00:00:00,000 ERROR   appliance.daemon: FORGED.png"
    daemon = daemons(broker, model)
    with Subscriber(broker, "cxr/#", client_id="display-forge") as sub:
        daemon.start()
        shutil.copyfile(real_images(1, ".png")[0], daemon.inbox / forged_name)
        assert len(wait_results(sub, 1, timeout=20)) == 1
    forged = [line for line in daemon.log().splitlines() if line.startswith("2026-01-01 00:00:00,000 ERROR")]
    assert not forged, forged
