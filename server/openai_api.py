"""OpenAI's API: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/embeddings``, ``/v1/models``."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

router = APIRouter()
_CREATED = int(time.time())


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    name = request.app.state.served_model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": _CREATED, "owned_by": "treadle",
                                        "root": name, "max_model_len": request.app.state.engine.server_args.context_length}]}
