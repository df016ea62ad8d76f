"""SR and SC to a PACS (a real pynetdicom storage SCP): delivered, kept while it is down, never lost."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from appliance.config import DicomOutConfig, PacsConfig
from appliance.dicomnet.sender import DicomSender, PacsUnavailable
from appliance.dicomout.writer import DicomOutWriter
from appliance.result import Result
from tests.dicomnet.pacs import Pacs
from tests.dicomout.conftest import MakeJob
from testsupport.dciodvfy import DCIODVFY, assert_valid
from testsupport.mosquitto import LOOPBACK


class MakeWriter(Protocol):
    def __call__(self, pacs: Pacs, **pacs_options: Any) -> DicomOutWriter: ...


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Pacs]:
    p = Pacs(tmp_path / "pacs").start()
    yield p
    p.stop()


@pytest.fixture
def make_writer(tmp_path: Path) -> Iterator[MakeWriter]:
    made: list[DicomOutWriter] = []

    def make(pacs: Pacs, **pacs_options: Any) -> DicomOutWriter:
        destination = PacsConfig(
            ae_title=pacs.ae_title,
            host=LOOPBACK,
            port=pacs.port,
            **{"retry_min_seconds": 0.2, "retry_max_seconds": 0.8, **pacs_options},
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
    dicom_job: MakeJob, pacs: Pacs, make_writer: MakeWriter, analyzed: list[tuple[Result, Path]]
) -> None:
    writer = make_writer(pacs)
    result, source_path = analyzed[0]
    written = writer.write(dicom_job(result, source_path))
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
    sc = got[pydicom.dcmread(written[1]).SOPInstanceUID]
    assert sc.file_meta.TransferSyntaxUID == JPEGBaseline8Bit  # a PACS that takes JPEG gets it as it is


def test_pacs_down_then_up_loses_nothing(
    dicom_job: MakeJob,
    pacs: Pacs,
    make_writer: MakeWriter,
    analyzed: list[tuple[Result, Path]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    pacs.stop()
    writer = make_writer(pacs)
    assert writer.sender is not None
    writer.write(dicom_job(*analyzed[0]))
    with pytest.raises(PacsUnavailable, match="not reachable"):
        writer.sender.send_pending()
    with caplog.at_level(logging.WARNING, logger="appliance.dicomnet.sender"):
        writer.start()  # the background thread retries with backoff
        for result, source_path in analyzed[1:]:
            writer.write(dicom_job(result, source_path))
        assert wait_for(lambda: "next try in" in caplog.text, 5)
    assert writer.sender.depth() == 6 and pacs.received() == []

    pacs.start()  # back on the same port
    sender = writer.sender
    # The PACS stores before it answers; the sender unlinks after the answer: wait for both.
    assert wait_for(lambda: len(pacs.received()) == 6 and sender.depth() == 0), sender.depth()
    sent = {pydicom.dcmread(p).SOPInstanceUID for p in writer.config.outbox.glob("*.dcm")}
    assert {pydicom.dcmread(p).SOPInstanceUID for p in pacs.received()} == sent


def test_a_permanent_refusal_goes_to_failed_with_the_reason(
    dicom_job: MakeJob, tmp_path: Path, make_writer: MakeWriter, analyzed: list[tuple[Result, Path]]
) -> None:
    refusing = Pacs(tmp_path / "refusing", status=0xA900).start()  # "dataset does not match SOP class"
    try:
        writer = make_writer(refusing)
        written = writer.write(dicom_job(*analyzed[0]))
        assert writer.sender is not None
        report = writer.sender.send_pending()
        assert sorted(report.failed) == sorted(p.name for p in written) and writer.sender.depth() == 0
        reason = (writer.sender.failed_dir / f"{written[0].name}.reason.txt").read_text()
        assert "0xA900" in reason
    finally:
        refusing.stop()


def test_out_of_resources_keeps_the_files_queued(
    dicom_job: MakeJob, tmp_path: Path, make_writer: MakeWriter, analyzed: list[tuple[Result, Path]]
) -> None:
    busy = Pacs(tmp_path / "busy", status=0xA700).start()
    try:
        writer = make_writer(busy)
        writer.write(dicom_job(*analyzed[0]))
        assert writer.sender is not None
        with pytest.raises(PacsUnavailable, match="0xA700"):
            writer.sender.send_pending()
        assert writer.sender.depth() == 2
    finally:
        busy.stop()


def failed_files(sender: DicomSender) -> list[Path]:
    return sorted(sender.failed_dir.glob("*.dcm"))


def next_tries(sender: DicomSender) -> list[float]:
    states = [json.loads(p.read_text()) for p in sender.failed_dir.glob("*.retry.json")]
    return [s["next_try"] for s in states]


@pytest.mark.parametrize(
    "syntaxes",
    [[ExplicitVRLittleEndian, ImplicitVRLittleEndian], [ImplicitVRLittleEndian]],
    ids=["explicit-or-implicit", "implicit-only"],
)
def test_a_pacs_that_takes_only_uncompressed_gets_an_uncompressed_sc(
    dicom_job: MakeJob,
    tmp_path: Path,
    make_writer: MakeWriter,
    analyzed: list[tuple[Result, Path]],
    syntaxes: list[str],
) -> None:
    plain = Pacs(tmp_path / "plain", transfer_syntaxes=syntaxes).start()
    try:
        writer = make_writer(plain)
        written = writer.write(dicom_job(*analyzed[0]))
        assert writer.sender is not None
        report = writer.sender.send_pending()
        assert sorted(report.sent) == sorted(p.name for p in written), report
        assert report.failed == [] and failed_files(writer.sender) == []
        got = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in plain.received()}
        mine = pydicom.dcmread(written[1])  # the JPEG SC in the outbox
        theirs = got[mine.SOPInstanceUID]  # the same instance
        assert mine.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        assert theirs.file_meta.TransferSyntaxUID in syntaxes
        assert theirs.PhotometricInterpretation == "RGB" and theirs.LossyImageCompression == "01"
        assert np.array_equal(theirs.pixel_array, mine.pixel_array)  # the JPEG's pixels, decoded
        assert (theirs.SeriesInstanceUID, theirs.DeviceUID) == (mine.SeriesInstanceUID, mine.DeviceUID)
        if DCIODVFY is not None:  # what the PACS stored is as valid as what was written
            assert_valid(plain.received())
    finally:
        plain.stop()


def test_a_refused_file_is_sent_again_once_the_pacs_takes_it(
    dicom_job: MakeJob,
    tmp_path: Path,
    make_writer: MakeWriter,
    analyzed: list[tuple[Result, Path]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fussy = Pacs(tmp_path / "fussy", status=0xA900).start()  # refuses for good... until reconfigured
    try:
        writer = make_writer(fussy, failed_retry_seconds=0.3)
        assert writer.sender is not None
        sender = writer.sender
        with caplog.at_level(logging.INFO, logger="appliance.dicomnet.sender"):
            writer.start()  # the background thread
            written = writer.write(dicom_job(*analyzed[0]))
            assert wait_for(lambda: len(failed_files(sender)) == 2)
            reason = (sender.failed_dir / f"{written[0].name}.reason.txt").read_text()
            assert "0xA900" in reason and "tried again in" in reason
            fussy.status = 0x0000  # the PACS's administrator adds the SOP classes
            assert wait_for(lambda: len(fussy.received()) == 2 and sender.depth() == 0)
            assert wait_for(lambda: list(sender.failed_dir.iterdir()) == [])  # reasons gone too
        assert "trying the PACS again" in caplog.text
    finally:
        fussy.stop()


def test_a_refused_file_is_tried_with_backoff_and_then_stays_in_failed(
    dicom_job: MakeJob, tmp_path: Path, make_writer: MakeWriter, analyzed: list[tuple[Result, Path]]
) -> None:
    refusing = Pacs(tmp_path / "refusing", status=0xA900).start()
    try:
        writer = make_writer(refusing, failed_retries=2, failed_retry_seconds=0.1)
        assert writer.sender is not None
        sender = writer.sender
        written = writer.write(dicom_job(*analyzed[0]))
        name = written[0].name
        waits = []
        for attempt in (1, 2, 3):  # the first try and two retries
            if attempt > 1:  # both due again
                assert wait_for(lambda: all(t <= time.time() for t in next_tries(sender)), 5)
            report = sender.send_pending()
            assert sorted(report.failed) == sorted(p.name for p in written), (attempt, report)
            state = json.loads((sender.failed_dir / f"{name}.retry.json").read_text())
            assert state["attempts"] == attempt and "0xA900" in state["reason"]
            waits.append(state["wait_seconds"])
        assert waits == [pytest.approx(0.1), pytest.approx(0.2), None]  # doubling, then no more
        assert state["next_try"] is None and sender.seconds_to_next_retry() is None
        assert "given up after 3 attempts" in (sender.failed_dir / f"{name}.reason.txt").read_text()
        time.sleep(0.3)
        assert sender.send_pending().failed == [] and len(failed_files(sender)) == 2  # left alone
        assert len(refusing.calling) == 6  # 2 files x 3 tries
    finally:
        refusing.stop()


def test_a_file_put_back_into_failed_without_a_retry_state_is_sent(
    dicom_job: MakeJob, pacs: Pacs, make_writer: MakeWriter, analyzed: list[tuple[Result, Path]]
) -> None:
    """As a file parked before retries existed: it is due at once."""
    writer = make_writer(pacs)
    assert writer.sender is not None
    written = writer.write(dicom_job(*analyzed[0]))
    for path in writer.sender.pending():
        shutil.move(path, writer.sender.failed_dir / path.name)
    report = writer.sender.send_pending()
    assert sorted(report.sent) == sorted(p.name for p in written) and len(pacs.received()) == 2


def test_an_unreadable_queue_file_is_parked_for_good(pacs: Pacs, make_writer: MakeWriter) -> None:
    writer = make_writer(pacs)
    assert writer.sender is not None
    (writer.sender.queue_dir / "broken.dcm").write_bytes(b"not DICOM at all")
    report = writer.sender.send_pending()
    assert report.failed == ["broken.dcm"] and writer.sender.seconds_to_next_retry() is None
    assert "not tried again" in (writer.sender.failed_dir / "broken.dcm.reason.txt").read_text()


def test_a_pacs_that_requires_a_client_certificate_gets_the_carts(
    dicom_job: MakeJob, make_writer: MakeWriter, analyzed: list[tuple[Result, Path]], tmp_path: Path
) -> None:
    """Mutual TLS to the PACS (found missing by a review run: only the PACS's certificate was checked)."""
    import ssl

    from testsupport.mosquitto import make_certificates

    certs = make_certificates(tmp_path / "certs")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs.ca))
    context.load_cert_chain(certs.server_cert, certs.server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    pacs = Pacs(tmp_path / "pacs", ssl_context=context).start()
    try:
        result, source_path = analyzed[0]
        anonymous = make_writer(pacs, ca_file=certs.ca)
        written = anonymous.write(dicom_job(result, source_path))
        assert anonymous.sender is not None
        with pytest.raises(PacsUnavailable):
            anonymous.sender.send_pending()
        assert pacs.received() == []
        anonymous.close()
        known = make_writer(pacs, ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key)
        assert known.sender is not None
        report = known.sender.send_pending()
        assert sorted(report.sent) == sorted(p.name for p in written)
        assert len(pacs.received()) == len(written)
    finally:
        pacs.stop()


def test_missing_pacs_tls_files_stop_the_start_with_their_names(tmp_path: Path) -> None:
    """Found by a review run: they surfaced only at the first send, as an 'unexpected error' every 5 s."""
    from appliance.errors import ConfigError

    pacs = PacsConfig(ae_title="PACS", host=LOOPBACK, port=104, ca_file=tmp_path / "absent-ca.pem")
    with pytest.raises(ConfigError, match=r"absent-ca\.pem"):
        DicomSender(pacs, tmp_path / "queue", calling_ae="CXR_APPLIANCE")
