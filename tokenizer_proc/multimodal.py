"""Images and videos of a request: load, preprocess, and expand their placeholders (LLaVA).

Runs in the tokenizer process, so a bad file or URL fails the call with a ValueError naming the
field before anything is scheduled, and pixel work stays off the user's event loop. A LLaVA
prompt marks each image with one ``<image>`` token (``image_token_index``); it is replaced here
by as many copies as the vision tower yields embeddings, and each image becomes an ``MmItem``
(pixels + where its copies sit). A prompt without placeholders gets them at its start, one per
image, then a newline. A video is sampled into ``VIDEO_FRAMES`` frames, each an image of the
prompt (LLaVA-1.5 has no video tower of its own); its placeholders follow the images'.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

import numpy as np

from treadle.runtime.llava_layout import is_llava_llama
from treadle.runtime.messages import GenerateReq, MediaRef, MmItem
from treadle.runtime.model_check import TEXT_ONLY, architecture
from treadle.tokenizer_proc.media import load_image, load_video_frames

VIDEO_FRAMES = 4  # frames per video: 4 x 576 tokens fit LLaVA-1.5's 4,096-token context with room to answer


def load_multimodal(model_dir: str, tokenizer: Any) -> Optional["MultimodalProcessor"]:
    """The model's multimodal processor, or None for a text-only model (no vision config)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    if is_llava_llama(cfg):  # the original LLaVA layout: its own marker and padded images
        from treadle.tokenizer_proc.llava_pad import LlavaPadProcessor

        return LlavaPadProcessor(model_dir, cfg, tokenizer)
    if "vision_config" not in cfg or not ("image_token_index" in cfg or "image_token_id" in cfg):
        return None
    if architecture(cfg) in TEXT_ONLY:  # served for its text (Gemma 3): images are refused as for any text model
        return None
    return MultimodalProcessor(model_dir, cfg, tokenizer)


class MultimodalProcessor:
    """The model's image preprocessing and placeholder layout (one per tokenizer process)."""

    def __init__(self, model_dir: str, cfg: dict[str, Any], tokenizer: Any) -> None:
        """``cfg``: the model's config.json, as read (HF LLaVA fields); ``model_dir``: where the
        image processor's settings are."""
        from transformers import AutoImageProcessor

        vision = cfg["vision_config"]
        self.image_token = int(cfg.get("image_token_index", cfg.get("image_token_id")))  # either spelling
        self.marker = self.image_token  # the id that marks an image in the tokenized prompt
        patches = (int(vision.get("image_size", 224)) // int(vision.get("patch_size", 32))) ** 2
        self.tokens_per_image = patches + (cfg.get("vision_feature_select_strategy", "default") == "full")
        self.image_processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
        self.newline = tokenizer.encode("\n", add_special_tokens=False)
        self.pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="media")

    def start(self, reqs: list[GenerateReq]) -> list[list[Future]]:
        """Begin loading and preprocessing every image and video of a call, in parallel threads
        (decoding, resizing and fetching URLs release the GIL); one future per image or video."""
        out = []
        for req in reqs:
            futs = [self.pool.submit(self._image, ref, ref.label or f"image_data[{i}]")
                    for i, ref in enumerate(req.image_data)]
            futs += [self.pool.submit(self._video, ref, ref.label or f"video_data[{i}]")
                     for i, ref in enumerate(req.video_data)]
            out.append(futs)
        return out

    def _image(self, ref: MediaRef, field: str) -> list[tuple[str, np.ndarray]]:
        return [("image", self.pixel_values([load_image(ref, field)])[0])]

    def _video(self, ref: MediaRef, field: str) -> list[tuple[str, np.ndarray]]:
        return [("video", px) for px in self.pixel_values(load_video_frames(ref, field, VIDEO_FRAMES))]

    def expand(self, req: GenerateReq, ids: list[int], media: list[Future]) -> tuple[list[int], list[MmItem]]:
        """``ids`` with each image's placeholder expanded, and the request's items in prompt order
        (``media``: what ``start`` began for this request; its first error is raised here)."""
        images = [x for f in media for x in f.result()]
        if not images:
            return ids, []
        marks = [i for i, t in enumerate(ids) if t == self.marker]
        if not marks:  # no placeholders: one per image at the start of the prompt
            ids = [self.image_token] * len(images) + list(self.newline) + ids
            marks = list(range(len(images)))
        if len(marks) != len(images):
            field = " / ".join(f for f, given in (("image_data", req.image_data), ("video_data", req.video_data)) if given)
            raise ValueError(f"{field}: the prompt has {len(marks)} image placeholder(s) but {len(images)} "
                             f"image(s) and video frame(s) were given ({VIDEO_FRAMES} frames a video).")
        out: list[int] = []
        items: list[MmItem] = []
        prev = 0
        for (modality, px), mark in zip(images, marks):
            out += ids[prev:mark]
            items.append(MmItem(modality=modality, offset=len(out), num_tokens=self.tokens_per_image,
                                digest=digest(px), pixels=px.tobytes(), shape=list(px.shape)))
            out += [self.image_token] * self.tokens_per_image
            prev = mark + 1
        return out + ids[prev:], items

    def pixel_values(self, images: list[Any]) -> np.ndarray:
        """``[N, 3, H, W]`` float32, as HF's image processor makes them for this model."""
        batch = self.image_processor(images=images, return_tensors="np")["pixel_values"]
        return np.ascontiguousarray(batch, dtype=np.float32)


def digest(pixels: np.ndarray) -> int:
    """A 63-bit hash of an image's pixels: equal images share radix-cache keys, different ones don't."""
    h = hashlib.blake2b(pixels.tobytes(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def check_items_fit(items: list[MmItem], length: int) -> None:
    """After truncation: an image cut in two cannot run (its embeddings come whole)."""
    for i, it in enumerate(items):
        if it.offset + it.num_tokens > length:
            raise ValueError(f"The input with its image tokens ({it.offset + it.num_tokens}+ tokens) does not fit "
                             f"the context: image {i} would be cut by truncation.")


def reject_media(req: GenerateReq, arch: Optional[str]) -> None:
    """A text-only model given images or videos: say so, naming the field."""
    field = "image_data" if req.image_data else "video_data"
    raise ValueError(f"{field}: this model ({arch or 'unknown architecture'}) takes no images or videos; "
                     f"multimodal input needs a LLaVA model (LlavaForConditionalGeneration).")
