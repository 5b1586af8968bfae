"""The errors of the lambdas package, defined once under the fabric's root error.

Problems of a single call (timeout, memory, a bad request) are results, not exceptions: a node
must keep serving after any of them. `LambdaError` is for mistakes a person fixes: a bad
`module:function` spec, a duplicate name, using a runner that is closed. The others are the
package's own signals between the node, its zygote and the zygote's children; each is caught
by name where it is turned into a result, and is re-exported by the module that raises it.
"""

from __future__ import annotations

from core.errors import FabricError

__all__ = ["LambdaError", "FrameError", "LinkDown", "LinkHung", "BadRequest"]


class LambdaError(FabricError):
    """A lambda cannot be registered, loaded or run; the message says what to change."""


class FrameError(LambdaError):
    """A value cannot be framed, or bytes on a local pipe are not a valid frame."""


class LinkDown(LambdaError):
    """The zygote is gone. `started` tells whether the call may have begun running."""

    def __init__(self, message: str, *, started: bool) -> None:
        super().__init__(message)
        self.started = started


class LinkHung(LambdaError):
    """The zygote did not answer a call long after its timeout."""


class BadRequest(LambdaError):
    """A call's parameters are invalid; it becomes a "bad_request" outcome."""
