"""Station Wi-Fi for the node, from config: optional static IP, reconnection kept aggressive.

A node without a link is useless, so the radio is kept awake (no power saving), the
driver retries on its own, and every failed attempt here is followed by a cleaner one:
a disconnect, and every third time a full radio restart. Each call is bounded in time.
"""

import time

import network

_wlan = None
_failures = 0


def wlan():
    """The station interface (one per board)."""
    global _wlan
    if _wlan is None:
        _wlan = network.WLAN(network.STA_IF)
    return _wlan


def _setting(config, name, default=None):
    return getattr(config, name, default)


def static_ifconfig(config):
    """(ip, netmask, gateway, dns) when STATIC_IP is set, else None."""
    ip = _setting(config, "STATIC_IP")
    if not ip:
        return None
    gateway = _setting(config, "GATEWAY") or ip.rsplit(".", 1)[0] + ".1"
    return (ip, _setting(config, "NETMASK") or "255.255.255.0", gateway,
            _setting(config, "DNS") or gateway)


def _prepare(w, config):
    w.active(True)
    for option in ({"pm": getattr(w, "PM_NONE", 0)}, {"reconnects": -1}):
        try:
            w.config(**option)
        except Exception:
            pass  # older firmware lacks the option
    hostname = _setting(config, "HOSTNAME")
    if hostname:
        try:
            network.hostname(hostname)
        except Exception:
            pass
    static = static_ifconfig(config)
    if static:
        w.ifconfig(static)


def up(config, timeout_s=None):
    """Connect to WIFI_SSID within timeout_s (default WIFI_TIMEOUT_S); True when connected."""
    global _failures
    w = wlan()
    if w.active() and w.isconnected():
        _failures = 0
        return True
    if timeout_s is None:
        timeout_s = _setting(config, "WIFI_TIMEOUT_S", 15)
    try:
        if _failures and _failures % 3 == 0:
            w.active(False)  # radio restart: clears a driver stuck mid-association
        _prepare(w, config)
        try:
            w.connect(_setting(config, "WIFI_SSID"), _setting(config, "WIFI_PASSWORD"))
        except OSError:
            w.disconnect()  # "already connecting": start over once
            w.connect(_setting(config, "WIFI_SSID"), _setting(config, "WIFI_PASSWORD"))
        deadline = time.ticks_add(time.ticks_ms(), int(timeout_s * 1000))
        while not w.isconnected():
            if time.ticks_diff(deadline, time.ticks_ms()) <= 0:
                break
            time.sleep_ms(100)
    except Exception as e:
        print("wifi:", repr(e))
    if w.isconnected():
        _failures = 0
        return True
    _failures += 1
    try:
        w.disconnect()
    except Exception:
        pass
    return False


def sync_clock(config):
    """Set the clock from NTP_HOST when configured: result timestamps need unix time."""
    host = _setting(config, "NTP_HOST")
    if not host:
        return False
    try:
        import ntptime
        ntptime.host = host
        ntptime.settime()
        return True
    except Exception as e:
        print("ntp:", repr(e))
        return False
