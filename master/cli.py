"""`master-node`: run the master, submit work, and look at the fabric."""

from __future__ import annotations

import argparse
import sys

from core.errors import FabricError
from core.logs import configure_logging
from master.commands import COMMANDS

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="master-node",
        description="Coordinate prioritised tasks over MQTT. `serve` runs the master (with an "
                    "embedded broker unless --broker is given); the other commands talk to a "
                    "running master through the broker.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")
    parser.add_argument("--broker", dest="top_broker", metavar="URL",
                        help="broker as mqtt://[user:password@]host:port, for the commands that "
                             "take one (the same as giving it after the command)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP, description=command.DESCRIPTION)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    _log_level_everywhere(sub)
    return parser


def _log_level_everywhere(subparsers: argparse._SubParsersAction) -> None:
    """Accept --log-level after any (sub)command too; given nowhere, the top default holds."""
    for parser in subparsers.choices.values():
        parser.add_argument("--log-level", default=argparse.SUPPRESS,
                            help="logging level (default INFO)")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _log_level_everywhere(action)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_broker is not None:
        if not hasattr(args, "broker"):
            parser.error(f"--broker does not apply to {args.command}")
        if args.broker is None:
            args.broker = args.top_broker
    try:
        configure_logging(args.log_level)
    except ValueError:
        parser.error(f"--log-level {args.log_level!r}: use DEBUG, INFO, WARNING or ERROR")
    try:
        return args.run(args)
    except FabricError as e:
        print(f"master-node {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
