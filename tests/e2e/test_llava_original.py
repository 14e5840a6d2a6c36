"""The original LLaVA layout (``liuhaotian/llava-v1.5-*``: ``LlavaLlamaForCausalLM``, projector in
the checkpoint, ``mm_vision_tower`` naming a CLIP checkpoint, ``image_aspect_ratio: pad``) against
transformers' ``LlavaForConditionalGeneration`` holding the same weights (issue 24, acceptance 3).

The reference pads each image to a square of the image processor's mean colour itself (written
out here, as LLaVA's ``expand2square``), then runs CLIP's image processor and HF's greedy
generation on the prompt ids with each ``<image>`` expanded to 16 copies of ``image_token_index``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from treadle import Engine

Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.e2e

N = 12
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
PER_IMAGE = 16


def noise(seed: int, w: int, h: int) -> "Image.Image":
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def padded(im: "Image.Image", mean: list[float]) -> "Image.Image":
    """LLaVA's expand2square: centred on a square of the mean colour."""
    w, h = im.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(x * 255) for x in mean))
    canvas.paste(im, ((side - w) // 2, (side - h) // 2))
    return canvas


@pytest.fixture(scope="module")
def original(tmp_path_factory, default_model_dir):
    from tiny_llava import build_tiny_llava_original

    path, hf = build_tiny_llava_original(str(tmp_path_factory.mktemp("llava_original")), default_model_dir)
    with Engine(model_path=path, random_seed=0) as eng:
        yield eng, hf, path


class Reference:
    def __init__(self, hf, path: str) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor

        self.hf = hf
        self.images = CLIPImageProcessor.from_pretrained(f"{path}/clip")
        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.add_tokens(["<image>"], special_tokens=True)
        self.marker = self.tok.convert_tokens_to_ids("<image>")

    def ids(self, text: str) -> list[int]:
        out: list[int] = []
        for t in self.tok.encode(text):
            out += [self.hf.config.image_token_index] * PER_IMAGE if t == self.marker else [t]
        return out

    @torch.no_grad()
    def greedy(self, ids: list[int], image: "Image.Image", pad: bool = True) -> list[int]:
        im = padded(image, self.images.image_mean) if pad else image
        px = self.images(images=[im], return_tensors="pt")["pixel_values"].float()
        out = self.hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               pixel_values=px, max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)
        return out[0, len(ids):].tolist()


def test_original_layout_matches_hf_with_padded_images(original):
    eng, hf, path = original
    ref = Reference(hf, path)
    images = [noise(1, 48, 24), noise(2, 20, 40)]  # wide and tall: both padded to a square
    res = eng.generate(prompt=[PROMPT, PROMPT], image_data=[[images[0]], [images[1]]],
                       sampling_params={"temperature": 0, "max_new_tokens": N, "ignore_eos": True})
    ids = ref.ids(PROMPT)
    sensitive = False
    for r, im in zip(res, images):
        want = ref.greedy(ids, im)
        assert r["meta_info"]["prompt_tokens"] == len(ids)
        assert r["output_ids"] == want
        sensitive |= ref.greedy(ids, im, pad=False) != want
    assert sensitive, "the padding should change at least one image's tokens, or this test proves nothing"


def test_original_layout_prompt_without_placeholder_and_info(original):
    eng, hf, path = original
    ref = Reference(hf, path)
    im = noise(3, 30, 50)
    res = eng.generate(prompt="Describe it.", image_data=im,
                       sampling_params={"temperature": 0, "max_new_tokens": N, "ignore_eos": True})
    ids = [hf.config.image_token_index] * PER_IMAGE + ref.tok.encode("\n", add_special_tokens=False) + \
        ref.tok.encode("Describe it.")
    assert res["output_ids"] == ref.greedy(ids, im)
    assert res["meta_info"]["prompt_tokens"] == len(ids) and res["meta_info"].get("image_tokens") == PER_IMAGE
