"""Errors of the broker package, rooted in the fabric's one exception tree."""

from __future__ import annotations

from core.errors import ConfigError, FabricError

__all__ = ["BrokerError", "BrokerConfigError", "BrokerStartError", "PasswordFileError"]


class BrokerError(FabricError):
    """The embedded broker could not do what was asked."""


class BrokerConfigError(BrokerError, ConfigError):
    """A broker config (mosquitto syntax) cannot be used; the message names file, line, directive."""


class BrokerStartError(BrokerError):
    """The broker process did not come up (exited, or was not ready in time)."""


class PasswordFileError(BrokerError, ConfigError):
    """A password file line cannot be read, or a user/password cannot be stored."""
