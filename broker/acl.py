"""mosquitto's acl_file: parsed once, checked per publish and per delivery, as mosquitto 2.0 does.

File syntax (one file serves both brokers):

    topic [read|write|readwrite|deny] <topic>     before any `user` line: anonymous clients
    user <username>                               following `topic` lines: that user only
    pattern [read|write|readwrite|deny] <topic>   every client; %c = client id, %u = username

Checking follows mosquitto 2.0's default security: the client's own `topic` lines first
(`deny` lines before grants), then the `pattern` lines the same way; no match means denied.
A pattern is skipped for a client without a username if it names `%u`, and pattern lines deny
everything to a client whose id or username holds `+`, `#` or `/` (it could escape its level).
A rule not starting with `$` never matches a `$` topic. Subscriptions themselves are always
granted, as mosquitto 2.0's acl_file grants them: what a client may read is checked on each
message delivered to it (retained ones included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import IntFlag
from pathlib import Path
from typing import Callable

from broker.errors import BrokerConfigError
from core.topic_filter import topic_matches

__all__ = ["Access", "AclRule", "AclFile"]

_DECISION_CACHE_SIZE = 65_536
_DANGEROUS = frozenset("+#/")


class Access(IntFlag):
    """What a client does with a topic: receive it (READ) or publish to it (WRITE)."""

    NONE = 0
    READ = 1
    WRITE = 2
    READWRITE = 3


_ACCESS_WORDS = {"read": Access.READ, "write": Access.WRITE, "readwrite": Access.READWRITE,
                 "deny": Access.NONE}


@dataclass(frozen=True)
class AclRule:
    """One `topic` or `pattern` line."""

    topic: str
    access: Access
    line: int = 0

    @property
    def deny(self) -> bool:
        return self.access == Access.NONE


class AclFile:
    """The rules of one acl_file and a bounded cache of decisions made from them."""

    def __init__(self, *, anonymous: tuple[AclRule, ...] = (),
                 users: dict[str, tuple[AclRule, ...]] | None = None,
                 patterns: tuple[AclRule, ...] = (), source: Path | None = None) -> None:
        self.anonymous = _deny_first(anonymous)
        self.users = {name: _deny_first(rules) for name, rules in (users or {}).items()}
        self.patterns = _deny_first(patterns)
        self.source = source
        self._decisions: dict[tuple[str | None, str | None, str, Access], bool] = {}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AclFile:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BrokerConfigError(f"{file}: cannot read acl_file: {e}") from e
        return cls.parse(text, source=file)

    @classmethod
    def parse(cls, text: str, *, source: Path | None = None) -> AclFile:
        """Parse acl_file text; errors name the file and line."""
        where = str(source) if source else "<acl>"
        anonymous: list[AclRule] = []
        users: dict[str, list[AclRule]] = {}
        patterns: list[AclRule] = []
        current: list[AclRule] = anonymous
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.rstrip("\r\n").lstrip(" ")
            if not line.strip() or line.startswith("#"):
                continue
            keyword, _, rest = line.partition(" ")
            rest = rest.lstrip(" ").rstrip(" ")
            if keyword == "user":
                if not rest:
                    raise BrokerConfigError(f"{where}:{number}: user: missing username")
                current = users.setdefault(rest, [])
            elif keyword in ("topic", "pattern"):
                rule = _parse_rule(rest, number, f"{where}:{number}: {keyword}")
                (patterns if keyword == "pattern" else current).append(rule)
            else:
                raise BrokerConfigError(f"{where}:{number}: {keyword}: unknown keyword "
                                        "(use topic, user or pattern)")
        return cls(anonymous=tuple(anonymous),
                   users={name: tuple(rules) for name, rules in users.items()},
                   patterns=tuple(patterns), source=source)

    def allows(self, *, username: str | None, client_id: str | None, topic: str,
               access: Access) -> bool:
        """May this client READ (receive) or WRITE (publish) `topic`?"""
        key = (username, client_id, topic, access)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._decide(username, client_id or "", topic, access)
            if len(self._decisions) >= _DECISION_CACHE_SIZE:
                self._decisions.clear()
            self._decisions[key] = decision
        return decision

    def _decide(self, username: str | None, client_id: str, topic: str, access: Access) -> bool:
        own = self.anonymous if username is None else self.users.get(username, ())
        verdict = _first_match(own, topic, access, lambda rule: rule.topic)
        if verdict is not None:
            return verdict
        if not self.patterns:
            return False
        if _DANGEROUS & set(client_id) or (username is not None and _DANGEROUS & set(username)):
            return False

        def expand(rule: AclRule) -> str | None:
            if "%u" in rule.topic and username is None:
                return None
            text = rule.topic.replace("%c", client_id)
            return text.replace("%u", username) if username is not None else text

        return bool(_first_match(self.patterns, topic, access, expand))


def _first_match(rules: tuple[AclRule, ...], topic: str, access: Access,
                 topic_of: Callable[[AclRule], str | None]) -> bool | None:
    for rule in rules:
        rule_topic = topic_of(rule)
        if rule_topic is None:
            continue
        if topic.startswith("$") and not rule_topic.startswith("$"):
            continue
        if topic_matches(rule_topic, topic):
            if rule.deny:
                return False
            if access & rule.access:
                return True
    return None


def _deny_first(rules: tuple[AclRule, ...] | list[AclRule]) -> tuple[AclRule, ...]:
    return tuple(rule for rule in rules if rule.deny) + tuple(r for r in rules if not r.deny)


def _parse_rule(rest: str, number: int, where: str) -> AclRule:
    if not rest:
        raise BrokerConfigError(f"{where}: missing topic")
    first, _, topic = rest.partition(" ")
    topic = topic.lstrip(" ")
    if not topic:  # `topic foo`: read and write (mosquitto reads even `topic read` this way)
        return AclRule(first, Access.READWRITE, number)
    if first not in _ACCESS_WORDS:
        raise BrokerConfigError(f"{where}: invalid access {first!r}: use read, write, "
                                "readwrite or deny")
    return AclRule(topic, _ACCESS_WORDS[first], number)
