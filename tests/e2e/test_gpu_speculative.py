"""Speculative decoding on CUDA: the Triton extend kernel verifies drafts; float32 so that greedy
tokens compare exactly with ordinary decoding (which runs the decode kernel and CUDA graphs; in
bfloat16 the two kernels round differently). NGRAM and STANDALONE (the same model as its own draft:
every draft is accepted) on seeded random weights of the SmolLM2-135M shape, plus sampled requests
running to length; EAGLE / EAGLE3 heads, and tree verification (its steps attend through the
torch-native backend, the Triton kernels having no tree mask)."""

from __future__ import annotations

import pytest

from gpu_helpers import build_random_model, needs_gpus, shape_dir

pytestmark = [*needs_gpus(1), pytest.mark.e2e]

PROMPTS = [
    "Copy this list: " + ", ".join(f"item {i}" for i in range(40)) + ". The list again: item 0, item 1,",
    "def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total / len(xs)\n\n"
    "Rewrite mean with the variable total renamed to acc:\n",
    "The capital of France is",
    "Repeat after me: red green blue, red green blue, red green blue,",
    "Write a haiku about the sea.",
    "Q: What is 12 + 7?\nA:",
    "Once upon a time, in a small village,",
    "List the numbers from one to twelve: one, two, three,",
]
GREEDY = {"temperature": 0, "max_new_tokens": 48}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("spec")
    build_random_model(shape_dir("smollm2", str(d / "config")), str(d / "model"), 0.1)
    return str(d / "model")


def _run(model: str, **kw):
    from treadle import Engine

    e = Engine(model_path=model, dtype="float32", random_seed=0, mem_fraction_static=0.4, **kw)
    try:
        greedy = e.generate(PROMPTS, GREEDY)
        sampled = e.generate(PROMPTS, {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 32, "ignore_eos": True})
        return greedy, sampled
    finally:
        e.shutdown()


@pytest.mark.parametrize("spec", [{"speculative_algorithm": "NGRAM"},
                                  {"speculative_algorithm": "STANDALONE", "speculative_draft_model_path": "self"}])
def test_gpu_speculative_greedy_identical(spec, model):
    if spec.get("speculative_draft_model_path") == "self":
        spec = {**spec, "speculative_draft_model_path": model}
    base, _ = _run(model)
    got, sampled = _run(model, **spec)
    for b, g in zip(base, got):
        assert g["output_ids"] == b["output_ids"]
    verifies = sum(o["meta_info"]["spec_verify_ct"] for o in got)
    accepted = sum(o["meta_info"]["spec_num_correct_drafts"] for o in got)
    print(f"\n{spec['speculative_algorithm']}: identical; {accepted} drafts accepted in {verifies} verify steps")
    assert accepted > 0
    for o in sampled:
        m = o["meta_info"]
        assert len(o["output_ids"]) == 32 and m["spec_verify_ct"] + m["spec_num_correct_drafts"] == 31


@pytest.mark.parametrize("alg,topk", [("EAGLE", 1), ("EAGLE3", 1), ("NGRAM", 4), ("EAGLE3", 4)])
def test_gpu_eagle_heads_and_trees_greedy_identical(alg, topk, model, tmp_path):
    """EAGLE / EAGLE3 heads (tiny random, the SmolLM2 shape's hidden size) drafting chains, and
    trees (NGRAM, EAGLE3 top-4), whose verify steps run attention through the torch-native backend
    (SDPA with the tree mask) beside the Triton decode: greedy tokens as ordinary decoding; sampled
    requests run to length."""
    from spec_heads import make_eagle_head

    kw = {"speculative_algorithm": alg, "speculative_eagle_topk": topk}
    if alg != "NGRAM":
        kw["speculative_draft_model_path"] = make_eagle_head(str(tmp_path / "head"), alg == "EAGLE3")
    base, _ = _run(model)
    got, sampled = _run(model, **kw)
    for b, g in zip(base, got):
        assert g["output_ids"] == b["output_ids"]
    m = [o["meta_info"] for o in got]
    print(f"\n{alg} topk {topk}: identical; {sum(x['spec_num_correct_drafts'] for x in m)} of "
          f"{sum(x['spec_num_proposed_drafts'] for x in m)} drafts accepted in {sum(x['spec_verify_ct'] for x in m)} "
          "verify steps")
    if alg == "NGRAM":
        assert sum(x["spec_num_correct_drafts"] for x in m) > 0
    for o in sampled:
        x = o["meta_info"]
        assert len(o["output_ids"]) == 32 and x["spec_verify_ct"] + x["spec_num_correct_drafts"] == 31


@pytest.mark.parametrize("alg,topk", [("EAGLE", 1), ("EAGLE3", 4)])
def test_gpu_eagle_heads_at_tp2(alg, topk, model, tmp_path):
    """EAGLE chain and EAGLE3 tree heads at ``tp_size=2`` on two GPUs (NCCL, the one-shot all-reduce
    and the fused all-reduce + RMSNorm that the EAGLE3 taps read after): float32 greedy tokens of
    ordinary tp_size=1 decoding, and per request the tp_size=1 speculative engine's drafts."""
    import torch

    from spec_heads import make_eagle_head

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    kw = {"speculative_algorithm": alg, "speculative_eagle_topk": topk,
          "speculative_draft_model_path": make_eagle_head(str(tmp_path / "head"), alg == "EAGLE3")}
    base, _ = _run(model)
    one, _ = _run(model, **kw)
    two, sampled = _run(model, tp_size=2, **kw)
    keys = ("spec_verify_ct", "spec_num_correct_drafts", "spec_num_proposed_drafts")
    for b, o, t in zip(base, one, two):
        assert t["output_ids"] == b["output_ids"]
        assert [t["meta_info"][k] for k in keys] == [o["meta_info"][k] for k in keys]
    for o in sampled:
        x = o["meta_info"]
        assert len(o["output_ids"]) == 32 and x["spec_verify_ct"] + x["spec_num_correct_drafts"] == 31
