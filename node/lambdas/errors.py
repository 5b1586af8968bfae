"""The one error this package raises to its callers.

Problems of a single call (timeout, memory, a bad request) are results, not exceptions: a node
must keep serving after any of them. `LambdaError` is for mistakes a person fixes: a bad
`module:function` spec, a duplicate name, using a runner that is closed.
"""

from __future__ import annotations

from core.errors import FabricError

__all__ = ["LambdaError"]


class LambdaError(FabricError):
    """A lambda cannot be registered, loaded or run; the message says what to change."""
