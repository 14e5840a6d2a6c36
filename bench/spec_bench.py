"""Speculative decoding at batch 1: tokens per verify step and the speed-up over ordinary decoding.

    python bench/spec_bench.py                        # CPU: the default model, copy-heavy prompts
    python bench/spec_bench.py --shape llama8b        # GPU: Llama-3.1-8B shape, dummy weights
    python bench/spec_bench.py --algorithm STANDALONE --draft-model default
    python bench/spec_bench.py --topk 4 --parts copy   # NGRAM tree verification (CPU: torch-native)

Both engines (ordinary and speculative; same seed, same prompts) alive at once, each prompt
generated alone (batch 1) on one then the other, after a warm-up; on a GPU each engine gets a
32k-token KV pool (``max_total_tokens``) so that both fit. Parts:

* ``copy``: prompts whose answer repeats the prompt. On the default model: a code edit, a rewrite
  and a list continuation written here. On a dummy-weight shape the text means nothing, so the
  prompt is a random span given twice and the output is whatever the random model makes: read
  the acceptance figures beside the speed-up.
* ``no_repeat``: random ids that never repeat, so n-gram drafts find nothing in the prompt (the
  output may still repeat itself: read the acceptance figures).
* ``no_draft``: the same with ``speculative_ngram_min_match_window_size=12``, so drafts (almost)
  never come: the cost of running with speculation on when it proposes nothing (no overlap
  scheduling, the lookup each step). The issue's bound for "nothing accepted" is 5%.

Each result line has ``tok_s`` for both engines, ``speedup``, ``accept_length`` (tokens per verify
step, SGLang's meta_info figure) and the drafts accepted / proposed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from typing import Any

from common import CONFIGS, Results, bench_parser, config_model_dir, engine_kwargs, smollm2_tokenizer_dir

SHAPES = {"llama8b": "llama-3.1-8b", "smollm2": "smollm2-135m"}
CODE = ("def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total / len(xs)\n\n"
        "def variance(xs):\n    m = mean(xs)\n    total = 0\n    for x in xs:\n        total += (x - m) ** 2\n"
        "    return total / len(xs)\n")
STORY = ("The old lighthouse keeper climbed the stairs every evening. He lit the lamp, wiped the glass and "
         "watched the ships pass the rocks. One night the lamp went out, and he climbed the stairs again.")
TEXT_PROMPTS = [
    f"Rename the variable total to acc in this code:\n{CODE}\nHere is the code with total renamed to acc:\n",
    f"Rewrite the following text, keeping every sentence:\n{STORY}\nRewritten text:\n",
    "Copy this list: " + ", ".join(f"item {i}" for i in range(40)) + ". The list again: item 0,",
]


def timed(eng: Any, prompt: Any, params: dict) -> tuple[int, float, dict]:
    key = "input_ids" if isinstance(prompt, list) else "prompt"
    t0 = time.perf_counter()
    r = eng.generate(**{key: prompt}, sampling_params=params)
    return len(r["output_ids"]), time.perf_counter() - t0, r["meta_info"]


def part(res: Results, name: str, base_kw: dict, spec_kw: dict, prompts: list, new_tokens: int,
         rounds: int = 2) -> None:
    """Both engines alive at once, each prompt timed on one then the other (so a busy machine
    slows both alike), ``rounds`` times; the faster round of each engine counts."""
    from treadle import Engine

    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    engines = [Engine(random_seed=0, log_level="warning", **base_kw),
               Engine(random_seed=0, log_level="warning", **base_kw, **spec_kw)]
    try:
        for e in engines:  # warm-up, then an empty prefix cache
            timed(e, prompts[0], {**params, "max_new_tokens": 16})
            e.flush_cache()
        best, metas = [float("inf"), float("inf")], []
        tokens = 0
        for _ in range(rounds):
            spent, tokens, metas = [0.0, 0.0], 0, []
            for prompt in prompts:
                for k, e in enumerate(engines):
                    n, dt, meta = timed(e, prompt, params)
                    spent[k] += dt
                tokens += n
                metas.append(meta)
            for e in engines:
                e.flush_cache()
            best = [min(b, s) for b, s in zip(best, spent)]
    finally:
        for e in engines:
            e.shutdown()
    verifies = sum(m.get("spec_verify_ct", 0) for m in metas)
    accepted = sum(m.get("spec_num_correct_drafts", 0) for m in metas)
    proposed = sum(m.get("spec_num_proposed_drafts", 0) for m in metas)
    res.record(name, prompts=len(prompts), new_tokens=new_tokens, base_tok_s=round(tokens / best[0], 2),
               spec_tok_s=round(tokens / best[1], 2), speedup=round(best[0] / best[1], 3),
               accept_length=round((verifies + accepted) / max(verifies, 1), 3),
               drafts_accepted=accepted, drafts_proposed=proposed)


def main() -> None:
    p = bench_parser(__doc__, tokenizer=True)
    p.add_argument("--shape", choices=sorted(SHAPES), help="a dummy-weight shape (GPU); default: the default model")
    p.add_argument("--algorithm", default="NGRAM", choices=["NGRAM", "STANDALONE", "EAGLE", "EAGLE3"])
    p.add_argument("--draft-model", default="", help="STANDALONE's draft model, or the EAGLE / EAGLE3 head's path")
    p.add_argument("--topk", type=int, default=0, help="speculative_eagle_topk (> 1: tree verification)")
    p.add_argument("--num-draft-tokens", type=int, default=0, help="speculative_num_draft_tokens (0: the default)")
    p.add_argument("--new-tokens", type=int, default=0, help="tokens per prompt (default: 256 GPU, 64 CPU)")
    p.add_argument("--parts", default="copy,no_repeat,no_draft")
    a = p.parse_args()
    spec_kw: dict[str, Any] = {"speculative_algorithm": a.algorithm}
    if a.algorithm != "NGRAM":
        spec_kw["speculative_draft_model_path"] = a.draft_model or "default"
    if a.topk:
        spec_kw["speculative_eagle_topk"] = a.topk
    if a.num_draft_tokens:
        spec_kw["speculative_num_draft_tokens"] = a.num_draft_tokens
    d = ""
    if a.shape:
        tok = a.tokenizer_dir or smollm2_tokenizer_dir()
        d = config_model_dir(os.path.join(CONFIGS, SHAPES[a.shape], "config.json"), tok, f"treadle-{a.shape}-")
        vocab = json.load(open(os.path.join(d, "config.json")))["vocab_size"]
        # two engines share the card: a fixed pool each (32k tokens: 4 GB at the 8B shape), not a share of free memory
        base_kw = {"model_path": d, "load_format": "dummy", "max_total_tokens": 32768, **engine_kwargs(a)}
    else:
        vocab = 49152
        base_kw = {"model_path": "default", **engine_kwargs(a)}
    new_tokens = a.new_tokens or (256 if a.shape else 64)
    res = Results("spec_bench", a.out, {**base_kw, **spec_kw}, shape=a.shape or "default")
    rng = random.Random(0)
    try:
        if "copy" in a.parts:
            if a.shape:
                spans = [[rng.randrange(100, vocab) for _ in range(200)] for _ in range(3)]
                prompts: list = [s + s[:100] for s in spans]
            else:
                prompts = TEXT_PROMPTS
            part(res, "copy", base_kw, spec_kw, prompts, new_tokens)
        if "no_repeat" in a.parts:
            prompts = [rng.sample(range(100, vocab), 300) for _ in range(3)]
            part(res, "no_repeat", base_kw, spec_kw, prompts, new_tokens)
        if "no_draft" in a.parts and a.algorithm == "NGRAM":  # 12-token matches only: almost never a draft
            prompts = [rng.sample(range(100, vocab), 300) for _ in range(3)]
            part(res, "no_draft", base_kw, {**spec_kw, "speculative_ngram_min_match_window_size": 12}, prompts,
                 new_tokens)
    finally:
        if d:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
