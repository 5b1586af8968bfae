"""The credential `master-node serve` makes for its own master on its embedded broker.

With `allow_anonymous false` the master must log in like any client, but an operator should
not have to type its password into a URL (where `ps` shows it). So at each start `serve`
draws a random password, keeps it in memory only, and writes its mosquitto `$7$` hash to
`<state>/broker-master.passwd` (mode 0600), which the embedded broker is told to trust:
a session logged in with it passes every ACL and keeps its own client ids
(`use_username_as_clientid` applies to everyone else). The file is replaced at every start,
so a password from an earlier run is worthless. mosquitto knows nothing of it: with an
external broker the master logs in through `--broker` and `--password-file` like a node.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from broker.errors import PasswordFileError
from broker.passwd import hash_password

__all__ = ["TrustedCredential", "issue_credential", "TRUSTED_FILE_NAME"]

TRUSTED_FILE_NAME = "broker-master.passwd"


@dataclass(frozen=True)
class TrustedCredential:
    """A user name and password the embedded broker trusts; `path` holds only the hash."""

    username: str
    password: str
    path: Path

    def __repr__(self) -> str:  # never the password, even in a traceback
        return f"TrustedCredential(username={self.username!r}, path={str(self.path)!r})"


def issue_credential(state_dir: str | os.PathLike[str], username: str) -> TrustedCredential:
    """A fresh credential for `username`, its hash written (0600, atomically) in `state_dir`."""
    directory = Path(state_dir)
    path = directory / TRUSTED_FILE_NAME
    password = secrets.token_urlsafe(24)
    temp = directory / f".{TRUSTED_FILE_NAME}.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(f"{username}:{hash_password(password)}\n")
        os.replace(temp, path)
    except OSError as e:
        temp.unlink(missing_ok=True)
        raise PasswordFileError(f"{path}: cannot write the master's broker credential: {e}") from e
    return TrustedCredential(username=username, password=password, path=path)
