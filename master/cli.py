"""`master-node`: run the master, submit work, and look at the fabric."""

from __future__ import annotations

import argparse
import sys

from core.errors import FabricError
from core.logs import configure_logging
from master.commands import NAMES, load

__all__ = ["main", "build_parser"]


# Top-level options that take a value: what to step over when looking for the command's name.
_VALUED = ("--log-level", "--broker")


def command_in(argv: list[str]) -> str | None:
    """The command `argv` runs, when it names one plainly (None for help, or anything odd:
    then every command is loaded, for the full help or argparse's own error)."""
    items = iter(argv)
    for item in items:
        if item in _VALUED:
            next(items, None)  # its value
        elif item.startswith("-"):
            if item.partition("=")[0] not in _VALUED:
                return None  # help, or an option argparse must judge
        else:
            return item if item in NAMES else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: with only the named command's options when it names one (its
    module alone is imported), else with every command's."""
    only = command_in(sys.argv[1:] if argv is None else argv)
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
    for command in (load(name) for name in ((only,) if only else NAMES)):
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
    parser = build_parser(argv)
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
