"""Salted pseudonymous patient keys."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from appliance.config import PrivacyConfig
from appliance.errors import ConfigError
from appliance.pseudonym import PatientKeys, load_or_create_salt


def test_salt_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "patient-key.salt"
    a = PatientKeys.from_config(PrivacyConfig(salt_file=path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 32
    b = PatientKeys.from_config(PrivacyConfig(salt_file=path))
    assert a.key("PAT-123", "HOSP") == b.key("PAT-123", "HOSP")


def test_keys_are_stable_salted_and_hide_the_id(tmp_path: Path) -> None:
    keys = PatientKeys(b"s" * 32)
    k = keys.key("PAT-123", "HOSP")
    assert k is not None and len(k) == 16 and int(k, 16) >= 0
    assert "PAT" not in k and "123" not in k
    assert keys.key(" PAT-123 ", "HOSP") == k  # DICOM padding does not change the patient
    assert keys.key("PAT-123", "OTHER") != k  # the same number from another issuer is another patient
    assert keys.key("PAT-124", "HOSP") != k
    assert PatientKeys(b"t" * 32).key("PAT-123", "HOSP") != k  # another site, another salt
    assert keys.key("", None) is None and keys.key(None) is None
    assert "s" * 32 not in repr(keys)


def test_bad_salt_files_are_clear_errors(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    with pytest.raises(ConfigError, match="only 3 bytes"):
        load_or_create_salt(short)
    with pytest.raises(ConfigError, match="missing"):
        load_or_create_salt(tmp_path / "none", create=False)
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    with pytest.raises(ConfigError, match=r"file-not-dir/salt: cannot (read|create)"):
        PatientKeys.from_config(PrivacyConfig(salt_file=blocked / "salt"))
    eph = PatientKeys.from_config(PrivacyConfig(salt_file=blocked / "salt"), ephemeral_ok=True)
    assert eph.ephemeral and eph.key("x") is not None


def test_a_salt_others_may_read_is_refused_and_a_new_one_appears_whole(tmp_path: Path) -> None:
    path = tmp_path / "salt"
    load_or_create_salt(path)
    assert [p.name for p in tmp_path.iterdir()] == ["salt"]  # no temporary file left behind
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="group or others have access"):
        load_or_create_salt(path)


def test_the_issuer_of_patient_id_is_read_from_the_dicom(tmp_path: Path) -> None:
    import pydicom

    from appliance.ingest import read_image
    from testsupport.data import real_dicoms

    ds = pydicom.dcmread(real_dicoms()[0])
    ds.IssuerOfPatientID = "HOSP-A"
    ds.save_as(tmp_path / "a.dcm")
    assert read_image(tmp_path / "a.dcm").meta.extra["IssuerOfPatientID"] == "HOSP-A"
