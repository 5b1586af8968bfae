"""The environment a lambda runs with: the call's own variables on top of a small fixed base.

A lambda never sees the node's variables (a broker URL with its password, tokens, whatever
the operator exported): the worker process is started with the base only, and each call's
child replaces its environment with the base plus the variables the call gave. The base is
constant, the same on every node, so nothing in it tells a submitter about the machine:

    PATH=/usr/local/bin:/usr/bin:/bin   LANG=C.UTF-8   LC_ALL=C.UTF-8   PYTHONIOENCODING=utf-8
"""

from __future__ import annotations

from typing import Mapping

__all__ = ["BASE_ENV", "call_environment"]

BASE_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONIOENCODING": "utf-8",
}


def call_environment(call_env: Mapping[str, str] | None) -> dict[str, str]:
    """The whole environment of one call: the base, then the call's variables over it."""
    environment = dict(BASE_ENV)
    environment.update(call_env or {})
    return environment
