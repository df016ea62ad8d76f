"""The commands as an engineer types them (in-process, real files, real broker)."""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from appliance.cli import main
from appliance.journal import Journal
from testsupport import data, tiny_models
from testsupport.mosquitto import Broker
from testsupport.results import make_result
from testsupport.schemas import assert_valid


def config_file(tmp_path: Path, broker: Broker | None = None) -> Path:
    model = tiny_models.xrv_like(tmp_path / "model")
    config = {
        "ingest": {"watch": str(tmp_path / "inbox"), "spool": str(tmp_path / "spool")},
        "inference": {"model": str(model), "backend": "auto"},
        "mqtt": {"host": "127.0.0.1", "port": broker.port if broker else 1} if broker else {"port": 1},
        "privacy": {"salt_file": str(tmp_path / "salt")},
        "journal": {"path": str(tmp_path / "journal.sqlite3")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_process_prints_one_schema_valid_json_per_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = [*data.real_dicoms()[:2], data.first(source="txv", view="PA", modality="X-ray")]
    assert main(["process", "--config", str(config_file(tmp_path)), "--json", *map(str, files)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for line in lines:
        payload = assert_valid(line, "result.v2.json")
        assert payload["status"] == "ok" and payload["provenance"]["backend"] == "onnxruntime"
        # auto without TensorRT falls back, and says so in the provenance
        assert "TensorRT" in (payload["provenance"]["fallback_reason"] or "")


def test_process_exits_1_when_a_file_cannot_be_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_text("nope")
    assert main(["process", "--config", str(config_file(tmp_path)), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "error" in out and "Not read:" in out


def test_process_says_no_such_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = [tmp_path / "typo.dcm", tmp_path / "gone" / "scan.png"]
    assert main(["process", "--config", str(config_file(tmp_path)), "--json", *map(str, missing)]) == 1
    payloads = [assert_valid(line, "result.v2.json") for line in capsys.readouterr().out.splitlines()]
    assert [p["reason"] for p in payloads] == ["no such file"] * 2
    assert [p["status"] for p in payloads] == ["error"] * 2
    assert str(missing[0]) in payloads[0]["text"]
    # Not the hash of nothing: each missing file has its own id.
    assert payloads[0]["image"]["image_id"] != payloads[1]["image"]["image_id"]


def test_history_lists_the_journal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = config_file(tmp_path)
    journal = Journal(tmp_path / "journal.sqlite3")
    for n in range(3):
        journal.record_result(make_result(n, location=f"bed-{n}"))
    journal.close()
    assert main(["history", "--config", str(config), "--json", "--limit", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2


def _history_as_nobody(config: str, queue: multiprocessing.Queue) -> None:
    try:
        os.setgid(65534)
        os.setuid(65534)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["history", "--config", config, "--json"])
        queue.put((code, out.getvalue(), err.getvalue()))
    except BaseException as exc:
        queue.put((-1, "", repr(exc)))


def _run_as_nobody(config: Path) -> tuple[int, str, str]:
    queue: multiprocessing.Queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_history_as_nobody, args=(str(config), queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(30)
    return got


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the command as another user")
def test_history_reads_a_journal_its_user_cannot_write() -> None:
    """Found by a review: history and feedback export opened the journal for writing, so an engineer's
    account that may only read it got "attempt to write a readonly database" once the daemon had stopped."""
    folder = Path(tempfile.mkdtemp(prefix="cxr-ro-"))
    try:
        folder.chmod(0o755)
        config = config_file(folder)
        journal = Journal(folder / "journal.sqlite3")
        for n in range(3):
            journal.record_result(make_result(n, location=f"bed-{n}"))
        journal.close()  # the daemon stopped: no -wal file, and nobody may create one here
        code, out, err = _run_as_nobody(config)
        assert code == 0 and len(out.splitlines()) == 3, err
        running = Journal(folder / "journal.sqlite3")  # the daemon running: its WAL is read too
        running.record_result(make_result(3, location="bed-3"))
        code, out, err = _run_as_nobody(config)
        running.close()
        assert code == 0 and len(out.splitlines()) == 4, err
        assert sorted(p.name for p in folder.iterdir() if "journal" in p.name) == ["journal.sqlite3"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_history_without_a_journal_is_a_plain_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["history", "--config", str(config_file(tmp_path))]) == 2
    assert "no journal yet" in capsys.readouterr().err


def test_doctor_ready_with_a_broker_and_not_ready_without(
    tmp_path: Path, broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "inbox").mkdir()
    assert main(["doctor", "--config", str(config_file(tmp_path, broker))]) == 0
    out = capsys.readouterr().out
    assert "READY: 0 failed" in out and "WARN  backend  FALLBACK onnxruntime/fp32" in out
    broker.stop()
    assert main(["doctor", "--config", str(config_file(tmp_path, broker))]) == 1
    assert "FAIL  broker" in capsys.readouterr().out


def test_doctor_names_a_bad_model_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = config_file(tmp_path)
    (tmp_path / "model" / "model.onnx").write_bytes(b"tampered")
    assert main(["doctor", "--config", str(config)]) == 1
    assert "does not match the manifest" in capsys.readouterr().out


def test_doctor_loads_every_certificate_and_goes_on_past_a_bad_journal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by a review run: a missing metrics certificate got READY (and `run` then stopped), and a
    journal that is not a database ended doctor before its other checks and verdict."""
    path = config_file(tmp_path)
    config = yaml.safe_load(path.read_text())
    config["metrics"] = {
        "tls": {"cert_file": str(tmp_path / "absent.pem"), "key_file": str(tmp_path / "absent.key")}
    }
    path.write_text(yaml.safe_dump(config))
    (tmp_path / "journal.sqlite3").write_bytes(b"not a database" * 100)
    assert main(["doctor", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  tls" in out and "absent.pem" in out
    assert "FAIL  journal" in out and "NOT READY" in out


def test_doctor_judges_folders_salt_and_addresses_as_run_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by a review run: doctor said READY where `run` then stopped (a DICOM outbox that cannot be
    created, a bind address of another machine, a salt too short), and NOT READY where `run` works (a
    watch folder two levels below an existing one)."""
    path = config_file(tmp_path)
    config = yaml.safe_load(path.read_text())
    (tmp_path / "a-file").write_text("")
    config["ingest"]["watch"] = str(tmp_path / "new" / "deeper" / "inbox")
    config["dicom_out"] = {"enabled": True, "outbox": str(tmp_path / "a-file" / "dicom-out")}
    config["dicom_net"] = {"enabled": True, "bind": "203.0.113.7", "allowed_calling_ae": ["XRAY_UNIT"]}
    path.write_text(yaml.safe_dump(config))
    (tmp_path / "salt").write_bytes(b"1234")
    (tmp_path / "salt").chmod(0o600)
    assert main(["doctor", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    assert "WARN  folders  watch" in out and "created at start" in out
    assert "FAIL  folders  dicom_out.outbox" in out and "a-file is not a folder" in out
    assert "FAIL  network  dicom_net: cannot listen on 203.0.113.7" in out
    assert "FAIL  privacy" in out and "only 4 bytes" in out


def test_doctor_takes_an_empty_bind_as_every_address_as_the_receiver_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config_file(tmp_path)
    config = yaml.safe_load(path.read_text())
    config["dicom_net"] = {"enabled": True, "bind": "", "allowed_calling_ae": ["XRAY_UNIT"]}
    path.write_text(yaml.safe_dump(config))
    main(["doctor", "--config", str(path)])
    assert "OK    network  dicom_net: can listen on every address" in capsys.readouterr().out


def test_a_bug_on_one_file_is_its_error_result_and_the_others_are_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by a review run: an exception in the stages ended `process` with a traceback and no result
    for any file of the batch. Here a manifest naming two labels for a three-column output makes the
    interpretation fail on every image: each gets its own error result."""
    path = config_file(tmp_path)
    config = yaml.safe_load(path.read_text())
    manifest = yaml.safe_load(Path(config["inference"]["model"]).read_text())
    manifest["outputs"][0]["labels"] = ["Atelectasis", "Effusion"]
    manifest["outputs"][0]["thresholds"] = {"Atelectasis": 0.5}
    Path(config["inference"]["model"]).write_text(yaml.safe_dump(manifest))
    files = data.real_dicoms()[:2]
    assert main(["process", "--config", str(path), "--json", *map(str, files)]) == 1
    captured = capsys.readouterr()
    payloads = [assert_valid(line, "result.v2.json") for line in captured.out.splitlines()]
    assert [(p["status"], p["reason"]) for p in payloads] == [("error", "internal error")] * 2
    assert files[0].name in payloads[0]["text"] and "Traceback" in captured.err


def test_unwritable_outputs_and_odd_inputs_are_plain_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by a review run: each of these printed a traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["schema", "--out", str(blocker / "schemas")]) == 2
    assert "cannot create" in capsys.readouterr().err
    config = config_file(tmp_path)
    Journal(tmp_path / "journal.sqlite3").close()
    assert main(["feedback", "export", "--config", str(config), "--out", str(blocker / "x.csv")]) == 2
    assert "cannot write" in capsys.readouterr().err
    labels = tmp_path / "labels.csv"
    labels.write_bytes(b"file,abnormal\nR\xe9a.dcm,1\n")
    code = main(
        ["recalibrate", "--config", str(config), "--labels", str(labels), "--out", str(tmp_path / "o.yaml")]
    )
    assert code == 2 and "not UTF-8" in capsys.readouterr().err
