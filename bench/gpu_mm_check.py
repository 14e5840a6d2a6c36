"""Multimodal (LLaVA) on the GPU: the engine's greedy tokens against HF transformers.

    python bench/gpu_mm_check.py --tokenizer-dir DIR

Builds the tests' tiny random LLaVA (tests/tiny_llava.py) from the tokenizer in DIR, then runs
the engine on CUDA in float32 (graphs and overlap on, a small ``chunked_prefill_size`` so chunks
end inside images) on one- and two-image prompts, and compares 16 greedy tokens with HF
``generate`` on the same weights and pixels. Prints one line per prompt and PASS/FAIL.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer-dir", required=True)
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the same check")
    a = p.parse_args()
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tiny_llava import build_tiny_llava
    from treadle import Engine

    path = build_tiny_llava(tempfile.mkdtemp(prefix="tiny-llava-"), a.tokenizer_dir)
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(3)]
    prompts = [("<image>\nDescribe this image.", images[:1]), ("Compare <image> and <image> please.", images[1:])]
    proc = AutoProcessor.from_pretrained(path)
    hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).to(a.device).eval()
    ok = True
    with Engine(model_path=path, dtype="float32", device=a.device, chunked_prefill_size=12,
                random_seed=0) as engine:
        for text, imgs in prompts:
            inputs = proc(text=text, images=imgs, return_tensors="pt").to(a.device)
            want = hf.generate(**inputs, do_sample=False, max_new_tokens=16)[0, inputs["input_ids"].shape[1]:].tolist()
            got = engine.generate(prompt=text, image_data=imgs, sampling_params={"max_new_tokens": 16, "temperature": 0})
            same = got["output_ids"] == want
            ok &= same
            print(f"{len(imgs)} image(s): engine {got['output_ids']} hf {want} identical={same} "
                  f"image_tokens={got['meta_info'].get('image_tokens')}")
    print("PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
