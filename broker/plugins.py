"""amqtt plugins that read mosquitto's password_file and acl_file, so one set of files serves
both brokers (amqtt's own plugins want argon2 hashes and know only `acl`/`publish_acl`).

They are configured programmatically, through the `plugins` mapping of amqtt's config
(`{"broker.plugins.PasswordFileAuthPlugin": {"passwords": ..., ...}}`), never through
amqtt's YAML, and are handed the files as the broker read them when it started
(`ReloadingFile`), not their paths: each file is read once at start. They are read again
only when they change on disk, so a user added with `master-node passwd` can connect
without restarting the broker.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from broker.acl import Access, AclFile
from broker.errors import BrokerError
from broker.passwd import PasswordFile

__all__ = ["PasswordFileAuthPlugin", "AclFilePlugin", "ReloadingFile", "TRUSTED", "is_trusted"]

TRUSTED = "broker.trusted"  # session attribute: logged in with the master's credential


def is_trusted(session: Session | None) -> bool:
    """Did this session log in with the credential `serve` generated for its own master?"""
    return session is not None and bool(session.attributes.get(TRUSTED))

log = logging.getLogger("broker")
_ACL_RECHECK_SECONDS = 1.0
T = TypeVar("T")


class ReloadingFile(Generic[T]):
    """A file's parsed form, read here once and again only when its size or mtime changes;
    a bad edit keeps the old one. A file that cannot be read at first raises `load`'s error."""

    def __init__(self, path: Path, load: Callable[[Path], T]) -> None:
        self.path = path
        self._load = load
        self._stamp = self._stat()
        self.value: T = load(path)

    def _stat(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return info.st_mtime_ns, info.st_size

    def refresh(self) -> T:
        stamp = self._stat()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self.value = self._load(self.path)
                log.info("reloaded %s", self.path)
            except BrokerError as e:
                log.error("keeping the previous %s: %s", self.path, e)
        return self.value


class PasswordFileAuthPlugin(BaseAuthPlugin):
    """mosquitto's rules: no username needs allow_anonymous; a username needs the password
    file to hold it with a matching password (no password file: usernames are not checked
    when anonymous access is allowed, and refused when it is not). First, though, the
    master's own generated credential (`trusted_file`), whose sessions are marked `TRUSTED`."""

    @dataclass
    class Config:
        allow_anonymous: bool = False
        passwords: Any = None  # ReloadingFile[PasswordFile] | None (amqtt type-checks these)
        trusted: Any = None  # ReloadingFile[PasswordFile] | None

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._passwords: ReloadingFile[PasswordFile] | None = self.config.passwords
        self._trusted: ReloadingFile[PasswordFile] | None = self.config.trusted

    async def authenticate(self, *, session: Session) -> bool:
        session.attributes.pop(TRUSTED, None)
        if session.username is not None and self._trusted is not None and \
                self._trusted.refresh().verify(session.username, session.password):
            session.attributes[TRUSTED] = True
            return True
        if session.username is None:
            return bool(self.config.allow_anonymous)
        if self._passwords is None:
            return bool(self.config.allow_anonymous)
        return self._passwords.refresh().verify(session.username, session.password)


class AclFilePlugin(BaseTopicPlugin):
    """mosquitto's acl_file: WRITE checked on publish, READ on every delivery; subscribing is
    always granted, as mosquitto 2.0 grants it. The master's own trusted session passes."""

    @dataclass
    class Config:
        acl: Any = None  # ReloadingFile[AclFile]

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        if not isinstance(self.config.acl, ReloadingFile):
            raise BrokerError("AclFilePlugin needs the acl_file it checks (acl)")
        self._acl: ReloadingFile[AclFile] = self.config.acl
        self._checked = time.monotonic()

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        return self.allows(session, topic, action)

    def allows(self, session: Session | None, topic: str | None, action: Action | None) -> bool:
        """The synchronous check behind `topic_filtering`, for callers on the hot path."""
        if action == Action.SUBSCRIBE or is_trusted(session):
            return True
        if session is None or topic is None:
            return False
        now = time.monotonic()
        if now - self._checked > _ACL_RECHECK_SECONDS:
            self._checked = now
            self._acl.refresh()
        access = Access.WRITE if action == Action.PUBLISH else Access.READ
        return self._acl.value.allows(username=session.username, client_id=session.client_id,
                                      topic=topic, access=access)
