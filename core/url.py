"""Broker URLs: `mqtt://[user:password@]host:port` (or `mqtts://` for TLS), or a list of them.

A list names the members of one clustered broker, separated by commas (or spaces):
`mqtt://10.0.0.1:1883,mqtt://10.0.0.2:1883` or, sharing the first one's scheme and user,
`mqtt://user@10.0.0.1,10.0.0.2,10.0.0.3:1884`. A client connects to the first member that
answers and fails over to the next when it loses its member. Every member shares the list's
scheme and credentials (one cluster, one set of users), so they are given once.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import unquote, urlsplit

from core.errors import ConfigError

__all__ = ["BrokerUrl", "parse_broker_url", "BROKER_ENV", "DEFAULT_BROKER"]

BROKER_ENV = "FABRIC_BROKER"
DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
_SEPARATORS = re.compile(r"[,\s]+")


@dataclass(frozen=True)
class BrokerUrl:
    """A broker, or the first member of a broker list (`alternates`: the others' host, port)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    alternates: tuple[tuple[str, int], ...] = ()

    @property
    def members(self) -> tuple[BrokerUrl, ...]:
        """Every member as a broker of its own, in the order given, sharing the credentials."""
        first = BrokerUrl(host=self.host, port=self.port, username=self.username,
                          password=self.password, tls=self.tls)
        return (first, *(BrokerUrl(host=h, port=p, username=self.username,
                                   password=self.password, tls=self.tls)
                         for h, p in self.alternates))

    def __str__(self) -> str:
        auth = f"{self.username}:***@" if self.username else ""
        scheme = "mqtts" if self.tls else "mqtt"
        return ",".join([f"{scheme}://{auth}{self.host}:{self.port}",
                         *(f"{scheme}://{_host_text(h)}:{p}" for h, p in self.alternates)])


def _host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_broker_url(url: str | Iterable[str] | None, *,
                     env: dict[str, str] | None = None) -> BrokerUrl:
    """Parse a broker URL or list; with none given, fall back to $FABRIC_BROKER, then localhost.

    A list is one string with the URLs separated by commas or spaces, or a sequence of URLs.
    """
    environ = os.environ if env is None else env
    if url is not None and not isinstance(url, str):
        texts = [t for item in url for t in _split(str(item))]
        if not texts:
            raise ConfigError("broker list is empty: give at least one mqtt://HOST:PORT")
    else:
        texts = _split(url or environ.get(BROKER_ENV) or DEFAULT_BROKER)
        if not texts:
            texts = [DEFAULT_BROKER]
    first = _parse_one(texts[0])
    others = [_parse_one(text, scheme="mqtts" if first.tls else "mqtt") for text in texts[1:]]
    alternates: list[tuple[str, int]] = []
    for text, member in zip(texts[1:], others):
        if member.tls != first.tls:
            raise ConfigError(f"broker list: {text!r} mixes mqtt:// and mqtts://; every member "
                              "of one cluster takes the same scheme")
        if member.username is not None and (member.username, member.password) != \
                (first.username, first.password):
            raise ConfigError(f"broker list: {text!r} has credentials of its own; give the "
                              "user once, in the first URL (one cluster, one set of users)")
        if (member.host, member.port) == (first.host, first.port) or \
                (member.host, member.port) in alternates:
            raise ConfigError(f"broker list: {text!r} is named twice")
        alternates.append((member.host, member.port))
    return BrokerUrl(host=first.host, port=first.port, username=first.username,
                     password=first.password, tls=first.tls, alternates=tuple(alternates))


def _split(text: str) -> list[str]:
    return [part for part in _SEPARATORS.split(text.strip()) if part]


def _parse_one(text: str, *, scheme: str = "mqtt") -> BrokerUrl:
    """One URL; without a scheme it takes `scheme` (a list's members: the first one's)."""
    parts = urlsplit(text if "://" in text else f"{scheme}://{text}")
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
