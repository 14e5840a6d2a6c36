"""The client's side of multimodal input: turning ``image_data`` / ``video_data`` into ``MediaRef``s.

This runs in the user's process, so it only checks shapes and types and packs what it was given;
nothing is read, fetched or decoded here. Paths and URLs travel as strings and the tokenizer
process loads them (``tokenizer_proc/media.py``), off the user's event loop. The one exception is
a PIL image, which only exists in this process: its RGB pixels travel as they are (encoding a
photo as PNG would take tens of milliseconds of the user's thread). PIL is never imported here (a
user who hands us a PIL image has already imported it), so text-only users do not pay for it.
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Any, Optional

from treadle.runtime.messages import MediaRef

_EXPECTED = "expected a path, URL, base64 string, bytes or PIL image"


def to_media_refs(field: str, value: Any, batch_size: Optional[int]) -> list[list[MediaRef]]:
    """Normalise one call's ``image_data`` / ``video_data`` into one list of ``MediaRef`` per prompt.

    An item is a ``str`` (local path, ``file://``, ``http(s)://`` or ``data:`` URL, or bare base64),
    ``bytes``/``bytearray`` (an encoded file), a ``pathlib.Path`` or a ``PIL.Image.Image``.

    * ``value is None``: no media, ``[[]]`` for a single prompt or ``[[]] * batch_size``.
    * Single prompt (``batch_size is None``): an item, or a list/tuple of items. A list is always
      read as *several media of that one prompt* (``["a.png", "b.png"]`` is two images for the
      prompt), never as a batch; nested lists and ``None`` inside it are rejected.
    * Batch of N prompts: a list/tuple of exactly N entries, one per prompt, each an item, a list
      of items, or ``None`` (no media for that prompt). A length mismatch is a ``ValueError``;
      a non-list value is a ``TypeError`` (a single item is not broadcast over the batch).

    Wrong types raise ``TypeError`` and empty values ``ValueError``, both naming the field and the
    offending index, e.g. ``image_data[1][0]: expected ..., got int``.
    """
    if batch_size is None:
        if value is None:
            return [[]]
        if isinstance(value, (list, tuple)):
            return [[_to_ref(f"{field}[{i}]", v) for i, v in enumerate(value)]]
        return [[_to_ref(field, value)]]

    if value is None:
        return [[] for _ in range(batch_size)]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{field}: a batch of {batch_size} prompts needs a list with one entry per prompt, "
                        f"got {type(value).__name__}")
    if len(value) != batch_size:
        raise ValueError(f"{field} has {len(value)} entries but the batch has {batch_size} prompts")
    out: list[list[MediaRef]] = []
    for i, entry in enumerate(value):
        if entry is None:
            out.append([])
        elif isinstance(entry, (list, tuple)):
            out.append([_to_ref(f"{field}[{i}][{j}]", v) for j, v in enumerate(entry)])
        else:
            out.append([_to_ref(f"{field}[{i}]", entry)])
    return out


def _to_ref(where: str, item: Any) -> MediaRef:
    """One item → ``MediaRef``; ``where`` is the field with its index, for error messages."""
    if isinstance(item, str):
        if not item.strip():
            raise ValueError(f"{where}: empty string")
        if "://" not in item and not item.startswith("data:") and os.path.exists(item):
            item = os.path.abspath(item)  # relative to the caller's working directory, not a child's
        return MediaRef(source=item, label=where)
    if isinstance(item, (bytes, bytearray, memoryview)):
        if not len(item):
            raise ValueError(f"{where}: empty bytes")
        return MediaRef(raw=bytes(item), label=where)
    if isinstance(item, pathlib.PurePath):
        # Absolute, so the tokenizer process finds it whatever its working directory.
        return MediaRef(source=os.path.abspath(os.path.expanduser(str(item))), label=where)
    pil = sys.modules.get("PIL.Image")  # no PIL loaded means this cannot be a PIL image
    if pil is not None and isinstance(item, pil.Image):
        rgb = item if item.mode == "RGB" else _to_rgb(item)
        return MediaRef(rgb=rgb.tobytes(), size=list(rgb.size), label=where)
    raise TypeError(f"{where}: {_EXPECTED}, got {type(item).__name__}")


def _to_rgb(image: Any) -> Any:
    """A PIL image as RGB, the way the tokenizer process converts decoded files (palette
    transparency goes through RGBA, as PIL asks)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def attach_media(reqs: list[Any], prompt: Any, input_ids: Any, image_data: Any, video_data: Any) -> None:
    """Give each request (``GenerateReq``, prompt-major with ``n`` copies per prompt) its prompt's
    images and videos. The batch size is the user's: a list of prompts (or of id lists) is a batch."""
    if image_data is None and video_data is None:
        return
    batch = isinstance(prompt, (list, tuple)) or (
        prompt is None and isinstance(input_ids, (list, tuple)) and bool(input_ids) and isinstance(input_ids[0], (list, tuple)))
    n_prompts = (len(prompt) if prompt is not None else len(input_ids)) if batch else 1
    images = to_media_refs("image_data", image_data, n_prompts if batch else None)
    videos = to_media_refs("video_data", video_data, n_prompts if batch else None)
    per = len(reqs) // n_prompts  # n > 1: parallel samples of one prompt share its media
    for i, req in enumerate(reqs):
        req.image_data, req.video_data = images[i // per], videos[i // per]
