"""`network` for the MicroPython unix port, imitating an ESP32 station interface.

The link state comes from a control file named by the env var FAKE_WIFI_FILE: while it
says `down`, isconnected() is False and connect() does not succeed; once it says `up`
again the board must call connect() again to get its link back, as after a real drop.
A missing file means the access point is up. FAKE_MAC sets the MAC (12 hex digits).
"""

import os

STA_IF = 0
AP_IF = 1
PM_NONE = 0
PM_PERFORMANCE = 1
PM_POWERSAVE = 2
STAT_IDLE = 1000
STAT_CONNECTING = 1001
STAT_GOT_IP = 1010
STAT_NO_AP_FOUND = 201
STAT_WRONG_PASSWORD = 202

_hostname = ["esp32"]
_ifaces = {}


def hostname(name=None):
    if name is None:
        return _hostname[0]
    _hostname[0] = name


def _ap_up():
    path = os.getenv("FAKE_WIFI_FILE")
    if not path:
        return True
    try:
        with open(path) as f:
            return not f.read().strip().startswith("down")
    except OSError:
        return True


def _mac():
    text = os.getenv("FAKE_MAC") or "240ac4000001"
    return bytes(int(text[i:i + 2], 16) for i in range(0, 12, 2))


class WLAN:
    """One object per interface, as on a board."""

    def __new__(cls, iface=STA_IF):
        if iface not in _ifaces:
            obj = object.__new__(cls)
            obj._init(iface)
            _ifaces[iface] = obj
        return _ifaces[iface]

    def __init__(self, iface=STA_IF):
        pass

    def _init(self, iface):
        self.iface = iface
        self._active = False
        self._joined = False
        self._ssid = None
        self._static = None
        self._options = {}
        self.connects = 0

    def active(self, on=None):
        if on is None:
            return self._active
        self._active = bool(on)
        if not on:
            self._joined = False

    def connect(self, ssid=None, key=None, bssid=None):
        if not self._active:
            raise OSError("Wifi Not Started")
        self.connects += 1
        self._ssid = ssid
        self._joined = _ap_up()

    def disconnect(self):
        self._joined = False

    def isconnected(self):
        if self._joined and not _ap_up():
            self._joined = False  # dropped: stays down until connect() is called again
        return self._active and self._joined

    def status(self, param=None):
        if param == "rssi":
            return -50
        if self.isconnected():
            return STAT_GOT_IP
        return STAT_CONNECTING if self._active and self._ssid else STAT_IDLE

    def ifconfig(self, config=None):
        if config is not None:
            self._static = tuple(config)
            return None
        if self._static:
            return self._static
        if self.isconnected():
            return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")
        return ("0.0.0.0", "0.0.0.0", "0.0.0.0", "0.0.0.0")

    def config(self, *args, **kwargs):
        if kwargs:
            self._options.update(kwargs)
            return None
        if args and args[0] == "mac":
            return _mac()
        if args and args[0] in ("essid", "ssid"):
            return self._ssid
        if args:
            return self._options.get(args[0])
        raise TypeError("config needs a parameter")

    def scan(self):
        return []
