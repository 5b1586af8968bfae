"""What one lambda call produced: a value, or a structured error a remote caller can act on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal

__all__ = [
    "ErrorKind",
    "ERROR_KINDS",
    "TIMEOUT",
    "MEMORY",
    "EXCEPTION",
    "UNKNOWN_LAMBDA",
    "BAD_REQUEST",
    "CRASHED",
    "LambdaOutcome",
]

ErrorKind = Literal["timeout", "memory", "exception", "unknown_lambda", "bad_request", "crashed"]

TIMEOUT: Final = "timeout"
MEMORY: Final = "memory"
EXCEPTION: Final = "exception"
UNKNOWN_LAMBDA: Final = "unknown_lambda"
BAD_REQUEST: Final = "bad_request"
CRASHED: Final = "crashed"
ERROR_KINDS: Final[frozenset[str]] = frozenset(
    (TIMEOUT, MEMORY, EXCEPTION, UNKNOWN_LAMBDA, BAD_REQUEST, CRASHED)
)


@dataclass(frozen=True)
class LambdaOutcome:
    """Result of one call. `error` is None when `ok`; otherwise a flat dict with the keys
    kind, type, message and traceback, all strings, so it travels as JSON or msgpack."""

    ok: bool
    value: Any = None
    error: dict[str, str] | None = None
    duration_s: float = field(default=0.0, compare=False)

    @classmethod
    def success(cls, value: Any, *, duration_s: float = 0.0) -> LambdaOutcome:
        return cls(ok=True, value=value, error=None, duration_s=duration_s)

    @classmethod
    def failure(
        cls,
        kind: ErrorKind,
        message: str,
        *,
        type: str = "",
        traceback: str = "",
        duration_s: float = 0.0,
    ) -> LambdaOutcome:
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        error = {"kind": kind, "type": type, "message": message, "traceback": traceback}
        return cls(ok=False, value=None, error=error, duration_s=duration_s)

    @property
    def kind(self) -> str | None:
        """The error kind, or None for a success: the one field most callers branch on."""
        return None if self.error is None else self.error["kind"]

    def to_dict(self) -> dict[str, Any]:
        """Flat, wire-safe form: what `dispatch_lambda` returns and a result message carries."""
        return {
            "ok": self.ok,
            "value": self.value,
            "error": None if self.error is None else dict(self.error),
            "duration_s": self.duration_s,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LambdaOutcome:
        """Inverse of `to_dict`; anything malformed becomes a "crashed" outcome, never an error."""
        try:
            ok = data["ok"]
            duration_s = float(data.get("duration_s") or 0.0)
            if ok is True:
                return cls.success(data.get("value"), duration_s=duration_s)
            error = data["error"]
            return cls.failure(
                error["kind"],
                str(error.get("message", "")),
                type=str(error.get("type", "")),
                traceback=str(error.get("traceback", "")),
                duration_s=duration_s,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            return cls.failure(CRASHED, f"malformed outcome from the worker: {e!r}", type="ProtocolError")
