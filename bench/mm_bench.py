"""Image requests on the GPU: a LLaVA-1.5-7B-shaped model (CLIP ViT-L/14 at 336 px + a Llama-7B
text model), ``load_format="dummy"``.

    python bench/mm_bench.py [--tokenizer-dir DIR] [--requests 64] [--out FILE] [--profile-dir DIR]

The tokenizer in DIR (default: SmolLM2's) gets an ``<image>`` token (the config's ``image_token_index`` and vocabulary
are set to match it). Parts, each printed as a JSON line:
  ttft       one 640x480 image + a short prompt, one new token (median of 5 distinct images):
             loading, preprocessing, the vision tower and the 600-token prefill, end to end
  batch1     the same request with 256 new tokens (ignore_eos): decode tok/s
  batch      N requests at once, each its own image, 128 new tokens each: output tok/s, images/s
  repeat     the same N requests again: the images' positions come from the prefix cache
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from common import CONFIGS, Results, bench_parser, engine_kwargs, smollm2_tokenizer_dir

CONFIG = os.path.join(CONFIGS, "llava-1.5-7b", "config.json")


def model_dir(tokenizer_dir: str) -> str:
    from transformers import AutoTokenizer, CLIPImageProcessor

    d = tempfile.mkdtemp(prefix="treadle-llava7b-")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.save_pretrained(d)
    with open(CONFIG) as f:
        cfg = json.load(f)
    cfg["image_token_index"] = tok.convert_tokens_to_ids("<image>")
    cfg["text_config"]["vocab_size"] = len(tok)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(d)
    return d


def images(n: int, seed: int) -> list:
    from PIL import Image

    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(n)]


def main() -> None:
    p = bench_parser(__doc__, tokenizer=True)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--profile-dir", default="", help="trace the first 12 steps of the 64-image batch here")
    a = p.parse_args()
    from treadle import Engine

    d = model_dir(a.tokenizer_dir or smollm2_tokenizer_dir())
    res = Results("mm_bench", a.out, engine_kwargs(a), shape="llava-1.5-7b")
    prompt = "Describe this image in detail."
    t0 = time.perf_counter()
    with Engine(model_path=d, load_format="dummy", random_seed=0, log_level="warning", **engine_kwargs(a)) as eng:
        res.record("startup", seconds=round(time.perf_counter() - t0, 2))
        one = {"max_new_tokens": 1, "ignore_eos": True, "temperature": 0}
        eng.generate(prompt=prompt, image_data=images(1, 99)[0], sampling_params=one)  # warm-up
        ttfts = []
        for img in images(5, 1):
            t = time.perf_counter()
            out = eng.generate(prompt=prompt, image_data=img, sampling_params=one)
            ttfts.append(time.perf_counter() - t)
        res.record("ttft", ms=round(1000 * statistics.median(ttfts), 1), prompt_tokens=out["meta_info"]["prompt_tokens"],
                   image_tokens=out["meta_info"]["image_tokens"])
        t = time.perf_counter()
        out = eng.generate(prompt=prompt, image_data=images(1, 2)[0],
                           sampling_params={"max_new_tokens": 256, "ignore_eos": True, "temperature": 0})
        res.record("batch1", tok_s=round(256 / (time.perf_counter() - t), 1))
        imgs = images(a.requests, 3)
        sp = {"max_new_tokens": 128, "ignore_eos": True, "temperature": 0}
        for part in ("batch", "repeat"):
            if part == "batch" and a.profile_dir:  # the prefill steps with the vision tower, for trace_summary.py
                eng.start_profile(output_dir=a.profile_dir, profile_prefix="llava-batch", num_steps=12)
            t = time.perf_counter()
            outs = eng.generate(prompt=[prompt] * a.requests, image_data=imgs, sampling_params=sp)
            dt = time.perf_counter() - t
            res.record(part, requests=a.requests, seconds=round(dt, 2), tok_s=round(128 * a.requests / dt, 1),
                       images_s=round(a.requests / dt, 1),
                       cached_tokens=sum(o["meta_info"]["cached_tokens"] for o in outs),
                       prompt_tokens=sum(o["meta_info"]["prompt_tokens"] for o in outs))
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
