"""Broker credentials and client certificates from files or the environment, never the URL.

A password in `--broker mqtt://user:PASSWORD@host` is visible to every user of the machine in
`ps`. Instead the user name stays in the URL and the password comes from a file
(`--password-file`, first line, mode 0600 advised) or from `$FABRIC_PASSWORD`, which is read
once and removed from the process environment so nothing the process runs inherits it.
TLS clients prove who they are with a certificate and key (`--cert-file`, `--key-file`) and
check the broker against a CA (`--ca-file`); any of them turns TLS on.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, MutableMapping

from core.errors import ConfigError
from core.mqtt import TlsSettings
from core.url import BrokerUrl

__all__ = ["PASSWORD_ENV", "read_password_file", "with_password", "add_security_options",
           "broker_from_args", "tls_from_args"]

PASSWORD_ENV = "FABRIC_PASSWORD"


def read_password_file(path: str | os.PathLike[str]) -> str:
    """The first line of a password file, without its line break; empty or unreadable is an
    error naming the file (never its content)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"password file {file}: cannot read it: {e}") from e
    password = text.split("\n", 1)[0].rstrip("\r")
    if not password:
        raise ConfigError(f"password file {file}: the first line is empty")
    return password


def with_password(url: BrokerUrl, *, password_file: str | os.PathLike[str] | None = None,
                  environ: MutableMapping[str, str] | None = None) -> BrokerUrl:
    """`url` with its password from `password_file`, else `$FABRIC_PASSWORD` (then removed from
    `environ`), else as given. A password needs a user name, in the URL."""
    env = os.environ if environ is None else environ
    password = None
    if password_file is not None:
        password = read_password_file(password_file)
    elif env.get(PASSWORD_ENV):
        password = env.pop(PASSWORD_ENV)
    if password is None:
        return url
    if not url.username:
        raise ConfigError("a password was given but the broker URL names no user: use "
                          "mqtt://USER@host:port")
    return replace(url, password=password)


def add_security_options(parser: argparse.ArgumentParser) -> None:
    """--password-file, --ca-file, --cert-file, --key-file."""
    parser.add_argument("--password-file", type=Path, metavar="FILE",
                        help=f"the broker password, first line of FILE (or set ${PASSWORD_ENV}); "
                             "the user name goes in the URL: mqtt://USER@host:port")
    parser.add_argument("--ca-file", type=Path, metavar="FILE",
                        help="TLS: the CA certificate(s) the broker's certificate must chain to")
    parser.add_argument("--cert-file", type=Path, metavar="FILE",
                        help="TLS: this client's certificate (for require_certificate true)")
    parser.add_argument("--key-file", type=Path, metavar="FILE",
                        help="TLS: the private key of --cert-file")


def broker_from_args(url: BrokerUrl, args: Any) -> BrokerUrl:
    """`url` with the password of `args.password_file` / `$FABRIC_PASSWORD`, and TLS on if
    any TLS file was given."""
    url = with_password(url, password_file=getattr(args, "password_file", None))
    if tls_from_args(args) is not None and not url.tls:
        url = replace(url, tls=True)
    return url


def tls_from_args(args: Any) -> TlsSettings | None:
    """The client TLS settings of --ca-file/--cert-file/--key-file; None if none was given."""
    ca, cert, key = (getattr(args, name, None) for name in ("ca_file", "cert_file", "key_file"))
    if ca is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        raise ConfigError("--cert-file and --key-file go together")
    for what, path in (("--ca-file", ca), ("--cert-file", cert), ("--key-file", key)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{what} {path}: no such file")
    return TlsSettings(ca_file=str(ca) if ca else None, cert_file=str(cert) if cert else None,
                       key_file=str(key) if key else None)
