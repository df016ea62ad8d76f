"""Configuration sections for the systems the cart talks to: the MQTT broker, the ward display, the
DICOM network (X-ray units in, PACS out) and Prometheus. Passwords never live in the YAML itself."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, SecretStr, model_validator

from appliance.config_base import Section, read_secret
from appliance.errors import ConfigError


class TlsConfig(Section):
    ca_file: Path | None = Field(None, description="CA certificate that signed the broker's certificate.")
    cert_file: Path | None = Field(None, description="Client certificate (mutual TLS).")
    key_file: Path | None = Field(None, description="Client key (mutual TLS).")
    insecure_skip_verify: bool = Field(False, description="Never on a ward network; for bench tests only.")


class MqttConfig(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    client_id: str | None = Field(None, description="Default: cxr-<site>-<device_id>.")
    username: str | None = None
    password_file: Path | None = Field(None, description="File holding the password (mode 0600).")
    password_env: str | None = Field(None, description="Environment variable holding the password.")
    tls: TlsConfig | None = None
    topic_prefix: str = Field(
        "cxr", description="Topics: <prefix>/<site>/<device_id>/{status,result,latest/<bed>}."
    )
    keepalive: int = Field(30, ge=5, le=3600)
    qos: Literal[0, 1, 2] = 1
    outbox_max: int = Field(
        100_000, ge=100, description="Outbox bound; beyond it the oldest unsent result is dropped and logged."
    )
    reconnect_max_seconds: float = Field(30.0, gt=0)
    heartbeat_seconds: float = Field(
        30.0,
        ge=5,
        le=3600,
        description="The retained status is sent again this often even when nothing changed: a display"
        " shows a cart as not reporting after three missed heartbeats (a hung cart or a cut network that"
        " the broker's last will has not noticed yet).",
    )
    publish_heatmap: bool = Field(True, description="Include the heatmap PNG (a few kB) in the result.")
    publish_thumbnail: bool = Field(
        True,
        description="Publish a <=256 px X-ray cropped to the thorax (no corner labels or burned-in text),"
        " retained on <prefix>/<site>/<device_id>/thumbnail/<bed>; on by default: it carries no identifying"
        " text and shows the ward which image a result belongs to.",
    )

    @model_validator(mode="after")
    def _one_password_source(self) -> MqttConfig:
        if self.password_file and self.password_env:
            raise ValueError("give password_file or password_env, not both")
        if (self.password_file or self.password_env) and not self.username:
            raise ValueError("a password needs a username")
        return self

    def password(self) -> SecretStr | None:
        if self.password_file:
            return read_secret(self.password_file, "mqtt.password_file")
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(f"mqtt.password_env: environment variable {self.password_env} is not set")
            return SecretStr(value)
        return None


class WebTlsConfig(Section):
    cert_file: Path = Field(description="PEM certificate (chain) the server presents.")
    key_file: Path = Field(description="PEM private key of cert_file.")


class PageAuthConfig(Section):
    username: str = Field(
        min_length=1, description="User the ward page's browser logs in as (HTTP basic auth)."
    )
    password_file: Path = Field(
        description="File holding that user's password (mode 0600); never the YAML itself."
    )

    def password(self) -> SecretStr:
        return read_secret(self.password_file, "display.auth.password_file")


class DisplayConfig(Section):
    host: str = Field("127.0.0.1", description="Address `cxr-appliance display` serves the ward page on.")
    port: int = Field(8080, ge=1, le=65535)
    broker_ws_url: str = Field(
        "ws://127.0.0.1:9001", description="Mosquitto WebSockets URL the page connects to."
    )
    site: str = Field("+", description="Which site's carts to show ('+' = every site on the broker).")
    name: str | None = Field(None, description="This display's name, sent with acknowledgements.")
    username: str | None = Field(
        None, description="The broker's display account (reads results, writes acks)."
    )
    password_file: Path | None = Field(
        None, description="Password of the display account (served to the page)."
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description="Host names the ward page is served under (e.g. the monitor's URL name); requests"
        " naming another host get 421 (DNS rebinding). None: loopback, this machine's names and `host`.",
    )
    tls: WebTlsConfig | None = Field(
        None, description="Serve the ward page over HTTPS (then give broker_ws_url as wss://)."
    )
    auth: PageAuthConfig | None = Field(
        None,
        description="Ask the browser for a user and password (the page's config holds the broker account's"
        " password: set this, with tls, when the page is served beyond loopback).",
    )

    def password(self) -> SecretStr | None:
        return read_secret(self.password_file, "display.password_file") if self.password_file else None


class DicomTlsConfig(Section):
    cert_file: Path = Field(description="PEM certificate this end presents.")
    key_file: Path = Field(description="PEM private key of cert_file.")
    ca_file: Path | None = Field(
        None,
        description="CA that signed the peer's certificate; given: the peer must present one (mutual TLS).",
    )


def _ae_title(value: str) -> str:
    """PS3.5 6.2 (AE): 1-16 characters of the default repertoire, no backslash (the value separator) or
    control characters; leading and trailing spaces do not count. pynetdicom refused a longer one only
    when the daemon started, with a traceback."""
    title = value.strip()
    if not 1 <= len(title) <= 16 or "\\" in title or not all(" " <= c <= "~" for c in title):
        raise ValueError(f"{value!r} is not a DICOM AE title: 1-16 printable ASCII characters, no backslash")
    return title


AETitle = Annotated[str, AfterValidator(_ae_title)]


class DicomNetConfig(Section):
    enabled: bool = False
    ae_title: AETitle = Field(
        "CXR_APPLIANCE", description="Our AE title; associations calling another are refused."
    )
    port: int = Field(11112, ge=1, le=65535)
    bind: str = Field(
        "127.0.0.1",
        description="Address to listen on. Loopback keeps the receiver off the network: give the cart's"
        " address on the modality network explicitly (and consider tls).",
    )
    allowed_calling_ae: list[AETitle] = Field(
        default_factory=list,
        description="Calling AE titles of the X-ray units allowed to send; required when enabled"
        " (no 'accept any' setting).",
    )
    receive_dir: Path | None = Field(
        None,
        description="Where received instances are written before the spool takes them "
        "(default: <ingest.spool>/dicom-in; keep it on the spool's filesystem).",
    )
    tls: DicomTlsConfig | None = Field(None, description="Accept DICOM over TLS only (server certificate).")

    @model_validator(mode="after")
    def _senders_listed(self) -> DicomNetConfig:
        # An empty list would let anything on the network that reaches the port store images.
        if self.enabled and not [t for t in self.allowed_calling_ae if t.strip()]:
            raise ValueError("allowed_calling_ae must list the X-ray units' AE titles when enabled")
        return self


class PacsConfig(Section):
    ae_title: AETitle = Field(description="The PACS's AE title (called AE).")
    host: str = Field(description="PACS host name or address.")
    port: int = Field(104, ge=1, le=65535)
    calling_ae_title: AETitle | None = Field(None, description="Default: dicom_net.ae_title.")
    timeout_seconds: float = Field(30.0, gt=0, description="Connection and response timeout.")
    retry_min_seconds: float = Field(5.0, gt=0, description="First wait after the PACS could not be reached.")
    retry_max_seconds: float = Field(
        300.0, gt=0, description="Longest wait between retries (backoff doubles)."
    )
    ca_file: Path | None = Field(None, description="Given: connect over TLS, trusting this CA.")
    cert_file: Path | None = Field(
        None,
        description="PEM certificate the cart presents to a PACS that requires one (mutual TLS; with key_file).",
    )
    key_file: Path | None = Field(None, description="PEM private key of cert_file.")
    failed_retries: int = Field(
        5,
        ge=0,
        description="How often a file the PACS refused (kept in failed/) is sent again before it stays there.",
    )
    failed_retry_seconds: float = Field(
        600.0,
        gt=0,
        description="First wait before a refused file is sent again (doubles each time, at most a day).",
    )

    @model_validator(mode="after")
    def _client_certificate(self) -> PacsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (the cart's certificate and its key)")
        if self.cert_file is not None and self.ca_file is None:
            raise ValueError(
                "cert_file is for TLS: give ca_file too (the CA that signed the PACS's certificate)"
            )
        return self


class DicomOutConfig(Section):
    enabled: bool = Field(False, description="Write a DICOM SR and Secondary Capture for each DICOM input.")
    outbox: Path = Field(
        Path("/var/lib/cxr-appliance/dicom-out"),
        description="Folder for the SR/SC files; queue/ inside holds those not yet accepted by the PACS.",
    )
    secondary_capture: bool = Field(True, description="Also write the image with the heatmap overlay.")
    manufacturer: str = Field("CXR appliance", description="Manufacturer written into the objects.")
    pacs: PacsConfig | None = Field(None, description="Send the objects by C-STORE here (None: folder only).")
    keep_days: float = Field(
        30, ge=0, description="Written SR/SC files are deleted after this, unless still queued for the PACS."
    )
    keep_unsent_days: float = Field(
        90,
        ge=0,
        description="Files the PACS never accepted (queue/, failed/) are deleted after this, with an error"
        " in the log.",
    )


class MetricsConfig(Section):
    enabled: bool = Field(True, description="Serve Prometheus metrics at http://<host>:<port>/metrics.")
    host: str = Field(
        "127.0.0.1",
        description="Address to listen on. Loopback keeps the metrics on the cart; give the cart's address on the"
        " monitoring network (or 0.0.0.0) only for a Prometheus elsewhere, and then set username/password_file.",
    )
    port: int = Field(9108, ge=1, le=65535, description="TCP port of the metrics endpoint.")
    username: str | None = Field(None, description="Given: HTTP basic auth with this user is required.")
    password_file: Path | None = Field(
        None, description="File holding the basic-auth password (mode 0600); never the YAML itself."
    )
    tls: WebTlsConfig | None = Field(
        None, description="Serve the metrics over HTTPS (https://<host>:<port>/metrics)."
    )

    @model_validator(mode="after")
    def _auth_complete(self) -> MetricsConfig:
        if bool(self.username) != bool(self.password_file):
            raise ValueError("basic auth needs both username and password_file")
        return self

    def password(self) -> SecretStr | None:
        return read_secret(self.password_file, "metrics.password_file") if self.password_file else None
