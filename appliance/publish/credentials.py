"""How every MQTT client of the appliance (publisher, `doctor`, `usb-import`) logs in to the broker:
the configured account and, when mqtt.tls is set, TLS with the configured CA and client certificate."""

from __future__ import annotations

import logging
import ssl

import paho.mqtt.client as mqtt

from appliance.config import MqttConfig
from appliance.errors import ConfigError

log = logging.getLogger(__name__)


def tls_context(config: MqttConfig) -> ssl.SSLContext | None:
    tls = config.tls
    if tls is None:
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"mqtt.tls.ca_file {tls.ca_file}: cannot load: {exc}") from exc
    if tls.cert_file or tls.key_file:
        if not tls.cert_file:
            raise ConfigError("mqtt.tls.key_file needs mqtt.tls.cert_file")
        try:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"mqtt.tls.cert_file {tls.cert_file}: cannot load: {exc}") from exc
    if tls.insecure_skip_verify:
        log.warning("mqtt.tls.insecure_skip_verify is on: the broker's certificate is NOT checked")
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def apply_credentials(client: mqtt.Client, config: MqttConfig) -> None:
    """Username/password and TLS on a client not yet connected; ConfigError when a file cannot be read."""
    password = config.password()
    if config.username:
        client.username_pw_set(config.username, password.get_secret_value() if password else None)
    ctx = tls_context(config)
    if ctx is not None:
        client.tls_set_context(ctx)
