"""Tree verification and EAGLE draft heads end to end on the default model (CPU): NGRAM with a trie
of continuations (``speculative_eagle_topk`` 4), an EAGLE head drafting chains (with its own
embedding) and an EAGLE3 head drafting top-k trees (tiny "echo" heads built here, hidden size 576,
one layer) give the tokens of ordinary decoding when greedy, also at ``tp_size=2`` (with the
tp_size=1 engines' acceptance); seeded sampled requests at ``tp_size=2`` give the tp_size=1
engines' tokens; sampled NGRAM trees keep the distribution (chi-square)."""

from __future__ import annotations

import pytest

from spec_heads import make_eagle_head
from test_speculative import COPY_PROMPTS, GREEDY, PROMPTS, assert_sampling_matches

pytestmark = pytest.mark.e2e
TREE_PROMPTS = PROMPTS + ["Write the number zero ten times: 0 0 0 0 0 0"]  # period 2: the EAGLE3 echo head's
PENGUINS = "Write the word penguin six times: penguin, penguin, penguin,"


@pytest.fixture(scope="module")
def ngram_tree():
    from treadle import Engine

    eng = Engine(model_path="default", random_seed=0, speculative_algorithm="NGRAM", speculative_eagle_topk=4,
                 speculative_num_draft_tokens=8)
    yield eng
    eng.shutdown()


# EAGLE drafts chains, EAGLE3 trees; echo heads (``spec_heads``) whose drafts are sometimes accepted.
# EAGLE carries its own embedding: the target's with the rows of the period-2 prompt's two ids swapped,
# so it drafts the other id of the pair (the target's embedding would draft the last id again, which
# the period-2 output rejects), and " penguin"'s row (id 35,084: in TP rank 1's half of the vocabulary)
# set to ","'s, so it drafts "," after " penguin" (``PENGUINS``). EAGLE3 shares the target's embedding
# and taps the embedding, a middle layer's input and the final norm's input (every kind of tap), over
# an odd draft vocabulary (the last TP shard of its LM head padded) mapped by a d2t of gaps.
SPEC = {"eagle": dict(speculative_algorithm="EAGLE", speculative_num_steps=3),
        "eagle3": dict(speculative_algorithm="EAGLE3", speculative_num_steps=3, speculative_eagle_topk=4,
                       speculative_num_draft_tokens=8)}
HEADS = {"eagle": dict(eagle3=False), "eagle3": dict(eagle3=True, aux_layers=[-1, 14, 29], draft_vocab=4001)}


@pytest.fixture(scope="module")
def heads(tmp_path_factory, default_model_dir, hf_tokenizer):
    from safetensors import safe_open

    with safe_open(f"{default_model_dir}/model.safetensors", "pt") as f:  # SmolLM2 ties its LM head to this
        echo = f.get_tensor("model.embed_tokens.weight").float()
    a, b = hf_tokenizer(TREE_PROMPTS[-1])["input_ids"][-2:]  # " " and "0"
    penguin, comma = hf_tokenizer(PENGUINS)["input_ids"][-2:]
    own = echo.clone()
    own[[a, b]] = echo[[b, a]]
    own[penguin] = echo[comma]
    kw = {"eagle": dict(embed=own), "eagle3": {}}
    return {k: make_eagle_head(str(tmp_path_factory.mktemp(k)), std=0.005, echo=echo, **v, **kw[k])
            for k, v in HEADS.items()}


def _spec_engine(heads, which: str, **kw):
    from treadle import Engine

    return Engine(model_path="default", random_seed=0, speculative_draft_model_path=heads[which], **SPEC[which], **kw)


@pytest.fixture(scope="module")
def eagle(heads):
    eng = _spec_engine(heads, "eagle")
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def eagle3(heads):
    eng = _spec_engine(heads, "eagle3")
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def baseline(engine):
    return engine.generate(TREE_PROMPTS, GREEDY)


@pytest.fixture(scope="module")
def greedy_runs() -> dict:
    """Each speculative engine's greedy outputs on ``TREE_PROMPTS``, generated once for the module."""
    return {}


def _greedy(which: str, request, runs: dict) -> list[dict]:
    if which not in runs:
        runs[which] = request.getfixturevalue(which).generate(TREE_PROMPTS, GREEDY)
    return runs[which]


@pytest.mark.parametrize("which", ["ngram_tree", "eagle", "eagle3"])
def test_greedy_tokens_identical(which, baseline, request, greedy_runs):
    out = _greedy(which, request, greedy_runs)
    for want, got in zip(baseline, out):
        assert got["output_ids"] == want["output_ids"]
        assert got["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"]
    m = [o["meta_info"] for o in out]
    tokens, verifies = sum(x["completion_tokens"] for x in m), sum(x["spec_verify_ct"] for x in m)
    accepted, proposed = sum(x["spec_num_correct_drafts"] for x in m), sum(x["spec_num_proposed_drafts"] for x in m)
    print(f"\n{which}: {tokens} tokens, {verifies} verify steps, {accepted}/{proposed} drafts accepted")
    assert tokens - len(out) == verifies + accepted
    if which == "ngram_tree":  # the code edit and the rewrite copy long spans of their prompts
        for name, o in zip(["code edit", "rewrite", "summary"], out):
            x = o["meta_info"]
            print(f"{name}: {x['spec_accept_length']:.2f} tokens/step "
                  f"({x['spec_num_correct_drafts']}/{x['spec_num_proposed_drafts']} drafts accepted)")
        copied = [o["meta_info"] for o in out[:2]]
        assert sum(x["completion_tokens"] - 1 for x in copied) / sum(x["spec_verify_ct"] for x in copied) > 1.5
    else:  # a random head: drafts are proposed (4 a step at most: spec_num_steps 3, or 7 tree nodes)
        assert proposed > verifies
    if which == "eagle":  # its own embedding drafts the period-2 output's next id: most drafts pass there
        x = out[-1]["meta_info"]
        print(f"period 2: {x['spec_num_correct_drafts']}/{x['spec_num_proposed_drafts']} drafts accepted")
        assert x["spec_num_correct_drafts"] >= x["spec_num_proposed_drafts"] / 2


# Seeded sampled requests (the period-2 prompt twice with one seed, period 3, and " penguin," repeated,
# where the EAGLE head's drafts pass only if TP rank 1 holds the right rows of its embedding): their
# verify steps draw (tree or chain rejection sampling) from generators seeded per request.
SAMPLED_PROMPTS = [TREE_PROMPTS[-1], TREE_PROMPTS[-1], PROMPTS[5], PENGUINS]
SAMPLED = [{"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 10, "ignore_eos": True, "sampling_seed": s}
           for s in (1, 1, 2, 3)]
AFTER = {"temperature": 0, "max_new_tokens": 3}


@pytest.fixture(scope="module")
def sampled_ids(hf_tokenizer) -> list[list[int]]:
    return [hf_tokenizer(p)["input_ids"] for p in SAMPLED_PROMPTS]


@pytest.fixture(scope="module")
def tp2_runs() -> dict:
    """Per head, what its ``tp_size=2`` engine gave (one engine each, started once and shut down
    before the next starts): greedy outputs, seeded sampled outputs and their greedy continuations."""
    return {}


def _tp2(which: str, heads, runs: dict, ids: list[list[int]]) -> tuple[list[dict], list[dict], list[dict]]:
    if which not in runs:
        with _spec_engine(heads, which, tp_size=2) as tp:
            greedy = tp.generate(TREE_PROMPTS, GREEDY)
            sampled = tp.generate(input_ids=ids, sampling_params=SAMPLED)
            after = tp.generate(input_ids=[i + o["output_ids"] for i, o in zip(ids, sampled)], sampling_params=AFTER)
        runs[which] = greedy, sampled, after
    return runs[which]


@pytest.mark.parametrize("which", ["eagle", "eagle3"])
def test_tp2_heads_match_tp1(which, baseline, request, greedy_runs, heads, tp2_runs, sampled_ids):
    """The same head at ``tp_size=2`` (gloo; head sharded like the target, EAGLE's own embedding
    vocab-parallel, EAGLE3's taps read after the all-reduce, drafts broadcast from rank 0): the
    greedy tokens of ordinary tp_size=1 decoding, and per request the tp_size=1 speculative
    engine's verify steps and accepted / proposed drafts."""
    want = _greedy(which, request, greedy_runs)
    got = _tp2(which, heads, tp2_runs, sampled_ids)[0]
    keys = ("spec_verify_ct", "spec_num_correct_drafts", "spec_num_proposed_drafts")
    for plain, one, two in zip(baseline, want, got):
        assert two["output_ids"] == plain["output_ids"]
        assert [two["meta_info"][k] for k in keys] == [one["meta_info"][k] for k in keys]
    assert sum(o["meta_info"]["spec_num_correct_drafts"] for o in got) > 0  # some drafts were accepted


@pytest.mark.parametrize("which", ["eagle", "eagle3"])
def test_tp2_sampling_matches_tp1(which, request, engine, greedy_runs, heads, tp2_runs, sampled_ids):
    """Seeded sampled requests at ``tp_size=2``: both ranks accept with the same draws (the gathered
    logits and the request's seeded generator), so the tokens and acceptance are the tp_size=1
    speculative engine's for the same seeds, however many drafts a verify accepted; a rank that
    accepted another path would leave its KV (target and head, each holding half the heads) out of
    step and change the tokens after. The engine then serves greedy continuations of those outputs
    over the prefix cache (the KV the sampled verify steps wrote) with ordinary decoding's tokens."""
    _, got, after = _tp2(which, heads, tp2_runs, sampled_ids)
    _greedy(which, request, greedy_runs)  # the tp_size=1 engine's history (prefix cache) as the tp_size=2 one's
    want = request.getfixturevalue(which).generate(input_ids=sampled_ids, sampling_params=SAMPLED)
    keys = ("spec_verify_ct", "spec_num_correct_drafts", "spec_num_proposed_drafts")
    for one, two in zip(want, got):
        assert two["output_ids"] == one["output_ids"] and len(two["output_ids"]) == 10
        assert [two["meta_info"][k] for k in keys] == [one["meta_info"][k] for k in keys]
    assert got[0]["output_ids"] == got[1]["output_ids"]  # one seed, one output
    assert sum(o["meta_info"]["spec_num_correct_drafts"] for o in got) >= 3  # verifies that accepted drafts
    if which == "eagle":  # "," drafted after " penguin" from rank 1's rows of the head's own embedding
        assert got[3]["meta_info"]["spec_num_correct_drafts"] > 0
    print(f"\n{which} tp2 sampled: {[o['meta_info']['spec_num_correct_drafts'] for o in got]} drafts accepted")
    longer = [i + o["output_ids"] for i, o in zip(sampled_ids, got)]
    plain = engine.generate(input_ids=longer, sampling_params=AFTER)
    for ids, p, a in zip(longer, plain, after):
        assert a["output_ids"] == p["output_ids"]
        assert a["meta_info"]["cached_tokens"] > len(ids) - 10  # KV of the sampled verify steps reused


def test_tree_sampling_keeps_the_distribution(ngram_tree, engine):
    """Chi-square: the second to fourth sampled tokens (from tree verify steps, several n-gram
    branches tried in turn) are distributed as without speculation."""
    assert_sampling_matches(engine, ngram_tree, "red green blue, red green yellow, red green blue, red green")


def test_eagle_sampling_and_logprobs(eagle3, engine):
    """Sampled EAGLE3 rows count every token after the first as a verify result, one seed gives
    one output; greedy logprobs are the target's."""
    params = {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 8, "ignore_eos": True, "sampling_seed": 7}
    out = eagle3.generate([PROMPTS[3], PROMPTS[3], PROMPTS[4]], params)
    for o in out:
        m = o["meta_info"]
        assert len(o["output_ids"]) == 8 and m["spec_verify_ct"] + m["spec_num_correct_drafts"] == 7
    assert out[0]["output_ids"] == out[1]["output_ids"]
    greedy = {"temperature": 0, "max_new_tokens": 6}
    want = engine.generate(COPY_PROMPTS[0], greedy, return_logprob=True)
    got = eagle3.generate(COPY_PROMPTS[0], greedy, return_logprob=True)
    assert got["output_ids"] == want["output_ids"]
    for (la, ta, _), (lb, tb, _) in zip(got["meta_info"]["output_token_logprobs"],
                                        want["meta_info"]["output_token_logprobs"]):
        assert ta == tb and abs(la - lb) < 1e-4


def test_tree_logprobs_follow_the_accepted_path(ngram_tree, engine):
    """Target logprobs (chosen and top-2) of tokens accepted along tree paths, as ordinary decoding
    reports them."""
    params = {"temperature": 0, "max_new_tokens": 14}
    want = engine.generate(COPY_PROMPTS[:2], params, return_logprob=True, top_logprobs_num=2)
    got = ngram_tree.generate(COPY_PROMPTS[:2], params, return_logprob=True, top_logprobs_num=2)
    assert sum(g["meta_info"]["spec_num_correct_drafts"] for g in got) > 0
    for w, g in zip(want, got):
        assert g["output_ids"] == w["output_ids"]
        a, b = g["meta_info"], w["meta_info"]
        for (la, ta, _), (lb, tb, _) in zip(a["output_token_logprobs"], b["output_token_logprobs"], strict=True):
            assert ta == tb and abs(la - lb) < 1e-4
        for ra, rb in zip(a["output_top_logprobs"], b["output_top_logprobs"], strict=True):
            assert [t for _, t, _ in ra] == [t for _, t, _ in rb]
