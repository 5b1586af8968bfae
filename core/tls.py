"""TLS settings of one end of an MQTT connection, the same type for clients and the broker.

A client gives the CA that signed the broker's certificate and, when the broker requires
one, its own certificate and key (`insecure` skips checking the broker's name and chain).
A broker listener gives its certificate and key and, to check clients, a CA file or
directory, whether a client certificate is required, a minimum TLS version and ciphers:
mosquitto's listener options, which the embedded broker reads from the same file.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TlsSettings"]


@dataclass(frozen=True)
class TlsSettings:
    """Files are paths as given; fields a side does not use keep their defaults."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False  # client: do not check the broker's certificate
    ca_path: str | None = None  # broker: a directory of CA certificates
    require_certificate: bool = False  # broker: refuse clients without a certificate
    tls_version: str | None = None  # broker: the lowest version accepted ("tlsv1.2")
    ciphers: str | None = None  # broker: an OpenSSL cipher list
