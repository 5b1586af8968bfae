"""umqtt.simple's client with every socket wait bounded and a payload limit kept while reading.

umqtt.simple sets its socket back to blocking without a timeout after each poll and reads
each message into a new bytes object. Here each wait ends after `io_timeout` seconds
(OSError: the caller reconnects), and messages are read into one buffer of `limit` bytes
allocated once (`rx`), so a stream of large messages does not fragment the heap: the
callback gets a memoryview that is valid only during the call. A longer message is
drained through that buffer and handed to the callback as None. Every byte received
stamps `last_rx`, which tells a dead connection from a quiet one.
"""

import time

from umqtt.simple import MQTTClient

PINGRESP = 0xD0


class BoundedClient(MQTTClient):
    limit = 4096
    io_timeout = 10
    last_rx = 0
    rx = None  # bytearray(limit), set by the owner while the heap is still whole

    def _read_into(self, view):
        if self.sock.readinto(view) != len(view):
            raise OSError(-1)

    def wait_msg(self):
        s = self.sock
        res = s.read(1)
        s.settimeout(self.io_timeout)
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
