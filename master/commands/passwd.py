"""`master-node passwd`: add, replace or remove a user in a mosquitto-format password file."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from core.errors import ConfigError

NAME = "passwd"
HELP = "add or remove a broker user (mosquitto password file format)"
DESCRIPTION = ("Add or replace a user in a password file that both the embedded broker and "
               "mosquitto read (mosquitto 2 PBKDF2-SHA512 hashes), or remove one. Point "
               "broker.conf's password_file at it. The embedded broker picks up changes while "
               "running; mosquitto needs a SIGHUP. Without --password the password is asked for "
               "(twice) on the terminal, or read from one line of standard input.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="password file (created if missing, mode 0600)")
    p.add_argument("username", help="user name; for a node, its node id")
    p.add_argument("--password", help="the password (visible in the process list: prefer the prompt)")
    p.add_argument("--delete", action="store_true", help="remove the user instead")


def _read_password() -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Reenter password: "):
        raise ConfigError("passwords do not match")
    return first


def run(args: argparse.Namespace) -> int:
    from broker import add_user, remove_user
    if args.delete:
        if not remove_user(args.file, args.username):
            raise ConfigError(f"no user {args.username!r} in {args.file}")
        print(f"removed {args.username} from {args.file}")
        return 0
    password = args.password if args.password is not None else _read_password()
    add_user(args.file, args.username, password)
    print(f"{args.username} can now connect (password file {args.file})")
    return 0
