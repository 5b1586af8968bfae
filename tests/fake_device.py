"""A fake ESP32 on a pseudo-terminal: the MicroPython unix port behind a serial line.

    python tests/fake_device.py --fs DIR [--heap 100K] [--log FILE] [--max-seconds N]

Prints `PTY /dev/pts/N` once the line is open; give that path to mpremote (or to
scripts/deploy_esp32.py --port). DIR is the board's filesystem. The bridge relays bytes
between the pty and a MicroPython process running tests/esp32_shims/_firmware.py (boot.py,
main.py, the REPL), and restarts that process when the board would restart: a soft reset
(Ctrl-D in the REPL) starts a fresh interpreter in the matching REPL mode, machine.reset()
starts it as after power-on (boot.py, then main.py). A Ctrl-C that arrives while boot.py or
main.py runs becomes SIGINT, as a keyboard interrupt does on a board.

Output nobody reads is dropped, as a UART does; all of it is also appended to --log. The
bridge ends its MicroPython child on SIGTERM/SIGINT, and stops by itself after
--max-seconds.
"""

from __future__ import annotations

import argparse
import errno
import os
import pty
import selectors
import signal
import subprocess
import sys
import time
import tty
from pathlib import Path

SHIMS_DIR = Path(__file__).resolve().parent / "esp32_shims"
FIRMWARE = SHIMS_DIR / "_firmware.py"
SOFT_RESET_EXIT = 3      # from the raw REPL
HARD_RESET_EXIT = 4      # machine.reset()
SOFT_FRIENDLY_EXIT = 5   # from the friendly REPL
RESTART_MODES = {SOFT_RESET_EXIT: "raw", HARD_RESET_EXIT: "hard", SOFT_FRIENDLY_EXIT: "friendly"}


def micropython_command() -> list[str]:
    candidate = Path(sys.executable).parent / "micropython"
    return [str(candidate)] if candidate.exists() else ["micropython"]


class Bridge:
    """One pty, one MicroPython child at a time, restarted on resets."""

    def __init__(self, fs: Path, heap: str, log_path: Path | None, env: dict[str, str]) -> None:
        self.fs = fs
        self.heap = heap
        self.env = env
        self.log = open(log_path, "ab", buffering=0) if log_path else None
        self.master, self.slave = pty.openpty()
        tty.setraw(self.slave)  # a UART has no line discipline: no echo, no CR/LF mapping
        os.set_blocking(self.master, False)
        self.name = os.ttyname(self.slave)
        self.state_file = fs.parent / f".{fs.name}.state"
        self.child: subprocess.Popen | None = None
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.master, selectors.EVENT_READ, "host")
        self.pending_in = b""
        self.restarts = 0

    def start_child(self, mode: str) -> None:
        env = dict(self.env)
        env["FAKE_DEVICE_STATE"] = str(self.state_file)
        env["MICROPYPATH"] = f":.frozen:lib:{SHIMS_DIR}"
        self.state_file.write_text("running" if mode != "raw" else "repl")
        self.child = subprocess.Popen(
            [*micropython_command(), "-X", f"heapsize={self.heap}", str(FIRMWARE), mode],
            cwd=self.fs, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, bufsize=0)
        assert self.child.stdout is not None and self.child.stdin is not None
        os.set_blocking(self.child.stdout.fileno(), False)
        self.selector.register(self.child.stdout, selectors.EVENT_READ, "device")
        self.record(f"\n[bridge: started {mode}, pid {self.child.pid}]\n".encode())

    def record(self, data: bytes) -> None:
        if self.log is not None:
            self.log.write(data)

    def to_host(self, data: bytes) -> None:
        self.record(data)
        try:
            os.write(self.master, data)
        except BlockingIOError:
            pass  # nobody reading the line: a UART drops it too
        except OSError as e:
            if e.errno not in (errno.EIO, errno.EAGAIN):
                raise

    def from_host(self, data: bytes) -> None:
        if b"\x03" in data and self.state() == "running" and self.child is not None:
            self.child.send_signal(signal.SIGINT)
            data = data.replace(b"\x03", b"")
        self.pending_in += data
        self.feed_child()

    def feed_child(self) -> None:
        if not self.pending_in or self.child is None or self.child.stdin is None:
            return
        try:
            written = os.write(self.child.stdin.fileno(), self.pending_in)
            self.pending_in = self.pending_in[written:]
        except BlockingIOError:
            pass
        except BrokenPipeError:
            self.pending_in = b""

    def state(self) -> str:
        try:
            return self.state_file.read_text().strip()
        except OSError:
            return "repl"

    def child_exited(self) -> None:
        assert self.child is not None
        code = self.child.wait()
        assert self.child.stdout is not None
        try:
            rest = self.child.stdout.read() or b""
        except OSError:
            rest = b""
        if rest:
            self.to_host(rest)
        self.selector.unregister(self.child.stdout)
        self.child.stdout.close()
        if self.child.stdin is not None:
            self.child.stdin.close()
        self.child = None
        self.pending_in = b""
        self.restarts += 1
        mode = RESTART_MODES.get(code, "friendly")
        if code not in RESTART_MODES:
            self.record(f"\n[bridge: interpreter exited with {code}]\n".encode())
            time.sleep(0.2)  # never spin if the interpreter cannot start at all
        self.start_child(mode)

    def serve(self, deadline: float) -> None:
        self.start_child("hard")
        while time.monotonic() < deadline:
            for key, _mask in self.selector.select(timeout=0.2):
                if key.data == "host":
                    try:
                        data = os.read(self.master, 4096)
                    except (BlockingIOError, OSError):
                        continue
                    self.from_host(data)
                elif self.child is not None and key.fileobj is self.child.stdout:
                    try:
                        data = os.read(key.fileobj.fileno(), 4096)
                    except BlockingIOError:
                        continue
                    if data:
                        self.to_host(data)
                    else:
                        self.child_exited()
            if self.child is not None and self.child.poll() is not None:
                self.child_exited()
            self.feed_child()

    def close(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
            self.child.wait(5)
        os.close(self.master)
        os.close(self.slave)
        if self.log is not None:
            self.log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fs", type=Path, required=True, help="the board's filesystem folder")
    parser.add_argument("--heap", default="100K", help="MicroPython heap (default 100K)")
    parser.add_argument("--log", type=Path, help="append everything the board prints here")
    parser.add_argument("--max-seconds", type=float, default=600.0,
                        help="stop by itself after this long (default 600)")
    args = parser.parse_args(argv)
    args.fs.mkdir(parents=True, exist_ok=True)
    bridge = Bridge(args.fs.resolve(), args.heap, args.log, dict(os.environ))

    def stop(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"PTY {bridge.name}", flush=True)
    try:
        bridge.serve(time.monotonic() + args.max_seconds)
    finally:
        bridge.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
