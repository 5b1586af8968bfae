"""Read mosquitto's config syntax into a frozen `BrokerConfig`.

One `broker.conf` configures both the embedded broker and mosquitto, so this parser follows
mosquitto 2.0's own reading of the file, and refuses what the embedded broker cannot honour
instead of silently ignoring it:

- `#` starts a comment only as the very first character of a line; blank lines are skipped.
- Tokens are separated by spaces. Tabs are refused: mosquitto does not split on them, so a
  tab would make the same line mean something else to each broker.
- Path values are the rest of the line. Relative paths resolve against the working directory,
  as mosquitto 2.0 opens them (it does not use the config file's directory); they are made
  absolute here so a broker started later, elsewhere, reads the same files.
- Listener options (`certfile`, `keyfile`, `cafile`, `require_certificate`...) apply to the
  most recent `listener` line. With no `listener` line at all mosquitto runs in "local only"
  mode: port 1883 on the loopback interface, anonymous access allowed. So does this parser.
- A directive mosquitto knows but the embedded broker does not implement, an unknown
  directive, and a bad value all raise `BrokerConfigError` naming file, line and directive.
"""

from __future__ import annotations

import ipaddress
import json
import os
import types
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Union, get_args, get_origin, get_type_hints

from broker.errors import BrokerConfigError
from core.tls import TlsSettings

__all__ = [
    "BrokerConfig",
    "Listener",
    "TlsSettings",
    "load_config",
    "parse_config",
    "DEFAULT_PORT",
    "LOCAL_ONLY_ADDRESS",
]

DEFAULT_PORT = 1883
LOCAL_ONLY_ADDRESS = "127.0.0.1"
MAX_PACKET_SIZE_LIMIT = 268_435_455  # the largest packet MQTT can frame
_LOG_TYPES = frozenset({"error", "warning", "notice", "information", "debug", "subscribe",
                        "unsubscribe", "websockets", "all", "none"})
_TLS_VERSIONS = frozenset({"tlsv1.1", "tlsv1.2", "tlsv1.3"})

# Every directive mosquitto 2.0 reads, so an unsupported one is told apart from a typo.
_MOSQUITTO_DIRECTIVES = frozenset({
    "acl_file", "address", "addresses", "allow_anonymous", "allow_duplicate_messages",
    "allow_zero_length_clientid", "auth_plugin", "auth_plugin_deny_special_chars",
    "auto_id_prefix", "autosave_interval", "autosave_on_changes", "bind_address",
    "bind_interface", "bridge_alpn", "bridge_attempt_unsubscribe", "bridge_bind_address",
    "bridge_cafile", "bridge_capath", "bridge_certfile", "bridge_identity", "bridge_insecure",
    "bridge_keyfile", "bridge_max_packet_size", "bridge_outgoing_retain",
    "bridge_protocol_version", "bridge_psk", "bridge_require_ocsp", "bridge_tls_version",
    "cafile", "capath", "certfile", "check_retain_source", "ciphers", "ciphers_tls1.3",
    "cleansession", "clientid", "clientid_prefixes", "connection", "connection_messages",
    "crlfile", "dhparamfile", "http_dir", "idle_timeout", "include_dir", "keepalive_interval",
    "keyfile", "listener", "local_cleansession", "local_clientid", "local_password",
    "local_username", "log_dest", "log_facility", "log_timestamp", "log_timestamp_format",
    "log_type", "max_connections", "max_inflight_bytes", "max_inflight_messages",
    "max_keepalive", "max_packet_size", "max_qos", "max_queued_bytes", "max_queued_messages",
    "max_topic_alias", "memory_limit", "message_size_limit", "mount_point", "notification_topic",
    "notifications", "notifications_local_only", "password", "password_file",
    "per_listener_settings", "persistence", "persistence_file", "persistence_location",
    "persistent_client_expiration", "pid_file", "plugin", "port", "protocol", "psk_file",
    "psk_hint", "queue_qos0_messages", "remote_clientid", "remote_password", "remote_username",
    "require_certificate", "restart_timeout", "retain_available", "retained_persistence",
    "round_robin", "set_tcp_nodelay", "socket_domain", "start_type", "sys_interval",
    "threshold", "tls_engine", "tls_engine_kpass_sha1", "tls_keyform", "tls_version", "topic",
    "try_private", "upgrade_outgoing_qos", "use_identity_as_username",
    "use_subject_as_username", "use_username_as_clientid", "user", "username",
    "websockets_headers_size", "websockets_log_level",
})
_MOSQUITTO_PREFIXES = ("auth_opt_", "plugin_opt_")


@dataclass(frozen=True)
class Listener:
    """One TCP listener: `listener <port> [<bind address>]` and the options that follow it."""

    port: int
    bind_address: str | None = None
    tls: TlsSettings | None = None
    socket_domain: str | None = None
    max_connections: int | None = None  # None: no cap (mosquitto's -1)
    line: int = 0

    @property
    def is_loopback(self) -> bool:
        """True when only this machine can reach the listener."""
        return is_loopback_address(self.bind_address)

    @property
    def connect_host(self) -> str:
        """An address a local client can dial to reach this listener."""
        if self.bind_address in (None, "", "0.0.0.0"):
            return "::1" if self.socket_domain == "ipv6" else LOCAL_ONLY_ADDRESS
        if self.bind_address == "::":
            return "::1"
        return self.bind_address


@dataclass(frozen=True)
class BrokerConfig:
    """What both brokers are told by one mosquitto-syntax file; immutable, override by copy."""

    listeners: tuple[Listener, ...] = (Listener(DEFAULT_PORT, LOCAL_ONLY_ADDRESS),)
    allow_anonymous: bool = False
    password_file: Path | None = None
    acl_file: Path | None = None
    max_packet_size: int | None = None
    max_keepalive: int = 65535
    max_queued_messages: int = 1000
    persistence: bool = False
    set_tcp_nodelay: bool = False
    connection_messages: bool = True
    log_dest: tuple[str, ...] = ("stderr",)
    log_file: Path | None = None
    log_types: tuple[str, ...] = ("error", "warning", "notice", "information")
    log_timestamp: bool = True
    log_timestamp_format: str | None = None
    pid_file: Path | None = None
    use_username_as_clientid: bool = False
    # not a mosquitto directive: the `user:hash` file of the credential `serve` generates for
    # its own master, which passes every ACL (see broker.trusted)
    trusted_file: Path | None = None
    source: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.listeners:
            raise BrokerConfigError(f"{self._where()}: no listener")

    def _where(self) -> str:
        return str(self.source) if self.source else "<config>"

    def with_port(self, port: int, *, listener: int = 0) -> BrokerConfig:
        """A copy listening on `port` (0: any free port) instead of the file's port."""
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise BrokerConfigError(f"{self._where()}: port override {port!r}: not 0-65535")
        return self._with_listener(listener, port=port)

    def with_bind(self, address: str | None, *, listener: int = 0) -> BrokerConfig:
        """A copy whose listener binds `address` (None: every interface)."""
        return self._with_listener(listener, bind_address=address or None)

    def with_overrides(self, **changes: Any) -> BrokerConfig:
        """A copy with fields replaced (e.g. `allow_anonymous=False`); names are checked."""
        unknown = set(changes) - set(self.__dataclass_fields__)
        if unknown:
            raise BrokerConfigError(f"{self._where()}: no such setting: {', '.join(sorted(unknown))}")
        return replace(self, **changes)

    def _with_listener(self, index: int, **changes: Any) -> BrokerConfig:
        if not 0 <= index < len(self.listeners):
            raise BrokerConfigError(f"{self._where()}: no listener #{index}")
        listeners = list(self.listeners)
        listeners[index] = replace(listeners[index], **changes)
        return replace(self, listeners=tuple(listeners))

    @property
    def remote_listeners(self) -> tuple[Listener, ...]:
        """Listeners other machines can reach."""
        return tuple(item for item in self.listeners if not item.is_loopback)

    def to_json(self) -> str:
        """The parsed settings as JSON, for a broker process started with them: the file is
        read once, by whoever starts the broker (`from_json` reads this back)."""
        return json.dumps(_encode(self))

    @classmethod
    def from_json(cls, text: str) -> BrokerConfig:
        """Settings written by `to_json`; anything else is a `BrokerConfigError`."""
        try:
            config = _decode(cls, json.loads(text))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise BrokerConfigError(f"broker settings are not those of to_json: {e!r}") from e
        if not isinstance(config, cls):
            raise BrokerConfigError("broker settings are not those of to_json")
        return config


def _encode(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {item.name: _encode(getattr(value, item.name)) for item in fields(value)}
    if isinstance(value, tuple):
        return [_encode(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _decode(kind: Any, value: Any) -> Any:
    """`value` (from JSON) as the field type `kind`: dataclasses, tuples, paths, optionals."""
    if value is None:
        return None
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        (inner,) = (arg for arg in get_args(kind) if arg is not type(None))
        return _decode(inner, value)
    if origin is tuple:
        return tuple(_decode(get_args(kind)[0], item) for item in value)
    if kind is Path:
        return Path(value)
    if is_dataclass(kind):
        hints = get_type_hints(kind)
        return kind(**{name: _decode(hints[name], item) for name, item in value.items()})
    return value


def is_loopback_address(address: str | None) -> bool:
    """True for `localhost` and loopback IPs; None (every interface) and host names are not."""
    if address is None:
        return False
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def load_config(path: str | os.PathLike[str], *, base_dir: Path | None = None) -> BrokerConfig:
    """Parse a mosquitto config file; a missing file is a `BrokerConfigError` too."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BrokerConfigError(f"{file}: cannot read broker config: {e}") from e
    return parse_config(text, source=file, base_dir=base_dir)


def parse_config(text: str, *, source: str | os.PathLike[str] | None = None,
                 base_dir: Path | None = None) -> BrokerConfig:
    """Parse mosquitto config text; `base_dir` (default: working directory) anchors paths."""
    return _Parser(Path(source) if source is not None else None,
                   base_dir or Path.cwd()).parse(text)


# -- the parser ------------------------------------------------------------------------------

@dataclass
class _ListenerDraft:
    port: int
    bind_address: str | None
    line: int
    options: dict[str, Any] = field(default_factory=dict)


class _Parser:
    """One pass over the lines; a handler per directive, each validating its own value."""

    def __init__(self, source: Path | None, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir
        self.settings: dict[str, Any] = {}
        self.listeners: list[_ListenerDraft] = []
        self.log_dest: list[str] = []
        self.log_types: list[str] = []
        self.line = 0
        self.directive = ""
        self.handlers: dict[str, Callable[[list[str], str], None]] = {
            "acl_file": self._path_setting,
            "allow_anonymous": self._bool_setting,
            "allow_zero_length_clientid": self._only("true", why="the embedded broker always "
                                                     "assigns ids to clients that send none"),
            "autosave_interval": self._int_setting(0, None, store=False),
            "autosave_on_changes": self._bool_setting_ignored,
            "check_retain_source": self._bool_setting_ignored,
            "connection_messages": self._bool_setting,
            "log_dest": self._log_dest,
            "log_timestamp": self._bool_setting,
            "log_timestamp_format": self._string_setting,
            "log_type": self._log_type,
            # mosquitto 2.0 applies max_keepalive to MQTT 5 clients only; this broker speaks
            # 3.1.1, so the value is checked and kept but changes nothing
            "max_keepalive": self._int_setting(0, 65535),
            "max_packet_size": self._int_setting(20, MAX_PACKET_SIZE_LIMIT),
            "max_queued_messages": self._int_setting(0, None),
            "password_file": self._path_setting,
            "per_listener_settings": self._only("false", why="per-listener security is not "
                                                "implemented; use one password_file and "
                                                "acl_file for every listener"),
            "persistence": self._persistence,
            "retained_persistence": self._persistence,
            "persistence_file": self._string_ignored,
            "persistence_location": self._string_ignored,
            "pid_file": self._path_setting,
            "queue_qos0_messages": self._only("false", why="QoS 0 messages are never queued "
                                              "for offline clients"),
            "set_tcp_nodelay": self._bool_setting,  # the embedded broker always sets it
            "sys_interval": self._sys_interval,
            "upgrade_outgoing_qos": self._only("false", why="messages are delivered at "
                                               "min(publish QoS, subscription QoS) as MQTT "
                                               "requires"),
            "use_username_as_clientid": self._bool_setting,
            "listener": self._listener,
            "cafile": self._listener_path,
            "capath": self._listener_path,
            "certfile": self._listener_path,
            "keyfile": self._listener_path,
            "ciphers": self._listener_string,
            "require_certificate": self._listener_bool,
            "tls_version": self._listener_choice(_TLS_VERSIONS),
            "socket_domain": self._listener_choice(frozenset({"ipv4", "ipv6"})),
            "protocol": self._listener_choice(frozenset({"mqtt"}), unsupported={
                "websockets": "websockets listeners are not implemented"}),
            "max_connections": self._listener_max_connections,
        }

    # -- driving

    def parse(self, text: str) -> BrokerConfig:
        for self.line, raw in enumerate(text.splitlines(), start=1):
            if not raw or raw[0] == "#" or not raw.strip():
                continue
            if "\t" in raw:
                self.directive = raw.split(" ", 1)[0].split("\t", 1)[0]
                raise self.error("contains a tab; mosquitto separates values by spaces only")
            line = raw.rstrip(" \r\n")
            name, _, rest = line.lstrip(" ").partition(" ")
            self.directive = name
            rest = rest.lstrip(" ")
            handler = self.handlers.get(name)
            if handler is None:
                if name in _MOSQUITTO_DIRECTIVES or name.startswith(_MOSQUITTO_PREFIXES):
                    raise self.error("known to mosquitto but not supported by the embedded "
                                     "broker")
                raise self.error("unknown directive")
            handler(rest.split(" ") if rest else [], rest)
        self.line, self.directive = 0, ""
        return self._build()

    def error(self, message: str) -> BrokerConfigError:
        where = str(self.source) if self.source else "<config>"
        if self.line:
            where += f":{self.line}"
        if self.directive:
            where += f": {self.directive}"
        return BrokerConfigError(f"{where}: {message}")

    # -- value helpers

    def _one(self, args: list[str]) -> str:
        if len(args) != 1:
            raise self.error("expects exactly one value" if args else "missing value")
        return args[0]

    def _bool(self, args: list[str]) -> bool:
        value = self._one(args)
        if value not in ("true", "false"):
            raise self.error(f"invalid value {value!r}: use true or false")
        return value == "true"

    def _int(self, args: list[str], low: int, high: int | None) -> int:
        value = self._one(args)
        try:
            number = int(value, 10)
        except ValueError:
            raise self.error(f"invalid value {value!r}: not an integer") from None
        if number < low or (high is not None and number > high):
            bound = f"{low}-{high}" if high is not None else f">= {low}"
            raise self.error(f"invalid value {number}: must be {bound}")
        return number

    def _path(self, rest: str) -> Path:
        if not rest:
            raise self.error("missing path")
        path = Path(rest)
        return path if path.is_absolute() else (self.base_dir / path)

    def _store(self, target: dict[str, Any], value: Any, *, unique: bool) -> None:
        if unique and self.directive in target:
            raise self.error("given twice (mosquitto refuses duplicate values)")
        target[self.directive] = value

    # -- global settings

    def _bool_setting(self, args: list[str], rest: str) -> None:
        self._store(self.settings, self._bool(args), unique=False)

    def _bool_setting_ignored(self, args: list[str], rest: str) -> None:
        self._bool(args)  # validated; no effect on a broker without persistence

    def _int_setting(self, low: int, high: int | None, *,
                     store: bool = True) -> Callable[[list[str], str], None]:
        def handler(args: list[str], rest: str) -> None:
            value = self._int(args, low, high)
            if store:
                self._store(self.settings, value, unique=False)
        return handler

    def _path_setting(self, args: list[str], rest: str) -> None:
        self._store(self.settings, self._path(rest), unique=True)

    def _string_setting(self, args: list[str], rest: str) -> None:
        if not rest:
            raise self.error("missing value")
        self._store(self.settings, rest, unique=True)

    def _string_ignored(self, args: list[str], rest: str) -> None:
        if not rest:
            raise self.error("missing value")

    def _only(self, accepted: str, *, why: str) -> Callable[[list[str], str], None]:
        def handler(args: list[str], rest: str) -> None:
            value = "true" if self._bool(args) else "false"
            if value != accepted:
                raise self.error(f"{value} is not supported by the embedded broker: {why}")
        return handler

    def _persistence(self, args: list[str], rest: str) -> None:
        if self._bool(args):
            raise self.error("true is not supported by the embedded broker, which keeps no "
                             "state on disk (the master keeps its own journal); use false")
        self.settings["persistence"] = False

    def _sys_interval(self, args: list[str], rest: str) -> None:
        if self._int(args, 0, 65535) != 0:
            raise self.error("the embedded broker publishes no $SYS tree; use 0 or leave it out")

    def _log_dest(self, args: list[str], rest: str) -> None:
        if not args:
            raise self.error("missing value")
        kind = args[0]
        if kind in ("stdout", "stderr", "none"):
            if len(args) != 1:
                raise self.error(f"{kind} takes no argument")
            self.log_dest.append(kind)
        elif kind == "file":
            if "log_file" in self.settings:
                raise self.error("only one file destination is allowed")
            self.settings["log_file"] = self._path(rest[len("file"):].lstrip(" "))
            self.log_dest.append("file")
        elif kind in ("syslog", "topic", "dlt"):
            raise self.error(f"{kind} is not supported by the embedded broker: use stdout, "
                             "stderr, file or none")
        else:
            raise self.error(f"invalid destination {kind!r}")

    def _log_type(self, args: list[str], rest: str) -> None:
        value = self._one(args)
        if value not in _LOG_TYPES:
            raise self.error(f"invalid log type {value!r}")
        self.log_types.append(value)

    # -- listeners

    def _listener(self, args: list[str], rest: str) -> None:
        if not args:
            raise self.error("missing port")
        if len(args) > 2:
            raise self.error("expects <port> [<bind address>]")
        port = self._int(args[:1], 0, 65535)
        address = args[1] if len(args) == 2 else None
        if port == 0 or (address is not None and "/" in address):
            raise self.error("unix socket listeners are not supported by the embedded broker")
        for draft in self.listeners:
            if draft.port == port and draft.bind_address == address:
                raise self.error(f"duplicates the listener on line {draft.line}")
        self.listeners.append(_ListenerDraft(port, address, self.line))

    def _current_listener(self) -> _ListenerDraft:
        if not self.listeners:
            raise self.error("must follow a `listener` line (the embedded broker has no "
                             "implicit default listener)")
        return self.listeners[-1]

    def _listener_path(self, args: list[str], rest: str) -> None:
        self._store(self._current_listener().options, self._path(rest), unique=True)

    def _listener_string(self, args: list[str], rest: str) -> None:
        if not rest:
            raise self.error("missing value")
        self._store(self._current_listener().options, rest, unique=True)

    def _listener_bool(self, args: list[str], rest: str) -> None:
        self._store(self._current_listener().options, self._bool(args), unique=False)

    def _listener_choice(self, choices: frozenset[str], *,
                         unsupported: dict[str, str] | None = None
                         ) -> Callable[[list[str], str], None]:
        def handler(args: list[str], rest: str) -> None:
            value = self._one(args)
            if unsupported and value in unsupported:
                raise self.error(f"{value} is not supported by the embedded broker: "
                                 f"{unsupported[value]}")
            if value not in choices:
                raise self.error(f"invalid value {value!r}: use {' or '.join(sorted(choices))}")
            self._store(self._current_listener().options, value, unique=False)
        return handler

    def _listener_only(self, accepted: str, *, why: str) -> Callable[[list[str], str], None]:
        def handler(args: list[str], rest: str) -> None:
            self._current_listener()
            value = str(self._int(args, -1, 2**31 - 1))
            if value != accepted:
                raise self.error(f"{value} is not supported: {why}")
        return handler

    def _listener_max_connections(self, args: list[str], rest: str) -> None:
        value = self._int(args, -1, 2**31 - 1)
        if value == 0:
            raise self.error("0 would refuse every client: use -1 for no cap, or 1 and more")
        self._store(self._current_listener().options, None if value == -1 else value,
                    unique=False)

    # -- result

    def _build(self) -> BrokerConfig:
        settings = dict(self.settings)
        if self.listeners:
            listeners = tuple(self._finish_listener(draft) for draft in self.listeners)
        else:
            listeners = (Listener(DEFAULT_PORT, LOCAL_ONLY_ADDRESS),)
            settings.setdefault("allow_anonymous", True)  # mosquitto's "local only" mode
        if self.log_dest:
            if "none" in self.log_dest and len(self.log_dest) > 1:
                raise self.error("log_dest none cannot be combined with other destinations")
            settings["log_dest"] = tuple(dict.fromkeys(self.log_dest))
        if self.log_types:
            settings["log_types"] = tuple(dict.fromkeys(self.log_types))
        return BrokerConfig(listeners=listeners, source=self.source, **settings)

    def _finish_listener(self, draft: _ListenerDraft) -> Listener:
        options = draft.options
        self.line, self.directive = draft.line, "listener"
        tls_keys = {"certfile", "keyfile", "cafile", "capath", "require_certificate",
                    "tls_version", "ciphers"}
        tls: TlsSettings | None = None
        if tls_keys & options.keys():
            if "certfile" not in options or "keyfile" not in options:
                raise self.error("TLS needs both certfile and keyfile")
            if options.get("require_certificate") and not ({"cafile", "capath"} & options.keys()):
                raise self.error("require_certificate true needs cafile or capath")
            tls = TlsSettings(cert_file=str(options["certfile"]),
                              key_file=str(options["keyfile"]),
                              ca_file=_text(options.get("cafile")),
                              ca_path=_text(options.get("capath")),
                              require_certificate=bool(options.get("require_certificate", False)),
                              tls_version=options.get("tls_version"),
                              ciphers=options.get("ciphers"))
        return Listener(port=draft.port, bind_address=draft.bind_address, tls=tls,
                        socket_domain=options.get("socket_domain"),
                        max_connections=options.get("max_connections"), line=draft.line)


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)
