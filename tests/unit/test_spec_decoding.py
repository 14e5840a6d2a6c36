"""Speculative decoding's pure parts: n-gram drafts, chain acceptance (greedy and rejection
sampling, chi-square against the target distribution), verify-row flattening, arguments."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from treadle.gpu_worker.spec_verify import accept_chain, accept_greedy, target_probs
from treadle.gpu_worker.step_inputs import PlanLimits, flatten_plan
from treadle.runtime.messages import ForwardPlan, PlanRow, SamplingSpec
from treadle.runtime.server_args import ServerArgs
from treadle.scheduler_proc.spec_ngram import ngram_draft

P_MIN = 1e-3  # a correct sampler fails one test in a thousand runs


def test_ngram_draft_longest_then_most_recent_match():
    ids = [5, 1, 2, 3, 7, 8, 0, 2, 3, 9, 1, 2, 3]
    assert ngram_draft(ids, 2) == [7, 8]  # [1, 2, 3] matches at 1..3 (3 tokens) beats [2, 3] at 7..8
    assert ngram_draft([4, 2, 3, 9, 6, 2, 3, 1, 2, 3], 1) == [1]  # ties: the most recent occurrence
    assert ngram_draft([1, 2, 3], 4) == []
    assert ngram_draft([1, 2, 3, 1], 0) == []
    assert ngram_draft([1, 2, 3, 1], 5) == [2, 3, 1]  # stops at the sequence end
    assert ngram_draft([9, 2, 3, 8, 3], 3, min_window=2) == []  # only a 1-token match exists


def test_accept_greedy():
    assert accept_greedy([4, 5, 6, 7], [4, 5, 6]) == [4, 5, 6, 7]
    assert accept_greedy([4, 9, 6, 7], [4, 5, 6]) == [4, 9]
    assert accept_greedy([1, 2], [3]) == [1]


def _dists(seed: int, k: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(k, vocab, generator=g) * 1.5, dim=-1)


@pytest.mark.parametrize("point_mass", [True, False])
def test_rejection_sampling_keeps_the_target_distribution(point_mass):
    """Chi-square: the first produced token follows p_0, and the second (after an accepted first
    draft) follows p_1, whether the drafts are fixed (n-gram) or drawn from a draft model's q."""
    vocab, trials = 5, 4000
    p, q = _dists(0, 3, vocab), _dists(1, 2, vocab)
    gen = torch.Generator().manual_seed(2)
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(trials):
        if point_mass:
            drafts, qd = p[:2].argmax(dim=-1).tolist(), None  # likely drafts: many reach the second
        else:
            drafts, qd = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(2)], q
        toks = accept_chain(p, drafts, qd, gen)
        first[toks[0]] += 1
        if len(toks) > 1:
            second[toks[1]] += 1
    assert chisquare(first.numpy(), (p[0] * trials).numpy()).pvalue > P_MIN
    n2 = second.sum()
    assert n2 > 300
    assert chisquare(second.numpy(), (p[1] * n2).numpy()).pvalue > P_MIN


def test_target_probs_filters_like_the_sampler():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    p = target_probs(logits, SamplingSpec(temperature=0.5, top_k=2))
    assert p[0, 2:].sum() == 0 and abs(float(p.sum()) - 1) < 1e-6
    ref = torch.softmax(logits[0, :2] / 0.5, dim=-1)
    assert torch.allclose(p[0, :2], ref, atol=1e-6)


def test_flatten_puts_verify_positions_after_the_sampling_rows():
    plan = ForwardPlan(step=1, rows=[
        PlanRow(0, [5, 6, 7], 4, [10, 11, 12], spec=2),  # last token 5, drafts 6 and 7
        PlanRow(1, [9], 3, [20]),
    ])
    s = flatten_plan(plan, PlanLimits(4, 64, 64, 100), lambda slot: SamplingSpec(), extras=True, report=True,
                     takes_images=False, model_name="m", lora=False)
    assert s.sample_rows == [1] and s.logits_indices == [3, 0, 1, 2]
    assert s.spec_rows == [(0, 0, 3)]
    with pytest.raises(ValueError, match="drafts"):
        flatten_plan(ForwardPlan(step=1, rows=[PlanRow(0, [5], 4, [10], spec=1)]), PlanLimits(4, 64, 64, 100),
                     lambda slot: SamplingSpec(), extras=True, report=True, takes_images=False, model_name="m",
                     lora=False)


def test_spec_args_checked_and_resolved():
    a = ServerArgs(speculative_algorithm="ngram").resolved()
    assert (a.speculative_algorithm, a.speculative_num_draft_tokens, a.disable_overlap_schedule) == ("NGRAM", 8, True)
    a = ServerArgs(speculative_algorithm="STANDALONE", speculative_draft_model_path="default").resolved()
    assert (a.speculative_num_steps, a.speculative_num_draft_tokens) == (3, 4)
    for bad, field in [({"speculative_algorithm": "MEDUSA"}, "speculative_algorithm"),
                       ({"speculative_algorithm": "NGRAM", "speculative_num_draft_tokens": 0},
                        "speculative_num_draft_tokens"),
                       ({"speculative_algorithm": "STANDALONE"}, "speculative_draft_model_path"),
                       ({"speculative_draft_model_path": "default"}, "speculative_draft_model_path"),
                       ({"speculative_ngram_min_match_window_size": 5, "speculative_ngram_max_match_window_size": 2},
                        "speculative_ngram_min_match_window_size")]:
        with pytest.raises(ValueError, match=field):
            ServerArgs(**bad)
    with pytest.raises(ValueError, match="speculative_draft_model_path"):
        ServerArgs(speculative_algorithm="EAGLE3")
    with pytest.raises(ValueError, match="speculative_num_draft_tokens=9"):
        ServerArgs(speculative_algorithm="EAGLE", speculative_draft_model_path="d", speculative_eagle_topk=2,
                   speculative_num_steps=3, speculative_num_draft_tokens=9)
    a = ServerArgs(speculative_algorithm="EAGLE", speculative_draft_model_path="d", speculative_eagle_topk=4,
                   device="cpu").resolved()
    assert (a.speculative_num_steps, a.speculative_num_draft_tokens) == (3, 9)
    ServerArgs(speculative_algorithm="NGRAM", speculative_eagle_topk=4, attention_backend="triton").check_supported()
    with pytest.raises(NotImplementedError, match="STANDALONE drafts chains only"):
        ServerArgs(speculative_algorithm="STANDALONE", speculative_draft_model_path="d",
                   speculative_eagle_topk=2).check_supported()
    ServerArgs(speculative_algorithm="EAGLE3", speculative_draft_model_path="d", tp_size=2).check_supported()
    for alg in ("EAGLE3", "STANDALONE"):  # heads and draft models run beside a whole target, not a stage
        with pytest.raises(NotImplementedError, match=f"'{alg}' with pp_size=2"):
            ServerArgs(speculative_algorithm=alg, speculative_draft_model_path="d", pp_size=2).check_supported()
    assert not ServerArgs().resolved().disable_overlap_schedule
