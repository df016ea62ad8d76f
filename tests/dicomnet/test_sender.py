"""SR and SC to a PACS (a real pynetdicom storage SCP): delivered, kept while it is down, never lost."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from appliance.config import DicomOutConfig, PacsConfig
from appliance.dicomnet.sender import DicomSender, PacsUnavailable
from appliance.dicomout.writer import DicomOutWriter
from appliance.result import Result
from tests.dicomnet.pacs import Pacs
from tests.support.mosquitto import LOOPBACK

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the test DICOMs' odd patient names


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Pacs]:
    p = Pacs(tmp_path / "pacs").start()
    yield p
    p.stop()


@pytest.fixture
def make_writer(tmp_path: Path) -> Iterator[Callable[[Pacs], DicomOutWriter]]:
    made: list[DicomOutWriter] = []

    def make(pacs: Pacs) -> DicomOutWriter:
        destination = PacsConfig(
            ae_title=pacs.ae_title,
            host=LOOPBACK,
            port=pacs.port,
            retry_min_seconds=0.2,
            retry_max_seconds=0.8,
        )
        config = DicomOutConfig(enabled=True, outbox=tmp_path / "dicom-out", pacs=destination)
        outbox = config.outbox / "queue"
        writer = DicomOutWriter(config, DicomSender(destination, outbox, calling_ae="CXR_APPLIANCE"))
        made.append(writer)
        return writer

    yield make
    for w in made:
        w.close()


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_the_pacs_gets_the_sr_and_the_sc(
    pacs: Pacs, make_writer: Callable[[Pacs], DicomOutWriter], analyzed: list[tuple[Result, Path]]
) -> None:
    writer = make_writer(pacs)
    result, source_path = analyzed[0]
    written = writer.write(result, source_path)
    assert writer.sender is not None
    report = writer.sender.send_pending()
    assert sorted(report.sent) == sorted(p.name for p in written) and report.waiting == 0
    got = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in pacs.received()}
    for path in written:
        mine = pydicom.dcmread(path)
        assert got[mine.SOPInstanceUID].SOPClassUID == mine.SOPClassUID
        assert got[mine.SOPInstanceUID].DeviceUID == result.provenance.device_uid
    assert set(pacs.calling) == {"CXR_APPLIANCE"}
    assert writer.sender.depth() == 0 and all(p.exists() for p in written)  # the outbox keeps its copy


def test_pacs_down_then_up_loses_nothing(
    pacs: Pacs,
    make_writer: Callable[[Pacs], DicomOutWriter],
    analyzed: list[tuple[Result, Path]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    pacs.stop()
    writer = make_writer(pacs)
    assert writer.sender is not None
    writer.write(*analyzed[0])
    with pytest.raises(PacsUnavailable, match="not reachable"):
        writer.sender.send_pending()
    with caplog.at_level(logging.WARNING, logger="appliance.dicomnet.sender"):
        writer.start()  # the background thread retries with backoff
        for result, source_path in analyzed[1:]:
            writer.write(result, source_path)
        assert wait_for(lambda: "next try in" in caplog.text, 5)
    assert writer.sender.depth() == 6 and pacs.received() == []

    pacs.start()  # back on the same port
    sender = writer.sender
    # The PACS stores before it answers; the sender unlinks after the answer: wait for both.
    assert wait_for(lambda: len(pacs.received()) == 6 and sender.depth() == 0), sender.depth()
    sent = {pydicom.dcmread(p).SOPInstanceUID for p in writer.config.outbox.glob("*.dcm")}
    assert {pydicom.dcmread(p).SOPInstanceUID for p in pacs.received()} == sent


def test_a_permanent_refusal_goes_to_failed_with_the_reason(
    tmp_path: Path, make_writer: Callable[[Pacs], DicomOutWriter], analyzed: list[tuple[Result, Path]]
) -> None:
    refusing = Pacs(tmp_path / "refusing", status=0xA900).start()  # "dataset does not match SOP class"
    try:
        writer = make_writer(refusing)
        written = writer.write(*analyzed[0])
        assert writer.sender is not None
        report = writer.sender.send_pending()
        assert sorted(report.failed) == sorted(p.name for p in written) and writer.sender.depth() == 0
        reason = (writer.sender.failed_dir / f"{written[0].name}.reason.txt").read_text()
        assert "0xA900" in reason
    finally:
        refusing.stop()


def test_out_of_resources_keeps_the_files_queued(
    tmp_path: Path, make_writer: Callable[[Pacs], DicomOutWriter], analyzed: list[tuple[Result, Path]]
) -> None:
    busy = Pacs(tmp_path / "busy", status=0xA700).start()
    try:
        writer = make_writer(busy)
        writer.write(*analyzed[0])
        assert writer.sender is not None
        with pytest.raises(PacsUnavailable, match="0xA700"):
            writer.sender.send_pending()
        assert writer.sender.depth() == 2
    finally:
        busy.stop()
