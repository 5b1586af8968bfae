"""Processes a benchmark starts: brokers, masters, compute nodes; and what they cost.

Every process is started by a handle and stopped by that handle (its own PID, never by name),
every wait is bounded, and CPU and memory are read from /proc so a run can say where the time
went.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["REPO", "free_port", "child_env", "Child", "Children", "cpu_seconds", "rss_bytes",
           "child_pids", "mosquitto_path", "mosquitto_config", "wait_listening", "wait_for",
           "console_script"]

REPO = Path(__file__).resolve().parents[2]
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra_path: Sequence[Path] = ()) -> dict[str, str]:
    """The environment of a child: this checkout importable, output unbuffered."""
    env = dict(os.environ)
    paths = [str(p) for p in extra_path] + [str(REPO)]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths + [env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 0.02) -> object:
    """Poll until `predicate()` is truthy; TimeoutError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def wait_listening(port: int, timeout: float = 10.0) -> None:
    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False
    wait_for(listening, timeout, f"a listener on port {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0.0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (0 if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except OSError:
        return 0


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (e.g. the embedded broker the master started)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(entry.name))
    return out


def console_script(name: str, module: str) -> list[str]:
    """The installed console script beside this interpreter, else `python -m module`."""
    script = Path(sys.executable).parent / name
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", module]


def mosquitto_path() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


def mosquitto_config(port: int, directory: Path) -> Path:
    """The project's broker.conf with its listener on `port`: both brokers run one file."""
    text = (REPO / "broker.conf").read_text()
    text, count = re.subn(r"(?m)^listener\s+\d+(\s+127\.0\.0\.1)?\s*$",
                          f"listener {port} 127.0.0.1", text, count=1)
    if not count:
        text = f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n" + text
    path = directory / "mosquitto.conf"
    path.write_text(text)
    return path


class Child:
    """One child process with its output in a file, stopped by its own PID."""

    def __init__(self, name: str, args: list[str], *, log_dir: Path,
                 env: dict[str, str] | None = None, stdout_pipe: bool = False) -> None:
        self.name = name
        self.args = args
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            args, cwd=str(REPO), env=env or child_env(),
            stdout=subprocess.PIPE if stdout_pipe else self._log, stderr=self._log,
            start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def read_line_with(self, text: str, timeout: float) -> str:
        """The first stdout line holding `text` (stdout must be a pipe); bounded."""
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        os.set_blocking(self.popen.stdout.fileno(), False)
        buffer = b""
        while time.monotonic() < deadline:
            chunk = self.popen.stdout.read()
            if chunk:
                buffer += chunk
                for line in buffer.decode(errors="replace").splitlines():
                    if text in line:
                        return line
            elif self.popen.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not print {text!r} within {timeout:g}s:\n"
                           f"{buffer.decode(errors='replace')[-2000:]}\n{self.log_tail()}")

    def log_tail(self, size: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (a clean leave), then SIGKILL if it lingers; reaps it."""
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
            except ProcessLookupError:
                pass
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._log.close()


class Children:
    """The processes of one benchmark step, stopped together (last started first)."""

    def __init__(self, log_dir: Path | None = None) -> None:
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="bench-"))
        self.items: list[Child] = []

    def start(self, name: str, args: list[str], **kwargs: object) -> Child:
        child = Child(name, args, log_dir=self.log_dir, **kwargs)  # type: ignore[arg-type]
        self.items.append(child)
        return child

    def stop(self) -> None:
        for child in reversed(self.items):
            try:
                child.stop()
            except Exception:  # one stubborn child must not keep the others running
                pass
        self.items.clear()

    def __enter__(self) -> "Children":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
