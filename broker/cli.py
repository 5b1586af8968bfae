"""`python -m broker`: the embedded broker as a process of its own.

stdout carries exactly one line, for whoever started the process: `READY <host>:<port>` once
connections are accepted, or `ERROR <message>` if the broker cannot start. Logs go to the
config's `log_dest` (stdout is redirected to stderr, to keep that line alone). SIGTERM and
SIGINT stop it with exit status 0; with `--parent-pid` it also stops when that process is
gone, so a master killed with -9 leaves no broker behind.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

from core.runtime import tune_for_messaging
from broker.conf import BrokerConfig, load_config, parse_config
from broker.embedded import run_broker
from broker.errors import BrokerError

__all__ = ["main", "wait_for_exit", "configure_logging"]

log = logging.getLogger("broker")
PARENT_POLL_SECONDS = 0.5
_LEVELS = {"debug": logging.DEBUG, "all": logging.DEBUG, "information": logging.INFO,
           "notice": logging.INFO, "subscribe": logging.INFO, "unsubscribe": logging.INFO,
           "websockets": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m broker",
        description="Run the embedded MQTT broker from a mosquitto-syntax config file.")
    parser.add_argument("--config", type=Path, help="mosquitto-syntax config (default: "
                        "mosquitto's local-only mode: 127.0.0.1:1883, anonymous)")
    parser.add_argument("--port", type=int, help="listen on this port instead of the first "
                        "listener's (0: any free port)")
    parser.add_argument("--bind", help="bind the first listener to this address instead")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    parser.add_argument("--allow-remote-anonymous", action="store_true",
                        help="allow anonymous clients on listeners other machines can reach")
    parser.add_argument("--trusted-file", type=Path, help="a `user:hash` file whose users "
                        "pass every ACL: the credential `master-node serve` generates for its "
                        "own master")
    # `start_broker_process` parsed the config already and writes it on stdin (to_json)
    parser.add_argument("--settings-stdin", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class _Formatter(logging.Formatter):
    """mosquitto's log lines: `<epoch seconds>: message`, or a strftime timestamp."""

    def __init__(self, *, timestamp: bool, timestamp_format: str | None) -> None:
        super().__init__("%(message)s")
        self._timestamp = timestamp
        self._timestamp_format = timestamp_format

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if not self._timestamp:
            return message
        if self._timestamp_format:
            stamp = time.strftime(self._timestamp_format, time.localtime(record.created))
        else:
            stamp = str(int(record.created))
        return f"{stamp}: {message}"


def configure_logging(config: BrokerConfig) -> None:
    """Route logs as `log_dest`/`log_type`/`log_timestamp` say; amqtt's chatter stays quiet."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    types = set(config.log_types)
    if "none" in config.log_dest or types == {"none"}:
        root.addHandler(logging.NullHandler())
        root.setLevel(logging.CRITICAL + 1)
        return
    level = min((_LEVELS[kind] for kind in types if kind in _LEVELS), default=logging.WARNING)
    formatter = _Formatter(timestamp=config.log_timestamp,
                           timestamp_format=config.log_timestamp_format)
    handlers: list[logging.Handler] = []
    if {"stderr", "stdout"} & set(config.log_dest):
        handlers.append(logging.StreamHandler(sys.stderr))
    if "file" in config.log_dest and config.log_file is not None:
        handlers.append(logging.FileHandler(config.log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level)
    quiet = logging.DEBUG if level <= logging.DEBUG else logging.WARNING
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(quiet)


async def wait_for_exit(pid: int) -> None:
    """Return once process `pid` has exited (a zombie counts as exited)."""
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        except OSError:
            fd = -1
        if fd >= 0:
            gone = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_reader(fd, gone.set)
            try:
                await gone.wait()
            finally:
                loop.remove_reader(fd)
                os.close(fd)
            return
    while _alive(pid):
        await asyncio.sleep(PARENT_POLL_SECONDS)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _ready_line(addresses: list[tuple[str, int]]) -> str:
    host, port = addresses[0]
    return f"READY [{host}]:{port}" if ":" in host else f"READY {host}:{port}"


async def _serve(config: BrokerConfig, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher: asyncio.Task[None] | None = None
    if args.parent_pid is not None:
        async def watch_parent() -> None:
            await wait_for_exit(args.parent_pid)
            log.warning("parent process %d is gone; stopping", args.parent_pid)
            stop.set()
        watcher = asyncio.create_task(watch_parent())

    def ready(addresses: list[tuple[str, int]]) -> None:
        sys.stdout.write(_ready_line(addresses) + "\n")
        sys.stdout.flush()
        log.info("embedded broker running on %s",
                 ", ".join(f"{host}:{port}" for host, port in addresses))

    try:
        await run_broker(config, stop_event=stop, on_ready=ready,
                         allow_remote_anonymous=args.allow_remote_anonymous)
    finally:
        if watcher is not None:
            watcher.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    try:
        if args.settings_stdin:
            config = BrokerConfig.from_json(sys.stdin.read())
        else:
            config = load_config(args.config) if args.config else parse_config("")
        if args.port is not None:
            config = config.with_port(args.port)
        if args.bind is not None:
            config = config.with_bind(args.bind)
        if args.trusted_file is not None:
            config = config.with_overrides(trusted_file=args.trusted_file.resolve())
    except BrokerError as e:
        return _fail(str(e), status=2, parent=args.parent_pid is not None)
    configure_logging(config)
    tune_for_messaging()  # a broker allocates per packet what the collector would walk
    pid_file = config.pid_file
    try:
        if pid_file is not None:
            pid_file.write_text(f"{os.getpid()}\n")
        return asyncio.run(_serve(config, args))
    except BrokerError as e:
        return _fail(str(e), status=1, parent=args.parent_pid is not None)
    finally:
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)


def _fail(message: str, *, status: int, parent: bool) -> int:
    """Say why once: on stdout's protocol line for the master that started us (which reports
    it), on stderr for a person; both when stdout goes elsewhere than a terminal."""
    if not parent:
        print(f"error: {message}", file=sys.stderr, flush=True)
    if parent or not sys.stdout.isatty():
        print(f"ERROR {message.splitlines()[0] if message else 'failed'}", flush=True)
    return status
