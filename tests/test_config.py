from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.config import AppConfig, config_json_schema, load_config
from appliance.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_config_is_valid_and_uses_the_bundled_model() -> None:
    config = load_config(REPO / "config" / "example.yaml")
    assert config.inference.model == REPO / "engines" / "cxr-lite0" / "manifest.yaml"
    assert config.mqtt.qos == 1


def test_unknown_key_is_named_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "device:\n  site: ward-7\nmqtt:\n  host: localhost\n  prot: 1884\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:5: mqtt.prot: unknown key" in str(err.value)


def test_wrong_type_is_named_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "mqtt:\n  port: seventeen\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:2: mqtt.port:" in str(err.value)


def test_not_yaml_is_a_plain_error(tmp_path: Path) -> None:
    path = write(tmp_path, "mqtt: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    path = write(tmp_path, "ingest:\n  watch: inbox\n  extra_watch: [usb]\n")
    config = load_config(path)
    assert config.ingest.watch == tmp_path / "inbox"
    assert config.ingest.extra_watch == [tmp_path / "usb"]


def test_password_from_env_is_secret_and_never_in_repr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_TEST_PW", "hunter2")
    config = load_config(write(tmp_path, "mqtt:\n  username: cart\n  password_env: CXR_TEST_PW\n"))
    secret = config.mqtt.password()
    assert secret is not None and secret.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(config) and "hunter2" not in str(secret)


def test_password_without_username_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a password needs a username"):
        load_config(write(tmp_path, "mqtt:\n  password_env: X\n"))


def test_json_schema_forbids_unknown_keys() -> None:
    schema = config_json_schema()
    assert schema["additionalProperties"] is False
    assert "mqtt" in schema["properties"]  # type: ignore[operator]
    json.dumps(schema)


def test_validate_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate-config", str(REPO / "config" / "example.yaml")]) == 0
    assert "valid" in capsys.readouterr().out
    bad = write(tmp_path, "ingest:\n  max_pixels: -5\n")
    assert main(["validate-config", str(bad)]) == 2
    assert f"{bad}:2: ingest.max_pixels" in capsys.readouterr().err


def test_defaults_are_a_complete_config() -> None:
    assert AppConfig().device.site == "site"


@pytest.mark.parametrize(
    ("title", "line"),
    [("XRAY_UNIT_WARD_7_BAY_3", 4), ("XRAY\\\\UNIT", 4), ("   ", 4)],
)
def test_an_ae_title_dicom_would_refuse_is_refused_with_its_line(
    tmp_path: Path, title: str, line: int
) -> None:
    """Found by a review run: validate-config said valid, and `run` stopped with pynetdicom's traceback."""
    path = write(tmp_path, f'dicom_net:\n  enabled: true\n  allowed_calling_ae:\n  - "{title}"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:{line}: dicom_net.allowed_calling_ae" in str(err.value) and "AE title" in str(err.value)


def test_ae_titles_lose_their_padding(tmp_path: Path) -> None:
    path = write(tmp_path, 'dicom_net:\n  ae_title: " CXR_CART "\n  allowed_calling_ae: ["XRAY_1 "]\n')
    config = load_config(path)
    assert config.dicom_net.ae_title == "CXR_CART" and config.dicom_net.allowed_calling_ae == ["XRAY_1"]


def test_a_pacs_client_certificate_needs_its_key_and_tls(tmp_path: Path) -> None:
    base = "dicom_out:\n  enabled: true\n  pacs:\n    ae_title: PACS\n    host: pacs.local\n"
    with pytest.raises(ConfigError, match="cert_file and key_file go together"):
        load_config(write(tmp_path, base + "    cert_file: /etc/cart.pem\n    ca_file: /etc/ca.pem\n"))
    with pytest.raises(ConfigError, match="give ca_file too"):
        load_config(write(tmp_path, base + "    cert_file: /etc/cart.pem\n    key_file: /etc/cart.key\n"))


def test_a_config_not_in_utf8_names_its_line(tmp_path: Path) -> None:
    """Found by a review run: a Latin-1 byte gave a UnicodeDecodeError traceback (and killed a SIGHUP)."""
    path = tmp_path / "config.yaml"
    path.write_bytes(b'device:\n  site: ward-7\n  locations: {"R\xe9a Lit 3": bed-3}\n')
    with pytest.raises(ConfigError, match=r"config\.yaml:3: not UTF-8 \(byte 0xe9\)"):
        load_config(path)
