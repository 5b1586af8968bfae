"""`master-node broker`: run the embedded broker on its own (replicated masters, many hosts)."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "broker"
HELP = "run the embedded MQTT broker alone"
DESCRIPTION = ("Run the embedded MQTT broker as its own process, configured by broker.conf "
               "(mosquitto syntax; `mosquitto -c broker.conf` runs the same file). Use it when "
               "several masters share one broker. Prints READY host:port once it accepts "
               "connections; stops on Ctrl-C or SIGTERM.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="broker config (default: ./broker.conf if present, else a loopback "
                        "listener on 1883)")
    p.add_argument("--port", type=int, metavar="PORT", help="override the first listener's port")
    p.add_argument("--bind", metavar="ADDRESS", help="override the first listener's address")
    p.add_argument("--allow-remote-anonymous", action="store_true",
                   help="allow anonymous clients on a listener other machines can reach "
                        "(refused by default; prints a warning)")


def run(args: argparse.Namespace) -> int:
    from broker.cli import main as broker_main
    from master.service import default_config_path
    argv: list[str] = []
    config = args.config or default_config_path()
    if config is not None:
        argv += ["--config", str(config)]
    if args.port is not None:
        argv += ["--port", str(args.port)]
    if args.bind is not None:
        argv += ["--bind", args.bind]
    if args.allow_remote_anonymous:
        argv.append("--allow-remote-anonymous")
    return broker_main(argv)
