"""The amqtt internals the broker's overrides rely on, named once and checked at start-up.

`FabricBroker` (`broker.fixes`) and `DeliveryHandler` (`broker.delivery`) subclass amqtt's
`Broker` and `BrokerProtocolHandler`: they override private methods and read private
attributes, which amqtt may rename or drop in any release. So the broker runs only on the
amqtt it was written against (`AMQTT_VERSION`), and `check_amqtt` refuses to start it,
naming the version found or the privates missing, instead of letting a fix misbehave
later. Moving to another amqtt means reading every override below against its source, then
changing `AMQTT_VERSION`.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import textwrap
from dataclasses import dataclass
from functools import cache

from broker.errors import BrokerStartError

__all__ = ["AMQTT_VERSION", "Private", "PRIVATES", "check_amqtt", "missing_privates"]

AMQTT_VERSION = "0.12.1"

_BROKER = "amqtt.broker:Broker"
_HANDLER = "amqtt.mqtt.protocol.broker_handler:BrokerProtocolHandler"
_WRITER = "amqtt.adapters:StreamWriterAdapter"
_PLUGINS = "amqtt.plugins.manager:PluginManager"


@dataclass(frozen=True)
class Private:
    """One private name of an amqtt class: a method (overridden or called) or an instance
    attribute (read or replaced), and the fix of ours that relies on it."""

    owner: str  # "module:Class"
    name: str
    attribute: bool  # an instance attribute set in the class's code, not a class member
    used_by: str

    def __str__(self) -> str:
        return f"{self.owner.rpartition(':')[2]}.{self.name}"


def _methods(owner: str, used_by: str, *names: str) -> tuple[Private, ...]:
    return tuple(Private(owner, name, False, used_by) for name in names)


def _attributes(owner: str, used_by: str, *names: str) -> tuple[Private, ...]:
    return tuple(Private(owner, name, True, used_by) for name in names)


PRIVATES: tuple[Private, ...] = (
    *_methods(_BROKER, "listeners as ServerSpecs (IPv6, CA checks)", "_create_server_instance"),
    *_methods(_BROKER, "connect: authenticate first, IDENTITY, WILL_ACL, TAKEOVER, "
              "PERSISTENT_SESSIONS, KEEPALIVE", "_initialize_client_session", "_authenticate",
              "_client_connected"),
    *_methods(_BROKER, "a protocol error ends the session with its will",
              "_handle_client_session"),
    *_methods(_BROKER, "ACKED_DELIVERED", "_client_message_loop", "_handle_disconnect",
              "_delete_session", "_session_monitor", "_cleanup_session"),
    *_methods(_BROKER, "an ended session costs its own filters", "_del_subscription",
              "_del_all_subscriptions"),
    *_methods(_BROKER, "QOS_DOWNGRADE and the broadcast without a task per message",
              "_handle_message_delivery", "_broadcast_message", "_broadcast_loop",
              "_shutdown_broadcast_loop", "_run_broadcast", "_get_handler"),
    *_methods(_BROKER, "ACL checks as direct calls", "_topic_filtering"),
    *_methods(_BROKER, "a publish after a SUBSCRIBE waits for it", "_handle_subscription",
              "_handle_unsubscription"),
    *_methods(_BROKER, "RETAINED_ACL", "_publish_retained_messages_for_subscription",
              "_matches"),
    *_methods(_BROKER, "PERSISTENT_SESSIONS", "_publish_session_retained_messages",
              "_retain_broadcast_message"),
    *_attributes(_BROKER, "the session table", "_sessions"),
    *_attributes(_BROKER, "the subscription table, replaced by an indexed one",
                 "_subscriptions"),
    *_attributes(_BROKER, "RETAINED_ACL: one lookup for a filter without wildcards",
                 "_retained_messages"),
    *_attributes(_BROKER, "the broadcast queue and its loop", "_broadcast_queue",
                 "_broadcast_task", "_broadcast_shutdown_waiter"),
    *_attributes(_BROKER, "listening addresses and shutdown", "_servers"),
    *_methods(_HANDLER, "packets read whole, PUBACK and QoS 0/1 PUBLISH in place",
              "_reader_loop"),
    *_methods(_HANDLER, "AT_LEAST_ONCE", "_handle_qos1_message_flow",
              "_handle_qos2_message_flow", "_retry_deliveries", "_handle_message_flow",
              "_send_packet"),
    *_attributes(_HANDLER, "the reader loop's handshake with amqtt", "_reader_ready",
                 "_reader_stopped"),
    *_attributes(_HANDLER, "AT_LEAST_ONCE: acknowledgements awaited", "_puback_waiters",
                 "_pubrec_waiters", "_pubcomp_waiters"),
    *_attributes(_HANDLER, "`post` writes only when no delivery would be overtaken",
                 "_write_lock", "_keepalive_task"),
    *_attributes(_WRITER, "one send per turn of the event loop", "_writer"),
    *_attributes(_PLUGINS, "fast paths only when no plugin hears of single packets",
                 "_event_plugin_callbacks"),
)


def check_amqtt(*, installed: str | None = None,
                privates: tuple[Private, ...] = PRIVATES) -> None:
    """Raise `BrokerStartError` unless amqtt is `AMQTT_VERSION` and has every private the
    overrides rely on; `installed` (default: the installed distribution's) is for tests."""
    if installed is None:
        try:
            installed = importlib.metadata.version("amqtt")
        except importlib.metadata.PackageNotFoundError:
            installed = "none"
    if installed != AMQTT_VERSION:
        raise BrokerStartError(
            f"the embedded broker is written against amqtt {AMQTT_VERSION}, found amqtt "
            f"{installed}: its fixes override amqtt internals that change between releases; "
            f"install amqtt=={AMQTT_VERSION}")
    missing = missing_privates(privates)
    if missing:
        raise BrokerStartError(
            f"amqtt {installed} lacks internals the embedded broker's fixes rely on: "
            f"{', '.join(str(item) for item in missing)}; reinstall amqtt=={AMQTT_VERSION}")


def missing_privates(privates: tuple[Private, ...] = PRIVATES) -> list[Private]:
    """The privates that the installed amqtt does not have."""
    missing = []
    for item in privates:
        try:
            owner = _resolve(item.owner)
        except (ImportError, AttributeError):
            missing.append(item)
            continue
        present = item.name in _instance_attributes(owner) if item.attribute else \
            callable(getattr(owner, item.name, None))
        if not present:
            missing.append(item)
    return missing


def _resolve(owner: str) -> type:
    module, _, name = owner.partition(":")
    found = getattr(importlib.import_module(module), name)
    if not isinstance(found, type):
        raise AttributeError(f"{owner} is not a class")
    return found


@cache
def _instance_attributes(owner: type) -> frozenset[str]:
    """Names assigned as `self.<name>` anywhere in the code of `owner` and its bases: an
    instance attribute exists only once an object is built, so its code is read instead."""
    names: set[str] = set()
    for klass in owner.__mro__:
        if klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets = [node.target]
            else:
                continue
            names.update(target.attr for target in targets
                         if isinstance(target, ast.Attribute) and
                         isinstance(target.value, ast.Name) and target.value.id == "self")
    return frozenset(names)
