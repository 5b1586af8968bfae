"""Broker URLs: `mqtt://[user:password@]host:port` (or `mqtts://` for TLS)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from core.errors import ConfigError

__all__ = ["BrokerUrl", "parse_broker_url", "BROKER_ENV", "DEFAULT_BROKER"]

BROKER_ENV = "FABRIC_BROKER"
DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


@dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    def __str__(self) -> str:
        auth = f"{self.username}:***@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{auth}{self.host}:{self.port}"


def parse_broker_url(url: str | None, *, env: dict[str, str] | None = None) -> BrokerUrl:
    """Parse a broker URL; with none given, fall back to $FABRIC_BROKER, then localhost."""
    environ = os.environ if env is None else env
    text = url or environ.get(BROKER_ENV) or DEFAULT_BROKER
    parts = urlsplit(text if "://" in text else f"mqtt://{text}")
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(f"broker URL {text!r}: scheme must be mqtt:// or mqtts://")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as e:
        raise ConfigError(f"broker URL {text!r}: bad port") from e
    if not parts.hostname:
        raise ConfigError(f"broker URL {text!r}: no host")
    if parts.path not in ("", "/"):
        raise ConfigError(f"broker URL {text!r}: unexpected path {parts.path!r}")
    return BrokerUrl(host=parts.hostname, port=port,
                     username=unquote(parts.username) if parts.username else None,
                     password=unquote(parts.password) if parts.password else None, tls=tls)
