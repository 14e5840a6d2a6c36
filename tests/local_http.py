"""A local HTTP server for tests that fetch media by URL (importable from tests/unit and tests/e2e:
pytest puts this directory on sys.path for the root conftest)."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
from typing import Iterator

# Proxy settings a fetch would follow: tests clear them so localhost is reached directly.
PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}  # path -> (body bytes, seconds to wait before answering)

    def do_GET(self):  # noqa: N802
        body, delay = self.routes.get(self.path, (None, 0))
        if delay:
            time.sleep(delay)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the client gave up (a timeout test)
            pass

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def local_http_server() -> Iterator[tuple[str, dict]]:
    """``(base URL, routes)``, served from a thread of this process; fill ``routes[path] =
    (body, delay_s)`` to serve a file."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    _Handler.routes = {}
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", _Handler.routes
    finally:
        srv.shutdown()
        srv.server_close()


def closed_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
