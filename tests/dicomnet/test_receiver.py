"""The C-STORE receiver over real pynetdicom associations on loopback, into a real Spool."""

from __future__ import annotations

import logging
import random
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import BasicTextSRStorage, SecondaryCaptureImageStorage  # type: ignore[attr-defined]

from appliance.config import DicomNetConfig, DicomTlsConfig
from appliance.dicomnet.receiver import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    DicomReceiver,
)
from appliance.errors import UserError
from appliance.ingest import reasons
from appliance.ingest.intake import Intake
from appliance.ingest.spool import Spool
from testsupport import dicom_scu
from testsupport.daemon import wait_until
from testsupport.data import cxr_data, dicom_with
from testsupport.mosquitto import free_port, make_certificates
from testsupport.mutate import deflate_bomb

JPEG_CR = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
MONOCHROME1 = "Fake_MONOHR1.dcm"
NATIVE_DX = "1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"


def real(name: str) -> Path:
    return cxr_data() / "dicom" / name


@pytest.fixture
def receivers(spool: Spool, tmp_path: Path) -> Iterator[Callable[..., DicomReceiver]]:
    made: list[DicomReceiver] = []

    def make(**options: object) -> DicomReceiver:
        # The gate and the limits belong to the intake the receiver hands files to.
        limits = {k: options.pop(k) for k in ("max_bytes", "max_pixels") if k in options}
        accepting = options.pop("accepting", lambda: True)
        intake = Intake(
            spool,
            not_accepting=lambda: None if accepting() else "disk full",  # type: ignore[operator]
            **limits,  # type: ignore[arg-type]
        )
        on_accepted = options.pop("on_accepted", None)
        config = DicomNetConfig.model_validate(
            {"bind": "127.0.0.1", "port": free_port(), "allowed_calling_ae": ["XRAY_UNIT"], **options}
        )
        r = DicomReceiver(config, intake, tmp_path / "spool" / "dicom-in", on_accepted=on_accepted)  # type: ignore[arg-type]
        made.append(r.start())
        return r

    yield make
    for r in made:
        r.stop()


def spooled(spool: Spool) -> list[Path]:
    return sorted((spool.root / "incoming").iterdir())


def quarantined(spool: Spool) -> list[Path]:
    return sorted((spool.root / "quarantine").iterdir())


def test_c_echo_answers_success(receivers: Callable[..., DicomReceiver]) -> None:
    receiver = receivers()
    assert dicom_scu.echo(receiver.address[1]) == SUCCESS


def test_a_real_cr_lands_in_the_spool_unchanged_and_a_resend_is_a_duplicate(
    receivers: Callable[..., DicomReceiver], spool: Spool
) -> None:
    woken: list[int] = []
    receiver = receivers(on_accepted=lambda: woken.append(1))
    port = receiver.address[1]
    started = time.perf_counter()
    assert dicom_scu.store(port, [real(JPEG_CR)]) == [SUCCESS]
    elapsed_ms = (time.perf_counter() - started) * 1000
    # The response comes after the spool holds the file: no waiting needed here.
    files = spooled(spool)
    assert len(files) == 1 and woken == [1]
    sent, got = pydicom.dcmread(real(JPEG_CR)), pydicom.dcmread(files[0])
    assert got.SOPInstanceUID == sent.SOPInstanceUID
    assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID  # not re-encoded
    assert got.PixelData == sent.PixelData
    item = spool.claim_next()
    assert item is not None and item.source == "dicom-net"
    print(f"C-STORE association + store -> spool incoming/: {elapsed_ms:.1f} ms")

    # The same instance again (a unit retrying) is acknowledged and not spooled twice.
    assert dicom_scu.store(port, [real(JPEG_CR)]) == [SUCCESS]
    assert spool.pending_count() == 1
    assert list(receiver.receive_dir.iterdir()) == []


def test_several_instances_in_one_association(receivers: Callable[..., DicomReceiver], spool: Spool) -> None:
    receiver = receivers()
    # Fake_MONOHR1 carries the same SOPInstanceUID as the CR with other content: a corrected re-send is
    # analysed too (de-duplication is on UID + content); the CR sent again is not.
    statuses = dicom_scu.store(
        receiver.address[1], [real(NATIVE_DX), real(JPEG_CR), real(MONOCHROME1), real(JPEG_CR)]
    )
    assert statuses == [SUCCESS] * 4
    got = sorted(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in spooled(spool))
    assert got == sorted(
        pydicom.dcmread(real(n), stop_before_pixels=True).SOPInstanceUID
        for n in (NATIVE_DX, JPEG_CR, MONOCHROME1)
    )


def test_a_calling_ae_title_not_allowed_is_refused_at_association(
    receivers: Callable[..., DicomReceiver], spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = receivers(allowed_calling_ae=["XRAY_UNIT", "XRAY_2"])
    port = receiver.address[1]
    with caplog.at_level(logging.WARNING, logger="appliance.dicomnet.receiver"):
        assert dicom_scu.store(port, [real(NATIVE_DX)], calling="INTRUDER") == []
        wait_until(lambda: "INTRUDER" in caplog.text, 5, step=0.05)  # logged by the receiver's thread
    assert "'INTRUDER' is not in dicom_net.allowed_calling_ae (XRAY_UNIT, XRAY_2)" in caplog.text
    assert spooled(spool) == []
    assert dicom_scu.echo(port, calling="INTRUDER") is None
    assert dicom_scu.store(port, [real(NATIVE_DX)], calling="XRAY_2") == [SUCCESS]
    assert len(spooled(spool)) == 1


def test_an_association_calling_another_ae_title_is_refused(
    receivers: Callable[..., DicomReceiver], spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = receivers()
    port = receiver.address[1]
    with caplog.at_level(logging.WARNING, logger="appliance.dicomnet.receiver"):
        assert dicom_scu.store(port, [real(NATIVE_DX)], called="MAIN_PACS") == []
        wait_until(lambda: "MAIN_PACS" in caplog.text, 5, step=0.05)  # logged by the receiver's thread
    assert "called AE title 'MAIN_PACS' is not ours (CXR_APPLIANCE)" in caplog.text
    assert dicom_scu.echo(port, called="MAIN_PACS") is None
    assert spooled(spool) == []
    assert dicom_scu.store(port, [real(NATIVE_DX)]) == [SUCCESS]


def test_the_receiver_never_runs_without_a_calling_ae_allow_list(spool: Spool, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="allowed_calling_ae must list"):
        DicomNetConfig.model_validate({"enabled": True})
    # The safe defaults: loopback, and no "accept any sender" even when built without validation.
    assert DicomNetConfig().bind == "127.0.0.1"
    config = DicomNetConfig.model_validate({"port": free_port()})
    with pytest.raises(UserError, match="allowed_calling_ae is empty"):
        DicomReceiver(config, spool, tmp_path / "dicom-in").start()


def test_not_accepting_answers_out_of_resources_and_keeps_nothing(
    receivers: Callable[..., DicomReceiver], spool: Spool
) -> None:
    receiver = receivers(accepting=lambda: False)
    assert dicom_scu.store(receiver.address[1], [real(NATIVE_DX)]) == [OUT_OF_RESOURCES]
    assert spooled(spool) == [] and list(receiver.receive_dir.iterdir()) == []


def test_a_file_left_by_a_crash_is_spooled_at_start(spool: Spool, tmp_path: Path) -> None:
    receive_dir = tmp_path / "spool" / "dicom-in"
    receive_dir.mkdir(parents=True)
    (receive_dir / "x.dcm").write_bytes(real(NATIVE_DX).read_bytes())
    (receive_dir / ".half.dcm.123.part").write_bytes(b"DICM half written")
    config = DicomNetConfig.model_validate(
        {"bind": "127.0.0.1", "port": free_port(), "allowed_calling_ae": ["XRAY_UNIT"]}
    )
    with DicomReceiver(config, spool, receive_dir):
        assert len(spooled(spool)) == 1
        assert list(receive_dir.iterdir()) == []


def test_tls_only_a_client_with_a_trusted_certificate_may_send(
    receivers: Callable[..., DicomReceiver], spool: Spool, tmp_path: Path
) -> None:
    import ssl

    certs = make_certificates(tmp_path / "certs")
    receiver = receivers(
        tls=DicomTlsConfig(cert_file=certs.server_cert, key_file=certs.server_key, ca_file=certs.ca)
    )
    port = receiver.address[1]
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs.ca))
    client.load_cert_chain(certs.client_cert, certs.client_key)
    assert dicom_scu.store(port, [real(NATIVE_DX)], tls=client) == [SUCCESS]
    anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs.ca))
    assert dicom_scu.store(port, [real(JPEG_CR)], tls=anonymous) == []  # no client certificate
    assert dicom_scu.store(port, [real(JPEG_CR)]) == []  # plain DICOM on the TLS port
    assert len(spooled(spool)) == 1


def test_a_connection_that_never_shakes_hands_blocks_nobody(
    receivers: Callable[..., DicomReceiver], spool: Spool, tmp_path: Path
) -> None:
    """Found by a review run: pynetdicom shook TLS hands in its one accept loop, without a time limit, so
    one idle TCP connection stopped every later association (and stop() waited for it)."""
    import socket
    import ssl

    certs = make_certificates(tmp_path / "certs")
    receiver = receivers(tls=DicomTlsConfig(cert_file=certs.server_cert, key_file=certs.server_key))
    port = receiver.address[1]
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs.ca))
    with socket.create_connection(("127.0.0.1", port)):  # connects, never speaks
        time.sleep(0.3)
        started = time.monotonic()
        assert dicom_scu.store(port, [real(NATIVE_DX)], tls=client) == [SUCCESS]
        assert time.monotonic() - started < 5
        started = time.monotonic()
        receiver.stop()
        assert time.monotonic() - started < 5
    assert len(spooled(spool)) == 1


# -- Hardening II: what the receiver takes, and how much of it -------------------------------------------


def test_a_deflate_bomb_is_refused_unread(
    receivers: Callable[..., DicomReceiver], spool: Spool, tmp_path: Path
) -> None:
    # 256 MB of Pixel Data deflated to ~260 kB (Deflated Explicit VR Little Endian, the real DX's header).
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(deflate_bomb(random.Random(1), real(NATIVE_DX).read_bytes()))
    assert bomb.stat().st_size < 2_000_000
    receiver = receivers()
    port = receiver.address[1]
    tracemalloc.start()  # this process is the receiver's (pynetdicom's threads included)
    started = time.monotonic()
    try:
        statuses = dicom_scu.store(port, [bomb])  # the unit offers only the deflated syntax
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.monotonic() - started
    assert statuses == [], "the deflated context must not be accepted"
    assert elapsed < 5, f"{elapsed:.1f} s"
    assert peak < 20_000_000, f"peak {peak / 1e6:.1f} MB while refusing"
    assert spooled(spool) == [] and quarantined(spool) == [] and list(receiver.receive_dir.iterdir()) == []
    # A unit that proposes deflate next to an uncompressed syntax gets the uncompressed one.
    ae = AE(ae_title="XRAY_UNIT")
    ae.add_requested_context(SecondaryCaptureImageStorage, [DeflatedExplicitVRLittleEndian])
    ae.add_requested_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate(dicom_scu.LOOPBACK, port, ae_title="CXR_APPLIANCE")
    try:
        assert assoc.is_established
        assert [cx.transfer_syntax for cx in assoc.accepted_contexts] == [[ExplicitVRLittleEndian]]
    finally:
        assoc.release()


def _basic_text_sr(path: Path) -> Path:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = BasicTextSRStorage, generate_uid()
    ds.Modality, ds.PatientID, ds.ValueType = "SR", "TEST-1", "CONTAINER"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_non_image_sop_class_is_refused_and_never_spooled(
    receivers: Callable[..., DicomReceiver], spool: Spool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = receivers()
    with caplog.at_level(logging.WARNING, logger="appliance.dicomnet.receiver"):
        statuses = dicom_scu.store(
            receiver.address[1], [_basic_text_sr(tmp_path / "report.dcm"), real(JPEG_CR)]
        )
    assert statuses == [SOP_CLASS_NOT_SUPPORTED, SUCCESS]
    assert "Basic Text SR Storage is not an image the cart analyses" in caplog.text
    assert (
        len(spooled(spool)) == 1 and quarantined(spool) == [] and list(receiver.receive_dir.iterdir()) == []
    )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"PixelData": None}, reasons.NO_PIXEL_DATA),
        ({"Rows": 30000, "Columns": 30000}, reasons.IMAGE_TOO_LARGE),
    ],
)
def test_what_the_reader_would_refuse_is_refused_now_not_after_success(
    receivers: Callable[..., DicomReceiver],
    spool: Spool,
    tmp_path: Path,
    change: dict[str, object],
    reason: str,
) -> None:
    path = dicom_with(real(NATIVE_DX), tmp_path / "bad.dcm", change)
    receiver = receivers()
    assert dicom_scu.store(receiver.address[1], [path]) == [CANNOT_UNDERSTAND]
    assert spooled(spool) == [] and list(receiver.receive_dir.iterdir()) == []
    kept = [p for p in quarantined(spool) if p.name.endswith(".reason.txt")]
    assert len(kept) == 1 and f"reason: {reason}" in kept[0].read_text()


def test_an_instance_over_max_file_mb_aborts_the_association_and_leaves_nothing(
    receivers: Callable[..., DicomReceiver],
    spool: Spool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    partial = tmp_path / "pynetdicom-tmp"  # where pynetdicom streams the dataset it receives
    partial.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(partial))
    receiver = receivers(max_bytes=512 * 1024)
    port = receiver.address[1]
    assert real(NATIVE_DX).stat().st_size > 1_000_000
    with caplog.at_level(logging.ERROR, logger="appliance.dicomnet.receiver"):
        assert dicom_scu.store(port, [real(NATIVE_DX)]) == [None]  # no answer: the association was aborted
        deadline = time.monotonic() + 5
        while list(partial.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "C-STORE from XRAY_UNIT (127.0.0.1:" in caplog.text
    assert "aborted: the dataset is over 0.5 MB (ingest.max_file_mb)" in caplog.text
    assert list(partial.iterdir()) == [], "the partial dataset is removed"
    assert spooled(spool) == [] and quarantined(spool) == [] and list(receiver.receive_dir.iterdir()) == []
    assert dicom_scu.store(port, [real(JPEG_CR)]) == [SUCCESS]  # 127 kB: under the cap
    assert len(spooled(spool)) == 1 and list(partial.iterdir()) == []


def test_a_port_already_taken_is_a_plain_error(receivers: Callable[..., DicomReceiver], spool: Spool) -> None:
    """Found by a review run: the TLS server's own attributes were set after the bind, so a failed bind
    ended in an AttributeError traceback instead of 'cannot listen'."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match="cannot listen"):
            receivers(port=port)
