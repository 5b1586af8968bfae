"""When a delayed task may start: a countdown from now, or an ETA (ISO 8601 or epoch seconds).

The result is wall-clock epoch seconds (`TaskSpec.not_before`), the one clock a submitter
and a master on other machines share; the master turns it into its own clock's time.
Pure functions: `now` is a parameter.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from core.errors import ConfigError

__all__ = ["parse_eta", "not_before"]

_LATEST = 1e11  # epoch seconds (year 5138): a later time is a mistake


def parse_eta(value: Any) -> float:
    """Epoch seconds from an ETA: a number of epoch seconds, a datetime, or a string holding
    either (`1767225600`, `2026-01-01T00:00:00Z`, `2026-01-01 09:30+01:00`). A time without
    a zone is local time. ConfigError if it does not parse."""
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                seconds = datetime.fromisoformat(text.replace("Z", "+00:00")
                                                 .replace("z", "+00:00")).timestamp()
            except ValueError:
                raise ConfigError(f"eta {value!r}: give an ISO 8601 time (e.g. "
                                  "2026-01-01T09:30:00Z) or epoch seconds") from None
    else:
        raise ConfigError(f"eta {value!r}: give an ISO 8601 time or epoch seconds")
    if not math.isfinite(seconds) or not 0 <= seconds < _LATEST:
        raise ConfigError(f"eta {value!r}: not a time (epoch seconds 0-{_LATEST:g})")
    return seconds


def not_before(*, countdown: float = 0.0, eta: Any = None, now: float) -> float:
    """The start time asked for (epoch seconds; 0 for at once): `countdown` seconds after
    `now`, or `eta`; both given is a mistake."""
    if isinstance(countdown, bool) or not isinstance(countdown, (int, float)) \
            or not 0 <= countdown <= 7 * 24 * 3600.0:  # NaN fails the comparison
        raise ConfigError(f"countdown {countdown!r}: must be 0-604800 seconds")
    if eta is not None:
        if countdown:
            raise ConfigError("give a countdown or an eta, not both")
        return parse_eta(eta)
    return now + countdown if countdown else 0.0
