"""mosquitto password files, read and written here so one file serves both brokers.

A line is `username:hash`. New hashes use mosquitto 2.0's `$7$` format, as `mosquitto_passwd`
writes it: `$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512(password, salt)>` with
101 iterations and a 12-byte salt. The older `$6$<salt>$<SHA-512(password + salt)>` lines of
mosquitto 1.x are still accepted when checking.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from broker.errors import PasswordFileError

__all__ = [
    "PasswordFile",
    "add_user",
    "remove_user",
    "verify",
    "hash_password",
    "check_password",
    "PBKDF2_ITERATIONS",
]

PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes
SALT_BYTES = 12
_MAX_ITERATIONS = 10_000_000


def hash_password(password: str, *, salt: bytes | None = None,
                  iterations: int = PBKDF2_ITERATIONS) -> str:
    """The `$7$` hash mosquitto 2.0 stores for `password`."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${_b64(salt)}${_b64(digest)}"


def check_password(password: str, hashed: str) -> bool:
    """True if `password` matches a `$7$` or `$6$` hash; malformed hashes never match."""
    try:
        return _check(password.encode("utf-8"), hashed)
    except (ValueError, binascii.Error):
        return False


def _check(password: bytes, hashed: str) -> bool:
    parts = hashed.split("$")
    if len(parts) == 5 and parts[0] == "" and parts[1] == "7":
        iterations = int(parts[2])
        if not 1 <= iterations <= _MAX_ITERATIONS:
            return False
        salt, expected = base64.b64decode(parts[3], validate=True), base64.b64decode(parts[4],
                                                                                   validate=True)
        actual = hashlib.pbkdf2_hmac("sha512", password, salt, iterations)
        return hmac.compare_digest(actual, expected)
    if len(parts) == 4 and parts[0] == "" and parts[1] == "6":
        salt, expected = base64.b64decode(parts[2], validate=True), base64.b64decode(parts[3],
                                                                                   validate=True)
        return hmac.compare_digest(hashlib.sha512(password + salt).digest(), expected)
    return False


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _check_username(username: str) -> None:
    if not username or ":" in username or any(c in username for c in "\r\n\0"):
        raise PasswordFileError(f"invalid username {username!r}: it must be non-empty and hold "
                                "no ':' or line breaks")


@dataclass(frozen=True)
class PasswordFile:
    """The users of one password file, in file order; `verify` is what brokers ask."""

    path: Path
    hashes: dict[str, str]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PasswordFile:
        """Read a password file; a line that is not `user:hash` names itself in the error."""
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PasswordFileError(f"{file}: cannot read password file: {e}") from e
        hashes: dict[str, str] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.rstrip("\r\n")
            if not line.strip() or line.startswith("#"):
                continue
            username, sep, hashed = line.partition(":")
            if not sep or not username or not hashed.startswith(("$7$", "$6$")):
                raise PasswordFileError(f"{file}:{number}: expected `username:$7$...` "
                                        "(use mosquitto_passwd or `master-node passwd`)")
            hashes[username] = hashed
        return cls(path=file, hashes=hashes)

    @property
    def users(self) -> tuple[str, ...]:
        return tuple(self.hashes)

    def verify(self, username: str, password: str | None) -> bool:
        """True if the user exists and the password matches its hash."""
        hashed = self.hashes.get(username)
        if hashed is None or password is None:
            return False
        return check_password(password, hashed)


def add_user(path: str | os.PathLike[str], username: str, password: str) -> None:
    """Add or replace a user, creating the file (mode 0600) if needed; the write is atomic."""
    _check_username(username)
    if not isinstance(password, str) or not password:
        raise PasswordFileError("the password must be a non-empty string")
    file = Path(path)
    lines = _read_lines(file)
    entry = f"{username}:{hash_password(password)}"
    replaced = False
    for index, line in enumerate(lines):
        if line.partition(":")[0] == username and not line.startswith("#"):
            lines[index] = entry
            replaced = True
    if not replaced:
        lines.append(entry)
    _write_lines(file, lines)


def remove_user(path: str | os.PathLike[str], username: str) -> bool:
    """Remove a user; False if it was not there."""
    file = Path(path)
    lines = _read_lines(file)
    kept = [line for line in lines if line.startswith("#") or line.partition(":")[0] != username]
    if len(kept) == len(lines):
        return False
    _write_lines(file, kept)
    return True


def verify(path: str | os.PathLike[str], username: str, password: str) -> bool:
    """True if `username` is in the password file at `path` with this password."""
    return PasswordFile.load(path).verify(username, password)


def _read_lines(file: Path) -> list[str]:
    if not file.exists():
        return []
    PasswordFile.load(file)  # refuse to rewrite a file we cannot read
    return [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_lines(file: Path, lines: list[str]) -> None:
    directory = file.parent if str(file.parent) else Path(".")
    try:
        mode = file.stat().st_mode & 0o777 if file.exists() else 0o600
        fd, temp = tempfile.mkstemp(prefix=f".{file.name}.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write("".join(f"{line}\n" for line in lines))
            os.chmod(temp, mode)
            os.replace(temp, file)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise PasswordFileError(f"{file}: cannot write password file: {e}") from e
