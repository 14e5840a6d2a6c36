"""A step's multimodal inputs: run the vision tower on new images, place embeddings at their tokens.

A prompt with an image may be prefilled in several chunks, and the image's placeholder tokens may
straddle chunk boundaries. The scheduler sends an item's pixels only with the first row that
needs it (``MmChunk``); the embeddings of the whole item are computed then and kept per
(slot, item) until a row has covered the item's last position, so later chunks reuse them
instead of re-running the tower. A slot taken by a new request (``NewSlot``) drops whatever its
previous request left (an aborted or retracted prompt never reaches its last position).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from treadle.gpu_worker.host_to_device import to_device
from treadle.runtime.messages import MmChunk, PlanRow


class MmInputs:
    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> None:
        """``encode``: pixels ``[N, 3, H, W]`` float32 -> embeddings ``[N, tokens, hidden]``."""
        self.encode, self.device = encode, device
        self.cache: dict[tuple[int, int], torch.Tensor] = {}  # (slot, item) -> [num_tokens, hidden]

    def drop_slot(self, slot: int) -> None:
        for key in [k for k in self.cache if k[0] == slot]:
            del self.cache[key]

    def step_embeds(self, rows: list[tuple[int, PlanRow]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(token indices [M], embeddings [M, hidden])`` for ``rows``: ``(index of the row's first
        token in the step, row)`` of the rows with ``mm`` chunks. Encodes the items not cached yet
        (one tower call per image shape) and forgets the items whose last position a row covers."""
        self._encode_new(rows)
        idx: list[int] = []
        parts: list[torch.Tensor] = []
        for off, row in rows:
            lo, hi = row.start_pos, row.start_pos + len(row.input_ids)
            for c in row.mm:
                emb = self.cache[(row.slot, c.item)]
                if emb.shape[0] != c.num_tokens:
                    raise ValueError(f"slot {row.slot} item {c.item}: {c.num_tokens} tokens, but its cached "
                                     f"embeddings have {emb.shape[0]}")
                a, b = max(lo, c.offset), min(hi, c.offset + c.num_tokens)
                if a >= b:
                    raise ValueError(f"slot {row.slot} item {c.item} (positions {c.offset}..{c.offset + c.num_tokens}) "
                                     f"does not overlap the row's positions {lo}..{hi}")
                idx += range(off + a - lo, off + b - lo)
                parts.append(emb[a - c.offset:b - c.offset])
                if b == c.offset + c.num_tokens:  # its last position is in: no later chunk needs it
                    del self.cache[(row.slot, c.item)]
        return to_device(idx, torch.int64, self.device), torch.cat(parts)

    def _encode_new(self, rows: list[tuple[int, PlanRow]]) -> None:
        """Encode every item not cached yet, batching the items of one image shape."""
        by_shape: dict[tuple[int, ...], list[tuple[tuple[int, int], MmChunk]]] = {}
        for _, row in rows:
            for c in row.mm:
                key = (row.slot, c.item)
                if key in self.cache:
                    continue
                if not c.pixels:
                    raise ValueError(f"slot {row.slot} item {c.item}: no pixels and no cached embeddings")
                if len(c.shape) != 3 or len(c.pixels) != 4 * int(np.prod(c.shape)):
                    raise ValueError(f"slot {row.slot} item {c.item}: {len(c.pixels)} bytes of pixels do not "
                                     f"make a float32 [C, H, W] array of shape {c.shape}")
                by_shape.setdefault(tuple(c.shape), []).append((key, c))
        for shape, items in by_shape.items():
            pixels = np.stack([np.frombuffer(c.pixels, np.float32).reshape(shape) for _, c in items])
            embeds = self.encode(to_device(torch.from_numpy(pixels), torch.float32, self.device))
            for (key, c), emb in zip(items, embeds):
                if emb.shape[0] != c.num_tokens:
                    raise ValueError(f"slot {key[0]} item {c.item}: {c.num_tokens} placeholder tokens, but the "
                                     f"image yields {emb.shape[0]} embeddings")
            self.cache.update((key, emb) for (key, _), emb in zip(items, embeds))

    def __len__(self) -> int:
        return len(self.cache)

