"""``get_model_info()``: what SGLang's ``Engine.get_model_info`` and ``GET /get_model_info`` report.

One builder for the Engine method and the HTTP route, so the two never disagree. The keys are
the union of SGLang's versions: ``model_path`` / ``tokenizer_path`` as the user named them (a hub
id stays a hub id), ``is_generation`` (False for embedding models, given or detected),
``preferred_sampling_params``, the current ``weight_version`` (weight updates change it),
``served_model_name``, ``load_format``, the chat parsers, and from config.json ``model_type``,
``architectures`` and whether images are understood.
"""

from __future__ import annotations

import json
import os
from typing import Any

from treadle.runtime.server_args import ServerArgs


def model_info(args: ServerArgs, model_dir: str) -> dict[str, Any]:
    """The model facts of an engine started with (resolved) ``args`` on ``model_dir``."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    return {
        "model_path": args.model_path,
        "tokenizer_path": args.tokenizer_path,
        "is_generation": not args.is_embedding,
        "preferred_sampling_params": args.preferred_sampling_params,
        "weight_version": args.weight_version,
        "served_model_name": args.served_model_name or args.model_path,
        "load_format": args.load_format,
        "reasoning_parser": args.reasoning_parser,
        "tool_call_parser": args.tool_call_parser,
        "model_type": cfg.get("model_type"),
        "architectures": cfg.get("architectures"),
        "has_image_understanding": "vision_config" in cfg or "mm_vision_tower" in cfg,
        "has_audio_understanding": False,
    }
