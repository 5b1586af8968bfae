"""Run the embedded broker (amqtt plus `FabricBroker`'s fixes) from a `BrokerConfig`.

amqtt is configured programmatically here, never through its YAML (whose unknown keys are
fatal): listeners become `ServerSpec`s with TLS contexts built the way mosquitto builds them,
and authentication and ACLs are the mosquitto-file plugins of `broker.plugins`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import ssl
import sys
from types import TracebackType
from typing import Any, Callable

from amqtt.errors import BrokerError as AmqttBrokerError

from broker.acl import AclFile
from broker.amqtt_privates import check_amqtt
from broker.conf import BrokerConfig, Listener
from broker.errors import BrokerConfigError, BrokerStartError
from broker.fixes import FabricBroker, ServerSpec
from broker.passwd import PasswordFile
from broker.plugins import ReloadingFile
from core.tls import TlsSettings

__all__ = ["EmbeddedBroker", "run_broker", "check_anonymous_policy", "tls_context"]

log = logging.getLogger("broker")
SHUTDOWN_TIMEOUT = 10.0

_TLS_MINIMUM = {"tlsv1.1": ssl.TLSVersion.TLSv1_1, "tlsv1.2": ssl.TLSVersion.TLSv1_2,
                "tlsv1.3": ssl.TLSVersion.TLSv1_3}


def _start_failure(cause: BaseException) -> str:
    """Why listening failed, in one line: a busy port says which and what to do."""
    if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
        found = re.search(r"\('([^']*)', (\d+)", str(cause))
        where = f"{found.group(1)}:{found.group(2)}" if found else "a listener's port"
        return (f"{where}: address already in use (is another broker or "
                "master-node serve running? stop it, or pick another port with --port)")
    return str(cause) or type(cause).__name__


def check_anonymous_policy(config: BrokerConfig, *, allow_remote_anonymous: bool = False) -> None:
    """Anonymous access is for loopback listeners; refuse it elsewhere unless overridden, and
    then warn loudly on stderr."""
    remote = config.remote_listeners
    if not config.allow_anonymous or not remote:
        return
    names = ", ".join(f"{item.bind_address or '*'}:{item.port}" for item in remote)
    if not allow_remote_anonymous:
        where = str(config.source) if config.source else "<config>"
        raise BrokerConfigError(
            f"{where}: allow_anonymous true with listener(s) other machines can reach ({names}):"
            " anyone on the network could connect. Bind them to 127.0.0.1, or set "
            "allow_anonymous false and use a password_file, or pass --allow-remote-anonymous.")
    banner = "!" * 72
    # on stderr whatever log_dest says: this must not be silenced by a logging setting
    print(f"{banner}\nWARNING: ANONYMOUS ACCESS FROM THE NETWORK IS ON ({names}): any host that "
          f"reaches these listeners can publish and subscribe without a password.\n{banner}",
          file=sys.stderr, flush=True)


def tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """A server context as mosquitto sets one up: client certificates only with a CA given,
    and required only with `require_certificate true`."""
    if tls.cert_file is None or tls.key_file is None:
        raise ValueError("a listener's TLS needs certfile and keyfile")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file or tls.ca_path:
        context.load_verify_locations(cafile=tls.ca_file, capath=tls.ca_path)
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_certificate else ssl.CERT_NONE
    if tls.tls_version:
        context.minimum_version = _TLS_MINIMUM[tls.tls_version]
    if tls.ciphers:
        context.set_ciphers(tls.ciphers)
    return context


def _server_spec(config: BrokerConfig, listener: Listener) -> ServerSpec:
    host = listener.bind_address
    if host is None and (listener.socket_domain or listener.port == 0):
        # every interface; with port 0 on one family only, or IPv4 and IPv6 would each get a
        # different free port and the READY line could name only one of them
        host = "::" if listener.socket_domain == "ipv6" else "0.0.0.0"
    context = None
    if listener.tls is not None:
        try:
            context = tls_context(listener.tls)
        except (OSError, ssl.SSLError, ValueError) as e:
            where = str(config.source) if config.source else "<config>"
            raise BrokerConfigError(f"{where}:{listener.line}: listener {listener.port}: cannot "
                                    f"set up TLS: {e}") from e
    return ServerSpec(host=host, port=listener.port, ssl_context=context,
                      max_connections=listener.max_connections)


def _amqtt_settings(config: BrokerConfig, *, passwords: ReloadingFile[PasswordFile] | None,
                    trusted: ReloadingFile[PasswordFile] | None,
                    acl: ReloadingFile[AclFile] | None
                    ) -> tuple[dict[str, Any], dict[str, ServerSpec]]:
    listeners: dict[str, Any] = {}
    servers: dict[str, ServerSpec] = {}
    for index, listener in enumerate(config.listeners):
        name = "default" if index == 0 else f"listener-{index}"
        spec = _server_spec(config, listener)
        host = spec.host or ""
        listeners[name] = {"type": "tcp",
                           "bind": f"[{host}]:{spec.port}" if ":" in host else f"{host}:{spec.port}"}
        servers[name] = spec
    plugins: dict[str, Any] = {
        "broker.plugins.PasswordFileAuthPlugin": {
            "allow_anonymous": config.allow_anonymous, "passwords": passwords,
            "trusted": trusted,
        },
    }
    if acl is not None:
        plugins["broker.plugins.AclFilePlugin"] = {"acl": acl}
    return {"listeners": listeners, "plugins": plugins}, servers


class EmbeddedBroker:
    """The broker inside the running event loop: `async with EmbeddedBroker(config) as b:`."""

    def __init__(self, config: BrokerConfig, *, allow_remote_anonymous: bool = False) -> None:
        self.config = config
        self._allow_remote_anonymous = allow_remote_anonymous
        self._broker: FabricBroker | None = None

    @property
    def broker(self) -> FabricBroker:
        if self._broker is None:
            raise BrokerStartError("the broker is not started")
        return self._broker

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every listening socket, in listener order, ports resolved."""
        return [(host, port) for _, host, port in self.broker.bound_addresses()]

    async def start(self) -> None:
        """Validate, then listen; a bad file or a busy port is an error, never half a broker,
        and so is an amqtt other than the one the fixes are written against."""
        check_amqtt()
        config = self.config
        check_anonymous_policy(config, allow_remote_anonymous=self._allow_remote_anonymous)
        # each file read once, here: a bad one stops the start; the plugins get what was read
        passwords, trusted = (None if path is None else ReloadingFile(path, PasswordFile.load)
                              for path in (config.password_file, config.trusted_file))
        acl = None if config.acl_file is None else ReloadingFile(config.acl_file, AclFile.load)
        settings, servers = _amqtt_settings(config, passwords=passwords, trusted=trusted,
                                            acl=acl)
        broker = FabricBroker(settings, servers=servers, max_packet_size=config.max_packet_size,
                              max_queued_messages=config.max_queued_messages,
                              connection_messages=config.connection_messages,
                              use_username_as_clientid=config.use_username_as_clientid,
                              bind_identity=config.password_file is not None)
        amqtt_log = logging.getLogger("amqtt.broker")
        level = amqtt_log.level
        amqtt_log.setLevel(logging.CRITICAL)  # its traceback of the cause we report ourselves
        try:
            await broker.start()
        except AmqttBrokerError as e:
            raise BrokerStartError(_start_failure(e.__cause__ or e)) from e
        finally:
            amqtt_log.setLevel(level)
        self._broker = broker

    async def stop(self) -> None:
        """Shut down within `SHUTDOWN_TIMEOUT`; connections still open then are dropped."""
        broker, self._broker = self._broker, None
        if broker is None:
            return
        try:
            await asyncio.wait_for(broker.shutdown(), SHUTDOWN_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("broker shutdown took over %.0f s; dropping connections", SHUTDOWN_TIMEOUT)
            for server in broker._servers.values():
                server.instance.close()

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


async def run_broker(config: BrokerConfig, *, stop_event: asyncio.Event | None = None,
                     allow_remote_anonymous: bool = False,
                     on_ready: Callable[[list[tuple[str, int]]], None] | None = None) -> None:
    """Serve until `stop_event` is set (forever without one); `on_ready` gets the addresses
    once connections are accepted."""
    async with EmbeddedBroker(config, allow_remote_anonymous=allow_remote_anonymous) as broker:
        if on_ready is not None:
            on_ready(broker.addresses)
        await (stop_event or asyncio.Event()).wait()
