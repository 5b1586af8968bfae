"""TLS listeners, configured by the same mosquitto directives for both brokers, with
certificates made by the test (needs the `cryptography` package of the test extra)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from support.brokers import BrokerHandle, Probe, broker_params, start_broker

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # signed by another CA
    rogue_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
                 issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
                 server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate,
           key: ec.EllipticCurvePrivateKey | None = None) -> tuple[Path, Path | None]:
    cert_path = directory / f"{name}.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = None
    if key is not None:
        key_path = directory / f"{name}.key"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    keys = {name: ec.generate_private_key(ec.SECP256R1())
            for name in ("ca", "server", "client", "rogue-ca", "rogue")}
    ca = _certificate("fabric test CA", keys["ca"], "fabric test CA", keys["ca"], ca=True)
    server = _certificate("localhost", keys["server"], "fabric test CA", keys["ca"], server=True)
    client = _certificate("node-1", keys["client"], "fabric test CA", keys["ca"])
    rogue = _certificate("node-1", keys["rogue"], "rogue CA", keys["rogue-ca"])
    ca_path, _ = _write(directory, "ca", ca)
    server_cert, server_key = _write(directory, "server", server, keys["server"])
    client_cert, client_key = _write(directory, "client", client, keys["client"])
    rogue_cert, rogue_key = _write(directory, "rogue", rogue, keys["rogue"])
    assert server_key and client_key and rogue_key
    return Pki(ca_path, server_cert, server_key, client_cert, client_key, rogue_cert, rogue_key)


@pytest.fixture(params=broker_params())
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def _tls_broker(kind: str, pki: Pki, directory: Path, *, require_certificate: bool
                ) -> BrokerHandle:
    config = (f"listener 8883 127.0.0.1\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
              f"cafile {pki.ca}\nrequire_certificate {str(require_certificate).lower()}\n"
              "allow_anonymous true\n")
    return start_broker(kind, config, directory=directory)


def _context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def _accepted(broker: BrokerHandle, context: ssl.SSLContext | None) -> bool:
    """True if a TLS (or, without context, plain) client gets a CONNACK and can round-trip."""
    topic = f"tls/{uuid.uuid4().hex[:8]}"
    try:
        client = Probe(broker.host, broker.port, f"tls-{uuid.uuid4().hex[:8]}", tls=context,
                       timeout=5.0)
    except (OSError, ssl.SSLError, TimeoutError):
        return False
    with client:
        if not client.accepted:
            return False
        try:
            client.subscribe(topic, 1)
            client.publish(topic, b"over tls", qos=1)
        except (TimeoutError, ValueError, RuntimeError):
            return False
        return client.wait_message(topic) is not None


@pytest.fixture
def tls_broker(kind: str, pki: Pki, tmp_path: Path) -> Iterator[BrokerHandle]:
    with _tls_broker(kind, pki, tmp_path, require_certificate=False) as broker:
        yield broker


def test_tls_listener_serves_clients_that_trust_its_ca(tls_broker: BrokerHandle,
                                                       pki: Pki) -> None:
    assert tls_broker.url.startswith("mqtts://")
    assert _accepted(tls_broker, _context(pki))


def test_tls_listener_refuses_plain_tcp_and_untrusting_clients(tls_broker: BrokerHandle,
                                                               pki: Pki) -> None:
    assert not _accepted(tls_broker, None)
    assert not _accepted(tls_broker, ssl.create_default_context())  # system CAs only


def test_required_client_certificates(kind: str, pki: Pki, tmp_path: Path) -> None:
    with _tls_broker(kind, pki, tmp_path, require_certificate=True) as broker:
        assert _accepted(broker, _context(pki, pki.client_cert, pki.client_key))
        assert not _accepted(broker, _context(pki))  # no client certificate
        assert not _accepted(broker, _context(pki, pki.rogue_cert, pki.rogue_key))


def test_fabric_nodes_and_cli_prove_who_they_are(kind: str, pki: Pki, tmp_path: Path) -> None:
    """`require_certificate true` end to end: a master, a node and the CLI, each with the CA,
    a client certificate and its key given as options; without a certificate the CLI is
    refused at once, saying why."""
    import subprocess
    import sys

    from support.fabric import Fabric, Proc, child_env

    tls = ["--ca-file", str(pki.ca), "--cert-file", str(pki.client_cert),
           "--key-file", str(pki.client_key)]
    with _tls_broker(kind, pki, tmp_path, require_certificate=True) as broker:
        fabric = Fabric(broker.url, tmp_path)
        try:
            fabric.master(*tls)
            node = fabric.node("tls-node", *tls)
            node.wait_for_output("ready on", timeout=30)
            submit = [sys.executable, "-m", "master.cli", "submit", "--broker", broker.url,
                      "--root", fabric.root, "echo", "over-tls"]
            done = subprocess.run(submit + tls, env=child_env(), capture_output=True,
                                  text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == '"over-tls"'
            started = time.monotonic()
            bare = subprocess.run(submit + ["--ca-file", str(pki.ca)], env=child_env(),
                                  capture_output=True, text=True, timeout=60)
            assert bare.returncode == 2
            took = time.monotonic() - started
            assert "cannot connect" in bare.stderr and "TLS handshake failed" in bare.stderr, \
                bare.stderr
            assert took < 5.0  # at once, not after the 10 s connect timeout
            print(f"refused without a certificate in {took:.1f} s: "
                  f"{bare.stderr.strip().splitlines()[-1]}")
            half = subprocess.run(submit + ["--cert-file", str(pki.client_cert)],
                                  env=child_env(), capture_output=True, text=True, timeout=60)
            assert half.returncode == 2 and "go together" in half.stderr, half.stderr
            assert isinstance(node, Proc)
        finally:
            fabric.cleanup()
