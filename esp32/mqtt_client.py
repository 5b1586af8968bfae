"""umqtt.simple's client with every socket wait bounded and a payload limit kept while reading.

umqtt.simple sets its socket back to blocking without a timeout after each poll and reads
each message into a new bytes object. Here each wait ends after `io_timeout` seconds
(OSError: the caller reconnects), and messages are read into one buffer of `limit` bytes
allocated once (`rx`), so a stream of large messages does not fragment the heap: the
callback gets a memoryview that is valid only during the call. A longer message is
drained through that buffer and handed to the callback as None. Every byte received
stamps `last_rx`, which tells a dead connection from a quiet one.

TLS: `Tls` is what umqtt.simple is given as its `ssl` (1.4 and later call its
wrap_socket) and, for 1.3, stands in for the `ussl` module current firmware no longer
has. It verifies the broker's certificate against one CA and its host name. An SSL
socket has no settimeout, so timeouts go to the TCP socket under it (`raw`).
"""

import time

from umqtt.simple import MQTTClient

PINGRESP = 0xD0


class Tls:
    def __init__(self, cadata, hostname, timeout):
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=cadata)
        self.ctx = ctx
        self.hostname = hostname
        self.timeout = timeout
        self.raw = None

    def wrap_socket(self, sock, **_):
        sock.settimeout(self.timeout)  # bounds the handshake too
        self.raw = sock
        return self.ctx.wrap_socket(sock, server_hostname=self.hostname)


class BoundedClient(MQTTClient):
    limit = 4096
    io_timeout = 10
    last_rx = 0
    rx = None   # bytearray(limit), set by the owner while the heap is still whole
    raw = None  # the TCP socket under TLS
    tls = None  # the Tls it was given

    def settimeout(self, t):
        (self.raw or self.sock).settimeout(t)

    def _read_into(self, view):
        if self.sock.readinto(view) != len(view):
            raise OSError(-1)

    def wait_msg(self):
        s = self.sock
        res = s.read(1)
        self.settimeout(self.io_timeout)
        if res is None:
            return None
        if res == b"":
            raise OSError(-1)
        self.last_rx = time.ticks_ms()
        op = res[0]
        if op == PINGRESP:
            s.read(1)
            return op
        if op & 0xF0 != 0x30:
            return op  # PUBACK, SUBACK: the caller reads the rest
        size = self._recv_len()
        n = s.read(2)
        n = n[0] << 8 | n[1]
        topic = s.read(n)
        size -= n + 2
        pid = 0
        if op & 6:
            p = s.read(2)
            pid = p[0] << 8 | p[1]
            size -= 2
        if self.rx is None:
            self.rx = bytearray(self.limit)
        buf = memoryview(self.rx)
        if size > self.limit:
            while size > 0:
                n = min(size, len(buf))
                self._read_into(buf[:n])
                size -= n
            msg = None
        else:
            msg = buf[:size]
            self._read_into(msg)
        self.cb(topic, msg)
        if op & 6 == 2:
            s.write(bytes((0x40, 2, pid >> 8, pid & 0xFF)))
        elif op & 6 == 4:
            raise OSError(-2)  # QoS 2 is never subscribed to
        return op
