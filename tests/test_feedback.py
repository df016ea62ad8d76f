"""Clinician feedback: ack/v2 (verdict + comment) beside ack/v1, the journal's feedback rows, the
migration of journals from before it, and the audit CSV (`cxr-appliance feedback export`)."""

from __future__ import annotations

import csv
import io
import json
import logging
import sqlite3
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from appliance.cli import main
from appliance.journal import FEEDBACK_COLUMNS, MAX_ACKS_PER_RESULT, Journal
from appliance.result import Acknowledgement, Result, Score, parse_ack
from testsupport.results import make_result
from testsupport.schemas import assert_valid

AT = "2024-03-01T09:00:00Z"


def scored(n: int, score: float | None, **kw: object) -> Result:
    """A support result with an abnormality score (what recalibration fits), or without one."""
    abnormal = Score(score=score, threshold=0.5, positive=score >= 0.5) if score is not None else None
    return make_result(n, **kw).model_copy(update={"abnormal": abnormal})  # type: ignore[arg-type]


def ack(result: Result, by: str = "Dr Lee", **kw: object) -> Acknowledgement:
    return Acknowledgement.model_validate({"message_id": result.message_id, "by": by, "at": AT, **kw})


# ---------- the payload ----------


def test_v1_acks_still_parse_and_v2_carries_a_cleaned_bounded_verdict() -> None:
    v1 = {"schema": "cxr-appliance/ack/v1", "message_id": "m-1", "by": "RN Smith", "at": AT, "display": "icu"}
    assert_valid(v1, "ack.v1.json")
    old = parse_ack(json.dumps(v1))
    assert (old.message_id, old.by, old.display, old.verdict, old.comment) == (
        "m-1",
        "RN Smith",
        "icu",
        None,
        None,
    )
    schemaless = {k: v for k, v in v1.items() if k != "schema"}  # v1's schema field had a default
    assert parse_ack(json.dumps(schemaless)).by == "RN Smith"

    v2 = {
        "schema": "cxr-appliance/ack/v2",
        "message_id": "m-2",
        "by": "Dr\u202e Lee\n",
        "at": AT,
        "verdict": "disagree",
        "comment": "line one\r\nline\x00 two\x1b[31m  ",
    }
    assert_valid(v2, "ack.v2.json")
    new = parse_ack(json.dumps(v2).encode())
    # Newlines, escapes and bidi overrides would forge CSV rows or reorder text on the ward screens.
    assert (new.by, new.verdict, new.comment) == ("Dr Lee", "disagree", "line one line two [31m")
    assert parse_ack(json.dumps({**v2, "comment": " \n\t "})).comment is None
    # What the page publishes round-trips through the committed schema.
    assert_valid(new.model_dump_json(by_alias=True), "ack.v2.json")

    refused = [
        {**v2, "verdict": "maybe"},
        {**v2, "comment": "x" * 201},
        {**v2, "by": "\n\t"},  # nothing left of the name
        {**v2, "message_id": "m" * 129},
        {**v1, "verdict": "agree"},  # v1 has no verdict: a display must say v2
        {**v2, "schema": "cxr-appliance/ack/v9"},
    ]
    for payload in refused:
        with pytest.raises(ValidationError):
            parse_ack(json.dumps(payload))


# ---------- the journal ----------


def test_feedback_rows_join_each_ack_to_its_result(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    urgent, normal = scored(1, 0.93, triage="urgent"), scored(2, None, patient_key=None)
    for r in (urgent, normal):
        journal.record_result(r)
    assert journal.record_ack(
        ack(urgent, verdict="disagree", comment="Old scarring, not pneumonia.", display="icu-1")
    )
    assert journal.record_ack(ack(normal, by="RN Smith"))  # an ack/v1 display: no verdict
    assert not journal.record_ack(ack(normal, by="RN Smith"))  # a QoS 1 redelivery: stored once

    # An ack naming a message the journal does not know is dropped (and said so), not stored.
    unknown = Acknowledgement(message_id="not-a-result", by="Mallory", at=AT, verdict="agree")
    with caplog.at_level(logging.WARNING, logger="appliance.journal"):
        assert not journal.record_ack(unknown)
    assert "unknown message 'not-a-result'" in caplog.text
    assert journal.acknowledgements("not-a-result") == []

    rows = journal.feedback()
    assert [list(row) for row in rows] == [list(FEEDBACK_COLUMNS)] * 2
    assert rows[0] == {
        "message_id": urgent.message_id,
        "image_id": urgent.image.image_id,
        "patient_key": urgent.patient_key,
        "acquired_at": urgent.image.acquired_at,
        "triage": "urgent",
        "abnormal": 0.93,
        "by": "Dr Lee",
        "at": AT,
        "display": "icu-1",
        "verdict": "disagree",
        "comment": "Old scarring, not pneumonia.",
    }
    assert (rows[1]["message_id"], rows[1]["verdict"], rows[1]["abnormal"], rows[1]["patient_key"]) == (
        normal.message_id,
        None,
        None,
        None,
    )
    assert journal.counts()["acknowledgements"] == 2

    # `since` is the appliance's receiving clock: everything so far is before "now + 1 s".
    assert journal.feedback(since="2000-01-01T00:00:00+02:00") == rows
    assert journal.feedback(since="2999-01-01T00:00:00Z") == []
    with pytest.raises(ValueError, match="ISO 8601"):
        journal.feedback(since="last tuesday")
    journal.close()


def test_one_result_holds_a_bounded_number_of_acks(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    result = scored(3, 0.7)
    journal.record_result(result)
    stored = [
        journal.record_ack(ack(result, by=f"user {n}", verdict="unsure"))
        for n in range(MAX_ACKS_PER_RESULT + 5)
    ]
    assert stored == [True] * MAX_ACKS_PER_RESULT + [False] * 5
    assert len(journal.feedback()) == MAX_ACKS_PER_RESULT
    journal.close()


def test_a_journal_from_before_feedback_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    old = sqlite3.connect(path)
    # The acknowledgements table as it was before verdicts, with one ack in it.
    old.executescript(
        """
        CREATE TABLE acknowledgements (
            message_id TEXT NOT NULL, by TEXT NOT NULL, at TEXT NOT NULL, display TEXT,
            received_at TEXT NOT NULL, UNIQUE (message_id, by, at));
        """
    )
    result = scored(4, 0.81, triage="abnormal")
    old.execute(
        "INSERT INTO acknowledgements VALUES (?, 'RN Old', ?, 'ward-3', '2024-03-01T09:00:01.000+00:00')",
        (result.message_id, AT),
    )
    old.commit()
    old.close()

    journal = Journal(path)
    journal.record_result(result)
    assert journal.record_ack(ack(result, verdict="agree"))
    got = [(r["by"], r["display"], r["verdict"], r["abnormal"]) for r in journal.feedback()]
    assert got == [("RN Old", "ward-3", None, 0.81), ("Dr Lee", None, "agree", 0.81)]
    journal.close()
    Journal(path).close()  # opening a migrated journal again changes nothing


# ---------- the audit CSV ----------


def test_feedback_export_writes_a_csv_an_auditor_can_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({"journal": {"path": str(tmp_path / "journal.sqlite3")}}), encoding="utf-8"
    )
    assert main(["feedback", "export", "--config", str(config)]) == 2
    assert "no journal yet" in capsys.readouterr().err

    journal = Journal(tmp_path / "journal.sqlite3")
    first, second = scored(5, 0.91, triage="urgent"), scored(6, 0.55, triage="abnormal")
    for r in (first, second):
        journal.record_result(r)
    journal.record_ack(ack(first, verdict="disagree", comment='Prior "scarring", see CT'))
    # A comment a spreadsheet would run as a formula: exported as text.
    journal.record_ack(ack(second, by="=cmd|' /C calc'!A0", verdict="unsure", comment="-1+1"))
    journal.close()

    out = tmp_path / "audit" / "feedback.csv"
    out.parent.mkdir()
    assert main(["feedback", "export", "--config", str(config), "--out", str(out)]) == 0
    assert "2 acknowledgement(s)" in capsys.readouterr().err
    with out.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == FEEDBACK_COLUMNS
        rows = list(reader)
    assert [(r["message_id"], r["verdict"], r["comment"]) for r in rows] == [
        (first.message_id, "disagree", 'Prior "scarring", see CT'),
        (second.message_id, "unsure", "'-1+1"),
    ]
    assert rows[1]["by"] == "'=cmd|' /C calc'!A0"
    assert (rows[0]["patient_key"], rows[0]["triage"], float(rows[0]["abnormal"])) == (
        first.patient_key,
        "urgent",
        0.91,
    )
    assert rows[0]["display"] == ""  # None is an empty cell
    # Pseudonymous only: no column could hold a name or patient ID.
    assert not {"patient_id", "patient_name", "name"} & set(rows[0])

    # --out - (the default) is stdout; --since filters on when the appliance received the acks.
    assert main(["feedback", "export", "--config", str(config), "--out", "-"]) == 0
    assert list(csv.DictReader(io.StringIO(capsys.readouterr().out))) == rows
    assert main(["feedback", "export", "--config", str(config), "--since", "2999-01-01T00:00:00Z"]) == 0
    assert capsys.readouterr().out.splitlines() == [",".join(FEEDBACK_COLUMNS)]
    assert main(["feedback", "export", "--config", str(config), "--since", "yesterday"]) == 2
    assert "not an ISO 8601 time" in capsys.readouterr().err
