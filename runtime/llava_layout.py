"""The original LLaVA checkpoint layout (``liuhaotian/llava-v1.5-*``, ``LlavaLlamaForCausalLM``)
read as the HF ``LlavaForConditionalGeneration`` that gpu_worker/models/llava.py builds.

That layout is a Llama checkpoint (``model.*``, ``lm_head.*``, Llama fields at the top of
config.json) plus the projector inside it (``model.mm_projector.{0,2}``) and ``mm_*`` fields; the
vision tower is a separate CLIP checkpoint named by ``mm_vision_tower`` (a path or a hub id,
resolved like ``model_path``), which also holds the image processor's settings. Its tokenizer has
no ``<image>`` token: the tokenizer process adds one to find the placeholders in the prompt (the
marker), and the placeholder positions carry ``image_token_index`` (an id inside the vocabulary,
never seen by the model: the vision embeddings replace them).

``image_aspect_ratio: pad`` pads each image to a square of the image processor's mean colour
before resizing (LLaVA's ``expand2square``).
"""

from __future__ import annotations

import os
from typing import Any

ARCH = "LlavaLlamaForCausalLM"
IMAGE_MARKER = "<image>"  # what a prompt writes where an image goes (LLaVA's DEFAULT_IMAGE_TOKEN)
_MM_KEYS = ("mm_", "image_aspect_ratio", "tune_mm", "freeze_mm", "unfreeze_mm", "use_mm_proj", "image_grid")


def is_llava_llama(cfg: dict[str, Any]) -> bool:
    """Whether a config.json (as read) is the original LLaVA layout."""
    return ARCH in (cfg.get("architectures") or []) or ("mm_vision_tower" in cfg and "text_config" not in cfg)


def vision_tower_dir(cfg: dict[str, Any], model_dir: str) -> str:
    """The CLIP checkpoint directory ``mm_vision_tower`` names: a directory (absolute, or relative
    to the model's directory or the working directory), else resolved like ``model_path``."""
    name = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{model_dir}: an {ARCH} config needs mm_vision_tower (the CLIP checkpoint)")
    for cand in (os.path.join(model_dir, name), os.path.expanduser(name)):
        if os.path.isdir(cand):
            return os.path.abspath(cand)
    from treadle.runtime.model_files import resolve_model_files

    try:
        return resolve_model_files(name).model_dir
    except (ValueError, OSError) as e:
        raise ValueError(f"{model_dir}: cannot find mm_vision_tower {name!r}: {e}") from None


def hf_llava_dict(cfg: dict[str, Any], model_dir: str) -> dict[str, Any]:
    """The HF ``LlavaConfig`` fields of an original-layout config (``vision_config`` from the
    tower's checkpoint); ``vision_tower_dir`` and ``image_aspect_ratio`` ride along."""
    from transformers import CLIPVisionConfig

    if cfg.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise NotImplementedError(f"LLaVA mm_projector_type {cfg.get('mm_projector_type', 'linear')!r} is not built "
                                  "(mlp2x_gelu only: LLaVA-1.5)")
    if cfg.get("mm_use_im_start_end") or cfg.get("mm_use_im_patch_token"):
        raise NotImplementedError("LLaVA checkpoints with image start/end or patch tokens are not built (LLaVA-1.5 "
                                  "uses neither)")
    select = cfg.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ValueError(f"unsupported mm_vision_select_feature {select!r} (patch or cls_patch)")
    aspect = cfg.get("image_aspect_ratio", "square")
    if aspect not in ("pad", "square", None):
        raise NotImplementedError(f"LLaVA image_aspect_ratio {aspect!r} is not built (pad or square)")
    tower = vision_tower_dir(cfg, model_dir)
    text = {k: v for k, v in cfg.items() if not k.startswith(_MM_KEYS) and k not in ("architectures", "model_type")}
    text.update(model_type="llama", architectures=["LlamaForCausalLM"])
    fill = cfg.get("pad_token_id")
    return {
        "architectures": [ARCH], "model_type": "llava",
        "text_config": text, "vision_config": CLIPVisionConfig.from_pretrained(tower).to_dict(),
        "image_token_index": int(fill) if isinstance(fill, int) and 0 <= fill < cfg["vocab_size"] else 0,
        "vision_feature_layer": int(cfg.get("mm_vision_select_layer", -2)),
        "vision_feature_select_strategy": "default" if select == "patch" else "full",
        "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "vision_tower_dir": tower, "image_aspect_ratio": aspect or "square",
    }


def load_model_config(model_dir: str) -> Any:
    """transformers' config of a checkpoint: ``AutoConfig``'s, or for the original LLaVA layout the
    ``LlavaConfig`` it maps to (AutoConfig would read its ``model_type: llava`` as an HF LLaVA with
    default-sized towers)."""
    import json

    from transformers import AutoConfig, LlavaConfig

    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    if not is_llava_llama(raw):
        return AutoConfig.from_pretrained(model_dir)
    d = hf_llava_dict(raw, model_dir)
    extra = {k: d.pop(k) for k in ("architectures", "vision_tower_dir", "image_aspect_ratio", "model_type")}
    config = LlavaConfig(**d)
    config.architectures = extra["architectures"]
    config.vision_tower_dir, config.image_aspect_ratio = extra["vision_tower_dir"], extra["image_aspect_ratio"]
    return config
