"""The sampler's distributions (chi-square against the analytic renormalized ones) and seeded streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from treadle.gpu_worker.sampler import Sampler
from treadle.runtime.messages import SamplingSpec

N = 20_000
_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=_CUDA)])
def dev(request) -> torch.device:
    return torch.device(request.param)

LOGITS = torch.tensor([2.0, 1.6, 1.5, 1.1, 0.9, 0.7, 0.2, 0.0, -0.4, -1.0, -2.0, -3.5])

# Every filter alone and combined, all in one batch, each spec different.
SPECS = [
    SamplingSpec(),
    SamplingSpec(temperature=0.6),
    SamplingSpec(temperature=2.0),
    SamplingSpec(top_k=4),
    SamplingSpec(top_p=0.7),
    SamplingSpec(min_p=0.3),
    SamplingSpec(temperature=1.4, top_k=8, top_p=0.85, min_p=0.08),
]


def analytic(spec: SamplingSpec) -> np.ndarray:
    """Softmax at the temperature; walk tokens best first keeping those inside top-k, whose mass
    before them is <= top_p, and with p >= min_p * p_max; renormalize."""
    p = torch.softmax(LOGITS.double() / spec.temperature, -1).numpy()
    keep, before = np.zeros_like(p), 0.0
    for rank, i in enumerate(np.argsort(-p, kind="stable")):
        if (spec.top_k < 1 or rank < spec.top_k) and before <= spec.top_p and p[i] >= spec.min_p * p.max():
            keep[i] = p[i]
        before += p[i]
    return keep / keep.sum()


def chi2_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square p-value, bins with expected count < 5 merged into one."""
    exp = probs * counts.sum()
    big = exp >= 5
    obs_b, exp_b = list(counts[big]), list(exp[big])
    if (~big).any() and exp[~big].sum() > 0:
        obs_b.append(counts[~big].sum())
        exp_b.append(exp[~big].sum())
    return chisquare(obs_b, exp_b).pvalue


def test_distributions_match_analytic(dev):
    sm = Sampler(len(SPECS), dev, seed=1)
    for s, sp in enumerate(SPECS):
        sm.set_slot(s, sp)
    slots = [s for s in range(len(SPECS)) for _ in range(N)]  # each slot's row repeated N times, one call
    toks = sm.sample(LOGITS.to(dev).repeat(len(slots), 1), slots).view(len(SPECS), N).cpu()
    for s, sp in enumerate(SPECS):
        counts = np.bincount(toks[s].numpy(), minlength=len(LOGITS)).astype(float)
        probs = analytic(sp)
        assert counts[probs == 0].sum() == 0, f"{sp}: sampled a filtered token"
        assert (probs > 0).sum() >= 3, "each case must keep several tokens to test anything"
        assert chi2_p(counts, probs) > 1e-3, f"{sp}: {counts / N} vs {probs}"


def test_filters_keep_the_expected_sets():
    kept = {i: set(np.flatnonzero(analytic(sp)).tolist()) for i, sp in enumerate(SPECS)}
    assert kept[3] == {0, 1, 2, 3}
    assert kept[0] == set(range(12)) and len(kept[4]) < 12 and len(kept[5]) < 12 and len(kept[6]) < 8


OTHERS = [SamplingSpec(temperature=0.5 + 0.1 * i, top_k=(i % 4) * 5 - 1, top_p=1.0 - 0.03 * i,
                       seed=(7 + i if i % 3 == 0 else None)) for i in range(16)]


def seeded_run(dev: torch.device, spec: SamplingSpec, crowd: bool, steps: int = 40, gen_seed: int = 0) -> list[int]:
    """Tokens of ``spec``'s slot, sampled alone or as row 9 of 17 with 16 other specs."""
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(3)).to(dev)
    sm = Sampler(17, dev, seed=gen_seed)
    sm.set_slot(16, spec)
    for s, sp in enumerate(OTHERS if crowd else []):
        sm.set_slot(s, sp)
    slots = list(range(9)) + [16] + list(range(9, 16)) if crowd else [16]
    row = slots.index(16)
    return [sm.sample(logits.repeat(len(slots), 1), slots)[row].item() for _ in range(steps)]


def test_seeded_stream_independent_of_batch_and_global_seed(dev):
    spec = SamplingSpec(temperature=1.2, top_p=0.95, seed=1234)
    alone = seeded_run(dev, spec, crowd=False)
    assert seeded_run(dev, spec, crowd=True, gen_seed=99) == alone
    assert len(set(alone)) > 5  # really samples
    assert seeded_run(dev, SamplingSpec(temperature=1.2, top_p=0.95, seed=1235), crowd=False) != alone
    assert seeded_run(dev, SamplingSpec(temperature=1.2, top_p=0.95), crowd=False, gen_seed=5) != alone


def test_seeded_stream_continues_after_readmission(dev):
    """A request re-admitted with ``prior_output`` picks its seeded stream up where it stopped."""
    spec = SamplingSpec(temperature=1.0, seed=77)
    whole = seeded_run(dev, spec, crowd=False, steps=30)
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(3)).to(dev)
    sm = Sampler(4, dev, seed=5)
    sm.set_slot(2, spec, prior_output=whole[:12])
    assert [sm.sample(logits, [2]).item() for _ in range(18)] == whole[12:]
