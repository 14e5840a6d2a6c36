"""Images of the original LLaVA layout (``LlavaLlamaForCausalLM``, runtime/llava_layout.py).

Two things differ from the HF layout: the tokenizer has no ``<image>`` token, so one is added
here as the marker the prompt's placeholders tokenize to (the expanded positions then carry the
config's in-vocabulary ``image_token_index``); and with ``image_aspect_ratio: pad`` each image is
padded to a square of the image processor's mean colour, centred, before the processor resizes
and crops it (LLaVA's ``expand2square``), so nothing of a wide or tall image is cropped away.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from treadle.runtime.llava_layout import IMAGE_MARKER, hf_llava_dict
from treadle.tokenizer_proc.multimodal import MultimodalProcessor


def expand_to_square(image: Any, fill: tuple[int, ...]) -> Any:
    """``image`` (PIL) centred on a square canvas of colour ``fill`` (itself if already square)."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def mean_colour(image_processor: Any) -> tuple[int, ...]:
    """The processor's ``image_mean`` as 0-255 integers (LLaVA's ``int(x * 255)``)."""
    return tuple(int(x * 255) for x in image_processor.image_mean)


class LlavaPadProcessor(MultimodalProcessor):
    def __init__(self, model_dir: str, cfg: dict[str, Any], tokenizer: Any) -> None:
        hf = hf_llava_dict(cfg, model_dir)
        super().__init__(hf["vision_tower_dir"], hf, tokenizer)  # the image processor is the tower's
        self.marker = tokenizer.add_special_token(IMAGE_MARKER)
        self.pad = hf["image_aspect_ratio"] == "pad"

    def pixel_values(self, images: list[Any]) -> np.ndarray:
        if self.pad:
            fill = mean_colour(self.image_processor)
            images = [expand_to_square(im, fill) for im in images]
        return super().pixel_values(images)
