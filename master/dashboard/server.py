"""DashboardServer: the page, its script and style, and the fabric's state as JSON, over HTTP.

The standard library's threading HTTP server is enough for a few people watching; every
asset ships inside the package, the page loads nothing from elsewhere (its content security
policy says so to the browser), and the state is polled by the page a few times a second.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Callable

from core.errors import ConfigError

__all__ = ["DashboardServer", "parse_listen", "ASSETS"]

log = logging.getLogger(__name__)

ASSETS = {"/": ("index.html", "text/html; charset=utf-8"),
          "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
          "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8")}
_POLICY = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"


def parse_listen(value: str, *, default_port: int = 8080) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` or `HOST` (loopback and 8080 by default) as (host, port)."""
    host, sep, port_text = value.rpartition(":") if ":" in value else (value, "", "")
    host = host.strip("[]") or "127.0.0.1"
    if not sep:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"--listen {value!r}: the port must be a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--listen {value!r}: the port must be 0-65535")
    return host, port


def _load_assets() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("master.dashboard").joinpath("static")
    return {path: (folder.joinpath(name).read_bytes(), kind)
            for path, (name, kind) in ASSETS.items()}


class DashboardServer:
    """Serves the page and `/api/state` (what `state()` returns) until stopped."""

    def __init__(self, *, host: str, port: int, state: Callable[[], dict[str, Any]]) -> None:
        self._assets = _load_assets()
        self._state = state
        handler = self._handler_class()
        try:
            self._httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"cannot serve the dashboard on {host}:{port}: the port is "
                                  "already in use (choose another with --listen HOST:PORT)") from None
            raise ConfigError(f"cannot serve the dashboard on {host}:{port}: "
                              f"{e.strerror or e}") from None
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="dashboard-http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        return f"http://{shown}:{port}/"

    def start(self) -> "DashboardServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for a serve_forever that never ran
            self._httpd.shutdown()
            self._thread.join(5.0)
        self._httpd.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "fabric-dashboard"

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                path = self.path.split("?", 1)[0]
                if path == "/api/state":
                    try:
                        body = json.dumps(server._state(), allow_nan=False).encode()
                    except (TypeError, ValueError) as e:
                        log.warning("dashboard state not encodable: %s", e)
                        self._send(500, b'{"error": "state not encodable"}', "application/json")
                        return
                    self._send(200, body, "application/json")
                elif path in server._assets:
                    body, kind = server._assets[path]
                    self._send(200, body, kind)
                else:
                    self._send(404, b"not found\n", "text/plain; charset=utf-8")

            def _send(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Security-Policy", _POLICY)
                self.send_header("X-Content-Type-Options", "nosniff")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("dashboard %s " + format, self.address_string(), *args)

        return Handler
