"""Start the embedded broker as a child process and wait, boundedly, until it accepts clients."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from broker.conf import BrokerConfig, load_config, parse_config
from broker.embedded import check_anonymous_policy
from broker.errors import BrokerStartError

__all__ = ["BrokerProcess", "start_broker_process"]


class BrokerProcess:
    """A running broker process: where to reach it, and how to stop it."""

    def __init__(self, popen: subprocess.Popen[bytes], *, host: str, port: int,
                 tls: bool = False) -> None:
        self.popen = popen
        self.host = host
        self.port = port
        self.tls = tls

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    def running(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`; the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        self._close_pipes()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL now (a crash, for tests); reaps the process."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        if self.popen.stdout is not None and not self.popen.stdout.closed:
            self.popen.stdout.close()

    def __enter__(self) -> BrokerProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"BrokerProcess(pid={self.pid}, url={self.url!r})"


def start_broker_process(config_path: str | os.PathLike[str] | None, *, port: int | None = None,
                         bind: str | None = None, parent_pid: int | None = None,
                         timeout: float = 10.0, allow_remote_anonymous: bool = False,
                         stderr: IO[bytes] | int | None = None,
                         cwd: str | os.PathLike[str] | None = None,
                         trusted_file: str | os.PathLike[str] | None = None,
                         python: str = sys.executable) -> BrokerProcess:
    """Run `python -m broker` and return once it prints READY (within `timeout`).

    The config is read and checked here, so a bad file raises `BrokerConfigError` in the
    caller with its line number, and the process is handed the parsed settings (on its
    stdin) instead of reading the file again; `port=0` picks a free port. With `parent_pid`
    the broker exits by itself once that process is gone. Relative paths in the config
    resolve against `cwd` (default: the working directory), where the process runs.
    `trusted_file` holds the hashed credential of the master that starts it
    (`broker.trusted`).
    """
    base_dir = Path(cwd).resolve() if cwd is not None else Path.cwd()
    config = _checked_config(config_path, port=port, bind=bind, base_dir=base_dir,
                             allow_remote_anonymous=allow_remote_anonymous)
    if trusted_file is not None:
        config = config.with_overrides(trusted_file=Path(trusted_file).resolve())
    command = [python, "-m", "broker", "--settings-stdin"]
    if parent_pid is not None:
        command += ["--parent-pid", str(parent_pid)]
    if allow_remote_anonymous:
        command.append("--allow-remote-anonymous")
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    popen = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=stderr, env=env, cwd=base_dir)
    try:
        _hand_over(popen, config)
        line = _read_line(popen, timeout)
    except BaseException:
        popen.kill()
        popen.wait()
        if popen.stdout is not None:
            popen.stdout.close()
        raise
    if not line.startswith("READY "):
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
        if popen.stdout is not None:
            popen.stdout.close()
        reason = line[len("ERROR "):] if line.startswith("ERROR ") else (
            f"exited with status {popen.returncode}" if line == "" else f"said {line!r}")
        raise BrokerStartError(f"embedded broker did not start: {reason}")
    host, port_text = line[len("READY "):].rsplit(":", 1)
    host = host.strip("[]")
    listener = config.listeners[0]
    if host in ("0.0.0.0", "::", ""):
        host = listener.connect_host
    return BrokerProcess(popen, host=host, port=int(port_text), tls=listener.tls is not None)


def _checked_config(config_path: str | os.PathLike[str] | None, *, port: int | None,
                    bind: str | None, base_dir: Path, allow_remote_anonymous: bool
                    ) -> BrokerConfig:
    config = (load_config(config_path, base_dir=base_dir) if config_path is not None
              else parse_config("", base_dir=base_dir))
    if port is not None:
        config = config.with_port(port)
    if bind is not None:
        config = config.with_bind(bind)
    if not allow_remote_anonymous:
        check_anonymous_policy(config)
    return config


def _hand_over(popen: subprocess.Popen[bytes], config: BrokerConfig) -> None:
    """Write the settings on the process's stdin and close it; a process already gone is
    told apart by its missing READY line (`_read_line`)."""
    assert popen.stdin is not None
    try:
        popen.stdin.write(config.to_json().encode("utf-8"))
        popen.stdin.flush()
    except BrokenPipeError:
        pass
    finally:
        with contextlib.suppress(BrokenPipeError):
            popen.stdin.close()


def _read_line(popen: subprocess.Popen[bytes], timeout: float) -> str:
    """The first stdout line, or '' if the process ends first; bounded by `timeout`."""
    assert popen.stdout is not None
    deadline = time.monotonic() + timeout
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(popen.stdout, selectors.EVENT_READ)
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerStartError(f"embedded broker not ready within {timeout:.1f} s")
            if not selector.select(remaining):
                continue
            chunk = os.read(popen.stdout.fileno(), 4096)
            if not chunk:
                return ""
            buffer += chunk
    return buffer.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
