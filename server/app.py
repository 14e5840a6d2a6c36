"""The ASGI app: one ``Engine`` behind SGLang's native routes and OpenAI's ``/v1`` routes.

``create_app`` only wires things together; the routes live in ``native.py`` and
``openai_api.py``, the error shapes in ``errors.py``, the metrics in ``metrics.py``. What a route
may use, all on ``request.app.state``:

- ``engine``: the ``treadle.Engine`` (its async calls run on the server's event loop; its sync
  control calls go through ``run_in_threadpool``);
- ``served_model_name``: the name ``/v1/models`` lists and requests must name;
- ``metrics``: the ``Metrics``; each generating route times its requests with ``metrics.timer()``;
- ``on_engine_dead(exc)``: called when a call raised ``EngineDeadError``; ``/health`` then answers
  503 and the server exits non-zero.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional

from fastapi import FastAPI, Request, Response

from treadle.server.errors import error_response, install_error_handlers
from treadle.server.metrics import Metrics

# the routes a missing or wrong API key may still reach (a load balancer's probe has no key)
OPEN_PATHS = frozenset({"/health"})


def create_app(engine: Any, served_model_name: str, api_key: Optional[str] = None,
               on_engine_dead: Optional[Callable[[BaseException], None]] = None) -> FastAPI:
    from treadle.server import native, openai_api, scoring_routes

    app = FastAPI(title="Treadle", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.served_model_name = served_model_name
    app.state.metrics = Metrics(served_model_name)
    app.state.engine_dead = None  # the EngineDeadError once the engine is gone
    app.state.draining = False    # set on SIGTERM: new requests get 503, those in flight finish

    def engine_died(exc: BaseException) -> None:
        if app.state.engine_dead is None:
            app.state.engine_dead = exc
            if on_engine_dead is not None:
                on_engine_dead(exc)

    app.state.on_engine_dead = engine_died
    install_error_handlers(app)
    if api_key:
        _require_api_key(app, api_key)
    app.include_router(native.router)
    app.include_router(openai_api.router)
    app.include_router(scoring_routes.router)  # /v1/rerank, /v1/score
    return app


def _require_api_key(app: FastAPI, api_key: str) -> None:
    """``Authorization: Bearer KEY`` on every route but ``/health`` (SGLang's ``--api-key``)."""
    expected = f"Bearer {api_key}"

    @app.middleware("http")
    async def check_key(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path not in OPEN_PATHS and request.headers.get("authorization") != expected:
            return error_response(401, "Invalid or missing API key (send 'Authorization: Bearer <key>').",
                                  code="invalid_api_key")
        return await call_next(request)
