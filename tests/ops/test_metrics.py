"""Prometheus metrics of the real daemon: real Mosquitto, real chest X-rays, scraped over real HTTP.

Also checks that the alert rules and the Grafana dashboard in docs/ only use metrics the daemon
really exports, and that docs/metrics.md describes every one of them.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import shutil
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from appliance.config import AppConfig, load_config
from appliance.errors import ConfigError
from appliance.ops.metrics import Metrics
from appliance.publish.outbox import Outbox
from testsupport import data
from testsupport.daemon import DaemonProcess, wait_results, wait_until
from testsupport.mosquitto import Broker, Subscriber, free_port, make_certificates

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
# Exported only where the machine has the sensors (a Jetson; not this test machine, perhaps).
OPTIONAL = {"cxr_thermal_zone_temperature_celsius", "cxr_devfreq_clock_hertz"}

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(port: int, auth: tuple[str, str] | None = None, tls: ssl.SSLContext | None = None) -> str:
    request = urllib.request.Request(f"{'https' if tls else 'http'}://127.0.0.1:{port}/metrics")
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10, context=tls) as response:
        assert response.status == 200
        return str(response.read().decode())


def samples(text: str) -> Samples:
    """Sample name -> [(labels, value)], from the parser prometheus_client itself ships."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    """The sum over the samples of `name` whose labels include `labels`."""
    return sum(v for got, v in found.get(name, []) if all(got.get(k) == w for k, w in labels.items()))


def documented_names(text: str) -> set[str]:
    """The names a reader or a query uses: counters with _total, info metrics with _info."""
    names = set()
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):  # prometheus_client's creation time of each counter/histogram
            continue
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        names.add(family.name + suffix)
    return names


def test_the_daemon_counts_real_images_and_exports_its_state(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    port = free_port()
    daemon = daemons(broker, model, metrics={"enabled": True, "port": port})
    manifest = yaml.safe_load(model.read_text())
    with Subscriber(broker, "cxr/#") as sub:
        daemon.start()
        for index, image in enumerate(data.real_dicoms()[:2]):
            shutil.copyfile(image, daemon.inbox / f"m{index}.dcm")
        (daemon.inbox / "notes.dcm").write_text("not an image\n" * 20)
        got = wait_results(sub, 2, timeout=30)
        assert [p["status"] for p in got] == ["ok", "ok"], daemon.log()

        # The result reaches MQTT a moment before the loop counts it: poll the endpoint.
        def settled() -> bool:
            found = samples(scrape(port))
            return (
                value(found, "cxr_images_processed_total") == 2
                and value(found, "cxr_refusals_total", status="quarantined") == 1
                and value(found, "cxr_outbox_depth_messages") == 0
            )

        assert wait_until(settled, timeout=20), scrape(port)
        text = scrape(port)
    found = samples(text)

    assert value(found, "cxr_images_processed_total", source="inbox", status="ok") == 2
    assert value(found, "cxr_refusals_total", status="quarantined", reason="not a DICOM or image") == 1
    assert value(found, "cxr_refusals_total", status="refused") == 0
    for stage in ("read", "preprocess", "infer", "interpret", "journal"):
        assert value(found, "cxr_stage_duration_seconds_count", stage=stage) == 2, stage
        assert value(found, "cxr_stage_duration_seconds_sum", stage=stage) > 0, stage
    assert value(found, "cxr_end_to_end_latency_seconds_count") == 2
    assert 0 < value(found, "cxr_end_to_end_latency_seconds_sum") < 60
    assert "cxr_outbox_depth_messages" in found and "cxr_outbox_oldest_pending_age_seconds" in found
    assert value(found, "cxr_outbox_dropped_total") == 0
    assert value(found, "cxr_mqtt_connected") == 1
    assert value(found, "cxr_spool_backlog_images") == 0
    assert value(found, "cxr_spool_filesystem_free_bytes") > 0
    assert value(found, "cxr_spool_filesystem_reserve_bytes") == 200e6  # ingest.min_free_mb default
    assert value(found, "cxr_accepting") == 1
    assert {labels["cause"]: v for labels, v in found["cxr_fault"]} == {"disk": 0, "storage": 0, "backend": 0}
    [(model_labels, one)] = found["cxr_model_info"]
    assert one == 1 and model_labels["name"] == manifest["name"]
    assert model_labels["version"] == str(manifest["version"])
    [(backend_labels, _)] = found["cxr_backend_info"]
    assert backend_labels["backend"] == "onnxruntime" and backend_labels["precision"] == "fp32"
    [(appliance_labels, _)] = found["cxr_appliance_info"]
    assert appliance_labels["site"] == "ward-7" and appliance_labels["device_id"] == "cart-1"
    assert value(found, "process_resident_memory_bytes") > 10e6  # prometheus_client's process collector

    # The docs describe every metric, and the alerts and dashboard ask only for metrics that exist.
    exported = documented_names(text)
    reference = (DOCS / "metrics.md").read_text(encoding="utf-8")
    missing = sorted(n for n in exported if n.startswith("cxr_") and n not in reference)
    assert not missing, f"docs/metrics.md does not describe {missing}"
    for doc in ("prometheus-alerts.yml", "grafana-dashboard.json"):
        used = set(re.findall(r"\bcxr_[a-z0-9_]+", (DOCS / doc).read_text(encoding="utf-8")))
        unknown = sorted(used - set(found) - exported - OPTIONAL)  # samples or histogram names
        assert not unknown, f"docs/{doc} queries metrics the daemon does not export: {unknown}"
    assert daemon.stop() == 0


def test_basic_auth_refuses_a_wrong_password_and_accepts_the_right_one(
    model: Path, daemons: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    secret = tmp_path / "metrics-password"
    secret.write_text("correct horse battery staple\n")  # the trailing newline is not part of it
    secret.chmod(0o600)
    port = free_port()
    daemon = daemons(
        None,
        model,
        metrics={"enabled": True, "port": port, "username": "prometheus", "password_file": str(secret)},
    )
    daemon.start()
    for auth in (None, ("prometheus", "wrong"), ("grafana", "correct horse battery staple")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(port, auth)
        assert refused.value.code == 401, auth
        assert "Basic" in refused.value.headers.get("WWW-Authenticate", "")
    text = scrape(port, ("prometheus", "correct horse battery staple"))
    assert "cxr_model_info" in text and "cxr_accepting 1.0" in text
    assert "correct horse" not in daemon.log() and "correct horse" not in daemon.config_path.read_text()


def test_metrics_over_https_with_basic_auth(
    model: Path, daemons: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """Found missing by a review run: basic auth over plain HTTP sent the password in clear on every scrape."""
    certs = make_certificates(tmp_path / "certs")
    secret = tmp_path / "metrics-password"
    secret.write_text("correct horse battery staple\n")
    secret.chmod(0o600)
    port = free_port()
    tls = {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)}
    daemon = daemons(
        None,
        model,
        metrics={
            "enabled": True,
            "port": port,
            "username": "prometheus",
            "password_file": str(secret),
            "tls": tls,
        },
    )
    daemon.start()
    trusting = ssl.create_default_context(cafile=str(certs.ca))
    text = scrape(port, ("prometheus", "correct horse battery staple"), tls=trusting)
    assert "cxr_model_info" in text
    with pytest.raises(urllib.error.HTTPError) as refused:
        scrape(port, ("prometheus", "wrong"), tls=trusting)
    assert refused.value.code == 401
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        scrape(port, ("prometheus", "correct horse battery staple"))  # plain HTTP on the TLS port
    assert "metrics at https://" in daemon.log()


def test_metrics_listen_on_loopback_by_default_and_take_no_password_from_yaml(tmp_path: Path) -> None:
    for config in (AppConfig(), load_config(REPO / "config" / "example.yaml")):
        assert config.metrics.enabled and config.metrics.host == "127.0.0.1" and config.metrics.port == 9108
        assert config.metrics.username is None and config.metrics.password_file is None
    path = tmp_path / "config.yaml"
    path.write_text("metrics:\n  username: prometheus\n  password: hunter2\n")
    with pytest.raises(ConfigError, match=r"metrics\.password: unknown key"):
        load_config(path)
    path.write_text("metrics:\n  username: prometheus\n")
    with pytest.raises(ConfigError, match="basic auth needs both username and password_file"):
        load_config(path)
    path.write_text(f"metrics:\n  username: prometheus\n  password_file: {tmp_path / 'absent'}\n")
    with pytest.raises(ConfigError, match=r"metrics\.password_file .*absent: cannot read"):
        Metrics(load_config(path))  # read when the daemon is built: before it connects or says online


def fake_analyzer() -> SimpleNamespace:
    return SimpleNamespace(
        manifest=SimpleNamespace(name="tiny", version="1"),
        backend=SimpleNamespace(
            name="onnxruntime", precision="fp32", model_sha256="0" * 64, fallback_reason=None
        ),
    )


def test_readable_thermal_zones_are_exported_and_the_rest_skipped_silently(tmp_path: Path) -> None:
    zones = {"thermal_zone0": ("CPU-therm", "45500\n"), "thermal_zone1": ("GPU-therm", "garbage\n")}
    for name, (kind, temp) in zones.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "type").write_text(kind + "\n")
        (tmp_path / name / "temp").write_text(temp)
    (tmp_path / "thermal_zone2").mkdir()
    (tmp_path / "thermal_zone2" / "temp").mkdir()  # reading it fails, as an asleep sensor's EIO does
    metrics = Metrics(AppConfig(), thermal_root=tmp_path)
    found = samples(generate_latest(metrics.registry).decode())
    assert found["cxr_thermal_zone_temperature_celsius"] == [
        ({"zone": "thermal_zone0", "type": "CPU-therm"}, 45.5)
    ]
    without = samples(
        generate_latest(Metrics(AppConfig(), thermal_root=tmp_path / "absent").registry).decode()
    )
    assert "cxr_thermal_zone_temperature_celsius" not in without


def test_a_port_already_taken_is_logged_and_the_cart_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        metrics = Metrics(AppConfig.model_validate({"metrics": {"port": port}}))
        metrics.start(spool=None, publisher=None, analyzer=fake_analyzer())  # type: ignore[arg-type]
        metrics.close()
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text


def test_outbox_reports_how_long_its_oldest_message_waits(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    assert outbox.oldest_pending_age() == 0.0
    outbox.put("cxr/a", b"1", message_id="m1")
    outbox.put("cxr/a", b"2", message_id="m2")
    assert 0.0 <= outbox.oldest_pending_age() < 5.0
    outbox.mark_acked([row.id for row in outbox.pending()])
    assert outbox.oldest_pending_age() == 0.0
    outbox.close()


def test_the_dashboard_and_alert_rules_parse() -> None:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text(encoding="utf-8"))
    assert dashboard["panels"] and all(p.get("targets") or p["type"] == "row" for p in dashboard["panels"])
    rules = yaml.safe_load((DOCS / "prometheus-alerts.yml").read_text(encoding="utf-8"))
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert {"CxrCartDown", "CxrBacklogGrowing", "CxrOutboxStuck"} <= alerts


def test_readable_devfreq_clocks_are_exported_and_the_rest_skipped(tmp_path: Path) -> None:
    gpu = tmp_path / "17000000.ga10b"
    gpu.mkdir()
    (gpu / "cur_freq").write_text("306000000\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "cur_freq").write_text("n/a\n")
    metrics = Metrics(AppConfig(), thermal_root=tmp_path / "none", devfreq_root=tmp_path)
    found = samples(generate_latest(metrics.registry).decode())
    assert found["cxr_devfreq_clock_hertz"] == [({"device": "17000000.ga10b"}, 306e6)]
    without = Metrics(AppConfig(), devfreq_root=tmp_path / "absent")
    assert "cxr_devfreq_clock_hertz" not in generate_latest(without.registry).decode()
