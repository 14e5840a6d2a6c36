"""Speculative decoding end to end on the default model (CPU): NGRAM and STANDALONE (a tiny random
draft model with the default tokenizer) give the tokens of ordinary decoding when greedy, keep the
sampled distribution, and work with logprobs, stop rules, chunked prefill and the prefix cache."""

from __future__ import annotations

import pytest
from scipy.stats import chi2_contingency

pytestmark = pytest.mark.e2e

CODE = ("def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total / len(xs)\n\n"
        "def variance(xs):\n    m = mean(xs)\n    total = 0\n    for x in xs:\n        total += (x - m) ** 2\n"
        "    return total / len(xs)\n")
STORY = ("The old lighthouse keeper climbed the stairs every evening. He lit the lamp, wiped the glass and "
         "watched the ships pass the rocks. One night the lamp went out, and he climbed the stairs again.")
# copy-heavy prompts: the answer repeats spans of the prompt (summarise, rewrite, code edit)
COPY_PROMPTS = [
    f"Rename the variable total to acc in this code:\n{CODE}\nHere is the code with total renamed to acc:\n",
    f"Rewrite the following text, keeping every sentence:\n{STORY}\nRewritten text:\n",
    f"Summarise in one sentence:\n{STORY}\nSummary:",
]
PROMPTS = COPY_PROMPTS + [
    "List the numbers from one to twelve: one, two, three,",
    "The capital of France is",
    "Repeat after me: red green blue, red green blue, red green blue,",
    "Write a haiku about the sea.",
    "Q: What is 12 + 7?\nA:",
]
GREEDY = {"temperature": 0, "max_new_tokens": 16}


@pytest.fixture(scope="module")
def ngram():
    from treadle import Engine

    # 64-token prefill chunks: a 150-token prompt is chunked (the shared engine takes it whole)
    eng = Engine(model_path="default", random_seed=0, speculative_algorithm="NGRAM",
                 speculative_num_draft_tokens=6, chunked_prefill_size=64)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def standalone(tmp_path_factory, default_model_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    from family_helpers import save_tiny
    from treadle import Engine

    draft = str(tmp_path_factory.mktemp("draft"))
    save_tiny(LlamaConfig, LlamaForCausalLM, draft, default_model_dir, num_hidden_layers=2, initializer_range=0.2)
    eng = Engine(model_path="default", random_seed=0, speculative_algorithm="STANDALONE",
                 speculative_draft_model_path=draft, speculative_num_steps=3)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def baseline(engine):
    """Greedy outputs of ordinary decoding (the shared engine), computed once."""
    return engine.generate(PROMPTS, GREEDY)


@pytest.mark.parametrize("which", ["ngram", "standalone"])
def test_greedy_tokens_identical(which, baseline, request):
    spec = request.getfixturevalue(which)
    out = spec.generate(PROMPTS, GREEDY)
    for want, got in zip(baseline, out):
        assert got["output_ids"] == want["output_ids"]
        assert got["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"]
        meta = got["meta_info"]
        assert meta["spec_verify_ct"] >= (meta["completion_tokens"] > 1)
        assert meta["spec_num_proposed_drafts"] >= meta["spec_num_correct_drafts"]
    accepted = sum(o["meta_info"]["spec_num_correct_drafts"] for o in out)
    verifies = sum(o["meta_info"]["spec_verify_ct"] for o in out)
    tokens = sum(o["meta_info"]["completion_tokens"] for o in out)
    print(f"\n{which}: {tokens} tokens, {verifies} verify steps, {accepted} drafts accepted")
    # every produced token after the first comes from a verify: accepted drafts + one each
    assert tokens - len(out) == verifies + accepted
    if which == "ngram":  # the copy-heavy prompts: tokens per verify step
        for name, o in zip(["code edit", "rewrite", "summary"], out):
            m = o["meta_info"]
            print(f"{name}: {m['spec_accept_length']:.2f} tokens/step "
                  f"({m['spec_num_correct_drafts']}/{m['spec_num_proposed_drafts']} drafts accepted)")
        copied = out[:2]  # the code edit and the rewrite copy long spans
        steps = sum(o["meta_info"]["spec_verify_ct"] for o in copied)
        assert sum(o["meta_info"]["completion_tokens"] - 1 for o in copied) / steps > 1.5


def test_logprobs_and_stop_rules(ngram, engine, baseline):
    """Target logprobs for accepted tokens; a stop string, a stop token and max_new_tokens that
    fall inside a verified chain end the output where ordinary decoding ends it."""
    first = baseline[0]["output_ids"]
    params = [{"temperature": 0, "max_new_tokens": 11}, {"temperature": 0, "max_new_tokens": 20, "stop": ["len(xs)"]},
              {"temperature": 0, "max_new_tokens": 20, "stop_token_ids": [first[9]]}]
    prompts = [COPY_PROMPTS[0]] * 3
    want = engine.generate(prompts, params, return_logprob=True, top_logprobs_num=2)
    got = ngram.generate(prompts, params, return_logprob=True, top_logprobs_num=2)
    for w, g in zip(want, got):
        assert g["output_ids"] == w["output_ids"] and g["text"] == w["text"]
        a, b = g["meta_info"], w["meta_info"]
        assert a["finish_reason"] == b["finish_reason"]
        assert len(a["output_token_logprobs"]) == len(b["output_token_logprobs"]) == len(g["output_ids"])
        for (la, ta, _), (lb, tb, _) in zip(a["output_token_logprobs"], b["output_token_logprobs"]):
            assert ta == tb and abs(la - lb) < 1e-4
        for ra, rb in zip(a["output_top_logprobs"], b["output_top_logprobs"]):
            assert [t for _, t, _ in ra] == [t for _, t, _ in rb]
    assert sum(g["meta_info"]["spec_num_correct_drafts"] for g in got) > 0


def test_chunked_prompt_and_prefix_cache(ngram, engine, hf_tokenizer):
    """A prompt the NGRAM engine prefills in 64-token chunks, then the same prompt continued by part
    of its output: the second request reuses cached KV that verify rows wrote, and gives the
    tokens of ordinary decoding."""
    prompt = "Copy this list: " + ", ".join(f"item {i}" for i in range(30)) + ". The list again: item 0, item 1,"
    ids = hf_tokenizer(prompt)["input_ids"]
    assert len(ids) > 128
    params = {"temperature": 0, "max_new_tokens": 16}
    first = ngram.generate(input_ids=ids, sampling_params=params)
    assert first["meta_info"]["spec_num_correct_drafts"] > 0
    longer = ids + first["output_ids"][:12]
    want = engine.generate(input_ids=longer, sampling_params=params)
    got = ngram.generate(input_ids=longer, sampling_params=params)
    assert got["meta_info"]["cached_tokens"] >= len(ids)
    assert got["output_ids"] == want["output_ids"]


def test_grammar_requests_decode_without_speculation(ngram):
    out = ngram.generate("Give a JSON object with a name:", {"temperature": 0, "max_new_tokens": 24,
                                                              "regex": r'\{"name": "[a-z]{1,8}"\}'})
    assert out["text"].startswith('{"name": "')
    assert out["meta_info"]["spec_verify_ct"] == 0


def _homogeneous(a: list[int], b: list[int]) -> float:
    """p-value of a chi-square test that two token samples come from one distribution (rare tokens
    pooled so every expected count is at least 5)."""
    keys = sorted(set(a) | set(b), key=lambda t: -(a.count(t) + b.count(t)))
    table, rest = [], [0, 0]
    for t in keys:
        row = [a.count(t), b.count(t)]
        if sum(row) >= 10:
            table.append(row)
        else:
            rest = [rest[0] + row[0], rest[1] + row[1]]
    if sum(rest):
        table.append(rest)
    if len(table) < 2:
        return 1.0
    return chi2_contingency(table).pvalue

def assert_sampling_matches(engine, spec, prompt: str) -> None:
    """120 samples of 4 tokens (temperature 1, top-k 4) from ``engine`` and from the speculating
    ``spec``: some drafts are accepted, and the second to fourth tokens (the verify steps')
    pass the chi-square test of one distribution."""
    params = {"temperature": 1.0, "top_k": 4, "max_new_tokens": 4}
    base = [o["output_ids"] for o in engine.generate([prompt] * 120, params)]
    got = spec.generate([prompt] * 120, params)
    assert sum(o["meta_info"]["spec_num_correct_drafts"] for o in got) > 0
    got_ids = [o["output_ids"] for o in got]
    for pos in (1, 2, 3):
        a = [ids[pos] for ids in base if len(ids) > pos]
        b = [ids[pos] for ids in got_ids if len(ids) > pos]
        assert _homogeneous(a, b) > 1e-3, pos


def test_sampling_keeps_the_distribution(ngram, engine):
    """Chi-square: the second to fourth sampled tokens (from verify steps) are distributed as
    without speculation. The prompt makes n-gram drafts likely but not certain. (Rejection
    sampling against a draft model's q: tests/unit/test_spec_decoding.py.)"""
    assert_sampling_matches(engine, ngram, "red green blue, red green blue, red green")


def test_standalone_sampling_runs_and_counts(standalone):
    """Sampled STANDALONE requests (draft distributions q through the rejection sampler): every
    token after the first comes from a verify, and two requests with one seed give one output."""
    params = {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 8, "ignore_eos": True, "sampling_seed": 7}
    out = standalone.generate([PROMPTS[3], PROMPTS[3], PROMPTS[4]], params)
    for o in out:
        m = o["meta_info"]
        assert len(o["output_ids"]) == 8
        assert m["spec_verify_ct"] + m["spec_num_correct_drafts"] == 7
    assert out[0]["output_ids"] == out[1]["output_ids"]
