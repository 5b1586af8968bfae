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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP, description=command.DESCRIPTION)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        return args.run(args)
    except FabricError as e:
        print(f"master-node {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
