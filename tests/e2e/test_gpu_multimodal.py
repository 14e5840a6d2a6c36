"""Multimodal (LLaVA) on the GPU: the engine's greedy tokens against HF transformers (formerly
``bench/gpu_mm_check.py``).

The tests' tiny random LLaVA (``tests/tiny_llava.py``, SmolLM2's tokenizer plus ``<image>``) runs
on CUDA in float32 (graphs and overlap on, a small ``chunked_prefill_size`` so chunks end inside
images) on a one- and a two-image prompt; 16 greedy tokens must equal HF ``generate``'s on the
same weights and pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpu_helpers import needs_gpus

pytestmark = [*needs_gpus(1), pytest.mark.e2e]

PROMPTS = {"one_image": ("<image>\nDescribe this image.", slice(0, 1)),
           "two_images": ("Compare <image> and <image> please.", slice(1, 3))}


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    """(engine, HF model, HF processor, images) on one tiny LLaVA."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from treadle import Engine

    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(3)]
    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    hf = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, dtype=torch.float32).to("cuda").eval()
    with Engine(model_path=tiny_llava_dir, dtype="float32", device="cuda", chunked_prefill_size=12,
                random_seed=0) as engine:
        yield engine, hf, proc, images


@pytest.mark.parametrize("name", list(PROMPTS))
def test_llava_greedy_matches_hf(llava, name):
    engine, hf, proc, images = llava
    text, which = PROMPTS[name]
    imgs = images[which]
    inputs = proc(text=text, images=imgs, return_tensors="pt").to("cuda")
    want = hf.generate(**inputs, do_sample=False, max_new_tokens=16)[0, inputs["input_ids"].shape[1]:].tolist()
    got = engine.generate(prompt=text, image_data=imgs, sampling_params={"max_new_tokens": 16, "temperature": 0})
    print(f"{len(imgs)} image(s): engine {got['output_ids']} hf {want} "
          f"image_tokens={got['meta_info'].get('image_tokens')}")
    assert got["output_ids"] == want
