"""Serving an engine over HTTP inside the test process: uvicorn in a thread of its own, on a free
loopback port. The tests of the routes share the module's engine this way; the CLI's own tests
(SIGTERM, a dead engine's exit code) start ``treadle serve`` as a real process instead."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Iterator, Optional

import httpx
import uvicorn

from treadle.server.app import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(engine: Any, served_model_name: str = "default", api_key: Optional[str] = None,
                    timeout_s: float = 30.0) -> Iterator[str]:
    """Yield the base URL (``http://127.0.0.1:PORT``) of ``create_app(engine, ...)`` served by
    uvicorn (uvloop) in a thread; the server is stopped on exit (the engine is the caller's)."""
    port = free_port()
    app = create_app(engine, served_model_name, api_key=api_key)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", loop="uvloop",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the test server on port {port} did not start")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def wait_health(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s} s")
