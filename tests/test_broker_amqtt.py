"""The embedded broker runs only on the amqtt its fixes are written against, and every amqtt
private those fixes touch is named in `broker.amqtt_privates`, which checks them at start."""

from __future__ import annotations

import ast
import asyncio
import importlib.metadata
from pathlib import Path

import pytest

import broker.amqtt_privates as privates
from broker import BrokerStartError, EmbeddedBroker, parse_config
from broker.amqtt_privates import AMQTT_VERSION, PRIVATES, Private, check_amqtt

BROKER_PACKAGE = Path(privates.__file__).resolve().parent


def test_the_installed_amqtt_passes_the_check() -> None:
    assert importlib.metadata.version("amqtt") == AMQTT_VERSION
    assert privates.missing_privates() == []
    check_amqtt()


def test_another_amqtt_version_is_refused_naming_both() -> None:
    with pytest.raises(BrokerStartError, match=rf"written against amqtt {AMQTT_VERSION}, "
                       r"found amqtt 0\.11\.0: .*install amqtt==" + AMQTT_VERSION):
        check_amqtt(installed="0.11.0")


def test_a_missing_private_is_refused_by_name() -> None:
    gone = (Private("amqtt.broker:Broker", "_gone_method", False, "a test"),
            Private("amqtt.adapters:StreamWriterAdapter", "_gone_attribute", True, "a test"),
            Private("amqtt.no_such_module:Thing", "_x", False, "a test"))
    with pytest.raises(BrokerStartError) as raised:
        check_amqtt(installed=AMQTT_VERSION, privates=PRIVATES + gone)
    message = str(raised.value)
    assert f"amqtt {AMQTT_VERSION} lacks internals" in message
    assert "Broker._gone_method, StreamWriterAdapter._gone_attribute, Thing._x" in message
    assert "_sessions" not in message  # only what is missing


def test_the_broker_does_not_start_on_another_amqtt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(privates, "AMQTT_VERSION", "0.0.1")

    async def start() -> None:
        config = parse_config("listener 1883 127.0.0.1\nallow_anonymous true\n").with_port(0)
        async with EmbeddedBroker(config):
            raise AssertionError("the broker started")
    with pytest.raises(BrokerStartError, match="written against amqtt 0.0.1, found amqtt "
                       + AMQTT_VERSION):
        asyncio.run(asyncio.wait_for(start(), 30))


def _amqtt_classes() -> dict[str, type]:
    owners = {item.owner for item in PRIVATES}
    return {owner: privates._resolve(owner) for owner in owners}


def _members(cls: type) -> set[str]:
    return set(dir(cls)) | set(privates._instance_attributes(cls))


def _touched_privates() -> set[str]:
    """`Class._name` for each amqtt private the broker package defines over or reads: in a
    subclass of an amqtt class, its own `_name`s that amqtt's class has too; elsewhere, any
    `x._name` (or `getattr(x, "_name")`) that an amqtt class has."""
    classes = _amqtt_classes()
    by_name = {cls.__name__: cls for cls in classes.values()}
    found: set[str] = set()
    for path in sorted(BROKER_PACKAGE.glob("*.py")):
        if path.name == "amqtt_privates.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        in_subclass: set[int] = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = [by_name[b.id] for b in node.bases
                     if isinstance(b, ast.Name) and b.id in by_name]
            if not bases:
                continue
            members = set().union(*(_members(base) for base in bases))
            for inner in ast.walk(node):
                in_subclass.add(id(inner))
                name = None
                if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = inner.name
                elif isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name) \
                        and inner.value.id == "self":
                    name = inner.attr
                if name and name.startswith("_") and not name.startswith("__") and \
                        name in members:
                    owner = next(base for base in bases if name in _members(base))
                    found.add(f"{owner.__name__}.{name}")
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute) and id(node) not in in_subclass and not (
                    isinstance(node.value, ast.Name) and node.value.id == "self"):
                name = node.attr
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id == "getattr" and len(node.args) >= 2 and \
                    isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                name = node.args[1].value
            if name and name.startswith("_") and not name.startswith("__"):
                found.update(f"{cls.__name__}.{name}" for cls in classes.values()
                             if name in _members(cls))
    return found


def test_every_amqtt_private_the_broker_touches_is_listed_and_no_other() -> None:
    listed = {str(item) for item in PRIVATES}
    touched = _touched_privates()
    assert touched - listed == set(), "touched but not listed in broker.amqtt_privates"
    assert listed - touched == set(), "listed in broker.amqtt_privates but not touched"
