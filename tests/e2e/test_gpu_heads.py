"""Scoring heads and the original LLaVA layout on CUDA (the Triton attention backend; decoding
CUDA graphs are not captured for a score model), against transformers on the same weights.

float32 on both sides: classification / reward scores within 2e-3 (Triton's float32 dots may use
TF32), the original-layout LLaVA's greedy tokens identical for a wide and a tall image.
Tokenizer: ``TREADLE_TEST_TOKENIZER_DIR`` or SmolLM2's (``gpu_helpers.smollm2_dir``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpu_helpers import needs_gpus, smollm2_dir
from treadle import Engine

pytestmark = [*needs_gpus(1), pytest.mark.e2e]

TEXTS = ["Hello world", "The cat sat on the mat.", "Paris is the capital of France and a big city.",
         "Quantum computers use qubits."]


@pytest.mark.parametrize("builder", ["build_llama_classifier", "build_qwen2_reward"])
def test_gpu_scores_match_hf(builder, tmp_path):
    import tiny_heads
    from transformers import AutoTokenizer

    tok_dir = smollm2_dir()
    path, ref = getattr(tiny_heads, builder)(str(tmp_path / "m"), tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    with Engine(model_path=path, random_seed=0, dtype="float32") as eng:
        assert eng.get_server_info()["device"].startswith("cuda")
        for text, got in zip(TEXTS, eng.encode(TEXTS)["embedding"]):
            want = ref(tok(text)["input_ids"])
            assert max(abs(g - w) for g, w in zip(got, want)) < 2e-3, (got, want)


def test_gpu_original_llava_matches_hf(tmp_path):
    from PIL import Image
    from test_llava_original import N, PROMPT, Reference

    from tiny_llava import build_tiny_llava_original

    path, hf = build_tiny_llava_original(str(tmp_path / "llava"), smollm2_dir())
    ref = Reference(hf, path)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((48, 24), (20, 40))]
    with Engine(model_path=path, random_seed=0, dtype="float32") as eng:
        res = eng.generate(prompt=[PROMPT, PROMPT], image_data=[[images[0]], [images[1]]],
                           sampling_params={"temperature": 0, "max_new_tokens": N, "ignore_eos": True})
    ids = ref.ids(PROMPT)
    for r, im in zip(res, images):
        assert r["output_ids"] == ref.greedy(ids, im)
    torch.cuda.empty_cache()
