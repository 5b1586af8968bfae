"""`machine` for the MicroPython unix port: adds what an ESP32 has and the port lacks.

reset() and soft_reset() end the process with the exit codes the fake device bridge
(tests/fake_device.py) reads as a hard or a soft reset, and restarts accordingly.
FAKE_MAC (12 hex digits) sets unique_id(), which an ESP32 derives from its MAC.
"""

import os
import sys

try:
    from umachine import *  # the port's own functions (idle, mem32, ...)
except ImportError:
    pass

SOFT_RESET_EXIT = 3
HARD_RESET_EXIT = 4


def unique_id():
    text = os.getenv("FAKE_MAC") or "240ac4000001"
    return bytes(int(text[i:i + 2], 16) for i in range(0, 12, 2))


def reset():
    sys.stdout.write("\r\n")
    sys.exit(HARD_RESET_EXIT)


def soft_reset():
    sys.exit(SOFT_RESET_EXIT)


def freq(hz=None):
    return 240000000


def reset_cause():
    return 1  # PWRON_RESET


class WDT:
    def __init__(self, id=0, timeout=5000):
        self.timeout = timeout

    def feed(self):
        pass
