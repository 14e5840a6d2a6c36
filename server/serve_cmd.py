"""``treadle serve``: one Engine behind one uvicorn server, and the process's life around them.

- Start-up: the engine starts first (its time in the log), then uvicorn binds; the line
  ``Serving <model> on http://HOST:PORT`` is printed once the socket listens (tests and benches
  wait for it).
- SIGTERM or SIGINT: the server drains: new requests and ``/health`` answer 503, requests in
  flight finish for up to ``--graceful-shutdown-timeout`` seconds (then they are aborted), the
  engine shuts down with all its children, and the process exits 0. A second signal stops at once.
- Engine death (a child process died or froze; a call raised ``EngineDeadError``): ``/health``
  answers 503 for a moment, then the process reaps what is left and exits 1, so that a
  supervisor restarts it.
"""

from __future__ import annotations

import signal
import sys
import time
from types import FrameType
from typing import Any, Optional

import uvicorn

from treadle.server.app import create_app
from treadle.server.chat_template import load_server_tokenizer
from treadle.server.serve_args import parse_args

READY_LINE = "Serving {model} on http://{host}:{port}"
DEAD_EXIT_DELAY_S = 1.0  # /health answers 503 this long before the process goes (a probe sees why)
DEAD_EXIT_CODE = 1
START_FAILED_EXIT_CODE = 1
ABORTED_DRAIN_S = 5.0  # after the grace period: time for the aborted requests' last events to go out


def say(message: str) -> None:
    """A start-up or shutdown phase, on stderr whatever the log level."""
    print(f"[treadle serve {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class InFlight:
    """ASGI wrapper counting the HTTP requests being answered (a stream until its last byte)."""

    def __init__(self, app: Any) -> None:
        self.app, self.count = app, 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.count -= 1


class TreadleServer(uvicorn.Server):
    """uvicorn's server with the lifecycle above: its signal handler starts a drain instead of
    stopping, and its tick (every 0.1 s) ends the drain and watches the engine."""

    def __init__(self, config: uvicorn.Config, app: Any, inflight: InFlight, grace_s: float, model: str) -> None:
        super().__init__(config)
        self.fastapi_app, self.inflight, self.grace_s, self.model = app, inflight, grace_s, model
        self.drain_deadline: Optional[float] = None
        self.aborted_at: Optional[float] = None
        self.dead_at: Optional[float] = None
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        if self.drain_deadline is not None or self.dead_at is not None:  # a second signal: stop now
            say(f"signal {sig} again: stopping without waiting")
            self.should_exit = self.force_exit = True
            return
        say(f"signal {signal.Signals(sig).name}: draining ({self.inflight.count} request(s) in flight, "
            f"grace {self.grace_s:g} s)")
        self.fastapi_app.state.draining = True
        self.drain_deadline = time.monotonic() + self.grace_s

    async def startup(self, sockets: Optional[list] = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:  # on stdout only, bare: a supervisor or test matches the line's start
            cfg = self.config
            print(READY_LINE.format(model=self.model, host=cfg.host, port=cfg.port), flush=True)

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        now = time.monotonic()
        state = self.fastapi_app.state
        if state.engine_dead is None:
            dead = engine_death(state.engine)
            if dead is not None:
                state.on_engine_dead(dead)
        if state.engine_dead is not None:
            if self.dead_at is None:
                self.dead_at = now
                say(f"the engine died: {state.engine_dead}; exiting with code {DEAD_EXIT_CODE}")
            if now - self.dead_at >= DEAD_EXIT_DELAY_S:
                self.exit_code = DEAD_EXIT_CODE
                return True
            return False
        if self.drain_deadline is None:
            return False
        if self.inflight.count == 0:
            say("drained: no request in flight")
            return True
        if now >= self.drain_deadline and self.aborted_at is None:
            say(f"grace period over: aborting {self.inflight.count} request(s)")
            state.engine.abort_request(abort_all=True)
            self.aborted_at = now
        return self.aborted_at is not None and now - self.aborted_at >= ABORTED_DRAIN_S


def engine_death(engine: Any) -> Optional[BaseException]:
    """The engine's own death report, if it has one: the client's supervisor thread marks the
    engine dead when a child exits or stops beating (``client/supervisor.py``); there is no
    callback for it, so the server polls this on each tick."""
    sup = getattr(engine, "_sup", None)
    return getattr(sup, "dead", None) if sup is not None and not getattr(engine, "_shut_down", False) else None


def _interrupt(sig: int, frame: Optional[FrameType]) -> None:
    raise KeyboardInterrupt


def serve(argv: Optional[list[str]] = None) -> int:
    """Run the server until it drains or the engine dies; the process's exit code."""
    server_args, ns = parse_args(argv)
    from treadle import Engine

    name = server_args.served_model_name or server_args.model_path
    say(f"starting the engine (model {server_args.model_path})")
    t0 = time.perf_counter()
    # SIGTERM while the engine starts: stop the start (Engine.__init__ cleans up its children)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        engine = Engine(server_args=server_args)
    except (ValueError, TypeError, NotImplementedError, RuntimeError, OSError) as e:
        say(f"the engine failed to start: {type(e).__name__}: {e}")
        return START_FAILED_EXIT_CODE
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        say(f"engine started in {time.perf_counter() - t0:.1f} s "
            f"(device {engine.server_args.device}, {len(engine.get_all_child_pids())} child processes)")
        app = create_app(engine, name, api_key=server_args.api_key)
        if not engine.server_args.is_embedding and not server_args.skip_tokenizer_init:  # (detected too)
            # the chat template and tokenizer now, not on the first chat request (and a bad
            # --chat-template fails the start)
            try:
                app.state.openai_tokenizer = load_server_tokenizer(engine.server_args)
            except (OSError, ValueError) as e:
                say(f"the chat template failed to load: {type(e).__name__}: {e}")
                return START_FAILED_EXIT_CODE
        inflight = InFlight(app)
        config = uvicorn.Config(inflight, host=server_args.host, port=int(server_args.port), loop="uvloop",
                                log_level=server_args.log_level_http or "warning", timeout_graceful_shutdown=5,
                                lifespan="off")
        server = TreadleServer(config, app, inflight, ns.graceful_shutdown_timeout, name)
        server.run()
        if not server.started and server.exit_code == 0:
            return DEAD_EXIT_CODE  # the socket never listened (address in use, ...)
        return server.exit_code
    finally:
        say("shutting the engine down")
        engine.shutdown()
        say("stopped")


def main(argv: Optional[list[str]] = None) -> int:
    try:
        return serve(argv)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
