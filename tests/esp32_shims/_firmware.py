"""What an ESP32's firmware does around the user's files, on the MicroPython unix port.

    micropython _firmware.py hard       reset: boot.py, main.py, then the friendly REPL
    micropython _firmware.py raw        soft reset from the raw REPL: boot.py, raw REPL
    micropython _firmware.py friendly   soft reset from the friendly REPL: boot.py,
                                        main.py, friendly REPL

Run in the board's filesystem directory, with stdin/stdout being the serial line. The
REPL speaks enough of the raw REPL protocol for mpremote (raw-paste is declined, so
mpremote falls back to the plain raw REPL). A soft reset (Ctrl-D on an empty line)
ends the process with SOFT_RESET_EXIT (raw) or SOFT_FRIENDLY_EXIT, machine.reset() with
machine.HARD_RESET_EXIT: the bridge (tests/fake_device.py) starts a fresh interpreter
in the matching mode, as a board restarts its VM. The state file named by
FAKE_DEVICE_STATE says `running` while boot.py or main.py runs, so the bridge turns a
Ctrl-C into SIGINT then, and `repl` otherwise.
"""

import os
import sys

SOFT_RESET_EXIT = 3
SOFT_FRIENDLY_EXIT = 5
BANNER = ("MicroPython v1.29 on fake-esp32; ESP32 module (unix port)\r\n"
          "Type \"help()\" for more information.\r\n")

_globals = {"__name__": "__main__"}


def out(text):
    sys.stdout.write(text)


def set_state(state):
    path = os.getenv("FAKE_DEVICE_STATE")
    if path:
        with open(path, "w") as f:
            f.write(state)


def run_file(name):
    try:
        os.stat(name)
    except OSError:
        return
    set_state("running")
    try:
        with open(name) as f:
            source = f.read()
        exec(compile(source, name, "exec"), _globals)
    except KeyboardInterrupt as e:
        sys.print_exception(e, sys.stdout)
    except Exception as e:
        sys.print_exception(e, sys.stdout)
    set_state("repl")


def read1():
    while True:
        try:
            c = sys.stdin.buffer.read(1)
        except KeyboardInterrupt:
            return b"\x03"
        if not c:
            sys.exit(0)  # the bridge went away
        return c


def execute(code, raw):
    try:
        if raw:
            exec(code, _globals)
        else:
            try:
                value = eval(code, _globals)
            except SyntaxError:
                exec(code, _globals)
            else:
                if value is not None:
                    out(repr(value) + "\r\n")
    except SystemExit:
        raise
    except BaseException as e:
        if raw:
            out("\x04")
        sys.print_exception(e, sys.stdout)
        return True
    return False


def raw_repl():
    """Until Ctrl-B (returns) or a soft reset (exits)."""
    out("raw REPL; CTRL-B to exit\r\n")
    line = b""
    while True:
        out(">")
        while True:
            c = read1()
            if c == b"\x01":
                if line == b"\x05A":
                    out("R\x00")  # raw-paste understood, not offered
                    line = b""
                    continue
                out("raw REPL; CTRL-B to exit\r\n>")
                line = b""
            elif c == b"\x02":
                out("\r\n")
                return
            elif c == b"\x03":
                line = b""
            elif c == b"\x04":
                break
            else:
                line += c
        if not line:
            out("\r\nMPY: soft reboot\r\n")
            sys.exit(SOFT_RESET_EXIT)
        out("OK")
        failed = execute(line.decode(), True)
        line = b""
        out("\x04" if failed else "\x04\x04")


def friendly_repl():
    """Until Ctrl-A (returns) or a soft reset (exits)."""
    out(BANNER + ">>> ")
    line = b""
    while True:
        c = read1()
        if c == b"\x01":
            out("\r\n")
            return
        if c == b"\x03":
            line = b""
            out("\r\n>>> ")
        elif c == b"\x04":
            if not line:
                out("\r\nMPY: soft reboot\r\n")
                sys.exit(SOFT_FRIENDLY_EXIT)
        elif c in (b"\r", b"\n"):
            out("\r\n")
            if line.strip():
                execute(line.decode(), False)
            line = b""
            out(">>> ")
        elif c in (b"\x7f", b"\x08"):
            if line:
                line = line[:-1]
                out("\x08 \x08")
        else:
            line += c
            out(c.decode())


def main(mode):
    # The board's path: its own filesystem first (the port puts this script's folder there).
    sys.path[0] = ""
    set_state("repl")
    run_file("boot.py")
    if mode in ("hard", "friendly"):
        run_file("main.py")
    raw = mode == "raw"
    while True:
        if raw:
            raw_repl()
        else:
            friendly_repl()
        raw = not raw


main(sys.argv[1] if len(sys.argv) > 1 else "hard")
